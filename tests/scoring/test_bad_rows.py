"""Bad rows are written with an error and no label, counted by kind, and never stop the run; audio paths never
leave the audio root."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from scoring.local import LocalEngine
from scoring.pipeline import run_scoring
from tests.scoring.helpers import config, read_rows, run_score


def _write_audio_root(root: Path, outside: Path) -> None:
    root.mkdir()
    tone = 0.1 * np.sin(2 * np.pi * 220 * np.arange(8000) / 16000)
    sf.write(root / "good.wav", tone, 16000)
    (root / "broken.wav").write_bytes(b"RIFF not really a wave file")
    sf.write(outside / "secret.wav", tone, 16000)
    os.symlink(outside / "secret.wav", root / "escape.wav")


TURNS = [
    {"turn": 0, "speaker": "customer", "text": "My bill is wrong."},
    {"turn": 1, "speaker": "agent", "audio_path": "good.wav"},
    {"turn": 2, "speaker": "customer", "text": "Hello", "audio_path": "broken.wav"},
    {"turn": 3, "speaker": "agent", "text": "x", "audio_path": "missing.wav"},
    {"turn": 4, "speaker": "customer", "text": "x", "audio_path": "escape.wav"},  # a symlink out of the root
    {"turn": 5, "speaker": "customer", "text": "x", "audio_path": "../secret.wav"},  # refused by the reader
    {"turn": 6, "speaker": "customer", "text": "x", "audio_path": "/etc/passwd"},  # refused by the reader
    {"turn": 7, "speaker": "agent", "text": "   "},  # neither text nor audio
    {"turn": 7, "speaker": "agent", "text": "Turn seven again"},
    {"turn": 8, "speaker": "customer", "text": "Thanks."},
    {"turn": 9, "speaker": "agent", "text": "x" * 2001},  # over the service's max_text_chars
]


def _source(tmp_path: Path) -> Path:
    _write_audio_root(tmp_path / "audio", tmp_path)
    lines = [json.dumps({"conversation_id": "call-1", **turn}) for turn in TURNS]
    lines.insert(3, "{not json")
    lines.append(json.dumps({"conversation_id": "call-2", "turn": -1, "speaker": "agent", "text": "x"}))
    source = tmp_path / "calls.jsonl"
    source.write_text("\n".join(lines) + "\n")
    return source


EXPECTED_ERRORS = {
    "invalid_row": 4,  # bad JSON, '..' path, absolute path, negative turn
    "audio_undecodable": 1,
    "audio_not_found": 1,
    "unsafe_audio_path": 1,
    "empty_turn": 1,
    "duplicate_turn": 1,
    "text_too_long": 1,
}


def test_bad_rows_are_recorded_and_counted(tmp_path: Path, local_engine: LocalEngine) -> None:
    source = _source(tmp_path)
    report = run_scoring(config(tmp_path, source, audio_root=tmp_path / "audio"), local_engine)

    rows = read_rows(tmp_path / "out.jsonl")
    assert report.rows == len(rows) == len(TURNS) + 2  # one row per input record
    assert dict(report.errors) == EXPECTED_ERRORS
    for row in rows:
        assert (row["label"] is None) == (row["error"] is not None)
        assert (row["p_neutral"] is None) == (row["error"] is not None)
    call = [(r["turn"], (r["error"] or "").split(":")[0]) for r in rows if r["conversation_id"] == "call-1"]
    assert call == [
        (0, ""),  # text only
        (1, ""),  # audio only
        (2, "audio_undecodable"),
        (3, "audio_not_found"),
        (4, "unsafe_audio_path"),
        (7, "empty_turn"),
        (7, "duplicate_turn"),  # a repeated turn index keeps its first record
        (8, ""),
        (9, "text_too_long"),
    ]
    orphans = [r["error"] for r in rows if r["conversation_id"] is None]
    assert len(orphans) == EXPECTED_ERRORS["invalid_row"] and any("record 4: invalid JSON" in e for e in orphans)
    assert any("'../secret.wav' must be relative" in e for e in orphans)


def test_the_command_reports_errors_by_kind_and_succeeds(tmp_path: Path, tiny_artifact: Path) -> None:
    source = _source(tmp_path)
    result = run_score(
        source,
        "--out",
        tmp_path / "out.csv",
        "--audio-root",
        tmp_path / "audio",
        "--model",
        tiny_artifact,
        state_dir=tmp_path / "state",
    )
    assert result.returncode == 0, result.stderr
    assert f"turns: {len(TURNS) + 2}" in result.stdout
    expected = ", ".join(f"{kind} {count}" for kind, count in sorted(EXPECTED_ERRORS.items()))
    assert f"errors: {sum(EXPECTED_ERRORS.values())} ({expected})" in result.stdout
    assert "turns/s" in result.stdout
