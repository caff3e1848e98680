"""The monitoring job: turn new logged predictions into snapshots, and collapse into retraining jobs.

Each run processes every complete window logged since the last snapshot of the model version (catching up
after downtime), stores one snapshot per window with its Evidently reports on disk, and feeds the collapse
detector, whose state is rebuilt from the snapshots since the last collapse event.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from core.db.models import CollapseEvent, FeedbackKind, JobTrigger, MonitoringSnapshot, RetrainingJob
from core.db.session import session_scope
from core.settings import MONITOR_BOOTSTRAP_REPLICATES
from monitoring.analysis import ReferenceProfile, WindowFindings, analyse_window
from monitoring.collapse import CollapseDetector, CollapseRules, Decision, WindowSignals
from monitoring.estimation import LabelledRecall, labelled_minority_recall
from monitoring.prior import Interval, LabelShiftEstimate
from monitoring.windows import Window, load_labelled, load_window

REPLAY_LIMIT = 500


@dataclass(frozen=True)
class MonitorRun:
    snapshots: list[int]
    events: list[int]
    jobs: list[int]


def _last_snapshot(session: Session, version: str) -> MonitoringSnapshot | None:
    query = select(MonitoringSnapshot).where(MonitoringSnapshot.model_version == version)
    return session.scalar(query.order_by(MonitoringSnapshot.window_end.desc(), MonitoringSnapshot.id.desc()).limit(1))


def _store_snapshot(
    session: Session,
    window: Window,
    findings: WindowFindings,
    labelled: LabelledRecall | None,
    reference: ReferenceProfile,
    report_dir: Path,
) -> MonitoringSnapshot:
    snapshot = MonitoringSnapshot(
        model_version=window.model_version,
        window_start=window.start,
        window_end=window.end,
        n_predictions=findings.n_predictions,
        n_labelled=findings.n_labelled,
        class_shares=findings.class_shares,
        reference_shares=dict(reference.class_shares),
        majority_share=findings.majority_share,
        drift_score=findings.drift.js_distance,
        drift_p_value=findings.drift.p_value,
        drift_detected=findings.drift.drifted,
        embedding_drift=findings.embedding_drift,
        measured_recall=findings.measured_recall,
        estimated_recall=findings.estimated_recall,
        minority_recall_measured=findings.minority_recall_measured,
        minority_recall_estimated=findings.minority_recall_estimated,
        minority_recall_measured_halfwidth=findings.minority_recall_halfwidth,
        minority_recall_measured_upper=findings.minority_recall_measured_upper,
        measured_source=None if findings.measured_source is None else findings.measured_source.value,
        labelled_horizon=labelled.labelled if labelled else None,
        minority_recall_labelled=labelled.measured if labelled else None,
        minority_recall_labelled_estimated=labelled.estimated if labelled else None,
        minority_recall_labelled_halfwidth=labelled.halfwidth if labelled else None,
        labelled_source=labelled.source.value if labelled and labelled.source else None,
        report_path=str(report_dir),
        **label_shift_columns(findings.label_shift),
    )
    session.add(snapshot)
    session.flush()
    return snapshot


def label_shift_columns(shift: LabelShiftEstimate) -> dict[str, Any]:
    """The snapshot columns of one window's label-shift estimate."""
    names = shift.names

    def per_class(intervals: Sequence[Interval | None], part: str) -> dict[str, float | None]:
        return {name: None if i is None else getattr(i, part) for name, i in zip(names, intervals, strict=True)}

    minority = shift.minority_recall
    return {
        "n_conversations": shift.conversations,
        "estimated_prior": per_class(shift.prior, "estimate"),
        "estimated_prior_lower": per_class(shift.prior, "lower"),
        "estimated_prior_upper": per_class(shift.prior, "upper"),
        "prior_shift_detected": shift.shift_significant,
        "expected_shares": None if shift.expected_shares is None else per_class(shift.expected_shares, "estimate"),
        "mix_unexplained_share": shift.unexplained_share,
        "mix_p_value": shift.mix_p_value,
        "estimated_recall_lower": per_class(shift.recall, "lower"),
        "estimated_recall_upper": per_class(shift.recall, "upper"),
        "minority_recall_estimated_lower": None if minority is None else minority.lower,
        "minority_recall_estimated_upper": None if minority is None else minority.upper,
    }


def snapshot_signals(snapshot: MonitoringSnapshot, reference: ReferenceProfile) -> WindowSignals:
    return WindowSignals(
        n_predictions=snapshot.n_predictions,
        n_labelled=snapshot.n_labelled,
        majority_share=snapshot.majority_share,
        reference_majority_share=float(snapshot.reference_shares[reference.majority]),
        drifted=snapshot.drift_detected,
        minority_recall_measured=snapshot.minority_recall_measured,
        minority_recall_estimated=snapshot.minority_recall_estimated,
        reference_minority_recall=reference.minority_recall,
        minority_recall_halfwidth=snapshot.minority_recall_measured_halfwidth,
        minority_recall_measured_upper=snapshot.minority_recall_measured_upper,
        measured_source=snapshot.measured_source,
        minority_recall_estimated_upper=snapshot.minority_recall_estimated_upper,
        mix_p_value=snapshot.mix_p_value,
        prior_shifted=bool(snapshot.prior_shift_detected),
        minority_share=sum(float(snapshot.class_shares[name]) for name in reference.minority),
        reference_minority_share=reference.minority_share,
    )


