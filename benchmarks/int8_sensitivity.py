"""Where the int8 encoder's label changes come from: near ties, per-layer sensitivity, blockwise alternatives.

    python -m benchmarks.int8_sensitivity --artifact ARTIFACT_DIR [--ranges int8_ranges.safetensors]

Every variant is an encoder graph built here from the artifact's fp32 encoder. Through the artifact's fp32
context head it labels every MELD dev dialogue (bidirectional), and its labels are compared with fp32's:

- every Linear int8: the shipped recipe (activation smoothing, then dynamic int8, model/quantize.py);
- one text-encoder layer int8 at a time, every other Linear fp32 (mixed precision, `keep_fp32`);
- blockwise int8: ONNX Runtime's MatMulNBits with 8-bit weights in blocks of 32 inputs, computing in int8 with
  the activations quantised per token and per block of 32 inputs (accuracy level 4), after smoothing;
- blockwise 8-bit weights computed in fp32 (accuracy level 1): the error of the weights alone.

Speed: encoder throughput at batch 32 with one intra-op thread (steady on a shared machine), every variant
taking turns with fp32 batch by batch. Also printed: the share of dev turns whose fp32 top-two margin is under
0.02 and 0.05; any perturbation of the embeddings can flip those labels.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from benchmarks.encoder_throughput import bucketed, meld_dev_turns, sample_texts, time_interleaved
from core.settings import data_dir_or_exit
from model.artifact import ModelArtifact, load_artifact
from model.quantize import (
    ActivationRanges,
    load_ranges,
    module_path,
    quantize_encoder_int8,
    reads_filterbank,
    smooth,
)
from model.runtime import InferenceRuntime, open_session, session_options, top_two_margin

Builder = Callable[[Path, Path], Path]  # (fp32 encoder, destination) -> the variant's graph
TEXT_LAYER = re.compile(r"^(text\.bert\.encoder\.layer\.\d+\.)")


@dataclass(frozen=True)
class Variant:
    name: str
    build: Builder


@dataclass(frozen=True)
class Comparison:
    name: str
    turns: int
    changed: int
    mean_gap: float  # mean |p_variant - p_fp32| over turns and classes
    widest_flipped_margin: float  # the largest fp32 top-two margin among the changed turns
    speed: float  # encoder throughput / fp32's

    def row(self) -> str:
        agreement = 1 - self.changed / self.turns
        return (
            f"| {self.name} | {agreement:.2%} | {self.changed} | {self.mean_gap:.4f} | "
            f"{self.widest_flipped_margin:.3f} | {self.speed:.2f}× |"
        )


def dynamic_int8(ranges: ActivationRanges | None, keep_fp32: Sequence[str] = ()) -> Builder:
    return lambda src, dst: quantize_encoder_int8(src, dst, ranges, keep_fp32)


def blockwise_int8(ranges: ActivationRanges | None, accuracy_level: int, block: int = 32) -> Builder:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    def build(src: Path, dst: Path) -> Path:
        model = onnx.load(str(src))
        del model.graph.value_info[:]
        if ranges:
            smooth(model, ranges)
        config = DefaultWeightOnlyQuantConfig(
            block_size=block, is_symmetric=True, accuracy_level=accuracy_level, bits=8
        )
        quantizer = MatMulNBitsQuantizer(
            model,
            bits=8,
            block_size=block,
            is_symmetric=True,
            accuracy_level=accuracy_level,
            nodes_to_exclude=[node.name for node in model.graph.node if reads_filterbank(node)],
            algo_config=config,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
        return dst

    return build


def text_layers(encoder: Path) -> list[str]:
    """Module-path prefixes of the text encoder's layers ('text.bert.encoder.layer.0.', ...), in order."""
    paths = (module_path(node) or "" for node in onnx.load(str(encoder)).graph.node)
    found = {match.group(1) for path in paths if (match := TEXT_LAYER.match(path))}
    return sorted(found, key=lambda prefix: int(prefix.split(".")[-2]))


