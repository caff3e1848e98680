"""The monitoring job over a real database: snapshots per window, one collapse event and one job per collapse."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, func, select

from core.db import migrate
from core.db.models import (
    CollapseEvent,
    Feedback,
    ModelStatus,
    ModelVersion,
    MonitoringSnapshot,
    Prediction,
    RequestKind,
    RetrainingJob,
)
from core.db.session import make_engine, session_scope
from monitoring.analysis import ReferenceProfile
from monitoring.collapse import CollapseRules
from monitoring.job import MonitorSettings, run_monitor

NAMES = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
SHARES = (0.47, 0.17, 0.12, 0.11, 0.07, 0.03, 0.03)
REFERENCE = ReferenceProfile(
    names=NAMES,
    class_shares=dict(zip(NAMES, SHARES, strict=True)),
    minority=("sadness", "disgust", "fear"),
    minority_recall=0.45,
)
WINDOW = 300
RULES = CollapseRules(min_predictions=WINDOW)


@pytest.fixture()
def engine(database_url: str) -> Iterator[Engine]:
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    with session_scope(engine) as session:
        session.add(
            ModelVersion(version="v1", status=ModelStatus.CHAMPION, artifact_path="-", artifact_sha256="0" * 64)
        )
    yield engine
    engine.dispose()


def _window_rows(
    rng: np.random.Generator, start: datetime, shares: tuple[float, ...], confidence: float, has_text: bool = True
) -> list:
    """Predictions whose labels follow `shares`; a third carry a feedback label drawn from the probabilities."""
    rows: list = []
    for i, k in enumerate(rng.choice(len(NAMES), WINDOW, p=shares)):
        probabilities = np.full(len(NAMES), (1 - confidence) / (len(NAMES) - 1))
        probabilities[k] = confidence
        prediction = Prediction(
            id=uuid.uuid4(),
            created_at=start + timedelta(milliseconds=i),
            model_version="v1",
            request_kind=RequestKind.UTTERANCE,
            has_text=has_text,
            has_audio=not has_text,
            label=NAMES[k],
            label_index=int(k),
            confidence=confidence,
            probabilities=probabilities.tolist(),
            latency_ms=1.0,
            embedding=rng.normal(size=8).astype("<f4").tobytes(),
        )
        rows.append(prediction)
        if i % 3 == 0:
            rows.append(Feedback(prediction_id=prediction.id, label=NAMES[rng.choice(len(NAMES), p=probabilities)]))
    return rows


def _log(
    engine: Engine, windows: int, shares: tuple[float, ...], confidence: float, offset: int, has_text: bool = True
) -> None:
    rng = np.random.default_rng(offset)
    base = datetime(2026, 1, 1, tzinfo=UTC)
    with session_scope(engine) as session:
        for w in range(windows):
            session.add_all(_window_rows(rng, base + timedelta(minutes=offset + w), shares, confidence, has_text))


def _count(engine: Engine, model: type) -> int:
    with session_scope(engine) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def _monitor(engine: Engine, reports: Path, precision: float = 0.04, horizon: int = 20_000) -> None:
    rules = replace(RULES, recall_precision=precision)
    run_monitor(engine, "v1", REFERENCE, MonitorSettings(WINDOW, reports, horizon), rules)


def _snapshots(engine: Engine) -> list[MonitoringSnapshot]:
    with session_scope(engine) as session:
        return list(session.scalars(select(MonitoringSnapshot).order_by(MonitoringSnapshot.id)))


def test_stationary_then_collapsed_stream(engine: Engine, tmp_path: Path) -> None:
    _log(engine, 4, SHARES, confidence=0.8, offset=0)
    _monitor(engine, tmp_path)
    assert _count(engine, MonitoringSnapshot) == 4 and _count(engine, CollapseEvent) == 0

    _monitor(engine, tmp_path)  # nothing new: no new snapshot
    assert _count(engine, MonitoringSnapshot) == 4

    collapsed = (0.85, 0.06, 0.04, 0.03, 0.01, 0.005, 0.005)
    _log(engine, 4, collapsed, confidence=0.4, offset=10)
    _monitor(engine, tmp_path)
    assert _count(engine, MonitoringSnapshot) == 8
    with session_scope(engine) as session:
        events = list(session.scalars(select(CollapseEvent)))
        assert len(events) == 1, "one collapse, one event, despite four collapsed windows"
        job = session.get(RetrainingJob, events[0].job_id)
        assert job is not None and job.status.value == "queued" and "majority" in job.reason
        snapshot = session.get(MonitoringSnapshot, events[0].snapshot_id)
        assert snapshot is not None and snapshot.drift_detected and snapshot.n_labelled == 100
        assert Path(snapshot.report_path or "", "class_drift.html").is_file()
        first_collapsed = session.scalars(select(MonitoringSnapshot).order_by(MonitoringSnapshot.id)).all()[4]
        assert events[0].snapshot_id == first_collapsed.id + 1, "fires on the second collapsed window"

    _log(engine, 2, collapsed, confidence=0.4, offset=20)
    _monitor(engine, tmp_path)  # still collapsed, still cooling down: no second event after a restart
    assert _count(engine, CollapseEvent) == 1


def test_audio_only_turns_are_not_monitored(engine: Engine, tmp_path: Path) -> None:
    """Voice-only traffic served by the speech head, all neutral and unsure, between healthy text windows: the
    monitor reads the text turns only (its reference is the text path's), so neither a window nor an alarm."""
    _log(engine, 2, SHARES, confidence=0.8, offset=0)
    _log(engine, 3, (1.0, 0, 0, 0, 0, 0, 0), confidence=0.3, offset=0, has_text=False)
    _log(engine, 2, SHARES, confidence=0.8, offset=5)
    _monitor(engine, tmp_path)
    snapshots = _snapshots(engine)
    assert [s.n_predictions for s in snapshots] == [WINDOW] * 4 and _count(engine, CollapseEvent) == 0
    assert all(not s.drift_detected for s in snapshots)


def test_minority_recall_is_measured_over_as_many_labelled_predictions_as_its_precision_needs(
    engine: Engine, tmp_path: Path
) -> None:
    """A window holds ~3 labelled fear turns: too few alone; the measurement reaches back over earlier windows'
    labels until its 95% half-width is within the precision, and the estimate on those same predictions agrees
    (the synthetic labels are drawn from the served probabilities, so they are calibrated)."""
    _log(engine, 8, SHARES, confidence=0.8, offset=0)
    _monitor(engine, tmp_path, precision=0.1)
    snapshots = _snapshots(engine)
    measured = [s for s in snapshots if s.labelled_horizon is not None]
    assert snapshots[0].labelled_horizon is None and snapshots[0].minority_recall_labelled is None
    assert measured and all((s.minority_recall_measured_halfwidth or 1) > 0.1 for s in snapshots), "no window alone"
    for index, snapshot in enumerate(snapshots):
        if snapshot.labelled_horizon is None:
            continue
        assert snapshot.labelled_horizon <= (index + 1) * WINDOW // 3  # only labels logged up to its window's end
        assert snapshot.minority_recall_labelled_halfwidth is not None
        assert snapshot.minority_recall_labelled_halfwidth <= 0.1
        assert snapshot.minority_recall_labelled is not None and snapshot.minority_recall_labelled_estimated is not None
        gap = abs(snapshot.minority_recall_labelled - snapshot.minority_recall_labelled_estimated)
        assert gap <= snapshot.minority_recall_labelled_halfwidth  # within the measurement's own 95% interval


def test_a_horizon_too_short_for_the_precision_measures_nothing(engine: Engine, tmp_path: Path) -> None:
    _log(engine, 3, SHARES, confidence=0.8, offset=0)
    _monitor(engine, tmp_path, precision=0.15, horizon=30)
    assert [s.labelled_horizon for s in _snapshots(engine)] == [None, None, None]


def test_exporter_publishes_the_latest_snapshot_and_registry_state(engine: Engine, tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from monitoring.exporter import MonitoringCollector

    registry = CollectorRegistry()
    registry.register(MonitoringCollector(engine))
    assert b"equipoise_monitor_majority_share" not in generate_latest(registry), "no snapshot yet: no window gauges"

    _log(engine, 1, SHARES, confidence=0.8, offset=0)
    _monitor(engine, tmp_path)
    families = {family.name: family for family in text_string_to_metric_families(generate_latest(registry).decode())}
    recall_sources = {sample.labels["source"] for sample in families["equipoise_monitor_recall"].samples}
    assert recall_sources == {"measured", "estimated"}
    champions = [s for s in families["equipoise_model_versions"].samples if s.labels["status"] == "champion"]
    assert champions[0].value == 1
    assert families["equipoise_monitor_window_predictions"].samples[0].value == WINDOW
    assert families["equipoise_collapse_events"].samples[0].value == 0