def _detector(session: Session, version: str, reference: ReferenceProfile, rules: CollapseRules) -> CollapseDetector:
    """The detector as it stood after the last stored snapshot."""
    last_event = session.scalar(
        select(CollapseEvent).where(CollapseEvent.model_version == version).order_by(CollapseEvent.id.desc()).limit(1)
    )
    query = select(MonitoringSnapshot).where(MonitoringSnapshot.model_version == version)
    if last_event is not None and last_event.snapshot_id is not None:
        query = query.where(MonitoringSnapshot.id > last_event.snapshot_id)
    recent = list(session.scalars(query.order_by(MonitoringSnapshot.id.desc()).limit(REPLAY_LIMIT)))
    history = [snapshot_signals(s, reference) for s in reversed(recent)]
    return CollapseDetector.replay(history, rules, fired_before=last_event is not None)


def _record_collapse(session: Session, snapshot: MonitoringSnapshot, decision: Decision) -> CollapseEvent:
    reason = "collapse toward the majority class: " + "; ".join(decision.reasons)
    job = RetrainingJob(trigger=JobTrigger.COLLAPSE, reason=reason, base_version=snapshot.model_version)
    session.add(job)
    session.flush()
    event = CollapseEvent(
        model_version=snapshot.model_version,
        snapshot_id=snapshot.id,
        reason=reason,
        evidence=decision.evidence | {"report_path": snapshot.report_path},
        job_id=job.id,
    )
    session.add(event)
    session.flush()
    return event


def newest_labelled_recall(
    session: Session,
    version: str,
    reference: ReferenceProfile,
    *,
    until: datetime,
    settings: MonitorSettings,
    rules: CollapseRules,
) -> LabelledRecall | None:
    """Minority recall over the newest audit-labelled predictions up to `until` when they are enough for the rules'
    precision; else over the newest corrections (biased toward mistakes: their source says so); else None."""
    for kind in (FeedbackKind.AUDIT, FeedbackKind.CORRECTION):
        probabilities, true = load_labelled(
            session, version, reference.names, until=until, limit=settings.label_horizon, kind=kind
        )
        found = labelled_minority_recall(
            probabilities,
            true,
            reference.names,
            reference.minority,
            precision=rules.recall_precision,
            model=reference.shift_model,
        )
        if found is not None:
            return replace(found, source=kind)
    return None


@dataclass(frozen=True)
class MonitorSettings:
    window_size: int
    reports_root: Path
    label_horizon: int  # most labelled predictions the measurement of minority recall may span
    replicates: int = MONITOR_BOOTSTRAP_REPLICATES  # resamples of a window's conversations behind its intervals


def run_monitor(
    engine: Engine,
    version: str,
    reference: ReferenceProfile,
    settings: MonitorSettings,
    rules: CollapseRules,
) -> MonitorRun:
    """Process every complete window of `version` not yet snapshotted, one transaction per window: its snapshot
    (and event and job) commit before the next window's analysis, so the prediction logger never waits on it."""
    with session_scope(engine) as session:
        detector = _detector(session, version, reference, rules)
        last = _last_snapshot(session, version)
        after = last.window_end if last else None
    run = MonitorRun([], [], [])
    while after is not _DONE:
        with session_scope(engine) as session:
            after = _monitor_next_window(session, version, reference, settings, detector, after, run)
    return run


_DONE = datetime.max


def _monitor_next_window(
    session: Session,
    version: str,
    reference: ReferenceProfile,
    settings: MonitorSettings,
    detector: CollapseDetector,
    after: datetime | None,
    run: MonitorRun,
) -> datetime:
    """Snapshot the window after `after`; its end, or _DONE when no complete window is left. Each snapshot also
    measures minority recall over the newest labelled predictions up to its end, as many as the rules'
    `recall_precision` needs, beside the label-free estimate on the same predictions
    (monitoring/estimation.py labelled_minority_recall)."""
    window = load_window(session, version, reference.names, after=after, limit=settings.window_size)
    if len(window) < settings.window_size:
        return _DONE
    report_dir = settings.reports_root / version / window.end.strftime("%Y%m%dT%H%M%S%f")
    findings = analyse_window(
        window.probabilities,
        window.labels,
        window.conversations,
        reference,
        embeddings=window.embeddings,
        report_dir=report_dir,
        replicates=settings.replicates,
        mix_alpha=detector.rules.mix_alpha,
    )
    labelled = newest_labelled_recall(
        session, version, reference, until=window.end, settings=settings, rules=detector.rules
    )
    snapshot = _store_snapshot(session, window, findings, labelled, reference, report_dir)
    run.snapshots.append(snapshot.id)
    decision = detector.observe(findings.signals(reference))
    if decision.fired:
        event = _record_collapse(session, snapshot, decision)
        run.events.append(event.id)
        run.jobs.append(event.job_id or 0)
    return window.end
