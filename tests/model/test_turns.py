from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.data.meld import group_dialogues, read_utterances
from model.data.turns import (
    FIELDS,
    PARQUET_SCHEMA,
    RowError,
    Turn,
    TurnRow,
    UnsafeAudioPath,
    meld_to_turns,
    read_turns,
    resolve_audio_path,
    write_turns,
)

SUFFIXES = [".jsonl", ".csv", ".parquet"]

GOOD: dict[str, Any] = {"conversation_id": "c1", "turn": 0, "speaker": "agent", "text": "Hello, how can I help?"}
# (record, fragment of the expected error or None); the same records are written in every format.
RECORDS: list[tuple[dict[str, Any], str | None]] = [
    (GOOD, None),
    ({**GOOD, "turn": -1}, "turn: Input should be greater than or equal to 0"),
    ({**GOOD, "speaker": None}, "speaker"),
    ({**GOOD, "text": None}, "a turn needs text, audio_path or both"),
    ({**GOOD, "audio_path": "../../etc/passwd"}, "audio_path"),
    ({**GOOD, "start_s": 3.0, "end_s": 1.0}, "end_s (1.0) is before start_s (3.0)"),
    ({**GOOD, "metadata": '{"queue": "billing"'}, "metadata"),
    ({**GOOD, "turn": 1, "text": None, "audio_path": "c1/1.ogg", "start_s": 1.5, "end_s": 2.0}, None),
    ({**GOOD, "turn": 2, "metadata": '{"queue": "billing", "agent_id": 7}'}, None),
]


def _write_raw(records: list[dict[str, Any]], path: Path) -> None:
    """Write records as they are, bad ones included (write_turns only takes valid turns)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(records)
    else:
        pq.write_table(pa.Table.from_pylist(records, schema=PARQUET_SCHEMA), path)


@pytest.fixture(scope="module")
def meld_test_turns(data_dir: Path) -> list[Turn]:
    return list(meld_to_turns(group_dialogues(read_utterances(data_dir, "test"))))


@pytest.mark.data
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_meld_turns_round_trip(meld_test_turns: list[Turn], tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"turns{suffix}"
    assert write_turns(meld_test_turns, path, batch_size=1000) == 2610
    results = list(read_turns(path, batch_size=500))
    assert [r.row for r in results] == list(range(1, 2611))
    assert all(isinstance(r, TurnRow) for r in results)
    assert [r.turn for r in results if isinstance(r, TurnRow)] == meld_test_turns


@pytest.mark.data
def test_meld_turn_format(meld_test_turns: list[Turn]) -> None:
    first = meld_test_turns[0]
    assert (first.conversation_id, first.turn, first.audio_path) == ("meld-test-0", 0, None)
    assert first.metadata is not None and set(first.metadata) == {"emotion", "sentiment"}
    assert len({t.conversation_id for t in meld_test_turns}) == 280


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_bad_rows_are_reported_and_reading_goes_on(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"turns{suffix}"
    _write_raw([record for record, _ in RECORDS], path)
    results = list(read_turns(path))
    assert [r.row for r in results] == list(range(1, len(RECORDS) + 1))
    for result, (record, expected) in zip(results, RECORDS, strict=True):
        if expected is None:
            assert isinstance(result, TurnRow), result
            assert result.turn.text == record["text"] and result.turn.turn == record["turn"]
        else:
            assert isinstance(result, RowError) and expected in result.message, result
    last = results[-1]
    assert isinstance(last, TurnRow) and last.turn.metadata == {"queue": "billing", "agent_id": 7}


def test_jsonl_specific_bad_lines(tmp_path: Path) -> None:
    path = tmp_path / "turns.jsonl"
    lines = [json.dumps(GOOD), "{not json", "", "[1, 2]", json.dumps({**GOOD, "turn": True}), json.dumps(GOOD)]
    path.write_bytes("\n".join(lines).encode() + b"\n\xff\xfe\n")
    results = list(read_turns(path))
    assert [(r.row, type(r).__name__) for r in results] == [
        (1, "TurnRow"),
        (2, "RowError"),
        (4, "RowError"),
        (5, "RowError"),
        (6, "TurnRow"),
        (7, "RowError"),
    ]
    messages = [r.message for r in results if isinstance(r, RowError)]
    assert messages[0].startswith("invalid JSON") and "expected an object" in messages[1]
    assert "boolean" in messages[2] and messages[3].startswith("invalid JSON")


def test_csv_specific_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "turns.csv"
    rows = [
        "conversation_id,turn,speaker,text",
        "c1,0,agent,hello",
        "c1,1,customer,too,many",
        "c1,x,customer,hi",
        'c1,3,customer,"' + "y" * 200_000 + '"',
        "c1,4,customer,caf\udce9",  # a byte that is not UTF-8
        "c1,5,customer,bye",
    ]
    path.write_bytes("\r\n".join(rows).encode("utf-8", errors="surrogateescape"))
    results = list(read_turns(path))
    assert [(r.row, type(r).__name__) for r in results] == [
        (1, "TurnRow"),
        (2, "RowError"),
        (3, "RowError"),
        (4, "RowError"),
        (5, "RowError"),
        (6, "TurnRow"),
    ]
    messages = [r.message for r in results if isinstance(r, RowError)]
    assert "more values than columns" in messages[0] and messages[1].startswith("turn:")
    assert "field larger than field limit" in messages[2] and "text:" in messages[3]


def test_missing_required_columns_refuse_the_file(tmp_path: Path) -> None:
    path = tmp_path / "turns.csv"
    path.write_text("conversation_id,text\nc1,hello\n", encoding="utf-8")
    with pytest.raises(ValueError, match="turn, speaker"):
        list(read_turns(path))
    with pytest.raises(ValueError, match="unsupported turn file"):
        read_turns(tmp_path / "turns.xlsx")


def test_audio_paths_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "audio"
    (root / "calls").mkdir(parents=True)
    (root / "calls" / "a.ogg").write_bytes(b"")
    (tmp_path / "secret.ogg").write_bytes(b"")
    (root / "inside").symlink_to(root / "calls")
    (root / "outside").symlink_to(tmp_path)
    assert resolve_audio_path(root, "calls/a.ogg") == (root / "calls" / "a.ogg").resolve()
    assert resolve_audio_path(root, "inside/a.ogg") == (root / "calls" / "a.ogg").resolve()
    for unsafe in ["/etc/passwd", "../secret.ogg", "calls/../../secret.ogg", "outside/secret.ogg", "", ".", "a\x00b"]:
        with pytest.raises(UnsafeAudioPath):
            resolve_audio_path(root, unsafe)
