"""Monitoring on real MELD streams, offline: does the monitor stay quiet when it should and fire when it must?

All of MELD is scored once through the serving runtime (monitoring/meld_stream.py). A *stream* is a sequence of
those turns, whole dialogues in order, served with some logits (the model's, or a degraded model's) and the
artifact's serving temperature. Every window of a stream goes through the production analysis
(`analyse_window`) and detector (`CollapseDetector`) against the *production* reference: the one the artifact
records (`reference_from_artifact`, as the monitor builds it), never one rebuilt here. A share of the turns
may carry their gold label as audit feedback (a random sample, as audit sampling makes it).

The streams the acceptance asks for are built here: the healthy stream (all of MELD, dialogues in order), pure
label shift (each class's turns kept with a class-specific probability, so p(x | y) and the model's per-class
behaviour do not move), a model leaning to the majority class (a constant on its logit), any other model's
logits from some window on, and resampled healthy streams (a bootstrap over conversations) for the false-alarm
rate. `benchmarks/monitoring_simulation.py` runs them all and writes docs/MONITORING.md's figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import beta

from core.db.models import FeedbackKind
from core.settings import MONITOR_BOOTSTRAP_REPLICATES
from model.artifact import ModelArtifact
from monitoring.analysis import LabelledTurns, ReferenceProfile, analyse_window
from monitoring.collapse import CollapseDetector, CollapseRules
from monitoring.estimation import labelled_minority_recall, mean_recall, measure_recall
from monitoring.meld_stream import ScoredMeld
from monitoring.runner import reference_minority_recall


@dataclass(frozen=True)
class Stream:
    """Turns served in this order: raw emotion logits, gold labels, conversations, and where the model changed."""

    name: str
    logits: np.ndarray  # [N, C]
    true: np.ndarray  # [N]
    conversations: np.ndarray  # [N]
    splits: np.ndarray  # [N] the MELD split of each turn
    degraded_from: int | None = None  # first turn served by a degraded model

    def __len__(self) -> int:
        return len(self.true)

    def served(self, temperature: float) -> np.ndarray:
        scaled = self.logits / temperature
        exp = np.exp(scaled - scaled.max(axis=1, keepdims=True))
        return exp / exp.sum(axis=1, keepdims=True)


def reference_from_artifact(artifact: ModelArtifact, minority: Sequence[str]) -> ReferenceProfile:
    """The champion's yardstick exactly as the monitor reads it from the artifact (monitoring/runner.py), less the
    embeddings of the first served window."""
    names = artifact.emotions.names
    return ReferenceProfile(
        names=names,
        class_shares=dict(artifact.reference_distribution),
        minority=tuple(name for name in minority if name in names),
        minority_recall=reference_minority_recall(artifact, minority),
        calibration=artifact.calibration,
    )


def healthy_stream(scored: ScoredMeld) -> Stream:
    """All of MELD, train then dev then test, dialogues in order."""
    return _stream("healthy", scored, np.arange(len(scored)))


def label_shift_stream(
    scored: ScoredMeld, majority: int, share: float, seed: int, rows: np.ndarray | None = None
) -> Stream:
    """All of MELD (or its `rows`) in order, thinned class by class so that `share` of the turns are of class
    `majority`: every turn of the class that must grow is kept, every other turn with one probability. Thinning
    by class keeps p(x | y), the model's behaviour on each class, and the order of the dialogues: pure label
    shift."""
    rows = np.arange(len(scored)) if rows is None else np.asarray(rows)
    is_majority = scored.true[rows] == majority
    ratio = share / (1 - share) * (~is_majority).sum() / is_majority.sum()
    draw = np.random.default_rng(seed).random(len(rows))
    keep = np.where(is_majority, draw < min(ratio, 1.0), draw < min(1 / ratio, 1.0))
    return _stream(f"label shift to {share:.0%} {scored.names[majority]}", scored, rows[keep])


def resampled_stream(scored: ScoredMeld, turns: int, seed: int) -> Stream:
    """Healthy traffic of about `turns` turns: whole MELD dialogues drawn with replacement (a bootstrap over
    conversations), one after the other; a dialogue drawn twice becomes two conversations."""
    rng = np.random.default_rng(seed)
    dialogues = scored.dialogues(np.arange(len(scored)))
    chosen: list[np.ndarray] = []
    while sum(len(d) for d in chosen) < turns:
        chosen.append(dialogues[rng.integers(len(dialogues))])
    rows = np.concatenate(chosen)
    stream = _stream(f"resampled {seed}", scored, rows)
    draws = np.repeat(np.arange(len(chosen)), [len(d) for d in chosen])
    return Stream(stream.name, stream.logits, stream.true, draws, stream.splits)


def with_logits_from(stream: Stream, logits: np.ndarray, turn: int, name: str) -> Stream:
    """`stream` served from `turn` on by a model whose logits for the same turns are `logits` [N, C]."""
    served = stream.logits.copy()
    served[turn:] = logits[turn:]
    return Stream(name, served, stream.true, stream.conversations, stream.splits, turn)


def logit_bias(logits: np.ndarray, cls: int, bias: float) -> np.ndarray:
    """The same model with `bias` added to one class's raw logit (its head's bias)."""
    shifted = logits.copy()
    shifted[:, cls] += bias
    return shifted


def _stream(name: str, scored: ScoredMeld, rows: np.ndarray) -> Stream:
    return Stream(name, scored.logits[rows], scored.true[rows], scored.conversation[rows], scored.split[rows])


@dataclass(frozen=True)
class WindowRecord:
    window: int
    split: str  # the MELD split of the window's first turn
    degraded: bool
    majority_share: float  # of the served labels
    true_majority_share: float
    estimated_majority_prior: float
    estimated_majority_prior_lower: float
    estimated_majority_prior_upper: float
    prior_shifted: bool
    mix_p_value: float | None
    unexplained_share: float | None
    drifted: bool  # class-mix drift: the clustered test and the Jensen-Shannon floor
    drift_p_value: float
    js_distance: float
    minority_recall_estimated: float | None  # label-free, prior-corrected
    minority_recall_estimated_lower: float | None
    minority_recall_estimated_upper: float | None
    minority_recall_true: float | None  # measured on every turn of the window (the simulation knows all labels)
    audit_labels: int
    minority_recall_audit: float | None  # measured on the window's audit labels
    labelled_horizon: int | None  # audit labels the newest precise measurement spans; None: not yet precise
    minority_recall_labelled: float | None
    minority_recall_labelled_estimated: float | None
    suspicious: bool
    fired: bool
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class SimulationSettings:
    temperature: float  # the artifact's serving temperature
    rules: CollapseRules
    window: int = 500
    audit_share: float = 0.0
    label_horizon: int = 20_000
    replicates: int = MONITOR_BOOTSTRAP_REPLICATES
    seed: int = 0


def run_stream(stream: Stream, reference: ReferenceProfile, settings: SimulationSettings) -> list[WindowRecord]:
    """Every complete window of `stream` through the production analysis and detector."""
    served = stream.served(settings.temperature)
    audited = np.random.default_rng(settings.seed).random(len(stream)) < settings.audit_share
    detector = CollapseDetector(settings.rules)
    names, majority = reference.names, reference.names.index(reference.majority)
    records = []
    for w in range(len(stream) // settings.window):
        rows = np.arange(w * settings.window, (w + 1) * settings.window)
        true = np.where(audited[rows], stream.true[rows], -1)
        labels = LabelledTurns(true, FeedbackKind.AUDIT) if audited[rows].any() else LabelledTurns.unlabelled(len(rows))
        findings = analyse_window(
            served[rows],
            labels,
            stream.conversations[rows],
            reference,
            replicates=settings.replicates,
            seed=w,
            mix_alpha=settings.rules.mix_alpha,
        )
        decision = detector.observe(findings.signals(reference))
        shift = findings.label_shift
        prior = shift.prior[majority]
        minority = shift.minority_recall
        seen = np.flatnonzero(audited[: rows[-1] + 1])[::-1][: settings.label_horizon]  # newest audit labels first
        labelled = labelled_minority_recall(
            served[seen],
            stream.true[seen],
            names,
            reference.minority,
            precision=settings.rules.recall_precision,
            model=reference.shift_model,
        )
        records.append(
            WindowRecord(
                window=w,
                split=str(stream.splits[rows[0]]),
                degraded=stream.degraded_from is not None and rows[0] >= stream.degraded_from,
                majority_share=findings.majority_share,
                true_majority_share=float(np.mean(stream.true[rows] == majority)),
                estimated_majority_prior=prior.estimate,
                estimated_majority_prior_lower=prior.lower,
                estimated_majority_prior_upper=prior.upper,
                prior_shifted=shift.shift_significant,
                mix_p_value=shift.mix_p_value,
                unexplained_share=shift.unexplained_share,
                drifted=findings.drift.drifted,
                drift_p_value=findings.drift.p_value,
                js_distance=findings.drift.js_distance,
                minority_recall_estimated=findings.minority_recall_estimated,
                minority_recall_estimated_lower=None if minority is None else minority.lower,
                minority_recall_estimated_upper=None if minority is None else minority.upper,
                minority_recall_true=minority_recall_of(served[rows], stream.true[rows], reference),
                audit_labels=findings.n_labelled,
                minority_recall_audit=findings.minority_recall_measured,
                labelled_horizon=labelled.labelled if labelled else None,
                minority_recall_labelled=labelled.measured if labelled else None,
                minority_recall_labelled_estimated=labelled.estimated if labelled else None,
                suspicious=decision.suspicious,
                fired=decision.fired,
                reasons=decision.reasons,
            )
        )
    return records


def minority_recall_of(served: np.ndarray, true: np.ndarray, reference: ReferenceProfile) -> float | None:
    return mean_recall(measure_recall(true, served.argmax(axis=1), reference.names), reference.minority)


def proportion_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Clopper-Pearson (exact) interval of a binomial proportion."""
    tail = (1 - confidence) / 2
    lower = 0.0 if successes == 0 else float(beta.ppf(tail, successes, trials - successes + 1))
    upper = 1.0 if successes == trials else float(beta.ppf(1 - tail, successes + 1, trials - successes))
    return lower, upper


