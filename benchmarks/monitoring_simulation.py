"""The monitor, the detector and tier 1 on real MELD streams, with the shipped artifact and its production reference.

    python -m benchmarks.monitoring_simulation [--model DIR] [--data-dir DIR] [--streams 200] [--out docs]

All of MELD (train, dev, test: 13,708 turns) is scored once through the serving runtime and cached
(monitoring/meld_stream.py); every stream below goes window by window (500 predictions) through the production
analysis and detector (monitoring/simulation.py) against the reference the artifact records:

- healthy: all of MELD, dialogues in order, with no labels and with 10% of turns audit-labelled;
- label shift: the same dialogues thinned class by class to 80% neutral (pure label shift); the estimated prior
  and the label-free minority recall against the truth over the whole stream, and what tier 1's correction
  (retraining/tier1_priors.py, estimated from the stream's newest 2,000 predictions as a job reads them) does to
  macro F1 there and on unshifted MELD test;
- collapse: all of MELD with +2 on the neutral logit from window 10;
- degraded champion: all of MELD served from window 10 by a champion whose emotion classifier was retrained by
  tier 2's cRT (retraining/tier2_head.py `train_head`) on feedback whose minority labels were flipped to neutral
  (MELD train's turns, on the shipped context graph's frozen features); like the demo's faulty release it carries
  the shipped artifact's calibration record;
- false alarms: `--streams` healthy streams of 27 windows resampled from MELD's dialogues (a bootstrap over
  conversations), with exact 95% intervals.

Writes OUT/reports/monitoring_simulation.json and the plots OUT/img/monitoring_*.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from core.settings import get_settings
from model.artifact import ModelArtifact, load_artifact
from monitoring.collapse import rules_from_settings
from monitoring.estimation import label_free_recall, mean_recall, measure_recall
from monitoring.meld_stream import ScoredMeld, score_all_meld
from monitoring.simulation import (
    SimulationSettings,
    Stream,
    false_alarm_rate,
    healthy_stream,
    label_shift_stream,
    logit_bias,
    plot_stream,
    reference_from_artifact,
    run_stream,
    summarise,
    with_logits_from,
)
from retraining.graphs import FEATURES_OUTPUT, run_context, session, with_features_output
from retraining.tier1_priors import PRIOR_WINDOW, correction, refusal
from retraining.tier2_head import HeadTraining, train_head
from training.metrics import macro_f1

WINDOW = 500
DEGRADE_FROM_WINDOW = 10
AUDIT_SHARE = 0.10
SHIFTED_SHARE = 0.8
COLLAPSE_BIAS = 2.0


def settings_for(artifact: ModelArtifact, audit_share: float = 0.0, seed: int = 0) -> SimulationSettings:
    settings = get_settings()
    return SimulationSettings(
        temperature=artifact.calibration.temperature,
        rules=rules_from_settings(settings, min_predictions=WINDOW),
        window=WINDOW,
        audit_share=audit_share,
        label_horizon=settings.monitor_label_horizon,
        replicates=settings.monitor_bootstrap_replicates,
        seed=seed,
    )


def degraded_logits(artifact: ModelArtifact, scored: ScoredMeld, minority: Sequence[str], seed: int = 0) -> np.ndarray:
    """Logits [N, C] of every MELD turn under a classifier retrained by tier 2 on corrupted feedback: MELD train's
    turns with every minority label turned into the majority one (neutral)."""
    graph = session(with_features_output(artifact.context_path))
    dialogues = [
        (scored.embeddings[rows], scored.speakers[rows], False) for rows in scored.dialogues(np.arange(len(scored)))
    ]
    (features,) = run_context(graph, dialogues, [FEATURES_OUTPUT])
    names = scored.names
    labels = scored.true.copy()
    labels[np.isin(labels, [names.index(m) for m in minority])] = names.index("neutral")
    train = scored.rows("train")
    head = train_head(features[train], labels[train], len(names), HeadTraining(seed=seed))
    return features.astype(np.float64) @ head.weight.T.astype(np.float64) + head.bias


def label_shift_report(
    stream: Stream, artifact: ModelArtifact, scored: ScoredMeld, minority: Sequence[str]
) -> dict[str, Any]:
    """Over the whole shifted stream: the estimated prior against the true share, the label-free minority recall
    against the measured one; and tier 1's correction's effect on macro F1, there and on unshifted MELD test."""
    from monitoring.prior import ShiftModel

    names = artifact.emotions.names
    temperature = artifact.calibration.temperature
    served = stream.served(temperature)
    model = ShiftModel.from_calibration(artifact.calibration)
    prior = model.fit_prior(model.posteriors(served)).prior
    measured = mean_recall(measure_recall(stream.true, served.argmax(1), names), minority)
    estimated = mean_recall(label_free_recall(served, names, model), minority)
    report: dict[str, Any] = {
        "turns": len(stream),
        "true_neutral_share": float(np.mean(stream.true == names.index("neutral"))),
        "estimated_neutral_prior": float(prior[names.index("neutral")]),
        "estimated_prior": dict(zip(names, prior.round(4).tolist(), strict=True)),
        "true_prior": dict(
            zip(names, (np.bincount(stream.true, minlength=len(names)) / len(stream)).round(4).tolist(), strict=True)
        ),
        "minority_recall_measured": measured,
        "minority_recall_label_free": estimated,
    }
    report["held_out_turns"] = held_out_recall(scored, artifact, minority)
    test = healthy_stream(scored)
    test_rows = scored.rows("test")
    unshifted = Stream(
        "MELD test", test.logits[test_rows], test.true[test_rows], test.conversations[test_rows], test.splits[test_rows]
    )
    report["tier1"] = {
        name: tier1_effect(s, artifact) for name, s in (("shifted", stream), ("unshifted_meld_test", unshifted))
    }
    return report


def held_out_recall(
    scored: ScoredMeld, artifact: ModelArtifact, minority: Sequence[str], seeds: int = 10
) -> dict[str, Any]:
    """The label-free minority recall against the measured one on MELD dev and test (turns the model never trained
    on) thinned to the shifted share, over `seeds` thinnings (one holds about 80 minority turns, so the measurement
    of each is noisy): on prior-corrected posteriors, and uncorrected (posteriors under the training prior)."""
    from monitoring.prior import ShiftModel

    names = artifact.emotions.names
    model = ShiftModel.from_calibration(artifact.calibration)
    uncorrected = ShiftModel(artifact.calibration, None, None)  # the posteriors taken as they are
    rows = np.concatenate([scored.rows("dev"), scored.rows("test")])
    gaps: dict[str, list[float]] = {"corrected": [], "uncorrected": []}
    measured_values = []
    for seed in range(seeds):
        stream = label_shift_stream(scored, names.index("neutral"), SHIFTED_SHARE, seed, rows)
        served = stream.served(artifact.calibration.temperature)
        measured = mean_recall(measure_recall(stream.true, served.argmax(1), names), minority)
        measured_values.append(measured)
        for name, shift_model in (("corrected", model), ("uncorrected", uncorrected)):
            estimate = mean_recall(label_free_recall(served, names, shift_model), minority)
            gaps[name].append(float(estimate - measured))  # type: ignore[operator]
    return {
        "thinnings": seeds,
        "turns_each": len(stream),
        "minority_recall_measured_mean": float(np.mean(measured_values)),
        **{f"{name}_gap_mean": float(np.mean(v)) for name, v in gaps.items()},
        **{f"{name}_gaps": v for name, v in gaps.items()},
    }


def tier1_effect(stream: Stream, artifact: ModelArtifact) -> dict[str, Any]:
    """Tier 1 estimated from the stream's newest PRIOR_WINDOW predictions, applied (when it may be) to every turn."""
    names = artifact.emotions.names
    served = stream.served(artifact.calibration.temperature)
    recent = slice(max(0, len(stream) - PRIOR_WINDOW), len(stream))
    found = correction(served[recent], stream.conversations[recent], artifact.calibration, names)
    refused = refusal(found, names)
    offset = np.zeros(len(names)) if refused else np.asarray(found.offset)
    before = macro_f1(stream.true, stream.logits.argmax(1), len(names))
    after = macro_f1(stream.true, (stream.logits + offset).argmax(1), len(names))
    accuracy = [float(np.mean((stream.logits + o).argmax(1) == stream.true)) for o in (0, offset)]
    return {
        "applied": refused is None,
        "refused": refused,
        "new_prior": dict(zip(names, np.round(found.new_prior, 4).tolist(), strict=True)),
        "macro_f1_before": before,
        "macro_f1_after": after,
        "macro_f1_change": after - before,
        "accuracy_before": accuracy[0],
        "accuracy_after": accuracy[1],
    }


