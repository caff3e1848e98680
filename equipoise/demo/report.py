"""The demo's report: the three models scored on the same held-out feedback, what the service answered per phase,
the monitoring windows, PNG plots, OUT/report.md and OUT/summary.json.

Held-out feedback: the streamed turns whose conversation falls in the retraining gate's held-out split
(retraining/dataset.py `is_heldout`), so the retrained model never trained on them; each is scored offline by the
serving runtime within its whole conversation, in the context mode the service used for it.
"""

from __future__ import annotations

import json
import os
import platform
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from equipoise.demo.state import MAJORITY, MINORITY, STORY, Demo, events, snapshots
from equipoise.demo.traffic import Turn
from model.labels import EMOTIONS
from training.metrics import MetricsReport, compute_metrics
from training.plots import plot_models

if TYPE_CHECKING:
    from core.db.models import MonitoringSnapshot

ROLES = {"default": "healthy default", "faulty": "faulty release (collapsed)", "retrained": "retrained (tier 2)"}
PHASE_ROLES = {"healthy": "default", "faulty": "faulty", "retrained": "retrained"}


def metrics(labels: Sequence[str], predicted: Sequence[str]) -> MetricsReport:
    true, guessed = [EMOTIONS.index(x) for x in labels], [EMOTIONS.index(x) for x in predicted]
    return compute_metrics(true, guessed, EMOTIONS, minority=MINORITY)


def score_heldout(artifact_dir: Path, turns: Sequence[Turn]) -> list[str]:
    """The artifact's emotion for every held-out turn of `turns` (in order), each scored in its conversation."""
    from model.runtime import InferenceRuntime, UtteranceInput

    runtime = InferenceRuntime.load(artifact_dir, device="cpu")
    conversations: dict[str, list[Turn]] = defaultdict(list)
    for turn in turns:
        conversations[turn.conversation].append(turn)
    answers: dict[tuple[str, int], str] = {}
    for causal in (True, False):
        chosen = [c for c, ts in conversations.items() if ts[0].causal == causal and any(t.heldout for t in ts)]
        dialogues = [[UtteranceInput(t.text, None, t.speaker) for t in conversations[c]] for c in chosen]
        for conversation, scored in zip(chosen, runtime.classify(dialogues, causal=causal), strict=True):
            answers.update({(conversation, k): p.emotion for k, p in enumerate(scored)})
    return [answers[(t.conversation, t.turn_index)] for t in turns if t.heldout]


def heldout_reports(demo: Demo) -> dict[str, MetricsReport]:
    turns = demo.stream.sent
    labels = [t.label for t in turns if t.heldout]
    return {role: metrics(labels, score_heldout(demo.artifacts[role], turns)) for role in ROLES}


def served_reports(turns: Sequence[Turn]) -> dict[str, tuple[MetricsReport, float, int]]:
    """Per phase, from the service's own answers: metrics, the majority class's share of answers, turns."""
    result = {}
    for phase in PHASE_ROLES:
        sent = [t for t in turns if t.phase == phase]
        if sent:
            share = sum(t.predicted == MAJORITY for t in sent) / len(sent)
            result[phase] = (metrics([t.label for t in sent], [t.predicted for t in sent]), share, len(sent))
    return result


# ---------------------------------------------------------------------------------------------- plots