def summarise(records: Sequence[WindowRecord]) -> dict[str, Any]:
    fired = [r.window for r in records if r.fired]
    first_degraded = next((r.window for r in records if r.degraded), None)
    after = [w for w in fired if first_degraded is not None and w >= first_degraded]
    drifted = sum(r.drifted for r in records)
    return {
        "windows": len(records),
        "events": fired,
        "false_alarms": [w for w in fired if first_degraded is None or w < first_degraded],
        "windows_to_detect": None if not after or first_degraded is None else after[0] - first_degraded + 1,
        "suspicious_windows": sum(r.suspicious for r in records),
        "drift_flagged": drifted,
        "drift_flagged_share": drifted / max(len(records), 1),
        "drift_test_significant": sum(r.drift_p_value < 0.01 for r in records),
        "prior_shift_flagged": sum(r.prior_shifted for r in records),
        "mix_unexplained": sum(r.mix_p_value is not None and r.mix_p_value < 0.01 for r in records),
        "records": [asdict(r) for r in records],
    }


def false_alarm_rate(
    scored: ScoredMeld,
    reference: ReferenceProfile,
    settings: SimulationSettings,
    *,
    streams: int,
    windows: int,
    seed: int = 1000,
) -> dict[str, Any]:
    """Collapse events and flagged windows on `streams` resampled healthy streams of `windows` windows each, with
    Clopper-Pearson 95% intervals: the share of streams with any event, and the per-window rates."""
    counts = {"streams_with_event": 0, "events": 0, "suspicious": 0, "drifted": 0, "prior_shifted": 0}
    for s in range(streams):
        stream = resampled_stream(scored, windows * settings.window, seed + s)
        records = run_stream(stream, reference, settings)
        events = sum(r.fired for r in records)
        counts["streams_with_event"] += events > 0
        counts["events"] += events
        counts["suspicious"] += sum(r.suspicious for r in records)
        counts["drifted"] += sum(r.drifted for r in records)
        counts["prior_shifted"] += sum(r.prior_shifted for r in records)
    total = streams * windows
    rates: dict[str, Any] = {"streams": streams, "windows": total, **counts}
    rates["stream_event_share"] = counts["streams_with_event"] / streams
    rates["stream_event_interval"] = proportion_interval(counts["streams_with_event"], streams)
    for key in ("suspicious", "drifted", "prior_shifted"):
        rates[f"{key}_share"] = counts[key] / total
        rates[f"{key}_interval"] = proportion_interval(counts[key], total)
    return rates


