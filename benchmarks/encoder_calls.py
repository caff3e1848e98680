"""Model CPU per utterance of the ways a batch of text utterances can reach the encoder, side by side in one run.

    python -m benchmarks.encoder_calls [--model DIR] --data-dir ../shared/data

The service scores micro-batches of the requests waiting (at 32 concurrent clients, pools of about 8-16 one-turn
texts); batch scoring scores chunks of 256 turns. Each pool is scored through `InferenceRuntime.classify` as
one-turn dialogues, on one intra-op thread, by every variant:

- **whole graph, calls of K**: the late-fusion encoder graph with its Whisper branch (run on a placeholder sample
  for text-only rows), the pool sorted by length and cut every K utterances (the former behaviour);
- **text path, calls of K**: the same calls through the encoder's text path (model/text_path.py);
- **text path, cut by cost**: the sorted pool cut where padding costs more than a call (model.preprocess), at most
  `--limit` utterances a call;
- **packed text path, cut by cost**: the same cut priced by attention alone, each call's tokens unpadded
  (encoder.packed.onnx; the default for fp32 where the artifact has it).

The pools are random MELD utterances (every split), the same pools for every variant, the variants interleaved
pool by pool so machine load falls on all alike. Reported: process CPU milliseconds per utterance (mean, and the
spread of the per-round means), and the labels' agreement with the first variant (they must all agree).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from core.settings import data_dir_or_exit
from model.artifact import load_artifact
from model.data import meld
from model.default_model import artifact_or_shipped
from model.runtime import (
    ENCODER_CALL_COST,
    EncoderSessions,
    InferenceRuntime,
    UtteranceInput,
    open_session,
    session_options,
)

POOLS = (8, 16, 32, 256)


@dataclass(frozen=True)
class Variant:
    name: str
    text_path: bool
    calls_of: int | None  # None: cut by cost
    packed: bool = False


def variants(limit: int, packed: bool) -> list[Variant]:
    return [
        Variant("whole graph, calls of 8", False, 8),
        Variant("whole graph, calls of 32", False, 32),
        Variant("text path, calls of 8", True, 8),
        Variant(f"text path, cut by cost (at most {limit})", True, None),
    ] + ([Variant(f"packed text path, cut by cost (at most {limit})", True, None, packed=True)] if packed else [])


def runtime(model: Path, variant: Variant, limit: int) -> InferenceRuntime:
    artifact, options = load_artifact(model), session_options(1)
    packed = artifact.packed_text_path if variant.packed else None
    encoder = EncoderSessions.open(artifact, artifact.encoder_path, "cpu", options, packed=packed)
    if not variant.text_path:
        encoder = EncoderSessions(encoder.full)
    return InferenceRuntime(
        artifact,
        encoder,
        open_session(artifact.context_path, "cpu", options),
        max_batch_size=variant.calls_of or limit,
        call_cost=0.0 if variant.calls_of else ENCODER_CALL_COST,
    )


def measure(
    runtimes: dict[str, InferenceRuntime], texts: list[str], pool: int, utterances: int, rounds: int, seed: int
) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    count = max(1, utterances // pool)
    pools = [[[UtteranceInput(t, None, None)] for t in rng.sample(texts, pool)] for _ in range(count)]
    per_round: dict[str, list[float]] = {name: [] for name in runtimes}
    labels: dict[str, list[str]] = {name: [] for name in runtimes}
    for runtime_ in runtimes.values():
        runtime_.classify(pools[0], causal=False)  # warm-up
    for _ in tqdm(range(rounds), desc=f"pools of {pool}", unit="round", leave=False):
        spent = dict.fromkeys(runtimes, 0.0)
        for dialogues in pools:
            for name, runtime_ in runtimes.items():
                start = time.process_time()
                scored = runtime_.classify(dialogues, causal=False)
                spent[name] += time.process_time() - start
                labels[name].extend(turns[0].emotion for turns in scored)
        for name in runtimes:
            per_round[name].append(spent[name] * 1000 / (len(pools) * pool))
    first = next(iter(runtimes))
    return {
        name: {
            "cpu_ms_per_utterance": float(np.mean(values)),
            "round_spread_ms": float(np.max(values) - np.min(values)),
            "labels_equal_to_first": float(np.mean(np.array(labels[name]) == np.array(labels[first]))),
        }
        for name, values in per_round.items()
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="artifact directory (default: the shipped default)")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--limit", type=int, default=32, help="most utterances a call when cut by cost")
    parser.add_argument("--utterances", type=int, default=1024, help="utterances per round and pool size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data_dir = data_dir_or_exit(args.data_dir)
    args.model = artifact_or_shipped(args.model)
    texts = meld.texts(data_dir)
    packed = load_artifact(args.model).packed_text_path is not None
    if not packed:
        print(f"{args.model.name} has no packed text path (exported before it existed): that variant is left out")
    runtimes = {v.name: runtime(args.model, v, args.limit) for v in variants(args.limit, packed)}
    figures = {str(pool): measure(runtimes, texts, pool, args.utterances, args.rounds, args.seed) for pool in POOLS}
    print(f"{load_artifact(args.model).version}, one intra-op thread, {args.rounds} rounds of {args.utterances}")
    print("| variant | " + " | ".join(f"pools of {p}: CPU ms/utt" for p in POOLS) + " | labels equal |")
    print("|---|" + "--:|" * (len(POOLS) + 1))
    for name in runtimes:
        cells = [figures[str(p)][name] for p in POOLS]
        spread = " | ".join(f"{c['cpu_ms_per_utterance']:.2f} ± {c['round_spread_ms'] / 2:.2f}" for c in cells)
        agree = min(c["labels_equal_to_first"] for c in cells)
        print(f"| {name} | {spread} | {agree:.1%} |")
    if args.json:
        record = {"arguments": {k: str(v) for k, v in vars(args).items()}, "figures": figures}
        args.json.write_text(json.dumps(record, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