def variants(encoder: Path, ranges: ActivationRanges | None) -> list[Variant]:
    layers = text_layers(encoder)
    others = ["audio", "text_proj", "gate"]  # the audio encoder and projections, kept fp32 with the other layers
    return [
        Variant("every Linear int8 (shipped recipe)", dynamic_int8(ranges)),
        *(
            Variant(f"only text layer {i} int8", dynamic_int8(ranges, [p for p in layers if p != layer] + others))
            for i, layer in enumerate(layers)
        ),
        Variant("blockwise int8, int8 compute", blockwise_int8(ranges, accuracy_level=4)),
        Variant("blockwise 8-bit weights, fp32 compute", blockwise_int8(ranges, accuracy_level=1)),
    ]


def runtime_with(artifact: ModelArtifact, encoder: Path) -> InferenceRuntime:
    options = session_options(0)
    return InferenceRuntime(
        artifact, open_session(encoder, "cpu", options), open_session(artifact.context_path, "cpu", options)
    )


def dev_probabilities(runtime: InferenceRuntime, root: Path) -> np.ndarray:
    return np.stack([turn.emotion_probs for turn in meld_dev_turns(runtime, root)])


def speeds(artifact: ModelArtifact, graphs: dict[str, Path], root: Path, n: int) -> dict[str, float]:
    """Encoder throughput of each graph relative to fp32, one intra-op thread, batches interleaved."""
    runtime = InferenceRuntime.load(artifact, device="cpu", intra_op_threads=1)
    prepared = runtime.preprocessor.prepare(sample_texts(root, n, seed=0), [None] * n)
    sessions = {
        name: ort.InferenceSession(str(path), session_options(1), providers=["CPUExecutionProvider"])
        for name, path in {"fp32": artifact.encoder_path, **graphs}.items()
    }
    backends = {name: _runner(session) for name, session in sessions.items()}
    times = time_interleaved(backends, bucketed(prepared), "speed, batch 32")
    return {name: float(times["fp32"].sum() / times[name].sum()) for name in graphs}


def _runner(session: ort.InferenceSession) -> Callable[..., np.ndarray]:
    return lambda batch: session.run(["embedding"], batch.feeds())[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, required=True, help="artifact directory")
    parser.add_argument("--ranges", type=Path, help="activation ranges for smoothing (default: measured on MELD train)")
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--n", type=int, default=512, help="MELD dev utterances for the speed comparison")
    args = parser.parse_args(argv)
    root = data_dir_or_exit(args.data_dir)
    artifact = load_artifact(args.artifact)
    ranges = load_ranges(args.ranges) if args.ranges else _measured_ranges(artifact, root)
    reference = dev_probabilities(InferenceRuntime.load(artifact, device="cpu"), root)
    margin = top_two_margin(reference)
    with tempfile.TemporaryDirectory(prefix="equipoise-int8-") as work:
        graphs, rows = {}, []
        for index, variant in enumerate(tqdm(variants(artifact.encoder_path, ranges), desc="variants", unit="variant")):
            graphs[variant.name] = variant.build(artifact.encoder_path, Path(work) / f"variant{index}.onnx")
            probabilities = dev_probabilities(runtime_with(artifact, graphs[variant.name]), root)
            changed = probabilities.argmax(1) != reference.argmax(1)
            rows.append((variant.name, changed, float(np.abs(probabilities - reference).mean())))
        relative = speeds(artifact, graphs, root, args.n)
    comparisons = [
        Comparison(name, len(changed), int(changed.sum()), gap, float(margin[changed].max(initial=0.0)), relative[name])
        for name, changed, gap in rows
    ]
    print(f"model {artifact.version}; MELD dev {len(margin):,} turns; ONNX Runtime {ort.__version__}\n")
    print(
        f"fp32 top-two margin under 0.02: {np.mean(margin < 0.02):.1%} of turns; under 0.05: "
        f"{np.mean(margin < 0.05):.1%}\n"
    )
    print("| encoder | labels unchanged | turns changed | mean \\|Δp\\| | widest fp32 margin flipped | speed vs fp32 |")
    print("|---|--:|--:|--:|--:|--:|")
    print("\n".join(comparison.row() for comparison in comparisons))
    return 0


def _measured_ranges(artifact: ModelArtifact, root: Path) -> ActivationRanges:
    from training.evaluate import meld_int8_ranges

    return meld_int8_ranges(artifact.path, root)


if __name__ == "__main__":
    raise SystemExit(main())
