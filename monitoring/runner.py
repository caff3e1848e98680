"""Monitoring of the serving champion: its reference profile, one monitor pass, and the periodic schedule.

The reference is what the champion's artifact recorded on held-out data (its predicted-class mix and its
minority recall). Embedding drift is measured against the first window the champion served, since the
artifact carries no embeddings: it answers "has the traffic moved since this model went live?".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from core.db.session import session_scope
from core.settings import Settings
from model.artifact import ModelArtifact, load_artifact
from model.registry import ModelRegistry
from monitoring.analysis import ReferenceProfile
from monitoring.collapse import CollapseRules, rules_from_settings
from monitoring.estimation import class_shares
from monitoring.job import MonitorRun, MonitorSettings, run_monitor
from monitoring.windows import load_window

log = logging.getLogger(__name__)


def reference_minority_recall(metrics: Mapping[str, Any]) -> float | None:
    """Minority recall the artifact recorded on dev (preferred) or test, if any."""
    for split in ("dev", "test"):
        value = metrics.get(split, {}).get("minority_recall") if isinstance(metrics.get(split), dict) else None
        if value is not None:
            return float(value)
    return None


def reference_profile(
    engine: Engine, artifact: ModelArtifact, minority: Sequence[str], window_size: int
) -> ReferenceProfile | None:
    """The champion's yardstick; None while it has served less than one window (nothing to compare yet)."""
    names = artifact.emotions.names
    with session_scope(engine) as session:
        first = load_window(session, artifact.version, names, after=None, limit=window_size)
    if len(first) < window_size:
        return None
    shares = dict(artifact.reference_distribution) or class_shares(first.predicted, names)
    return ReferenceProfile(
        names=names,
        class_shares=shares,
        minority=tuple(name for name in minority if name in names),
        minority_recall=reference_minority_recall(artifact.metrics),
        embeddings=first.embeddings,
        estimation_weights=artifact.calibration.estimation_weights,
    )


def monitor_champion(engine: Engine, settings: Settings, rules: CollapseRules | None = None) -> MonitorRun | None:
    """One monitoring pass over the champion's new windows; None when there is no champion or too little data."""
    assert settings.registry_dir is not None
    champion = ModelRegistry(engine, settings.registry_dir).champion()
    if champion is None:
        return None
    artifact = load_artifact(Path(champion.artifact_path))
    reference = reference_profile(engine, artifact, settings.minority_classes, settings.monitor_window)
    if reference is None:
        return None
    monitoring = MonitorSettings(
        window_size=settings.monitor_window,
        reports_root=settings.state_dir / "reports",
        label_horizon=settings.monitor_label_horizon,
    )
    return run_monitor(engine, artifact.version, reference, monitoring, rules or rules_from_settings(settings))


class MonitorSchedule:
    """Runs `monitor_champion` every `interval_s` on a daemon thread; a failing pass is logged, not fatal."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self._engine, self._settings = engine, settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="equipoise-monitor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while not self._stop.wait(self._settings.monitor_interval_s):
            try:
                run = monitor_champion(self._engine, self._settings)
            except Exception:  # noqa: BLE001 - the schedule must survive a bad pass (DB outage, bad report)
                log.exception("monitoring pass failed")
                continue
            if run and run.events:
                log.warning("collapse detected: events %s queued retraining jobs %s", run.events, run.jobs)
