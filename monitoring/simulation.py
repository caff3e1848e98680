"""Collapse simulation on real MELD test turns: does monitoring stay quiet when it should and fire when it must?

A real model scores MELD dev (the reference) and test (the stream) once. Windows are bootstrap samples of
test turns. The *stationary* stream serves the healthy model's probabilities in every window; the
*collapse* stream switches, after a few healthy windows, to a degraded model whose head is biased toward
the majority class (a constant added to its logit), the way a model drifts when its priors go stale.
Every window goes through the production analysis (`analyse_window`) and detector (`CollapseDetector`), and
every turn carries its gold label as feedback.

A 500-turn MELD window holds about ten fear turns, too few to measure minority recall (its 95% interval spans
±0.15), so, as in production, the measured minority recall of each window spans the newest labelled turns up to
its end, as many as a precise measurement needs (`labelled_minority_recall`), and the label-free estimate is
judged on the same turns. Its remaining sampling noise shows against the recall of the whole stream (the
population the windows are drawn from): the *noise floor*.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.settings import get_settings
from model.data.meld import group_dialogues, read_utterances
from model.runtime import InferenceRuntime, UtteranceInput
from monitoring.analysis import ReferenceProfile, analyse_window
from monitoring.collapse import CollapseDetector, CollapseRules, rules_from_settings
from monitoring.estimation import (
    class_shares,
    estimate_recall,
    labelled_minority_recall,
    mean_recall,
    measure_recall,
    posteriors,
)


@dataclass(frozen=True)
class ScoredSplit:
    """A model's probabilities, embeddings and the gold labels of one split."""

    names: tuple[str, ...]
    probabilities: np.ndarray
    embeddings: np.ndarray
    true: np.ndarray


@dataclass(frozen=True)
class WindowRecord:
    window: int
    degraded: bool
    majority_share: float
    drifted: bool
    js_distance: float
    minority_recall_estimated: float | None  # the window's label-free estimate
    minority_recall_detector: float | None  # what the detector judged: measured where the labels decide it
    detector_recall_source: str  # "measured" or "estimated"
    labelled_horizon: int | None  # labelled turns the measurement below spans; None: not yet precise
    minority_recall_labelled: float | None  # measured over those turns
    minority_recall_labelled_estimated: float | None  # label-free estimate on the same turns
    minority_recall_population: float | None  # measured on every turn of the stream, same model
    suspicious: bool
    fired: bool


def degrade(probabilities: np.ndarray, names: Sequence[str], majority: str, bias: float) -> np.ndarray:
    """The same model with `bias` added to the majority class's logit."""
    logits = np.log(np.clip(probabilities, 1e-12, 1.0))
    logits[:, list(names).index(majority)] += bias
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def reference_profile(
    dev: ScoredSplit,
    minority: Sequence[str],
    estimation_weights: Sequence[float] | None = None,
    reference_rows: int = 1000,
) -> ReferenceProfile:
    predicted = dev.probabilities.argmax(axis=1)
    rows = np.random.default_rng(0).choice(len(dev.embeddings), min(reference_rows, len(dev.embeddings)), replace=False)
    return ReferenceProfile(
        names=dev.names,
        class_shares=class_shares(predicted, dev.names),
        minority=tuple(minority),
        minority_recall=mean_recall(measure_recall(dev.true, predicted, dev.names), minority),
        embeddings=dev.embeddings[rows],
        estimation_weights=estimation_weights,
    )


def run_stream(
    test: ScoredSplit,
    reference: ReferenceProfile,
    *,
    windows: int,
    window_size: int,
    degrade_from: int | None,
    bias: float,
    rules: CollapseRules,
    seed: int,
    label_horizon: int,
    report_dir: Path | None = None,
) -> list[WindowRecord]:
    """Score `windows` bootstrap windows through analysis and detection; every turn carries its label. With
    `report_dir`, the Evidently report of the first window on which the detector fires is kept there."""
    rng = np.random.default_rng(seed)
    served: list[np.ndarray] = []  # each window's probabilities and labels, newest window first
    labels: list[np.ndarray] = []
    degraded = degrade(test.probabilities, test.names, reference.majority, bias)
    population = {
        False: population_minority_recall(test.probabilities, test, reference.minority),
        True: population_minority_recall(degraded, test, reference.minority),
    }
    detector = CollapseDetector(rules)
    records: list[WindowRecord] = []
    for w in range(windows):
        rows = rng.choice(len(test.true), window_size, replace=True)
        is_degraded = degrade_from is not None and w >= degrade_from
        probabilities = (degraded if is_degraded else test.probabilities)[rows]
        keep_report = report_dir is not None and not any(r.fired for r in records) and is_degraded
        findings = analyse_window(
            probabilities,
            test.true[rows],
            reference,
            embeddings=test.embeddings[rows],
            report_dir=report_dir / f"window_{w:03d}" if keep_report and report_dir else None,
        )
        signals = findings.signals(reference)
        decision = detector.observe(signals)
        judged, source = signals.minority_recall(rules)
        served.insert(0, probabilities[::-1])
        labels.insert(0, test.true[rows][::-1])
        labelled = labelled_minority_recall(
            np.concatenate(served)[:label_horizon],
            np.concatenate(labels)[:label_horizon],
            test.names,
            reference.minority,
            precision=rules.recall_precision,
            weights=reference.estimation_weights,
        )
        records.append(
            WindowRecord(
                window=w,
                degraded=is_degraded,
                majority_share=findings.majority_share,
                drifted=findings.drift.drifted,
                js_distance=findings.drift.js_distance,
                minority_recall_estimated=findings.minority_recall_estimated,
                minority_recall_detector=judged,
                detector_recall_source=source,
                labelled_horizon=labelled.labelled if labelled else None,
                minority_recall_labelled=labelled.measured if labelled else None,
                minority_recall_labelled_estimated=labelled.estimated if labelled else None,
                minority_recall_population=population[is_degraded],
                suspicious=decision.suspicious,
                fired=decision.fired,
            )
        )
    return records


