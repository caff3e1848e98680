"""Fixtures of the API tests: a fake runtime for fast in-process apps, fabricated artifacts for the registry, and
a real `equipoise serve` process for the integration tests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text

from api.app import create_app
from core import processes
from core.db import crud, migrate
from core.db.models import ModelStatus, ModelVersion, Role
from core.db.session import make_engine, session_scope
from core.processes import Service, equipoise_environment, free_port, running_service
from core.settings import Settings, load_settings
from model.artifact import write_artifact
from model.labels import EMOTIONS, SENTIMENTS, LabelSet
from model.preprocess import PreprocessingConfig
from model.runtime import TurnPrediction, UtteranceInput
from tests.conftest import postgres_database

FAKE_VERSION = "fake-1"


def without_equipoise_environment(patch: pytest.MonkeyPatch) -> None:
    """Settings are built explicitly here; stray EQUIPOISE_* variables (CI sets some) must not leak in."""
    for key in [key for key in os.environ if key.startswith("EQUIPOISE_")]:
        patch.delenv(key)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    without_equipoise_environment(monkeypatch)


# ------------------------------------------------------------------------------------------------ fake runtime


@dataclass
class FakeRuntime:
    """Deterministic probabilities from a hash of each turn's text and position; records every call."""

    version: str = FAKE_VERSION
    emotions: LabelSet = LabelSet(EMOTIONS)
    sentiments: LabelSet = LabelSet(SENTIMENTS)
    providers: tuple[str, ...] = ("FakeExecutionProvider",)
    precision: str = "fp32"
    rescore_margin: float = 0.0
    hears_audio: bool = True
    delay_s: float = 0.0
    poison: float = 1.0  # multiplies the probabilities: NaN or 2.0 make a model the probe must refuse
    calls: list[tuple[list[int], bool]] = field(default_factory=list)

    def classify(
        self, dialogues: list[list[UtteranceInput]], causal: bool, history: Sequence[Any] | None = None
    ) -> list[list[TurnPrediction]]:
        self.calls.append(([len(dialogue) for dialogue in dialogues], causal))
        if any(turn.text == "explode" for dialogue in dialogues for turn in dialogue):
            raise RuntimeError("the fake model cannot score 'explode'")
        time.sleep(self.delay_s)
        return [[self._turn(turn, index, causal) for index, turn in enumerate(dialogue)] for dialogue in dialogues]

    def classify_in_waves(
        self, dialogues: list[list[UtteranceInput]], causal: bool, history: Sequence[Any] | None = None
    ) -> Iterator[tuple[list[int], list[list[TurnPrediction]]]]:
        """One wave: the fake answers a batch all at once."""
        yield list(range(len(dialogues))), self.classify(dialogues, causal, history)

    def _turn(self, turn: UtteranceInput, index: int, causal: bool) -> TurnPrediction:
        seed = hashlib.sha256(f"{turn.text}|{turn.audio is not None}|{index}|{causal}".encode()).digest()
        emotion = _softmax(np.frombuffer(seed[: len(self.emotions)], dtype=np.uint8) / 32.0) * self.poison
        sentiment = _softmax(np.frombuffer(seed[8 : 8 + len(self.sentiments)], dtype=np.uint8) / 32.0)
        index = int(np.nanargmax(emotion)) if np.isfinite(emotion).any() else self.emotions.index("neutral")
        return TurnPrediction(
            emotion=self.emotions.name(index),
            emotion_index=index,
            emotion_probs=emotion.astype(np.float32),
            sentiment=self.sentiments.name(int(sentiment.argmax())),
            sentiment_probs=sentiment.astype(np.float32),
            embedding=np.frombuffer(seed, dtype=np.uint8).astype(np.float32)[:16],
        )


def _softmax(values: np.ndarray) -> np.ndarray:
    weights = np.exp(values - values.max())
    return weights / weights.sum()


def add_version(engine: Engine, version: str = FAKE_VERSION, status: ModelStatus = ModelStatus.CHAMPION) -> None:
    """A model_versions row without an artifact, for apps served by FakeRuntime."""
    with session_scope(engine) as session:
        session.add(
            ModelVersion(
                version=version,
                status=status,
                artifact_path=f"/nonexistent/{version}",
                artifact_sha256=hashlib.sha256(version.encode()).hexdigest(),
                labels=list(EMOTIONS),
            )
        )


# ------------------------------------------------------------------------------------------------ in-process app


def settings_for(root: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "state_dir": root / "state",
        "database_url": f"sqlite:///{root / 'equipoise.db'}",
        "log_flush_interval_s": 0.05,
        "model_poll_interval_s": 0.2,
        "gc_freeze": False,  # freezing would keep every earlier test's objects in this process
    }
    return load_settings(**(values | overrides))


@dataclass
class InProcess:
    client: TestClient
    settings: Settings
    engine: Engine
    runtimes: list[FakeRuntime]

    @property
    def state(self) -> Any:
        return self.client.app.state.service  # type: ignore[attr-defined]


RuntimeFactory = Callable[[ModelVersion], FakeRuntime]


