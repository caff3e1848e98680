"""Grouping turns into conversations: streaming for grouped input, external sort with spill for the rest."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

import scoring.conversations as conversations
from model.data.turns import RowError, Turn, write_turns
from scoring.conversations import Conversation, SourcePlan, iter_chunks, iter_items, scan_input


def _turns(conversations_: int, turns: int) -> list[Turn]:
    return [
        Turn(conversation_id=f"c{c:03d}", turn=t, speaker="agent" if t % 2 else "customer", text=f"turn {t} of {c}")
        for c in range(conversations_)
        for t in range(turns)
    ]


def _keys(items: list[conversations.Item]) -> list[tuple[str, list[int]]]:
    return [(i.conversation_id, [r.turn.turn for r in i.turns]) for i in items if isinstance(i, Conversation)]


def test_grouped_input_streams_and_orders_each_conversation_by_turn(tmp_path: Path) -> None:
    turns = _turns(3, 4)
    for block in range(3):  # reverse the turns inside each conversation: still grouped
        turns[block * 4 : block * 4 + 4] = reversed(turns[block * 4 : block * 4 + 4])
    path = tmp_path / "turns.jsonl"
    write_turns(turns, path)
    scan = scan_input(path)
    assert (scan.records, scan.grouped) == (12, True)
    items = list(iter_items(path, grouped=True, spill_dir=tmp_path))
    assert _keys(items) == [(f"c{c:03d}", [0, 1, 2, 3]) for c in range(3)]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_interleaved_input_is_sorted_through_spilled_runs(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conversations, "MAX_FAN_IN", 3)  # 10 runs: two merge passes
    turns = _turns(7, 5)
    random.Random(0).shuffle(turns)
    path = tmp_path / f"turns{suffix}"
    write_turns(turns, path)
    assert scan_input(path).grouped is False
    items = list(iter_items(path, grouped=False, spill_dir=tmp_path, run_rows=4))
    assert _keys(items) == [(f"c{c:03d}", list(range(5))) for c in range(7)]
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the spill directory is gone


def test_unreadable_records_pass_through_in_both_modes(tmp_path: Path) -> None:
    path = tmp_path / "turns.jsonl"
    path.write_text(
        '{"conversation_id": "b", "turn": 0, "speaker": "x", "text": "hi"}\n'
        "not json\n"
        '{"conversation_id": "a", "turn": 0, "speaker": "x", "text": "hi"}\n'
        '{"conversation_id": "b", "turn": 1, "speaker": "x"}\n'  # neither text nor audio
        '{"conversation_id": "b", "turn": 1, "speaker": "x", "text": "again"}\n'
    )
    assert scan_input(path) == conversations.InputScan(records=5, grouped=False)
    items = list(iter_items(path, grouped=False, spill_dir=tmp_path, run_rows=2))
    assert [i.row for i in items if isinstance(i, RowError)] == [2, 4]
    assert _keys(items) == [("a", [0]), ("b", [0, 1])]


def test_chunks_hold_whole_conversations_and_skip_finished_work(tmp_path: Path) -> None:
    path = tmp_path / "turns.jsonl"
    write_turns(_turns(6, 3), path)
    plan = SourcePlan(path, grouped=True, spill_dir=tmp_path, batch_turns=5, done_conversations=frozenset({"c001"}))
    chunks = [[item.conversation_id for item in chunk] for chunk in iter_chunks(plan)]
    assert chunks == [["c000", "c002"], ["c003", "c004"], ["c005"]]
