"""Near-tie re-scoring of the int8 encoder: label agreement with fp32 and speed, by margin.

    python -m benchmarks.int8_rescoring --artifact ARTIFACT_DIR [--margins 0,0.01,0.02,0.03,0.04,0.05]

In int8 mode the runtime re-encodes in fp32 every turn whose two likeliest emotions are closer than the margin,
then scores its dialogue again (model/runtime.py). For each margin, every MELD dialogue of the calibration
split (train) and of the report split (dev) goes through the serving runtime (bidirectional context), and its
labels are compared with fp32's. The margin is chosen on train only: the smallest one whose agreement reaches
--target. Dev, where the agreement is reported, plays no part in the choice.

Speed: MELD dev dialogues end to end (encoder and context head, as the API and batch scoring call them), fp32,
int8 alone and int8 with re-scoring at the chosen margin, one whole pass each in turn, --repeats times, on
--threads intra-op threads (default 1: steady on a shared machine).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort
from tqdm import tqdm

from core.settings import data_dir_or_exit
from model.artifact import load_artifact
from model.data.meld import group_dialogues, read_utterances
from model.runtime import InferenceRuntime, UtteranceInput
from training.evaluate import DIALOGUES_PER_CALL, Int8Agreement, int8_agreements

SPLITS = ("train", "dev")


def choose_margin(results: Sequence[Int8Agreement], target: float) -> float | None:
    """The smallest margin whose train agreement reaches `target`."""
    reaching = [r.margin for r in results if r.split == "train" and r.share >= target]
    return min(reaching) if reaching else None


def dev_dialogues(root: Path) -> list[list[UtteranceInput]]:
    dialogues = group_dialogues(read_utterances(root, "dev"))
    return [[UtteranceInput(u.text, None, u.speaker) for u in d.utterances] for d in dialogues]


def speeds(
    runtimes: dict[str, InferenceRuntime], dialogues: list[list[UtteranceInput]], repeats: int
) -> dict[str, float]:
    """Turns per second of each runtime over `dialogues`, passes taking turns; the best pass of each."""
    turns = sum(len(dialogue) for dialogue in dialogues)
    best = dict.fromkeys(runtimes, float("inf"))
    for _ in tqdm(range(repeats), desc="speed passes", unit="pass"):
        for name, runtime in runtimes.items():
            start = time.perf_counter()
            for first in range(0, len(dialogues), DIALOGUES_PER_CALL):
                runtime.classify(dialogues[first : first + DIALOGUES_PER_CALL], causal=False)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: turns / seconds for name, seconds in best.items()}


def agreement_table(results: Sequence[Int8Agreement], chosen: float | None) -> str:
    header = ["margin", "MELD train: labels unchanged", "re-encoded", "MELD dev: labels unchanged", "turns changed"]
    lines = ["| " + " | ".join([*header, "re-encoded"]) + " |", "|--:|--:|--:|--:|--:|--:|"]
    for margin in sorted({r.margin for r in results}):
        train, dev = (next(r for r in results if r.margin == margin and r.split == s) for s in SPLITS)
        mark = " (chosen)" if margin == chosen else ""
        lines.append(
            f"| {margin:g}{mark} | {train.share:.2%} | {train.rescored / train.turns:.1%} | {dev.share:.2%} | "
            f"{dev.changed} of {dev.turns:,} | {dev.rescored / dev.turns:.1%} |"
        )
    return "\n".join(lines)


def speed_table(speed: dict[str, float]) -> str:
    lines = ["| runtime | turns/s | vs fp32 |", "|---|--:|--:|"]
    lines += [f"| {name} | {value:,.0f} | {value / speed['fp32']:.2f}× |" for name, value in speed.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, required=True, help="artifact directory (with encoder.int8.onnx)")
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--margins", default="0,0.01,0.02,0.03,0.04,0.05", help="comma-separated margins")
    parser.add_argument("--target", type=float, default=0.995, help="train agreement the chosen margin reaches")
    parser.add_argument("--repeats", type=int, default=3, help="speed passes per runtime")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads for the speed runs")
    args = parser.parse_args(argv)
    root = data_dir_or_exit(args.data_dir)
    artifact = load_artifact(args.artifact)
    margins = sorted({float(m) for m in args.margins.split(",")})
    results = [result for split in SPLITS for result in int8_agreements(artifact, root, split, margins)]
    chosen = choose_margin(results, args.target)
    options = {"device": "cpu", "intra_op_threads": args.threads}
    runtimes = {
        "fp32": InferenceRuntime.load(artifact, **options),
        "int8 alone": InferenceRuntime.load(artifact, precision="int8", rescore_margin=0.0, **options),
    }
    if chosen:
        runtimes[f"int8, near ties < {chosen:g} re-scored"] = InferenceRuntime.load(
            artifact, precision="int8", rescore_margin=chosen, **options
        )
    speed = speeds(runtimes, dev_dialogues(root), args.repeats)
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"model {artifact.version}; ONNX Runtime {ort.__version__}; {platform.machine()}, {os.cpu_count()} CPUs\n")
    print(agreement_table(results, chosen) + "\n")
    verdict = f"{chosen:g}" if chosen is not None else "none of the margins"
    print(f"Chosen on MELD train (agreement >= {args.target:.1%}): {verdict}\n")
    print(f"MELD dev end to end, {args.threads} intra-op thread(s), best of {args.repeats} passes; load {load}:\n")
    print(speed_table(speed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
