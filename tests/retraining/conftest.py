"""Fixtures of the retraining tests: a migrated database, a registry with a tiny collapsed champion, and helpers
that log synthetic predictions and feedback the way the service does."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sqlalchemy import Engine

from core.db import migrate
from core.db.models import ContextMode, Feedback, JobTrigger, Prediction, RequestKind, RetrainingJob
from core.db.session import make_engine, session_scope
from model.registry import ModelRegistry
from tests.conftest import one_torch_thread

NEUTRAL_LEAN = 4.0  # added to the champion's neutral logit: it collapses toward the majority class


_one_torch_thread = pytest.fixture(autouse=True, scope="package")(one_torch_thread)


@pytest.fixture()
def engine(database_url: str) -> Iterator[Engine]:
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture()
def sqlite_engine(sqlite_url: str) -> Iterator[Engine]:
    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def tiny_export(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The suite's tiny exported artifact (the `tiny_artifact` fixture) when it exists; else one made here."""
    try:
        shared = request.getfixturevalue("tiny_artifact")
        return Path(getattr(shared, "path", shared))
    except pytest.FixtureLookupError:
        from model.artifact import export_artifact
        from model.network import EmotionModel, ModelConfig

        torch.manual_seed(0)
        model = EmotionModel(ModelConfig.tiny()).eval()
        return export_artifact(model, tmp_path_factory.mktemp("tiny") / "tiny", version="tiny-0", int8=False).path


@pytest.fixture(scope="session")
def champion_dir(tiny_export: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with its emotion head leaning hard toward neutral: a champion collapsed on the majority."""
    from model.artifact import load_artifact, write_artifact
    from retraining.graphs import EmotionHead, read_head, write_head
    from retraining.tiers import head_graphs

    tiny = load_artifact(tiny_export)
    work = tmp_path_factory.mktemp("champion")
    head = read_head(tiny.context_path)
    lean = np.zeros_like(head.bias)
    lean[tiny.emotions.index("neutral")] = NEUTRAL_LEAN
    context = write_head(tiny.context_path, work / "context.onnx", EmotionHead(head.weight, head.bias + lean))
    write_artifact(
        work / "tiny-1",
        version="tiny-1",
        graphs=head_graphs(tiny, context),
        tokenizer=tiny.tokenizer_path,
        model_config=tiny.config,
        preprocessing=tiny.preprocessing,
        calibration=tiny.calibration,
        weights=tiny.weights_path,  # the PyTorch state of its graphs (the classifier is read from context.onnx)
    )
    return work / "tiny-1"


@pytest.fixture()
def registry(engine: Engine, champion_dir: Path, tmp_path: Path) -> ModelRegistry:
    registry = ModelRegistry(engine, tmp_path / "registry")
    registry.promote(registry.register(champion_dir).version)
    return registry


def run_job(
    database: Engine, registry: ModelRegistry, tmp_path: Path, /, data_dir: Path | None = None, **job: Any
) -> RetrainingJob:
    """Queue a job and let a worker run the real pipeline on it (base corpora from `data_dir`, none by default);
    the job as it ended."""
    from retraining.pipeline import Environment, retrain
    from retraining.queue import JobQueue
    from retraining.worker import Worker

    environment = Environment(registry, tmp_path / "state", data_dir, ("sadness", "disgust", "fear"), "cpu")
    job_id = add_job(database, **job)
    worker = Worker(JobQueue(database, "test-worker"), tmp_path / "jobs", lambda ctx: retrain(ctx, environment))
    assert worker.run(once=True) == 1
    with session_scope(database) as session:
        return session.get_one(RetrainingJob, job_id)


def add_job(database: Engine, /, **values: object) -> int:
    with session_scope(database) as session:
        job = RetrainingJob(**{"trigger": JobTrigger.ADMIN, "reason": "test", **values})
        session.add(job)
        session.flush()
        return job.id


@dataclass(frozen=True)
class Turn:
    embedding: np.ndarray
    label: str | None  # feedback label, None: unlabelled
    text: str
    conversation: str | None = None
    turn: int | None = None
    speaker: str | None = None
    probabilities: Sequence[float] | None = None


def log_turns(engine: Engine, version: str, turns: Sequence[Turn], names: Sequence[str]) -> list[uuid.UUID]:
    """Predictions (with embeddings) and feedback rows, as the service logs them."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ids = []
    with session_scope(engine) as session:
        for i, turn in enumerate(turns):
            uniform = np.full(len(names), 1 / len(names))
            probabilities = list(uniform if turn.probabilities is None else turn.probabilities)
            prediction = Prediction(
                id=uuid.uuid4(),
                created_at=start + timedelta(milliseconds=i),
                model_version=version,
                request_kind=RequestKind.DIALOGUE if turn.conversation else RequestKind.UTTERANCE,
                context_mode=ContextMode.CAUSAL if turn.conversation else None,
                conversation_id=turn.conversation,
                turn_index=turn.turn,
                speaker=turn.speaker,
                text=turn.text,
                text_sha256=hashlib.sha256(turn.text.encode()).hexdigest(),
                has_text=True,
                has_audio=False,
                label=names[int(np.argmax(probabilities))],
                label_index=int(np.argmax(probabilities)),
                confidence=float(max(probabilities)),
                probabilities=[float(p) for p in probabilities],
                latency_ms=1.0,
                embedding=turn.embedding.astype("<f4").tobytes(),
            )
            session.add(prediction)
            if turn.label is not None:
                session.add(Feedback(prediction=prediction, label=turn.label, source="test"))
            ids.append(prediction.id)
    return ids
