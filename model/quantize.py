"""The int8 encoder: dynamic int8 quantisation of the MatMuls, after activation smoothing.

Dynamic quantisation gives each activation tensor a single int8 scale per call. In BERT-style encoders a few
hidden channels carry values tens of times larger than the others, so that scale spends most of the 256 levels
on them and rounds the rest coarsely: on the default model one MELD dev label in twenty changed. Smoothing
(Xiao et al. 2023, SmoothQuant) divides input channel j of a MatMul by s_j and multiplies row j of its weight by
s_j, which leaves the product unchanged in exact arithmetic, with s_j = amax_j**alpha / wmax_j**(1 - alpha)
(amax_j: the largest |x_j| seen on calibration inputs, wmax_j: the largest |w| in row j). The weights are then
quantised per output channel, where their larger rows cost far less than outlier activations did.

The activation ranges are measured once, on the fp32 graph, and kept keyed by the module path of each Linear
(recorded by the exporter in the node metadata), so they apply to any later export of the same weights.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from safetensors.numpy import load_file, save_file

if TYPE_CHECKING:
    from model.preprocess import Preprocessor

SMOOTHING_ALPHA = 0.9  # of 0.5-1.0 on MELD train dialogues, 0.9 changed the fewest labels
RANGES_FILE = "int8_ranges.safetensors"
NAME_SCOPES = "pkg.torch.onnx.name_scopes"

ActivationRanges = dict[str, np.ndarray]  # module path of a Linear -> max |input| per input channel, float32


def reads_filterbank(node: onnx.NodeProto) -> bool:
    """The mel filterbank's MatMul stays fp32 and unsmoothed: the power spectrum it weighs spans many decades."""
    return any("fbank" in name for name in node.input)


def _constant_weight_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMuls whose B is a 2-D weight, the filterbank's excepted."""
    weights = {i.name for i in model.graph.initializer if len(i.dims) == 2}
    return [
        node
        for node in model.graph.node
        if node.op_type == "MatMul" and node.input[1] in weights and not reads_filterbank(node)
    ]


def module_path(node: onnx.NodeProto) -> str | None:
    """The PyTorch module a node was exported from ('text.bert.encoder.layer.0.output.dense'), if recorded."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES:
            scopes = ast.literal_eval(prop.value)
            return str(scopes[-2]) if len(scopes) >= 2 else None
    return None


def text_calibration(
    preprocessor: Preprocessor, texts: Sequence[str], batch_size: int = 32
) -> Iterator[dict[str, np.ndarray]]:
    """Encoder feeds of `texts` (text only), batched as the runtime batches them."""
    from model.preprocess import collate

    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        yield collate(preprocessor.prepare(chunk, [None] * len(chunk))).feeds()


def measure_activation_ranges(encoder: Path, calibration: Iterable[Mapping[str, np.ndarray]]) -> ActivationRanges:
    """Per-channel max |input| of every weight MatMul of the fp32 `encoder`, over the `calibration` feeds (the
    Linears that share an input, such as query, key and value, get the same ranges)."""
    model = onnx.load(str(encoder))
    paths: dict[str, list[str]] = defaultdict(list)  # input tensor -> module paths of the MatMuls reading it
    for node in _constant_weight_matmuls(model):
        if path := module_path(node):
            paths[node.input[0]].append(path)
    for name in paths:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = list(paths)
    ranges: ActivationRanges = {}
    for feeds in calibration:
        for name, value in zip(names, session.run(names, dict(feeds)), strict=True):
            if value.size == 0:  # a modality absent from this batch
                continue
            channel_max = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0).astype(np.float32)
            for path in paths[name]:
                ranges[path] = channel_max if path not in ranges else np.maximum(ranges[path], channel_max)
    return ranges


def save_ranges(ranges: ActivationRanges, path: Path) -> Path:
    save_file({key: np.ascontiguousarray(value, dtype=np.float32) for key, value in ranges.items()}, str(path))
    return path


def load_ranges(path: Path) -> ActivationRanges:
    return dict(load_file(str(path)))


def smooth(model: onnx.ModelProto, ranges: ActivationRanges, alpha: float = SMOOTHING_ALPHA) -> int:
    """Rescale, in place, every weight MatMul with a measured range (one Mul per shared input, weights scaled
    row-wise); the number of inputs smoothed."""
    initializers = {i.name: i for i in model.graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in _constant_weight_matmuls(model):
        if module_path(node) in ranges:
            consumers[node.input[0]].append(node)
    for source, nodes in consumers.items():
        weights = [numpy_helper.to_array(initializers[node.input[1]]) for node in nodes]
        path = module_path(nodes[0]) or ""
        amax = ranges[path]
        if amax.shape != weights[0].shape[:1]:
            raise ValueError(f"{path}: {amax.shape[0]} activation ranges for {weights[0].shape[0]} input channels")
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        scale = (np.maximum(amax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha)).astype(np.float32)
        for node, weight in zip(nodes, weights, strict=True):
            initializers[node.input[1]].CopyFrom(numpy_helper.from_array(weight * scale[:, None], node.input[1]))
        _divide_input(model, source, scale, nodes)
    return len(consumers)


def _divide_input(model: onnx.ModelProto, source: str, scale: np.ndarray, nodes: list[onnx.NodeProto]) -> None:
    inverse, smoothed = f"{source}_smoothing", f"{source}_smoothed"
    model.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inverse))
    first = min(list(model.graph.node).index(node) for node in nodes)
    model.graph.node.insert(first, helper.make_node("Mul", [source, inverse], [smoothed], name=f"{source}_smooth"))
    for node in nodes:
        node.input[0] = smoothed


def _kept_fp32(node: onnx.NodeProto, prefixes: Sequence[str]) -> bool:
    path = module_path(node)
    return node.op_type in ("MatMul", "Gemm") and path is not None and any(path.startswith(p) for p in prefixes)


def quantize_encoder_int8(
    src: Path, dst: Path, ranges: ActivationRanges | None = None, keep_fp32: Sequence[str] = ()
) -> Path:
    """The int8 encoder of the fp32 graph `src`, smoothed first where `ranges` has the Linear; the Linears whose
    module path starts with one of `keep_fp32` stay fp32 (mixed precision).

    Dynamic int8 weights (per output channel) for MatMul / Gemm only: Conv stays fp32 (ConvInteger is slow or
    missing on EPs), attention score MatMuls (no constant B) stay fp32 (MatMulConstBOnly), and so does the word
    embedding table (a Gather). Weights are uint8: ONNX Runtime's u8s8 kernels saturate 16-bit sums on x86 CPUs
    without VNNI (probability errors of 0.1 and more on such machines), its u8u8 kernels do not."""
    model = onnx.load(str(src))
    # The exporter records value_info for initializers too; the quantizer rewrites Gemm(transB) as MatMul with
    # a transposed weight and its shape inference then trips over the stale [out, in] shape. Inference redoes it.
    del model.graph.value_info[:]
    if ranges:
        smooth(model, ranges)
    excluded = [node.name for node in model.graph.node if reads_filterbank(node)]
    for node in model.graph.node:
        if _kept_fp32(node, keep_fp32):
            excluded += [node.name, f"{node.name}_MatMul"]  # the quantizer renames a Gemm it rewrites as MatMul
    quantize_dynamic(
        model,
        dst,
        weight_type=QuantType.QUInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        per_channel=True,
        nodes_to_exclude=excluded,
        extra_options={"MatMulConstBOnly": True},
    )
    onnx.checker.check_model(str(dst), full_check=True)
    return dst
