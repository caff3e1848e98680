"""Two releases of the default model on MELD, paired turn by turn: both score every dialogue of a split through the
serving runtime (model/runtime.py, fp32, bidirectional context, text), and the differences in weighted F1, macro
F1 and each class's F1 come with 95% intervals from resampling whole dialogues, the same draws for both releases
(core/resampling.py), so an interval is the difference's own and not two intervals compared by eye.

    python -m benchmarks.release_compare --baseline /tmp/rel110/model/default --candidate model/default \\
        --splits dev test --json /tmp/release_compare.json

Dev is what a choice between releases may read; test is reported, never used to choose.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from core.resampling import turn_weights
from core.settings import data_dir_or_exit
from model.default_model import read_release, shipped_artifact
from model.runtime import InferenceRuntime
from training.evaluate import Scored, score_meld
from training.metrics import headline_f1, resampled_f1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="release directory (say the previous default)")
    parser.add_argument("--candidate", type=Path, required=True, help="release directory (say model/default)")
    parser.add_argument("--splits", nargs="+", default=["dev"], choices=["dev", "test"])
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--state-dir", type=Path, default=None, help="where releases are assembled (default: temp)")
    parser.add_argument("--replicates", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


def interval(values: np.ndarray) -> list[float]:
    return [float(q) for q in np.quantile(values, [0.025, 0.975])]


def compare(baseline: Scored, candidate: Scored, labels: Sequence[str], replicates: int, seed: int) -> dict[str, Any]:
    """Each release's figures and the candidate's gain, point estimates and 95% intervals over dialogues."""
    if not np.array_equal(baseline.labels, candidate.labels):
        raise ValueError("the two releases were scored on different turns")
    truth, classes = baseline.labels, np.arange(len(labels))
    ones = np.ones((1, len(truth)))
    draws = turn_weights(baseline.conversations, replicates, seed)
    rows: dict[str, Any] = {}
    for name, scored in (("baseline", baseline), ("candidate", candidate)):
        point, spread = (resampled_f1(truth, scored.predicted, w, classes) for w in (ones, draws))
        rows[name] = {"point": point, "spread": spread}
    out: dict[str, Any] = {"turns": len(truth), "dialogues": len(np.unique(baseline.conversations))}
    for name in ("baseline", "candidate"):
        out[name] = _figures(rows[name]["point"], rows[name]["spread"], labels)
    gain_point = rows["candidate"]["point"][0] - rows["baseline"]["point"][0], rows["baseline"]["point"][1]
    gain_spread = rows["candidate"]["spread"][0] - rows["baseline"]["spread"][0], rows["baseline"]["spread"][1]
    out["gain"] = _figures(gain_point, gain_spread, labels)
    return out


def _figures(
    point: tuple[np.ndarray, np.ndarray], spread: tuple[np.ndarray, np.ndarray], labels: Sequence[str]
) -> dict:
    """Weighted F1 weighs the per-class F1 (or its difference) by the baseline's support, the same in both."""
    at, over = headline_f1(*point), headline_f1(*spread)
    figures = {key: {"estimate": float(at[key][0]), "interval": interval(over[key])} for key in at}
    figures["f1"] = {
        name: {"estimate": float(point[0][0, i]), "interval": interval(spread[0][:, i])}
        for i, name in enumerate(labels)
    }
    return figures


def table(result: dict[str, Any], names: tuple[str, str]) -> list[str]:
    def cell(figure: dict, sign: str = "") -> str:
        low, high = figure["interval"]
        return f"{100 * figure['estimate']:{sign}.2f} [{100 * low:{sign}.2f}, {100 * high:{sign}.2f}]"

    lines = [f"| metric | {names[0]} | {names[1]} | gain |", "|---|--:|--:|--:|"]
    for key, label in (("weighted_f1", "weighted F1"), ("macro_f1", "macro F1")):
        cells = [cell(result[side][key]) for side in ("baseline", "candidate")] + [cell(result["gain"][key], "+")]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name in result["gain"]["f1"]:
        cells = [cell(result[side]["f1"][name]) for side in ("baseline", "candidate")]
        lines.append(f"| F1 {name} | " + " | ".join([*cells, cell(result["gain"]["f1"][name], "+")]) + " |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = data_dir_or_exit(args.data_dir)
    names = (read_release(args.baseline)["version"], read_release(args.candidate)["version"])
    with tempfile.TemporaryDirectory(prefix="equipoise-release-compare-") as work:
        state = args.state_dir or Path(work)
        runtimes = [
            InferenceRuntime.load(shipped_artifact(state, source), device="cpu")
            for source in (args.baseline, args.candidate)
        ]
        results: dict[str, Any] = {"baseline": names[0], "candidate": names[1], "replicates": args.replicates}
        report = []
        for split in args.splits:
            baseline, candidate = (score_meld(runtime, data_dir, split) for runtime in runtimes)
            result = compare(baseline, candidate, runtimes[0].emotions.names, args.replicates, args.seed)
            results[split] = result
            report += [
                f"## MELD {split}: {result['turns']:,} turns in {result['dialogues']} dialogues, 95% intervals "
                f"over {args.replicates:,} resamples of whole dialogues (the same draws for both)",
                "",
                *table(result, names),
                "",
            ]
    print("\n".join(report))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
