"""Prometheus gauges read from the database at scrape time: the monitor's latest findings, collapse events,
retraining jobs and registered model versions.

Reading at scrape time (rather than setting gauges when the monitor runs) means every service replica
exports the same truth, and a monitor running in another process (worker, cron) is visible too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.db.crud import labelled_counts
from core.db.models import CollapseEvent, JobStatus, ModelStatus, ModelVersion, MonitoringSnapshot, RetrainingJob

log = logging.getLogger(__name__)

SNAPSHOT_GAUGES: dict[str, tuple[str, str]] = {
    "equipoise_monitor_majority_share": ("majority_share", "Share of the window's predictions in the majority class"),
    "equipoise_monitor_drift_js_distance": ("drift_score", "Jensen-Shannon distance of the predicted-class mix"),
    "equipoise_monitor_drift_p_value": ("drift_p_value", "Chi-square p-value of the predicted-class mix"),
    "equipoise_monitor_drift_detected": ("drift_detected", "1 when the predicted-class mix drifted"),
    "equipoise_monitor_embedding_drift_auc": ("embedding_drift", "Domain-classifier AUC, window vs reference"),
    "equipoise_monitor_window_predictions": ("n_predictions", "Predictions in the latest window"),
    "equipoise_monitor_window_labelled": ("n_labelled", "Predictions with feedback labels in the latest window"),
    "equipoise_monitor_labelled_horizon": (
        "labelled_horizon",
        "Labelled predictions the latest measured minority recall spans (as many as its precision needs)",
    ),
    "equipoise_monitor_minority_recall_halfwidth": (
        "minority_recall_measured_halfwidth",
        "95% confidence half-width of the minority recall measured on the latest window's labels",
    ),
    "equipoise_monitor_labelled_minority_recall_halfwidth": (
        "minority_recall_labelled_halfwidth",
        "95% confidence half-width of the minority recall measured over the labelled predictions",
    ),
    "equipoise_monitor_window_conversations": ("n_conversations", "Conversations in the latest window"),
    "equipoise_monitor_prior_shift_detected": (
        "prior_shift_detected",
        "1 when the class prior estimated without labels moved significantly from the training prior (label shift)",
    ),
    "equipoise_monitor_mix_p_value": (
        "mix_p_value",
        "p-value of the served class mix against the mix the estimated prior explains (low: the model changed)",
    ),
    "equipoise_monitor_mix_unexplained_share": (
        "mix_unexplained_share",
        "Total variation between the served class mix and the mix the estimated prior explains",
    ),
    "equipoise_monitor_minority_recall_estimated_lower": (
        "minority_recall_estimated_lower",
        "Lower bound of the label-free minority recall's 95% interval (bootstrap over conversations)",
    ),
    "equipoise_monitor_minority_recall_estimated_upper": (
        "minority_recall_estimated_upper",
        "Upper bound of the label-free minority recall's 95% interval (bootstrap over conversations)",
    ),
}


class MonitoringCollector(Collector):
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        try:
            with Session(self._engine) as session:
                yield from self._snapshot_metrics(session)
                yield from _label_metrics(session)
                yield from self._registry_metrics(session)
                yield from _gate_metrics(session)
        except SQLAlchemyError as error:  # the database may be down; the service's own metrics must still scrape
            log.warning("monitoring metrics unavailable: %s", error.__class__.__name__)

    def _snapshot_metrics(self, session: Session) -> Iterator[Metric]:
        latest = session.scalar(
            select(MonitoringSnapshot)
            .join(ModelVersion, ModelVersion.version == MonitoringSnapshot.model_version)
            .where(ModelVersion.status == ModelStatus.CHAMPION)
            .order_by(MonitoringSnapshot.id.desc())
            .limit(1)
        )
        if latest is None:
            return
        version = latest.model_version
        for name, (attribute, documentation) in SNAPSHOT_GAUGES.items():
            value = getattr(latest, attribute)
            if value is not None:
                gauge = GaugeMetricFamily(name, documentation, labels=["model_version"])
                gauge.add_metric([version], float(value))
                yield gauge
        yield _per_class(
            "equipoise_monitor_class_share", "Predicted-class share in the latest window", version, latest.class_shares
        )
        yield _per_class(
            "equipoise_monitor_reference_share", "Reference predicted-class share", version, latest.reference_shares
        )
        yield _per_class(
            "equipoise_monitor_recall",
            "Per-class recall in the latest window, measured from feedback or estimated without labels",
            version,
            latest.measured_recall,
            latest.estimated_recall,
        )
        yield _by_source(
            "equipoise_monitor_minority_recall",
            "Mean recall of the minority classes in the latest window",
            version,
            latest.minority_recall_measured,
            latest.minority_recall_estimated,
        )
        yield _by_source(
            "equipoise_monitor_labelled_minority_recall",
            "Minority recall over the newest labelled predictions: measured, and estimated without labels on the same",
            version,
            latest.minority_recall_labelled,
            latest.minority_recall_labelled_estimated,
        )
        yield from _label_shift_metrics(latest)
        yield _single(
            "equipoise_monitor_last_window_end_timestamp_seconds",
            "End of the latest monitored window",
            latest.window_end.timestamp(),
        )

    def _registry_metrics(self, session: Session) -> Iterator[Metric]:
        events = CounterMetricFamily("equipoise_collapse_events", "Collapse events recorded", labels=[])
        events.add_metric([], float(session.scalar(select(func.count()).select_from(CollapseEvent)) or 0))
        yield events
        yield _counts(
            session, RetrainingJob.status, JobStatus, "equipoise_retraining_jobs", "Retraining jobs by status"
        )
        yield _counts(
            session, ModelVersion.status, ModelStatus, "equipoise_model_versions", "Registered model versions by status"
        )


def _label_shift_metrics(latest: MonitoringSnapshot) -> Iterator[Metric]:
    """The latest window's class prior estimated without labels with its 95% interval, and which feedback the
    measured recall used (monitoring/prior.py, monitoring/job.py)."""
    version = latest.model_version
    bounds = {
        "estimate": latest.estimated_prior,
        "lower": latest.estimated_prior_lower,
        "upper": latest.estimated_prior_upper,
    }
    if latest.estimated_prior is not None:
        gauge = GaugeMetricFamily(
            "equipoise_monitor_estimated_prior",
            "Class prior of the latest window estimated without labels (MLLS on BCTS posteriors), with the bounds of "
            "its 95% interval over the window's conversations",
            labels=["model_version", "label", "bound"],
        )
        for bound, shares in bounds.items():
            for label, value in (shares or {}).items():
                if value is not None:
                    gauge.add_metric([version, label, bound], float(value))
        yield gauge
    if latest.expected_shares is not None:
        yield _per_class(
            "equipoise_monitor_expected_share",
            "Predicted-class share the estimated prior explains through the model's dev confusion",
            version,
            latest.expected_shares,
        )
    if latest.measured_source is not None:
        source = GaugeMetricFamily(
            "equipoise_monitor_measured_recall_source",
            "1 for the kind of feedback the latest window's measured recall used: audit (a random sample) or "
            "correction (biased toward mistakes)",
            labels=["model_version", "kind"],
        )
        for kind in ("audit", "correction"):
            source.add_metric([version, kind], float(latest.measured_source == kind))
        yield source


def _label_metrics(session: Session) -> Iterator[Metric]:
    champion = session.scalar(select(ModelVersion.version).where(ModelVersion.status == ModelStatus.CHAMPION))
    if champion is None:
        return
    gauge = GaugeMetricFamily(
        "equipoise_labelled_predictions",
        "Champion's predictions carrying a feedback label, by kind: audit (offered for random labelling) or correction",
        labels=["model_version", "kind"],
    )
    for kind, count in labelled_counts(session, champion).items():
        gauge.add_metric([champion, kind.value], float(count))
    yield gauge


GATE_JOBS_SCANNED = 20  # newest succeeded jobs searched for a gate decision that reached the paired test


def _gate_metrics(session: Session) -> Iterator[Metric]:
    """The newest gate decision with a paired test (retraining/gate.py): each gain's bounds and estimate, and the
    lower bound each promotion rule requires."""
    jobs = session.scalars(
        select(RetrainingJob)
        .where(RetrainingJob.status == JobStatus.SUCCEEDED)
        .order_by(RetrainingJob.finished_at.desc(), RetrainingJob.id.desc())
        .limit(GATE_JOBS_SCANNED)
    )
    job = next((job for job in jobs if isinstance((job.result or {}).get("paired"), dict)), None)
    if job is None:
        return
    paired, version = job.result["paired"], str(job.candidate_version or job.result.get("version"))
    gains = GaugeMetricFamily(
        "equipoise_gate_gain",
        "Newest gate decision: gain of the candidate over the champion on the held-out feedback, with the lower and "
        "upper bound of its paired bootstrap interval over conversations",
        labels=["candidate_version", "metric", "bound"],
    )
    for metric, interval in paired.get("gains", {}).items():
        for bound in ("lower", "estimate", "upper"):
            if interval is not None and interval.get(bound) is not None:
                gains.add_metric([version, metric, bound], float(interval[bound]))
    yield gains
    required = GaugeMetricFamily(
        "equipoise_gate_required_lower_bound",
        "Newest gate decision: the value each gain's lower bound had to exceed for promotion",
        labels=["candidate_version", "metric"],
    )
    for metric, value in paired.get("required_lower_bounds", {}).items():
        required.add_metric([version, metric], float(value))
    yield required


def _single(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], value)
    return gauge


def _by_source(
    name: str, documentation: str, version: str, measured: float | None, estimated: float | None
) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation, labels=["model_version", "source"])
    for source, value in (("measured", measured), ("estimated", estimated)):
        if value is not None:
            gauge.add_metric([version, source], value)
    return gauge


def _per_class(
    name: str,
    documentation: str,
    version: str,
    values: dict[str, float | None],
    estimated: dict[str, float | None] | None = None,
) -> GaugeMetricFamily:
    """One gauge per class; with `estimated`, a `source` label tells measured from estimated values."""
    sources = [("measured", values), ("estimated", estimated)] if estimated is not None else [(None, values)]
    labels = ["model_version", "label"] + (["source"] if estimated is not None else [])
    gauge = GaugeMetricFamily(name, documentation, labels=labels)
    for source, per_class in sources:
        for label, value in per_class.items():
            if value is not None:
                gauge.add_metric([version, label] + ([source] if source else []), float(value))
    return gauge


def _counts(session: Session, column: object, states: type, name: str, documentation: str) -> GaugeMetricFamily:
    found = dict(session.execute(select(column, func.count()).group_by(column)).all())
    gauge = GaugeMetricFamily(name, documentation, labels=["status"])
    for state in states:
        gauge.add_metric([state.value], float(found.get(state, 0)))
    return gauge
