"""What the demo's phases and its report share: the run's configuration and state, its timeline, and the
monitoring rows it reads back."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from tqdm import tqdm

from core.db.models import CollapseEvent, MonitoringSnapshot
from core.db.session import session_scope
from equipoise.demo.services import Deployment
from equipoise.demo.traffic import Stream

STORY = """\
The shift toward the majority class is caused on purpose, and the report says so: a faulty release of the default
model is promoted, identical except for +BIAS added to its neutral logit inside the context graph (the emotion
head's bias, as monitoring/simulation.py's `logit_bias` does to logits). It ships the default's model card and
reference class mix, as a release whose packaging went wrong would. The traffic itself (MELD test conversations
in a fixed random order, gold labels sent back as feedback) does not change: what shifts is what the service
predicts. Everything else is the product at work: `equipoise monitor run` after every window of traffic, the
collapse detector, the job queue, `equipoise worker`, the tier-2 retraining, the gate, the hot reload."""

MAJORITY = "neutral"
MINORITY = ("sadness", "disgust", "fear")  # the product's default minority classes, set explicitly here
PHASES = ("setup", "healthy traffic", "faulty release", "retraining", "recovery", "report")


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    data_dir: Path
    model_dir: Path  # the first champion (the shipped default unless told otherwise)
    window: int = 400  # predictions per monitoring window
    bias: float = 5.0  # added to the faulty release's neutral logit (about 90 % of answers become neutral)
    healthy_windows: int = 2
    max_collapse_windows: int = 6  # windows of traffic on the faulty release before the demo gives up
    recovery_windows: int = 2
    conversations: int | None = None  # cap on the MELD test conversations streamed (default: all 280)
    seed: int = 0
    job_timeout_s: float = 900.0


@dataclass
class Timeline:
    """Wall time per phase, printed as each phase starts and ends."""

    started: float = field(default_factory=time.monotonic)
    phases: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str, what: str) -> Iterator[None]:
        number = PHASES.index(name) + 1 if name in PHASES else 0
        tqdm.write(f"[{number}/{len(PHASES)}] {name}: {what}")
        start = time.monotonic()
        yield
        self.phases[name] = time.monotonic() - start
        tqdm.write(f"      {name} done in {self.phases[name]:.1f} s")

    @property
    def total(self) -> float:
        return time.monotonic() - self.started


def say(message: str) -> None:
    tqdm.write(f"      {message}")


@dataclass
class Demo:
    """Everything the phases share; `summary` collects what the report needs."""

    config: DemoConfig
    deployment: Deployment
    engine: Engine
    stream: Stream
    timeline: Timeline
    versions: dict[str, str] = field(default_factory=dict)  # role -> version
    artifacts: dict[str, Path] = field(default_factory=dict)  # role -> artifact directory
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- monitoring rows


def snapshots(engine: Engine) -> list[MonitoringSnapshot]:
    with session_scope(engine) as session:
        rows = list(session.scalars(select(MonitoringSnapshot).order_by(MonitoringSnapshot.id)))
        session.expunge_all()
        return rows


def events(engine: Engine) -> list[CollapseEvent]:
    with session_scope(engine) as session:
        rows = list(session.scalars(select(CollapseEvent).order_by(CollapseEvent.id)))
        session.expunge_all()
        return rows
