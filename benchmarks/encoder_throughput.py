"""Utterance-encoder speed: PyTorch eager vs ONNX Runtime fp32 vs ONNX Runtime int8, on MELD dev texts.

    python -m benchmarks.encoder_throughput --data-dir ../shared/data --n 512

Every backend gets the same padded batches (the runtime's pre-processing and length bucketing) of the same
MELD dev utterances (real text lengths; no audio: MELD ships none, so each row carries the one-sample audio
placeholder). Timed: the encoder call only, after a warm-up. Reported: throughput at batch 32, latency p50 /
p99 per batch of 1 and of 32, ratios vs PyTorch, and int8 vs fp32 agreement of the emotion label over all MELD
dev dialogues (encoder + context head, bidirectional).

Without --artifact, the network is the real pretrained MiniLM text encoder with untrained audio encoder and
head, exported here; the agreement then compares labels of an untrained head. With --artifact (and --checkpoint,
a state_dict of model.network.EmotionModel, for the PyTorch column) a trained model is measured instead.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from core.settings import data_dir_or_exit
from model.artifact import ModelArtifact, export_artifact, load_artifact
from model.data.meld import group_dialogues, read_utterances
from model.network import EmotionModel, ModelConfig
from model.preprocess import EncoderBatch, PreparedUtterance, collate, length_buckets
from model.runtime import InferenceRuntime, TurnPrediction, UtteranceInput

BATCH = 32
WARMUP_BATCHES = 3
Backend = Callable[[EncoderBatch], np.ndarray]


@dataclass(frozen=True)
class Result:
    name: str
    throughput: float  # utterances per second at batch 32
    single_ms: np.ndarray  # per-call latencies at batch 1
    batch_ms: np.ndarray  # per-call latencies at batch 32

    def row(self, reference: Result | None) -> list[str]:
        p50_1, p99_1 = np.percentile(self.single_ms, [50, 99])
        p50_32, p99_32 = np.percentile(self.batch_ms, [50, 99])
        cells = [self.name, f"{self.throughput:,.0f}", f"{p50_1:.2f}", f"{p99_1:.2f}", f"{p50_32:.1f}", f"{p99_32:.1f}"]
        if reference is not None:
            ref_p50_1, ref_p50_32 = np.percentile(reference.single_ms, 50), np.percentile(reference.batch_ms, 50)
            cells += [
                f"{self.throughput / reference.throughput:.2f}x",
                f"{ref_p50_1 / p50_1:.2f}x",
                f"{ref_p50_32 / p50_32:.2f}x",
            ]
        return cells


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--n", type=int, default=512, help="MELD dev utterances to time (default 512)")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the batch-32 set (default 3)")
    parser.add_argument("--threads", type=int, default=0, help="threads for torch and ONNX Runtime (0: their defaults)")
    parser.add_argument("--artifact", type=Path, default=None, help="benchmark this artifact instead of exporting")
    parser.add_argument("--checkpoint", type=Path, default=None, help="EmotionModel state_dict for --artifact")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def sample_texts(root: Path, n: int, seed: int) -> list[str]:
    texts = [u.text for u in read_utterances(root, "dev")]
    picked = np.random.default_rng(seed).choice(len(texts), size=min(n, len(texts)), replace=False)
    return [texts[i] for i in sorted(picked)]


def model_and_artifact(args: argparse.Namespace, work: Path) -> tuple[EmotionModel | None, ModelArtifact]:
    """The untrained MiniLM network exported to `work`, or the given artifact (+ checkpoint)."""
    if args.artifact is None:
        torch.manual_seed(args.seed)
        model = EmotionModel(ModelConfig()).eval()
        return model, export_artifact(model, work / "bench-untrained", version="bench-untrained")
    artifact = load_artifact(args.artifact)
    if args.checkpoint is None:
        return None, artifact
    model = EmotionModel(artifact.model_config(), pretrained_text=False)
    model.load_state_dict(torch.load(args.checkpoint, map_location="cpu", weights_only=True))
    return model.eval(), artifact


def torch_backend(model: EmotionModel) -> Backend:
    def run(batch: EncoderBatch) -> np.ndarray:
        with torch.inference_mode():
            inputs = {name: torch.from_numpy(array) for name, array in batch.feeds().items()}
            return model.encoder(**inputs).numpy()

    return run


def time_interleaved(
    backends: dict[str, Backend], batches: Sequence[EncoderBatch], label: str
) -> dict[str, np.ndarray]:
    """Milliseconds per call of each backend, after a warm-up. Backends take turns on each batch (in rotating
    order), so a load spike on a shared machine hits them alike."""
    names = list(backends)
    for batch in batches[:WARMUP_BATCHES]:
        for run in backends.values():
            run(batch)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index, batch in enumerate(tqdm(batches, desc=label, unit="batch", leave=False)):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            start = time.perf_counter()
            backends[name](batch)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: np.asarray(values) for name, values in times.items()}


def bucketed(prepared: Sequence[PreparedUtterance]) -> list[EncoderBatch]:
    """Batches of BATCH utterances of similar length, as InferenceRuntime.encode forms them."""
    buckets = length_buckets([p.bucket_key for p in prepared], BATCH)
    return [collate([prepared[i] for i in bucket]) for bucket in buckets]


def measure(backends: dict[str, Backend], prepared: Sequence[PreparedUtterance], repeats: int) -> list[Result]:
    batch_ms = time_interleaved(backends, bucketed(prepared) * repeats, f"batch {BATCH}")
    single_ms = time_interleaved(backends, [collate([p]) for p in prepared], "batch 1")
    return [
        Result(name, len(prepared) * repeats / (batch_ms[name].sum() / 1e3), single_ms[name], batch_ms[name])
        for name in backends
    ]


def parity_gap(backends: dict[str, Backend], prepared: Sequence[PreparedUtterance]) -> float:
    """Largest |PyTorch - ONNX Runtime fp32| embedding difference over the batch-32 set."""
    eager, onnx = backends["PyTorch eager fp32"], backends["ONNX Runtime fp32"]
    return max(float(np.abs(eager(batch) - onnx(batch)).max()) for batch in bucketed(prepared))


@dataclass(frozen=True)
class Agreement:
    turns: int
    labels: float  # share of turns with the same emotion label
    probability_gap: float  # largest |p_int8 - p_fp32| over turns and classes
    cosine: float  # mean cosine similarity of the utterance embeddings

    def __str__(self) -> str:
        return (
            f"{self.labels:.2%} of {self.turns} turns have the same emotion label; largest emotion probability "
            f"gap {self.probability_gap:.3f}; mean embedding cosine similarity {self.cosine:.4f}"
        )


def meld_dev_turns(runtime: InferenceRuntime, root: Path) -> list[TurnPrediction]:
    """Every MELD dev turn in file order, scored by dialogue (text, speakers, bidirectional context)."""
    dialogues = [
        [UtteranceInput(u.text, None, u.speaker) for u in dialogue.utterances]
        for dialogue in group_dialogues(read_utterances(root, "dev"))
    ]
    return [turn for dialogue in runtime.classify(dialogues, causal=False) for turn in dialogue]


def int8_agreement(fp32: InferenceRuntime, int8: InferenceRuntime, root: Path) -> Agreement:
    """int8 vs fp32 over every MELD dev dialogue."""
    reference, candidate = (
        meld_dev_turns(runtime, root) for runtime in tqdm((fp32, int8), desc="MELD dev fp32 / int8", leave=False)
    )
    probs = [np.stack([t.emotion_probs for t in turns]) for turns in (reference, candidate)]
    vectors = [np.stack([t.embedding for t in turns]) for turns in (reference, candidate)]
    norms = np.linalg.norm(vectors[0], axis=1) * np.linalg.norm(vectors[1], axis=1)
    return Agreement(
        turns=len(reference),
        labels=float(np.mean(probs[0].argmax(1) == probs[1].argmax(1))),
        probability_gap=float(np.abs(probs[0] - probs[1]).max()),
        cosine=float(np.mean((vectors[0] * vectors[1]).sum(axis=1) / norms)),
    )


def markdown(results: Sequence[Result], reference: Result | None) -> str:
    header = [
        "backend",
        f"utt/s (batch {BATCH})",
        "p50 ms (b=1)",
        "p99 ms (b=1)",
        f"p50 ms (b={BATCH})",
        f"p99 ms (b={BATCH})",
    ]
    if reference is not None:
        header += ["throughput vs PyTorch", "p50 speed-up b=1", f"p50 speed-up b={BATCH}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(result.row(reference)) + " |" for result in results]
    return "\n".join(lines)


def describe(artifact: ModelArtifact, prepared: Sequence[PreparedUtterance], args: argparse.Namespace) -> str:
    tokens = np.array([len(p.token_ids) for p in prepared])
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return "\n".join(
        [
            f"- model: {artifact.version} (text encoder {artifact.config['text_encoder']}, "
            f"embed_dim {artifact.embed_dim}), artifact sha256 {artifact.sha256[:12]}",
            f"- inputs: {len(prepared)} MELD dev utterances, text only; tokens per utterance ([CLS]/[SEP] included) "
            f"mean {tokens.mean():.1f}, median {np.median(tokens):.0f}, max {tokens.max()}",
            f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; "
            f"load average (1/5/15 min) at the end {load}; "
            f"threads: torch {torch.get_num_threads()}, ONNX Runtime intra-op {args.threads or 'default'}",
            f"- versions: torch {torch.__version__}, onnxruntime {ort.__version__}, python {platform.python_version()}",
            "- timed: encoder call only (inputs pre-tokenised, padded, length-bucketed as the runtime does); "
            f"batch-{BATCH} figures over {-(-len(tokens) // BATCH)} batches x {args.repeats} passes, batch-1 over "
            f"{len(tokens)} calls; backends take turns batch by batch",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    root = data_dir_or_exit(args.data_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = sample_texts(root, args.n, args.seed)
    with tempfile.TemporaryDirectory(prefix="equipoise-bench-") as work:
        model, artifact = model_and_artifact(args, Path(work))
        runtimes = {
            precision: InferenceRuntime.load(artifact, device="cpu", intra_op_threads=args.threads, precision=precision)
            for precision in ("fp32", "int8")
        }
        prepared = runtimes["fp32"].preprocessor.prepare(texts, [None] * len(texts))
        backends: dict[str, Backend] = {}
        if model is not None:
            backends["PyTorch eager fp32"] = torch_backend(model)
        backends |= {f"ONNX Runtime {p}": runtime.encode_batch for p, runtime in runtimes.items()}
        results = measure(backends, prepared, args.repeats)
        parity = parity_gap(backends, prepared) if model is not None else None
        agreement = int8_agreement(runtimes["fp32"], runtimes["int8"], root)
    reference = results[0] if model is not None else None
    untrained = " (untrained head: labels are arbitrary; re-run on a trained model)" if args.artifact is None else ""
    print("## Encoder throughput\n")
    print(describe(artifact, prepared, args) + "\n")
    print(markdown(results, reference) + "\n")
    if parity is not None:
        print(f"PyTorch vs ONNX Runtime fp32, largest embedding difference on these inputs: {parity:.2e}")
    print(f"int8 vs fp32 on MELD dev: {agreement}{untrained}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