@contextlib.contextmanager
def in_process_app(
    settings: Settings, runtime: RuntimeFactory | None = None, champion: bool = True
) -> Iterator[InProcess]:
    """The app on a migrated database whose champion (a row without artifact) is served by FakeRuntime."""
    migrate.upgrade(str(settings.database_url))
    engine = make_engine(str(settings.database_url))
    if champion:
        add_version(engine)
    runtimes: list[FakeRuntime] = []

    def loader(row: ModelVersion) -> FakeRuntime:
        runtimes.append(runtime(row) if runtime else FakeRuntime(version=row.version))
        return runtimes[-1]

    try:
        with TestClient(create_app(settings, loader=loader), raise_server_exceptions=False) as client:
            yield InProcess(client, settings, engine, runtimes)
    finally:
        engine.dispose()


@pytest.fixture()
def start_app(tmp_path: Path) -> Iterator[Callable[..., InProcess]]:
    """start(runtime=None, champion=True, **settings) -> a running in-process app, stopped after the test."""
    with contextlib.ExitStack() as stack:

        def start(runtime: RuntimeFactory | None = None, champion: bool = True, **overrides: Any) -> InProcess:
            return stack.enter_context(in_process_app(settings_for(tmp_path, **overrides), runtime, champion))

        yield start


def wait_for(condition: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05) -> Any:
    return processes.wait_for(condition, timeout_s, "the condition", interval_s)


def count_rows(engine: Engine, table: str = "predictions") -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


# ------------------------------------------------------------------------------------------------ artifacts


def fake_artifact(directory: Path, version: str, emotions: tuple[str, ...] = EMOTIONS) -> Path:
    """A verifiable artifact whose graphs are placeholders: enough for the registry, not for ONNX Runtime."""
    parts = directory / f"{version}-parts"
    parts.mkdir(parents=True)
    for name in ("encoder.onnx", "context.onnx"):
        (parts / name).write_bytes(f"{name} of {version}".encode())
    (parts / "tokenizer.json").write_text(json.dumps({"version": version}))
    write_artifact(
        directory / version,
        version=version,
        graphs={"encoder.onnx": parts / "encoder.onnx", "context.onnx": parts / "context.onnx"},
        tokenizer=parts / "tokenizer.json",
        model_config={"emotions": list(emotions), "sentiments": list(SENTIMENTS), "embed_dim": 16},
        preprocessing=PreprocessingConfig(),
        card_text=f"# {version}\n",
    )
    return directory / version


# ------------------------------------------------------------------------------------------------ PostgreSQL


@contextlib.contextmanager
def new_database(kind: str, root: Path) -> Iterator[str]:
    """The URL of a new, empty database: "sqlite" a file under `root`, "postgres" one on the test server (dropped
    afterwards)."""
    if kind == "postgres":
        with postgres_database() as url:
            yield url
    else:
        yield f"sqlite:///{root / 'equipoise.db'}"


def keys_by_role(url: str) -> dict[Role, str]:
    """Migrate the database at `url` and create one API key per role; the keys as a client sends them."""
    migrate.upgrade(url)
    engine = make_engine(url)
    with session_scope(engine) as session:
        keys = {role: crud.create_api_key(session, f"{role.value}-key", role)[1] for role in Role}
    engine.dispose()
    return keys


# ------------------------------------------------------------------------------------------------ real server


@dataclass
class Server(Service):
    """A running `equipoise serve` (core.processes) and the database it logs to."""

    database_url: str

    def client(self, **kwargs: Any) -> httpx.Client:
        return super().client(**{"timeout": 30.0} | kwargs)

    def log(self) -> str:
        return self.process.log()

    def stop(self, timeout_s: float = 30) -> int:
        """Graceful stop (SIGTERM); the exit status, -SIGTERM being a clean exit too."""
        return self.process.stop(timeout_s)


def server_settings(state_dir: Path, database_url: str, **settings: str) -> dict[str, str]:
    """The settings of a server process in the tests: these, with test-friendly defaults."""
    return {
        "state_dir": str(state_dir),
        "database_url": database_url,
        "device": "cpu",
        "intra_op_threads": "1",
        "log_flush_interval_s": "0.1",
        "model_poll_interval_s": "0.5",
        "shipped_default": "false",  # assembling it takes a minute; tests of it ask for it
    } | settings


def server_environment(state_dir: Path, database_url: str, **settings: str) -> dict[str, str]:
    """The environment of a server process: nothing inherited from EQUIPOISE_*, test-friendly defaults."""
    return equipoise_environment(server_settings(state_dir, database_url, **settings))


@contextlib.contextmanager
def running_server(state_dir: Path, database_url: str, *, ready: bool = True, **settings: str) -> Iterator[Server]:
    """`python -m equipoise serve` on a free loopback port; waits for /readyz (or /healthz when not `ready`)."""
    port = free_port()
    with running_service(
        server_settings(state_dir, database_url, **settings),
        state_dir / f"server-{port}.log",
        port=port,
        ready_path="/readyz" if ready else "/healthz",
        timeout_s=90,
    ) as service:
        yield Server(service.process, service.url, database_url)