def plot_class_mix(rows: Sequence[MonitoringSnapshot], event_snapshot: int | None, path: Path) -> Path:
    """Predicted class shares per monitoring window (stacked), model versions shaded, the collapse event marked."""
    figure = Figure(figsize=(10, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    axis = figure.add_subplot()
    x = np.arange(1, len(rows) + 1)
    bottom = np.zeros(len(rows))
    for name in EMOTIONS:
        shares = np.array([float(r.class_shares.get(name, 0.0)) for r in rows])
        axis.bar(x, shares, 0.8, bottom=bottom, label=name)
        bottom += shares
    axis.step(x, [r.reference_shares[MAJORITY] for r in rows], "k--", where="mid", label=f"reference {MAJORITY}")
    _shade_versions(axis, rows)
    for k, row in enumerate(rows, start=1):
        if row.id == event_snapshot:
            axis.axvline(k + 0.5, color="red", linewidth=2, label="collapse event")
    axis.set(xlabel="monitoring window", ylabel="share of predictions", ylim=(0, 1.12), xticks=x)
    axis.set_title("Predicted class mix per monitoring window")
    figure.legend(loc="outside right center", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _shade_versions(axis: Any, rows: Sequence[MonitoringSnapshot]) -> None:
    start = 0
    for k in range(1, len(rows) + 1):
        if k == len(rows) or rows[k].model_version != rows[start].model_version:
            axis.axvspan(start + 0.5, k + 0.5, ymin=0.9, color=("0.85", "0.7")[len(axis.texts) % 2], alpha=0.6)
            axis.text((start + k + 1) / 2, 1.06, rows[start].model_version, ha="center", fontsize=7)
            start = k


# ---------------------------------------------------------------------------------------------- markdown


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def recall_table(reports: dict[str, MetricsReport]) -> list[str]:
    first = next(iter(reports.values()))
    header = "| model | " + " | ".join(f"{n} (n={s})" for n, s in zip(first.labels, first.support, strict=True))
    lines = [header + " | macro F1 | minority recall |", "|---" * (len(first.labels) + 3) + "|"]
    for role, report in reports.items():
        cells = " | ".join(_pct(v) for v in report.recall)
        lines.append(f"| {ROLES[role]} | {cells} | {_pct(report.macro_f1)} | {_pct(report.minority_recall)} |")
    return lines


def served_table(demo: Demo, served: dict[str, tuple[MetricsReport, float, int]]) -> list[str]:
    lines = [
        f"| phase | version | turns | {MAJORITY} share of answers | accuracy | macro F1 | minority recall |",
        "|---|---|---|---|---|---|---|",
    ]
    for phase, (report, share, n) in served.items():
        version = demo.versions.get(PHASE_ROLES[phase], "")
        lines.append(
            f"| {phase} | {version} | {n} | {share:.3f} | {_pct(report.accuracy)} | {_pct(report.macro_f1)} | "
            f"{_pct(report.minority_recall)} |"
        )
    return lines


def windows_table(rows: Sequence[MonitoringSnapshot], event_snapshot: int | None) -> list[str]:
    lines = [
        f"| window | version | predictions | labelled | {MAJORITY} share (reference) | drift | minority recall "
        "(measured / estimated) | event |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k, r in enumerate(rows, start=1):
        lines.append(
            f"| {k} | {r.model_version} | {r.n_predictions} | {r.n_labelled} | {r.majority_share:.3f} "
            f"({r.reference_shares[MAJORITY]:.3f}) | {'yes' if r.drift_detected else 'no'} | "
            f"{_pct(r.minority_recall_measured)} / {_pct(r.minority_recall_estimated)} | "
            f"{'**collapse**' if r.id == event_snapshot else ''} |"
        )
    return lines


def gate_table(job: dict[str, Any]) -> list[str]:
    champion, candidate = job.get("champion") or {}, job.get("candidate") or {}
    lines = ["| | macro F1 | weighted F1 | minority recall |", "|---|---|---|---|"]
    for name, values in (
        (f"champion {job.get('base_version')}", champion),
        (f"candidate {job['candidate_version']}", candidate),
    ):
        lines.append(
            f"| {name} | {_pct(values.get('macro_f1'))} | {_pct(values.get('weighted_f1'))} | "
            f"{_pct(values.get('minority_recall'))} |"
        )
    return lines


def markdown(demo: Demo, heldout: dict[str, MetricsReport], served: dict[str, Any], rows: list[Any]) -> str:
    config, job, event = demo.config, demo.summary["job"], demo.summary["event"]
    timings = [f"| {name} | {seconds:.1f} |" for name, seconds in demo.timeline.phases.items()]
    n_heldout = int(next(iter(heldout.values())).support.sum())
    story = STORY.replace("+BIAS", f"{config.bias:+g}")
    parity = job.get("parity_max_abs_diff")
    parts = [
        "# Equipoise demo: collapse, retraining, recovery",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {platform.machine()} with {os.cpu_count()} CPU cores; "
        f"`equipoise demo --window {config.window} --bias {config.bias:g}`; "
        f"total **{demo.timeline.total / 60:.1f} min**.",
        "## What happens",
        story,
        f"Versions: healthy default `{demo.versions['default']}`, faulty release `{demo.versions['faulty']}`, "
        f"retrained `{demo.versions['retrained']}`.",
        "## Timings",
        "| phase | seconds |\n|---|---|\n" + "\n".join(timings) + f"\n| **total** | **{demo.timeline.total:.1f}** |",
        "## Monitoring windows",
        "![class mix](class_mix.png)",
        "\n".join(windows_table(rows, demo.summary["event_snapshot"])),
        f"Collapse event {event['id']} on `{event['model_version']}`: {event['reason']}",
        "## Retraining and the gate",
        f"Job {job['id']} (`equipoise worker`): tier {job['tier']} ({job.get('tier_reason')}), "
        f"{job['seconds']:.0f} s in the worker; data {json.dumps(job.get('data', {}).get('per_class'))} feedback "
        f"labels per class plus {job.get('data', {}).get('base_turns')} base-corpus turns. Gate on "
        f"{job.get('heldout', {}).get('turns')} held-out feedback turns (logged embeddings), ONNX parity "
        f"{'-' if parity is None else f'{parity:.1e}'}: **{'promoted' if job.get('promoted') else 'rejected'}**.",
        "\n".join(gate_table(job)),
        "## Per-class recall on the held-out feedback",
        f"{n_heldout} streamed turns in the gate's held-out split (never trained on; the gate saw those streamed "
        "before the job, these include the recovery phase's too), scored offline by the serving runtime in their "
        "conversations, in the context mode the service used, by each of the three models:",
        "![per-class recall](recall_by_model.png)",
        "\n".join(recall_table(heldout)),
        "## What the service answered, per phase",
        "From the service's own answers to the streamed turns (different conversations in each phase):",
        "\n".join(served_table(demo, served)),
        "Logs: `logs/service.log`, `logs/worker.log`, `logs/commands.log`; the database `equipoise.db`; Evidently "
        "reports per window under `state/reports/`.",
    ]
    return "\n\n".join(parts) + "\n"


def write_report(demo: Demo) -> dict[str, Any]:
    out = demo.config.out
    rows = snapshots(demo.engine)
    event_snapshot = next((e.snapshot_id for e in events(demo.engine)), None)
    demo.summary["event_snapshot"] = event_snapshot
    heldout = heldout_reports(demo)
    served = served_reports(demo.stream.sent)
    plot_models(
        {ROLES[r]: rep for r, rep in heldout.items()},
        out / "recall_by_model.png",
        title=f"Per-class recall on {int(next(iter(heldout.values())).support.sum())} held-out feedback turns",
    )
    plot_class_mix(rows, event_snapshot, out / "class_mix.png")
    (out / "report.md").write_text(markdown(demo, heldout, served, rows), encoding="utf-8")
    summary = {
        **demo.summary,
        "versions": demo.versions,
        "timings_s": {**demo.timeline.phases, "total": demo.timeline.total},
        "heldout": {role: report.to_dict() for role, report in heldout.items()},
        "served": {
            phase: {"report": r.to_dict(), "majority_share": s, "turns": n} for phase, (r, s, n) in served.items()
        },
        "windows": len(rows),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    return summary
