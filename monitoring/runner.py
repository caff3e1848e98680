"""Monitoring of the serving champion: its reference profile, one monitor pass, and the periodic schedule.

The reference is what the champion's artifact recorded on its clean dev set: its predicted-class mix, its
calibration record (training prior, BCTS posteriors, dev confusion) and its minority recall there. Embedding
drift is measured against the first window the champion served, since the artifact carries no embeddings: it
answers "has the traffic moved since this model went live?".
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
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


def reference_minority_recall(artifact: ModelArtifact, minority: Sequence[str]) -> float | None:
    """The champion's own minority recall on held-out data, never on test: on its dev set from the calibration
    record's confusion, else on the held-out split a retrained candidate was gated on; None when unknown."""
    names = artifact.emotions.names
    classes = [names.index(name) for name in minority if name in names]
    reference = artifact.calibration.dev_reference
    if reference is not None and classes:
        rates, support = reference.confusion_rates(), np.asarray(reference.confusion).sum(axis=1)
        present = [k for k in classes if support[k] > 0]
        return float(np.mean([rates[k, k] for k in present])) if present else None
    heldout = artifact.metrics.get("heldout")
    value = heldout.get("minority_recall") if isinstance(heldout, dict) else None
    return None if value is None else float(value)


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
        minority_recall=reference_minority_recall(artifact, minority),
        embeddings=first.embeddings,
        calibration=artifact.calibration,
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
        replicates=settings.monitor_bootstrap_replicates,
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
