"""The same turn logs the same `predictions` row through the API and through `equipoise score --log-to-db`: one
row builder (core.db.crud.prediction_row) for both; a whitespace-only text is no text on either path."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from core.db.models import Prediction
from model.data.turns import Turn, write_turns
from tests.api.conftest import running_server, wait_for
from tests.scoring.helpers import run_score
from tests.scoring.test_command import _db_upgrade

CONVERSATION = "call-7"
TURNS = [
    ("agent", "Thanks for calling, you can reach me on 555-201-3344.", False),
    ("customer", "   ", True),  # whitespace only, with audio: the model hears it and reads no text
    ("customer", "\t\n", True),
    ("agent", "Is there anything else?", True),
]
# What each path must log alike; ids, times, request kind and latency are the path's own.
SAME = ("conversation_id", "turn_index", "speaker", "text", "text_redacted", "text_sha256", "has_text", "has_audio")
SAME += ("audio_path", "label", "label_index", "sentiment", "context_mode")


def clip(path: Path, seconds: float, frequency: float) -> Path:
    time = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, (0.3 * np.sin(2 * np.pi * frequency * time)).astype(np.float32), 16000, subtype="PCM_16")
    return path


def rows(url: str) -> list[dict[str, Any]]:
    with Session(create_engine(url)) as session:
        found = session.scalars(select(Prediction).order_by(Prediction.turn_index)).all()
        return [{column: getattr(row, column) for column in (*SAME, "probabilities", "audio_seconds")} for row in found]


def through_batch(tmp_path: Path, artifact: Path, clips: list[Path | None]) -> list[dict[str, Any]]:
    state = tmp_path / "batch"
    _db_upgrade(state)
    turns = [
        Turn(conversation_id=CONVERSATION, turn=i, speaker=speaker, text=text, audio_path=c.name if c else None)
        for i, ((speaker, text, _), c) in enumerate(zip(TURNS, clips, strict=True))
    ]
    source = tmp_path / "turns.jsonl"
    write_turns(turns, source)
    args = (source, "--out", tmp_path / "out.jsonl", "--model", artifact, "--audio-root", tmp_path, "--log-to-db")
    result = run_score(*args, state_dir=state)
    assert result.returncode == 0, result.stderr
    return rows(f"sqlite:///{state / 'equipoise.db'}")


def through_api(tmp_path: Path, artifact: Path, clips: list[Path | None]) -> list[dict[str, Any]]:
    url = f"sqlite:///{tmp_path / 'api.db'}"
    turns = [
        {"speaker": speaker, "text": text, **({"audio": base64.b64encode(c.read_bytes()).decode()} if c else {})}
        for (speaker, text, _), c in zip(TURNS, clips, strict=True)
    ]
    body = {"conversation_id": CONVERSATION, "context": "bidirectional", "turns": turns}
    with running_server(tmp_path / "api", url, default_model_dir=str(artifact)) as server:
        response = httpx.post(server.url + "/v1/predict/dialogue", json=body, timeout=30)
        assert response.status_code == 200, response.text
        wait_for(lambda: len(rows(url)) == len(TURNS), timeout_s=30)
    return rows(url)


def test_a_whitespace_only_turn_logs_the_same_row_through_the_api_and_batch_scoring(
    tmp_path: Path, tiny_artifact: Path
) -> None:
    clips = [
        clip(tmp_path / f"turn-{i}.wav", 1.0 + i / 4, 180.0 + 40 * i) if audio else None
        for i, (_, _, audio) in enumerate(TURNS)
    ]
    batch, served = through_batch(tmp_path, tiny_artifact, clips), through_api(tmp_path, tiny_artifact, clips)

    assert [row["has_text"] for row in batch] == [True, False, False, True]
    assert batch[0]["text_redacted"] and "555-201-3344" not in batch[0]["text"]
    for logged, answered in zip(batch, served, strict=True):
        assert {key: logged[key] for key in SAME} == {key: answered[key] for key in SAME}
        assert logged["audio_seconds"] == pytest.approx(answered["audio_seconds"])
        assert logged["probabilities"] == pytest.approx(answered["probabilities"], abs=1e-5)