def population_minority_recall(probabilities: np.ndarray, split: ScoredSplit, minority: Sequence[str]) -> float | None:
    return mean_recall(measure_recall(split.true, probabilities.argmax(axis=1), split.names), minority)


def tracking_error(records: Sequence[WindowRecord], *, floor: bool = False) -> dict[str, float]:
    """How far the label-free minority recall strays from the measured one on the same labelled turns, over the
    windows that have a measurement; with `floor`, how far the stream's population recall does (the
    measurement's own sampling noise)."""
    pairs = [
        (r.minority_recall_population if floor else r.minority_recall_labelled_estimated, r.minority_recall_labelled)
        for r in records
    ]
    return gap_statistics([(a, b) for a, b in pairs if a is not None and b is not None])


def gap_statistics(pairs: Sequence[tuple[float, float]]) -> dict[str, float]:
    gaps = np.array([abs(a - b) for a, b in pairs])
    if not len(gaps):
        return {"windows": 0}
    return {
        "windows": len(gaps),
        "mean_abs": float(gaps.mean()),
        "max_abs": float(gaps.max()),
        "share_within_0.1": float((gaps <= 0.1).mean()),
    }


def tracking_by_window_size(
    test: ScoredSplit, reference: ReferenceProfile, sizes: Sequence[int], windows: int, seed: int = 3
) -> dict[int, dict[str, dict[str, float]]]:
    """Estimated against measured minority recall, and the noise floor, on `windows` bootstrap windows of each
    size (healthy model; the recall functions of `analyse_window`, without its drift tests)."""
    rng = np.random.default_rng(seed)
    weighted = posteriors(test.probabilities, reference.estimation_weights)
    predicted = test.probabilities.argmax(axis=1)
    population = population_minority_recall(test.probabilities, test, reference.minority)
    table: dict[int, dict[str, dict[str, float]]] = {}
    for size in sizes:
        estimated, floor = [], []
        for _ in range(windows):
            rows = rng.choice(len(test.true), size, replace=True)
            measured = mean_recall(measure_recall(test.true[rows], predicted[rows], test.names), reference.minority)
            estimate = mean_recall(estimate_recall(weighted[rows], test.names, predicted[rows]), reference.minority)
            if measured is not None and estimate is not None and population is not None:
                estimated.append((estimate, measured))
                floor.append((population, measured))
        table[size] = {"estimated": gap_statistics(estimated), "noise_floor": gap_statistics(floor)}
    return table


