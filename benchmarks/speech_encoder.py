"""Encoder throughput with audio, a speech artifact beside a baseline in one run, and what int8 does to the
speech path.

    python -m benchmarks.speech_encoder --baseline DIR [--model DIR] --data-dir ../shared/data

Inputs: the clips of RAVDESS's held-out actors (21-24), each with its sentence as text (text + audio, the call
centre's case), cut to `--seconds`. Every runtime (baseline and model, fp32 and int8) encodes the same utterances
through `InferenceRuntime.encode` (the service's pre-processing, length buckets of `--batch`), after a warm-up,
interleaved round by round so machine load falls on all alike; the median round is reported.

Then the model's int8 encoder (every MatMul with a constant weight quantised, Whisper's included) against its fp32
one on the held-out speakers, audio only: label agreement and macro F1 through the serving runtime, int8 alone
(no near-tie re-scoring).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.settings import data_dir_or_exit
from model.audio import SAMPLE_RATE, decode_audio
from model.data.speech import read_clips, split_by_speaker
from model.default_model import artifact_or_shipped
from model.runtime import InferenceRuntime, UtteranceInput
from training.evaluate import score_speech

PRECISIONS = ("fp32", "int8")


def utterances(data_dir: Path, seconds: float) -> list[UtteranceInput]:
    clips = split_by_speaker(read_clips(data_dir, "ravdess")).test
    cut = int(seconds * SAMPLE_RATE)
    return [UtteranceInput(clip.text, decode_audio(clip.path)[:cut]) for clip in clips]


def throughput(runtimes: dict[str, InferenceRuntime], inputs: list[UtteranceInput], rounds: int) -> dict[str, float]:
    """Median utterances per second of each runtime's encoder over `rounds` interleaved passes."""
    for runtime in runtimes.values():
        runtime.encode(inputs[:16])  # warm-up: session initialisation and first allocations
    seconds: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in tqdm(range(rounds), desc="rounds", unit="round"):
        for name, runtime in runtimes.items():
            start = time.perf_counter()
            runtime.encode(inputs)
            seconds[name].append(time.perf_counter() - start)
    return {name: len(inputs) / float(np.median(times)) for name, times in seconds.items()}


def int8_speech(model: Path, data_dir: Path, threads: int) -> list[dict[str, object]]:
    rows = []
    runtimes = {
        p: InferenceRuntime.load(model, device="cpu", precision=p, intra_op_threads=threads) for p in PRECISIONS
    }
    for corpus in ("ravdess", "emodb"):
        for line in ("clean", "mulaw"):
            scored = {p: score_speech(r, data_dir, corpus, line=line) for p, r in runtimes.items()}
            emotions = runtimes["fp32"].emotions.names
            reports = {p: s.report(emotions) for p, s in scored.items()}
            rows.append({
                "test set": f"{corpus} held-out speakers, {line}",
                "clips": len(scored["fp32"].labels),
                "labels equal": float((scored["fp32"].predicted == scored["int8"].predicted).mean()),
                "fp32 macro F1": reports["fp32"].macro_f1,
                "int8 macro F1": reports["int8"].macro_f1,
                "max |p_int8 - p_fp32|": float(np.abs(scored["fp32"].probs - scored["int8"].probs).max()),
            })  # fmt: skip
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the artifact to compare with (e.g. 1.0.2)")
    parser.add_argument("--model", type=Path, help="the speech artifact (default: the shipped default, assembled)")
    parser.add_argument("--data-dir", type=Path, help="corpora directory (default: settings)")
    parser.add_argument("--seconds", type=float, default=3.0, help="audio per utterance (default 3)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default 5)")
    parser.add_argument("--batch", type=int, default=8, help="utterances per encoder call (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data_dir = data_dir_or_exit(args.data_dir)
    args.model = artifact_or_shipped(args.model)
    inputs = utterances(data_dir, args.seconds)
    runtimes = {
        f"{label} {precision}": InferenceRuntime.load(
            path, device="cpu", precision=precision, intra_op_threads=args.threads, max_batch_size=args.batch
        )
        for label, path in (("baseline", args.baseline), ("model", args.model))
        for precision in PRECISIONS
    }
    versions = {label: runtimes[f"{label} fp32"].artifact.version for label in ("baseline", "model")}
    speed = throughput(runtimes, inputs, args.rounds)
    figures = {
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, load average {os.getloadavg()[0]:.1f}",
        "versions": versions,
        "utterances": len(inputs),
        "seconds_of_audio": args.seconds,
        "utterances_per_second": speed,
        "int8_speech": int8_speech(args.model, data_dir, args.threads),
    }
    print(f"{len(inputs)} text + {args.seconds:g} s audio utterances, batch {args.batch}, {args.threads} threads")
    print("| encoder | utt/s | vs baseline fp32 |\n|---|--:|--:|")
    for name, rate in speed.items():
        label, precision = name.split()
        print(f"| {versions[label]} {precision} | {rate:.1f} | {rate / speed['baseline fp32']:.2f}x |")
    print(
        "| test set | clips | labels equal | fp32 macro F1 | int8 macro F1 | max prob diff |\n|---|--:|--:|--:|--:|--:|"
    )
    for row in figures["int8_speech"]:
        print("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