def plot_stream(records: Sequence[WindowRecord], title: str, path: Path) -> None:
    """Served and true majority share, the estimated prior with its interval, and minority recall (label-free with
    its interval, and true) per window; collapse events as red lines, degraded windows shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    windows = np.array([r.window for r in records])
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(windows, [r.majority_share for r in records], label="majority share of predictions")
    top.plot(windows, [r.true_majority_share for r in records], ":", color="black", label="true majority share")
    top.plot(windows, [r.estimated_majority_prior for r in records], color="C2", label="estimated prior (no labels)")
    top.fill_between(
        windows,
        [r.estimated_majority_prior_lower for r in records],
        [r.estimated_majority_prior_upper for r in records],
        color="C2",
        alpha=0.2,
        label="  95% interval (bootstrap over conversations)",
    )
    estimated = [np.nan if r.minority_recall_estimated is None else r.minority_recall_estimated for r in records]
    bottom.plot(windows, estimated, color="C1", label="minority recall, label-free")
    bottom.fill_between(
        windows,
        [np.nan if r.minority_recall_estimated_lower is None else r.minority_recall_estimated_lower for r in records],
        [np.nan if r.minority_recall_estimated_upper is None else r.minority_recall_estimated_upper for r in records],
        color="C1",
        alpha=0.2,
    )
    true = [np.nan if r.minority_recall_true is None else r.minority_recall_true for r in records]
    bottom.plot(windows, true, ":", color="black", label="minority recall, measured on every turn")
    for axis in (top, bottom):
        for r in records:
            if r.fired:
                axis.axvline(r.window, color="red", linestyle="--", label="collapse event")
        first_degraded = next((r.window for r in records if r.degraded), None)
        if first_degraded is not None:
            axis.axvspan(first_degraded - 0.5, windows[-1] + 0.5, color="grey", alpha=0.15, label="degraded model")
        handles, labels = axis.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        axis.legend(unique.values(), unique.keys(), loc="upper left", fontsize=7)
        axis.set_ylim(0, 1)
    top.set_title(title)
    bottom.set_xlabel("window (500 predictions)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
