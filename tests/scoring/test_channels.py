"""`equipoise score` on multi-channel audio: a row whose file has k channels is k output rows, one per channel, named
by `--channels` (else channel-i), each scored as that channel sent alone as a mono turn in its place; silent
channels are reported, the run resumes as any other, `--log-to-db` logs each channel once, and the progress bar
counts input records."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from core.db import migrate
from core.db.models import Prediction
from scoring.local import LocalEngine
from scoring.manifest import manifest_path
from scoring.pipeline import run_scoring
from tests.channel_audio import SYNTHETIC_RATE, Recording, recording, speech_recording, synthetic_voices
from tests.scoring.helpers import config, read_rows, run_score

TOLERANCE = 1e-5
OPENING = {"conversation_id": "call-1", "turn": 0, "speaker": "agent", "text": "Thank you for calling, how can I help?"}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def score(source: Path, out: Path, model: Path, state: Path, *options: str) -> subprocess.CompletedProcess[str]:
    result = run_score(source, "--out", out, "--model", model, *options, state_dir=state, shipped_default=False)
    assert result.returncode == 0, result.stderr
    return result


def assert_same(row: dict[str, Any], alone: dict[str, Any]) -> None:
    assert (row["label"], row["sentiment"], row["error"]) == (alone["label"], alone["sentiment"], None)
    for column in (name for name in row if name.startswith("p_")):
        assert row[column] == pytest.approx(alone[column], abs=TOLERANCE), column


def stereo_call(root: Path, call: Recording) -> Path:
    (root / "audio").mkdir()
    (root / "audio/call.wav").write_bytes(call.stereo)
    for index, mono in enumerate(call.channels):
        (root / f"audio/channel-{index}.wav").write_bytes(mono)
    return root / "audio"


@pytest.mark.parametrize("source", ["synthetic", pytest.param("speech", marks=pytest.mark.data)])
def test_each_channel_is_a_row_scored_as_that_channel_alone(
    tmp_path: Path, tiny_artifact: Path, request: pytest.FixtureRequest, source: str
) -> None:
    if source == "speech":
        call = speech_recording(request.getfixturevalue("data_dir"))
    else:
        call = recording(*synthetic_voices(), rate=SYNTHETIC_RATE)
    stereo_call(tmp_path, call)
    state = tmp_path / "state"
    split = tmp_path / "stereo.jsonl"
    write_jsonl(
        split, [OPENING, {"conversation_id": "call-1", "turn": 1, "speaker": "call", "audio_path": "audio/call.wav"}]
    )
    scored = score(split, tmp_path / "out.csv", tiny_artifact, state, "--channels", "agent,customer")
    assert "turns: 3 in 1 conversations" in scored.stdout
    rows = read_rows(tmp_path / "out.csv")
    assert [(r["turn"], r["speaker"], r["channel"]) for r in rows] == [
        (0, "agent", None),
        (1, "agent", 0),
        (1, "customer", 1),
    ]

    mono = write_jsonl(
        tmp_path / "mono.jsonl",
        [
            OPENING,
            {"conversation_id": "call-1", "turn": 1, "speaker": "agent", "audio_path": "audio/channel-0.wav"},
            {"conversation_id": "call-1", "turn": 2, "speaker": "customer", "audio_path": "audio/channel-1.wav"},
        ],
    )
    score(mono, tmp_path / "mono-out.jsonl", tiny_artifact, state)
    for row, alone in zip(rows, read_rows(tmp_path / "mono-out.jsonl"), strict=True):
        assert_same(row, alone)

    unnamed = score(split, tmp_path / "unnamed.jsonl", tiny_artifact, state)
    assert "turns: 3" in unnamed.stdout
    assert [r["speaker"] for r in read_rows(tmp_path / "unnamed.jsonl")] == ["agent", "channel-0", "channel-1"]


def test_silent_channels_wrong_names_and_unattributed_text_are_reported_rows(
    tmp_path: Path, tiny_artifact: Path
) -> None:
    voice, _ = synthetic_voices()
    audio = stereo_call(tmp_path, recording(voice, np.zeros_like(voice), rate=SYNTHETIC_RATE))
    (audio / "three.wav").write_bytes(recording(voice, voice, voice, rate=SYNTHETIC_RATE).stereo)
    call = {"conversation_id": "call-2", "speaker": "call"}
    source = write_jsonl(
        tmp_path / "turns.jsonl",
        [
            {**call, "turn": 0, "audio_path": "audio/call.wav"},
            {**call, "turn": 1, "audio_path": "audio/three.wav"},
            {**call, "turn": 2, "audio_path": "audio/call.wav", "text": "Where is my parcel?"},
            {**call, "turn": 3, "audio_path": "audio/call.wav", "text": "Where is my parcel?", "speaker": "customer"},
        ],
    )
    state = tmp_path / "state"
    scored = score(
        source,
        tmp_path / "out.jsonl",
        tiny_artifact,
        state,
        "--channels",
        "agent,customer",
        "--summary",
        tmp_path / "summary.jsonl",
    )
    assert "errors: 3 (channel_names_mismatch 1, silent_channel 1, text_channel_unknown 1)" in scored.stdout
    rows = read_rows(tmp_path / "out.jsonl")
    outline = [
        (r["turn"], r["speaker"], r["channel"], (r["error"] or "").split(":")[0] or r["label"] is not None)
        for r in rows
    ]
    assert outline == [
        (0, "agent", 0, True),
        (0, "customer", 1, "silent_channel"),
        (1, "call", None, "channel_names_mismatch"),
        (2, "call", None, "text_channel_unknown"),
        (3, "agent", 0, True),
        (3, "customer", 1, True),  # a silent channel with the words: the words are scored
    ]
    assert "audio/three.wav: the audio has 3 channels but 2 channel names" in rows[2]["error"]
    assert "set `speaker` to the channel that spoke it, one of agent, customer" in rows[3]["error"]
    (summary,) = read_rows(tmp_path / "summary.jsonl")
    assert (summary["turns"], summary["errors"]) == (6, 3)

    again = score(
        source,
        tmp_path / "out.jsonl",
        tiny_artifact,
        state,
        "--channels",
        "agent,customer",
        "--summary",
        tmp_path / "summary.jsonl",
    )
    assert "(0 scored in this run, 6 resumed from earlier runs)" in again.stdout
    assert read_rows(tmp_path / "out.jsonl") == rows


def test_log_to_db_logs_each_channel_once(tmp_path: Path, tiny_artifact: Path) -> None:
    stereo_call(tmp_path, recording(*synthetic_voices(), rate=SYNTHETIC_RATE))
    source = write_jsonl(
        tmp_path / "turns.jsonl",
        [OPENING, {"conversation_id": "call-1", "turn": 1, "speaker": "call", "audio_path": "audio/call.wav"}],
    )
    state = tmp_path / "state"
    state.mkdir()
    url = f"sqlite:///{state / 'equipoise.db'}"
    migrate.upgrade(url)
    options = ("--channels", "agent,customer", "--log-to-db")
    first = score(source, tmp_path / "out.jsonl", tiny_artifact, state, *options)
    assert "logged to the database: 3 predictions" in first.stdout
    again = score(source, tmp_path / "out.jsonl", tiny_artifact, state, *options, "--restart")
    assert "logged to the database" not in again.stdout  # the same ids: nothing is logged twice
    rows = read_rows(tmp_path / "out.jsonl")
    engine = create_engine(url)
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 3
        logged = session.execute(
            select(Prediction.turn_index, Prediction.speaker, Prediction.label, Prediction.has_audio).order_by(
                Prediction.turn_index, Prediction.speaker
            )
        ).all()
    engine.dispose()
    assert [tuple(row) for row in logged] == [
        (0, "agent", rows[0]["label"], False),
        (1, "agent", rows[1]["label"], True),
        (1, "customer", rows[2]["label"], True),
    ]


def test_the_progress_bar_counts_input_records_when_channels_are_split(
    tmp_path: Path, local_engine: LocalEngine, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three input records, one of them stereo: four output rows, and the bar ends at 3/3, on a run resumed from a
    commit after the stereo record too."""
    stereo_call(tmp_path, recording(*synthetic_voices(), rate=SYNTHETIC_RATE))
    stereo = {"conversation_id": "call-1", "turn": 1, "speaker": "call", "audio_path": "audio/call.wav"}
    closing = {"conversation_id": "call-2", "turn": 0, "speaker": "agent", "text": "Goodbye."}
    source = write_jsonl(tmp_path / "turns.jsonl", [OPENING, stereo, closing])
    options = {"channel_names": ("agent", "customer"), "progress": True, "commit_rows": 1, "batch_turns": 1}
    report = run_scoring(config(tmp_path, source, **options), local_engine)
    assert report.rows == 4
    assert "3/3" in capsys.readouterr().err.splitlines()[-1].split("\r")[-1]

    manifest = manifest_path(tmp_path / "out.jsonl")
    kept = manifest.read_text(encoding="utf-8").splitlines()[:2]  # the header and the commit of call-1
    manifest.write_text("\n".join(kept) + "\n", encoding="utf-8")
    resumed = run_scoring(config(tmp_path, source, **options), local_engine)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert resumed.rows == 4 and any(line.startswith("scoring:  67%") and "2/3" in line for line in bar), bar
    assert "3/3" in bar[-1]
