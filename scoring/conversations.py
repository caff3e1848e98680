"""A stream of turns grouped into conversations, each in turn order, with bounded memory.

Input whose conversations are contiguous (each conversation's turns together, in any turn order) streams with
one conversation in memory. Other input is sorted externally first: runs of at most `run_rows` turns are sorted
in memory and spilled to disk, then merged (in several passes when there are more than `MAX_FAN_IN` runs).
Unreadable records (`RowError`) belong to no conversation and pass through as they are met.
"""

from __future__ import annotations

import heapq
import itertools
import pickle
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from model.data.turns import ReadResult, RowError, TurnRow, read_turns

DEFAULT_RUN_ROWS = 20_000
MAX_FAN_IN = 64


@dataclass(frozen=True, slots=True)
class Conversation:
    conversation_id: str
    turns: tuple[TurnRow, ...]  # by turn index, then input record


Item = Conversation | RowError


def item_records(item: Item) -> int:
    """Input records of an item (its output rows, but for a multi-channel record's one row per channel)."""
    return len(item.turns) if isinstance(item, Conversation) else 1


@dataclass(frozen=True, slots=True)
class InputScan:
    records: int
    grouped: bool  # every conversation's turns are contiguous


def scan_input(path: Path) -> InputScan:
    """Count the records of `path` and check whether its conversations are contiguous (one streaming pass)."""
    records, grouped = 0, True
    current: str | None = None
    closed: set[str] = set()
    for result in read_turns(path):
        records += 1
        if not grouped or isinstance(result, RowError) or result.turn.conversation_id == current:
            continue
        if current is not None:
            closed.add(current)
        current = result.turn.conversation_id
        grouped = current not in closed
    return InputScan(records, grouped)


@dataclass(frozen=True)
class SourcePlan:
    """Everything needed to re-create the stream of work, in this process or in a Ray read task."""

    path: Path
    grouped: bool
    spill_dir: Path
    batch_turns: int
    run_rows: int = DEFAULT_RUN_ROWS
    done_conversations: frozenset[str] = frozenset()
    done_records: frozenset[int] = frozenset()

    def is_done(self, item: Item) -> bool:
        if isinstance(item, Conversation):
            return item.conversation_id in self.done_conversations
        return item.row in self.done_records


def iter_chunks(plan: SourcePlan) -> Iterator[list[Item]]:
    """The items not yet done, in chunks of whole conversations of at least `batch_turns` turns (the last may be
    smaller)."""
    chunk: list[Item] = []
    turns = 0
    for item in iter_items(plan.path, grouped=plan.grouped, spill_dir=plan.spill_dir, run_rows=plan.run_rows):
        if plan.is_done(item):
            continue
        chunk.append(item)
        turns += item_records(item)
        if turns >= plan.batch_turns:
            yield chunk
            chunk, turns = [], 0
    if chunk:
        yield chunk


def iter_items(path: Path, *, grouped: bool, spill_dir: Path, run_rows: int = DEFAULT_RUN_ROWS) -> Iterator[Item]:
    results = read_turns(path)
    if grouped:
        yield from group_contiguous(results)
        return
    spill_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".equipoise-spill-", dir=spill_dir) as work:
        yield from group_contiguous(external_sort(results, Path(work), run_rows))


def group_contiguous(results: Iterable[ReadResult]) -> Iterator[Item]:
    current: list[TurnRow] = []
    for result in results:
        if isinstance(result, RowError):
            yield result
            continue
        if current and result.turn.conversation_id != current[0].turn.conversation_id:
            yield _conversation(current)
            current = []
        current.append(result)
    if current:
        yield _conversation(current)


def external_sort(results: Iterable[ReadResult], work: Path, run_rows: int) -> Iterator[ReadResult]:
    """Row errors as they are met, then every turn ordered by (conversation id, turn, record)."""
    if run_rows < 1:
        raise ValueError(f"run_rows must be at least 1, not {run_rows}")
    runs = _Runs(work)
    paths: list[Path] = []
    buffer: list[TurnRow] = []
    for result in results:
        if isinstance(result, RowError):
            yield result
            continue
        buffer.append(result)
        if len(buffer) >= run_rows:
            paths.append(runs.write(sorted(buffer, key=_sort_key)))
            buffer = []
    buffer.sort(key=_sort_key)
    while len(paths) > MAX_FAN_IN:
        paths = [runs.merge(paths[i : i + MAX_FAN_IN]) for i in range(0, len(paths), MAX_FAN_IN)]
    yield from heapq.merge(buffer, *map(runs.read, paths), key=_sort_key)


def _sort_key(row: TurnRow) -> tuple[str, int, int]:
    return row.turn.conversation_id, row.turn.turn, row.row


def _conversation(rows: list[TurnRow]) -> Conversation:
    ordered = sorted(rows, key=_sort_key)
    return Conversation(ordered[0].turn.conversation_id, tuple(ordered))


class _Runs:
    """Sorted runs spilled to files in a private temporary directory (pickle: written and read only here)."""

    def __init__(self, work: Path) -> None:
        self._work = work
        self._numbers = itertools.count()

    def write(self, rows: Iterable[TurnRow]) -> Path:
        path = self._work / f"run-{next(self._numbers):06d}.pickle"
        with path.open("wb") as file:
            for row in rows:
                pickle.dump(row, file, protocol=pickle.HIGHEST_PROTOCOL)
        return path

    def merge(self, paths: list[Path]) -> Path:
        merged = self.write(heapq.merge(*map(self.read, paths), key=_sort_key))
        for path in paths:
            path.unlink()
        return merged

    @staticmethod
    def read(path: Path) -> Iterator[TurnRow]:
        with path.open("rb") as file:
            while True:
                try:
                    yield pickle.load(file)
                except EOFError:
                    return