def plot_stream(records: Sequence[WindowRecord], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = [r.window for r in records]
    figure, axis = plt.subplots(figsize=(9, 4))
    axis.plot(windows, [r.majority_share for r in records], label="majority share")
    axis.plot(windows, [r.minority_recall_detector for r in records], label="minority recall, window (detector's)")
    measured = [r for r in records if r.detector_recall_source == "measured"]
    axis.plot(
        [r.window for r in measured],
        [r.minority_recall_detector for r in measured],
        "o",
        markersize=3,
        color="C1",
        label="  ... measured from the window's labels",
    )
    axis.plot(
        windows, [r.minority_recall_labelled for r in records], label="minority recall, labelled turns (measured)"
    )
    axis.plot(
        windows,
        [r.minority_recall_labelled_estimated for r in records],
        "--",
        label="minority recall, same labelled turns (estimated)",
    )
    axis.plot(
        windows,
        [r.minority_recall_population for r in records],
        ":",
        color="black",
        label="minority recall over the whole stream",
    )
    for r in records:
        if r.fired:
            axis.axvline(r.window, color="red", linestyle=":", label="collapse event")
    first_degraded = next((r.window for r in records if r.degraded), None)
    if first_degraded is not None:
        axis.axvspan(first_degraded - 0.5, windows[-1] + 0.5, color="grey", alpha=0.15, label="degraded model")
    axis.set(xlabel="window", ylim=(0, 1), title=title)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def horizon_statistics(records: Sequence[WindowRecord]) -> dict[str, float]:
    """How many labelled turns the windows' measured minority recall spanned."""
    horizons = [r.labelled_horizon for r in records if r.labelled_horizon is not None]
    return {"median": float(np.median(horizons)), "max": float(max(horizons))} if horizons else {}


def summarise(records: Sequence[WindowRecord]) -> dict[str, object]:
    fired = [r.window for r in records if r.fired]
    first_degraded = next((r.window for r in records if r.degraded), None)
    delay = None if first_degraded is None or not fired else fired[0] - first_degraded + 1
    return {
        "windows": len(records),
        "events": fired,
        "windows_to_detect": delay,
        "windows_with_labels": sum(r.minority_recall_labelled is not None for r in records),
        "windows_judged_on_measured_recall": sum(r.detector_recall_source == "measured" for r in records),
        "labelled_horizon": horizon_statistics(records),
        "false_alarms": [w for w in fired if first_degraded is None or w < first_degraded],
        "tracking": tracking_error(records),
        "noise_floor": tracking_error(records, floor=True),
        "healthy_tracking": tracking_error([r for r in records if not r.degraded]),
        "records": [asdict(r) for r in records],
    }


def score_meld(runtime: InferenceRuntime, data_dir: Path, split: str) -> ScoredSplit:
    """Score every MELD dialogue of `split` with bidirectional context, as batch scoring does."""
    dialogues = group_dialogues(read_utterances(data_dir, split))
    inputs = [[UtteranceInput(u.text, None, u.speaker) for u in d.utterances] for d in dialogues]
    turns = [turn for dialogue in runtime.classify(inputs, causal=False) for turn in dialogue]
    names = runtime.emotions.names
    return ScoredSplit(
        names=names,
        probabilities=np.stack([t.emotion_probs for t in turns]).astype(np.float64),
        embeddings=np.stack([t.embedding for t in turns]),
        true=np.array([names.index(u.emotion) for d in dialogues for u in d.utterances]),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="model artifact directory")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("docs/simulation"))
    parser.add_argument("--windows", type=int, default=100)
    parser.add_argument("--window-size", type=int, default=500)
    parser.add_argument("--bias", type=float, default=2.0, help="logit added to the majority class when degraded")
    parser.add_argument(
        "--tracking-sizes", default="500,1000,2000", help="window sizes of the tracking comparison, comma-separated"
    )
    parser.add_argument("--tracking-windows", type=int, default=300, help="bootstrap windows per tracking size")
    args = parser.parse_args(argv)
    settings = get_settings()
    data_dir = args.data_dir or settings.data_dir
    runtime = InferenceRuntime.load(args.model, device="cpu")
    dev, test = score_meld(runtime, data_dir, "dev"), score_meld(runtime, data_dir, "test")
    weights = runtime.artifact.calibration.estimation_weights
    reference = reference_profile(dev, settings.minority_classes, weights)
    common = {
        "window_size": args.window_size,
        "bias": args.bias,
        "rules": rules_from_settings(settings, min_predictions=args.window_size),
        "label_horizon": settings.monitor_label_horizon,
    }
    stationary = run_stream(test, reference, windows=args.windows, degrade_from=None, seed=1, **common)
    collapse = run_stream(
        test, reference, windows=30, degrade_from=10, seed=2, report_dir=args.out / "evidently", **common
    )
    args.out.mkdir(parents=True, exist_ok=True)
    plot_stream(stationary, "Stationary stream (healthy model)", args.out / "stationary.png")
    plot_stream(
        collapse, f"Collapse stream (+{args.bias} on the majority logit from window 10)", args.out / "collapse.png"
    )
    sizes = [int(size) for size in args.tracking_sizes.split(",")]
    sweep = tracking_by_window_size(test, reference, sizes, args.tracking_windows)
    summary = {
        "model": runtime.version,
        "reference": {"class_shares": dict(reference.class_shares), "minority_recall": reference.minority_recall},
        "stationary": summarise(stationary),
        "collapse": summarise(collapse),
        "tracking_by_window_size": sweep,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name in ("stationary", "collapse"):
        part = summary[name]
        print(
            f"{name}: events {part['events']}, windows to detect {part['windows_to_detect']}, "
            f"tracking {part['tracking']}, noise floor {part['noise_floor']}"
        )
    for size, row in sweep.items():
        print(f"window {size}: estimated {row['estimated']}, noise floor {row['noise_floor']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