def brief(summary: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in summary.items() if key != "records"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="artifact directory (default: the shipped default, assembled)")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--cache-dir", type=Path, help="MELD scores cache (default: STATE/cache/meld-scores)")
    parser.add_argument("--streams", type=int, default=200, help="resampled healthy streams for the false alarms")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    settings = get_settings()
    data_dir = args.data_dir or settings.data_dir
    if args.model is None:
        from model.default_model import shipped_artifact

        args.model = shipped_artifact(settings.state_dir)
    artifact = load_artifact(args.model)
    scored = score_all_meld(args.model, data_dir, args.cache_dir or settings.state_dir / "cache" / "meld-scores")
    minority = tuple(settings.minority_classes)
    reference = reference_from_artifact(artifact, minority)
    started = time.time()
    healthy = healthy_stream(scored)
    neutral = scored.names.index("neutral")
    collapse = with_logits_from(
        healthy, logit_bias(healthy.logits, neutral, COLLAPSE_BIAS), DEGRADE_FROM_WINDOW * WINDOW, "collapse"
    )
    degraded = with_logits_from(
        healthy, degraded_logits(artifact, scored, minority), DEGRADE_FROM_WINDOW * WINDOW, "degraded champion"
    )
    shifted = label_shift_stream(scored, neutral, SHIFTED_SHARE, seed=0)
    runs = {
        "healthy": (healthy, settings_for(artifact)),
        "healthy_audit": (healthy, settings_for(artifact, AUDIT_SHARE)),
        "label_shift": (shifted, settings_for(artifact)),
        "label_shift_audit": (shifted, settings_for(artifact, AUDIT_SHARE)),
        "collapse": (collapse, settings_for(artifact)),
        "degraded_champion": (degraded, settings_for(artifact)),
    }
    records = {name: run_stream(stream, reference, s) for name, (stream, s) in runs.items()}
    summary: dict[str, Any] = {
        "model": artifact.version,
        "reference": {"class_shares": dict(reference.class_shares), "minority_recall": reference.minority_recall},
        "rules": asdict(settings_for(artifact).rules),
        **{name: summarise(r) for name, r in records.items()},
        "label_shift_stream": label_shift_report(shifted, artifact, scored, minority),
        "false_alarms": false_alarm_rate(
            scored, reference, settings_for(artifact), streams=args.streams, windows=len(healthy) // WINDOW
        ),
        "seconds": round(time.time() - started, 1),
    }
    reports, images = args.out / "reports", args.out / "img"
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "monitoring_simulation.json").write_text(json.dumps(summary, indent=2, default=float))
    titles = {
        "healthy": "Healthy: all of MELD, dialogues in order (no labels)",
        "label_shift": f"Pure label shift: MELD thinned to {SHIFTED_SHARE:.0%} neutral",
        "collapse": f"Collapse: +{COLLAPSE_BIAS:g} on the neutral logit from window {DEGRADE_FROM_WINDOW}",
        "degraded_champion": f"Degraded champion (tier 2 on flipped minority labels) from window {DEGRADE_FROM_WINDOW}",
    }
    for name, title in titles.items():
        plot_stream(records[name], title, images / f"monitoring_{name}.png")
    for name in runs:
        print(name, json.dumps(brief(summary[name])))
    print("label shift stream", json.dumps(summary["label_shift_stream"], default=float))
    print("false alarms", json.dumps(summary["false_alarms"], default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
