"""`equipoise score` as a user runs it: a subprocess with isolated settings and a real SQLite database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from core.db import migrate
from core.db.models import ModelStatus, ModelVersion, MonitoringSnapshot, Prediction, RequestKind
from core.db.session import make_engine
from core.settings import load_settings
from model.data.turns import Turn, write_turns
from model.registry import ModelRegistry
from scoring.database import PredictionLog
from tests.api.conftest import fake_artifact
from tests.scoring.helpers import REPO_ROOT, assert_same_predictions, read_rows, run_score


def _equipoise(state_dir: Path, *args: str, **settings: str) -> str:
    """`python -m equipoise ARGS` with isolated settings; its standard output, once it succeeded."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EQUIPOISE_")}
    env.update(EQUIPOISE_STATE_DIR=str(state_dir), PYTHONPATH=str(REPO_ROOT))
    env.update({f"EQUIPOISE_{name.upper()}": value for name, value in settings.items()})
    result = subprocess.run(
        [sys.executable, "-m", "equipoise", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _db_upgrade(state_dir: Path) -> None:
    _equipoise(state_dir, "db", "upgrade")


def test_log_to_db_writes_batch_predictions_once(tmp_path: Path, meld_turns: list[Turn], tiny_artifact: Path) -> None:
    state = tmp_path / "state"
    _db_upgrade(state)
    source = tmp_path / "turns.jsonl"
    write_turns(meld_turns, source)
    args = (source, "--out", tmp_path / "out.jsonl", "--model", tiny_artifact, "--log-to-db", "--context", "causal")
    first = run_score(*args, state_dir=state)
    assert first.returncode == 0, first.stderr
    assert f"logged to the database: {len(meld_turns)} predictions" in first.stdout
    assert "as model tiny-0.1 (champion)" in first.stdout  # a database without a champion: it becomes one
    again = run_score(*args, "--restart", state_dir=state)  # the same predictions again: nothing new is logged
    assert again.returncode == 0, again.stderr
    assert "logged to the database" not in again.stdout

    rows = {(r["conversation_id"], r["turn"]): r for r in read_rows(tmp_path / "out.jsonl")}
    with Session(create_engine(f"sqlite:///{state / 'equipoise.db'}")) as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == len(meld_turns)
        version = session.get(ModelVersion, "tiny-0.1")
        assert version is not None and version.status == ModelStatus.CHAMPION
        for prediction in session.scalars(select(Prediction)):
            row = rows[prediction.conversation_id, prediction.turn_index]
            assert prediction.request_kind == RequestKind.BATCH and prediction.context_mode.value == "causal"
            assert (prediction.label, prediction.sentiment) == (row["label"], row["sentiment"])
            assert prediction.probabilities[prediction.label_index] == pytest.approx(row["confidence"], abs=1e-6)
            assert len(np.frombuffer(prediction.embedding, dtype="<f4")) == 16  # the tiny model's embed_dim


def test_batch_predictions_on_a_fresh_database_are_monitored(
    tmp_path: Path, meld_turns: list[Turn], tiny_artifact: Path
) -> None:
    state = tmp_path / "state"
    _db_upgrade(state)
    source = tmp_path / "turns.jsonl"
    write_turns(meld_turns, source)
    scored = run_score(
        source, "--out", tmp_path / "out.jsonl", "--model", tiny_artifact, "--log-to-db", state_dir=state
    )
    assert scored.returncode == 0, scored.stderr

    window = 10
    monitored = _equipoise(state, "monitor", "run", monitor_window=str(window), shipped_default="false")
    with Session(create_engine(f"sqlite:///{state / 'equipoise.db'}")) as session:
        snapshots = list(session.scalars(select(MonitoringSnapshot).order_by(MonitoringSnapshot.id)))
    assert monitored.startswith(f"snapshots {[s.id for s in snapshots]};"), monitored
    assert snapshots and {s.model_version for s in snapshots} == {"tiny-0.1"}
    # Every full window of the batch traffic (a window may grow past its size to keep one instant whole).
    assert min(s.n_predictions for s in snapshots) >= window
    assert len(meld_turns) - window < sum(s.n_predictions for s in snapshots) <= len(meld_turns)


def test_beside_a_champion_another_scoring_model_stays_a_candidate(tmp_path: Path, tiny_artifact: Path) -> None:
    settings = load_settings(
        state_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'e.db'}", registry_dir=tmp_path / "models"
    )
    migrate.upgrade(str(settings.database_url))
    registry = ModelRegistry(make_engine(str(settings.database_url)), Path(str(settings.registry_dir)))
    log = PredictionLog(settings, "run", "tiny-0.1", causal=False)
    try:
        registry.promote(registry.register(fake_artifact(tmp_path / "built", "served-1")).version)
        assert log.ensure_model_version(tiny_artifact) == ModelStatus.CANDIDATE
        assert log.ensure_model_version(tiny_artifact) == ModelStatus.CANDIDATE  # known: left as it is
        statuses = {row.version: row.status for row in registry.list()}
    finally:
        log.close()
        registry.engine.dispose()
    assert statuses == {"served-1": ModelStatus.CHAMPION, "tiny-0.1": ModelStatus.CANDIDATE}


def test_without_a_model_the_command_says_how_to_give_one(tmp_path: Path, meld_turns: list[Turn]) -> None:
    source = tmp_path / "turns.jsonl"
    write_turns(meld_turns[:3], source)
    result = run_score(source, "--out", tmp_path / "out.jsonl", state_dir=tmp_path / "state", shipped_default=False)
    assert result.returncode == 2
    assert "pass --model" in result.stderr


def test_input_and_output_problems_are_reported_not_raised(tmp_path: Path, tiny_artifact: Path) -> None:
    source = tmp_path / "turns.txt"
    source.write_text("x")
    for args, message in [
        ((tmp_path / "missing.jsonl", "--out", tmp_path / "o.jsonl"), "not found"),
        ((source, "--out", tmp_path / "o.jsonl"), "unsupported turn file"),
        ((tmp_path / "o.jsonl", "--out", tmp_path / "o.xlsx"), "unsupported output file"),
    ]:
        (tmp_path / "o.jsonl").write_text("")
        result = run_score(*args, "--model", tiny_artifact, state_dir=tmp_path / "state")
        assert (result.returncode, message in result.stderr) == (2, True), result.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_the_ray_engine_from_the_command_line(tmp_path: Path, meld_turns: list[Turn], tiny_artifact: Path) -> None:
    source = tmp_path / "turns.csv"
    write_turns(meld_turns, source)
    for engine in ("local", "ray"):
        result = run_score(
            source,
            "--out",
            tmp_path / f"{engine}.parquet",
            "--engine",
            engine,
            "--actors",
            "2",
            "--model",
            tiny_artifact,
            state_dir=tmp_path / "state",
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert_same_predictions(read_rows(tmp_path / "ray.parquet"), read_rows(tmp_path / "local.parquet"))
