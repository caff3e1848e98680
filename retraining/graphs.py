"""The artifact graphs as the retraining tiers use them: the emotion head inside context.onnx, the head's input
features, and batched ONNX Runtime inference over dialogues and texts.

Artifacts carry ONNX graphs, not PyTorch weights, so the cheap tiers change the emotion classifier inside the
exported context graph: its last MatMul weight and Add bias are initializers, replaced in place (the rest of the
graph, and so every other output, is untouched). The same graph with the classifier's input exposed as an extra
output gives the frozen dialogue-context features the classifier is trained on (decoupled, cRT-style).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from model.artifact import ModelArtifact
from model.audio import decode_audio
from model.export import TEXT_EMOTION_OUTPUT
from model.preprocess import Preprocessor, collate, context_batch, in_original_order, length_buckets

EMOTION_OUTPUT = "emotion_logits"
FEATURES_OUTPUT = "emotion_features"

Dialogue = tuple[np.ndarray, np.ndarray, bool]  # embeddings [T, D], speaker indices [T], causal


class GraphError(ValueError):
    """The context graph does not have the expected emotion-head shape (MatMul by a constant, Add a constant)."""


@dataclass(frozen=True)
class EmotionHead:
    """The emotion classifier as a torch nn.Linear stores it."""

    weight: np.ndarray  # [C, D]
    bias: np.ndarray  # [C]


@dataclass(frozen=True)
class _HeadNodes:
    features: str  # name of the classifier's input value
    weight: str  # initializer [D, C] (MatMul's B)
    bias: str  # initializer [C]


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {tensor.name: tensor for tensor in model.graph.initializer}


def _producer(model: onnx.ModelProto, value: str) -> onnx.NodeProto:
    for node in model.graph.node:
        if value in node.output:
            return node
    raise GraphError(f"no node produces {value!r}")


def _locate_head(model: onnx.ModelProto) -> _HeadNodes:
    """The emotion classifier: what produces emotion_logits, or in a late-fusion graph the text head's logits
    (the fusion after it stays as it is)."""
    initializers = _initializers(model)
    outputs = {value.name for value in model.graph.output}
    add = _producer(model, TEXT_EMOTION_OUTPUT if TEXT_EMOTION_OUTPUT in outputs else EMOTION_OUTPUT)
    if add.op_type != "Add" or len(add.input) != 2:
        raise GraphError(f"{EMOTION_OUTPUT} is produced by {add.op_type}, not Add(MatMul(features, W), bias)")
    bias = next((name for name in add.input if name in initializers and len(initializers[name].dims) == 1), None)
    product = next((name for name in add.input if name != bias), None)
    if bias is None or product is None:
        raise GraphError(f"the Add producing {EMOTION_OUTPUT} has no constant bias")
    matmul = _producer(model, product)
    if matmul.op_type != "MatMul" or matmul.input[1] not in initializers:
        raise GraphError(f"the emotion head's product is {matmul.op_type}, not MatMul by a constant weight")
    return _HeadNodes(features=matmul.input[0], weight=matmul.input[1], bias=bias)


def read_head(context_graph: Path) -> EmotionHead:
    model = onnx.load(str(context_graph))
    nodes, initializers = _locate_head(model), _initializers(model)
    weight = numpy_helper.to_array(initializers[nodes.weight]).T
    return EmotionHead(np.ascontiguousarray(weight, dtype=np.float32), numpy_helper.to_array(initializers[nodes.bias]))


def write_head(context_graph: Path, out: Path, head: EmotionHead) -> Path:
    """A copy of `context_graph` whose emotion classifier is `head`; nothing else changes."""
    model = onnx.load(str(context_graph))
    nodes = _locate_head(model)
    old = read_head(context_graph)
    if head.weight.shape != old.weight.shape or head.bias.shape != old.bias.shape:
        raise GraphError(
            f"head shapes {head.weight.shape}/{head.bias.shape} differ from the graph's "
            f"{old.weight.shape}/{old.bias.shape}"
        )
    _shared_check(model, (nodes.weight, nodes.bias))
    replacements = {nodes.weight: head.weight.T, nodes.bias: head.bias}
    for tensor in model.graph.initializer:
        if tensor.name in replacements:
            array = np.ascontiguousarray(replacements[tensor.name], dtype=np.float32)
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    return out


def _shared_check(model: onnx.ModelProto, names: Sequence[str]) -> None:
    uses = {name: sum(name in node.input for node in model.graph.node) for name in names}
    shared = [name for name, count in uses.items() if count != 1]
    if shared:
        raise GraphError(f"emotion head initializers {shared} are shared with other nodes; cannot replace them")


def with_features_output(context_graph: Path) -> bytes:
    """The context graph with the emotion classifier's input exposed as the extra output `emotion_features`."""
    model = onnx.load(str(context_graph))
    # An Identity keeps the internal value's name intact for the nodes that consume it.
    model.graph.node.append(onnx.helper.make_node("Identity", [_locate_head(model).features], [FEATURES_OUTPUT]))
    model.graph.output.append(onnx.helper.make_tensor_value_info(FEATURES_OUTPUT, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def session(graph: Path | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = graph if isinstance(graph, bytes) else str(graph)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_context(
    graph: ort.InferenceSession, dialogues: Sequence[Dialogue], outputs: Sequence[str], batch_size: int = 64
) -> list[np.ndarray]:
    """Each requested output for every turn of every dialogue, concatenated in turn order ([N, ...] each).
    Dialogues of similar length are batched together; `causal` is one flag per batch."""
    if not dialogues:
        raise ValueError("no dialogues to run")
    per_dialogue: list[tuple[np.ndarray, ...]] = [()] * len(dialogues)
    for causal in (True, False):
        chosen = [i for i, dialogue in enumerate(dialogues) if dialogue[2] == causal]
        for bucket in length_buckets([len(dialogues[i][0]) for i in chosen], batch_size):
            indices = [chosen[j] for j in bucket]
            batch = context_batch([dialogues[i][:2] for i in indices], causal)
            values = graph.run(list(outputs), batch.feeds())
            for row, i in enumerate(indices):
                per_dialogue[i] = tuple(value[row, : len(dialogues[i][0])] for value in values)
    return [np.concatenate([values[k] for values in per_dialogue]) for k in range(len(outputs))]


def encode_texts(artifact: ModelArtifact, texts: Sequence[str | None], batch_size: int = 64) -> np.ndarray:
    """Text-only utterance embeddings [N, D] from the artifact's encoder.onnx (audio marked missing)."""
    return encode_utterances(artifact, texts, [None] * len(texts), batch_size)


def encode_utterances(
    artifact: ModelArtifact,
    texts: Sequence[str | None],
    audio_paths: Sequence[str | None],
    batch_size: int = 64,
    chunk: int = 256,
) -> np.ndarray:
    """Utterance embeddings [N, D] from the artifact's encoder.onnx: each turn's text and its audio file (decoded
    to 16 kHz mono), whichever it has; a missing one is marked missing. Audio is decoded `chunk` turns at a time."""
    if len(texts) != len(audio_paths):
        raise ValueError(f"{len(texts)} texts but {len(audio_paths)} audio paths")
    if not texts:
        return np.zeros((0, artifact.embed_dim), dtype=np.float32)
    preprocessor = Preprocessor.from_file(artifact.tokenizer_path, artifact.preprocessing)
    encoder = session(artifact.encoder_path)
    parts = []
    for start in range(0, len(texts), chunk):
        audios = [_stored_audio(path) for path in audio_paths[start : start + chunk]]
        prepared = preprocessor.prepare(list(texts[start : start + chunk]), audios)
        buckets = length_buckets([u.bucket_key for u in prepared], batch_size)
        encoded = [encoder.run(["embedding"], collate([prepared[i] for i in b]).feeds())[0] for b in buckets]
        parts.append(np.stack(in_original_order(buckets, encoded)))
    return np.concatenate(parts).astype(np.float32)


def _stored_audio(path: str | None) -> np.ndarray | None:
    # Stored audio was accepted by the service under its own limits; 600 s is the largest it can be set to.
    return None if path is None else decode_audio(path, max_bytes=Path(path).stat().st_size, max_seconds=600.0)
