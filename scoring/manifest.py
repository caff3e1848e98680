"""The resume manifest beside an output (`<output>.manifest`): a header line naming the run, then one JSON line per
commit, appended and fsync'd; a last line `{"complete": true}` once the outputs are final.

A commit line is written only after the output rows it covers are durable, so the positions it records are
always valid. A torn last line (killed while appending) is dropped on open. On resume, the outputs are cut back to
the last commit's positions, which removes the rows of every conversation that was not committed, and the
conversations and unreadable records listed in the commits are skipped.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

FORMAT = "equipoise-score-manifest/1"


class ManifestError(ValueError):
    """The manifest belongs to a different run or is damaged; the message says what to do."""


@dataclass(frozen=True)
class Commit:
    positions: dict[str, int]  # sink name -> position to resume from
    conversations: list[tuple[str, int]]  # conversation id, output rows
    records: list[int]  # unreadable input records, one error row each
    errors: dict[str, int]  # error rows by kind
    input_records: int = 0  # input records covered (the conversations' and the unreadable ones)

    @property
    def rows(self) -> int:
        return sum(rows for _, rows in self.conversations) + len(self.records)

    def to_json(self) -> dict[str, Any]:
        return {
            "positions": self.positions,
            "conversations": self.conversations,
            "records": self.records,
            "errors": self.errors,
            "input_records": self.input_records,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Commit:
        conversations = [(str(cid), int(rows)) for cid, rows in data["conversations"]]
        records = [int(r) for r in data["records"]]
        commit = cls(dict(data["positions"]), conversations, records, dict(data["errors"]))
        # A manifest written before the count was kept: a row per input record, as it was then.
        return replace(commit, input_records=int(data.get("input_records", commit.rows)))


@dataclass
class Progress:
    """What the commits so far cover."""

    rows: int = 0
    input_records: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    done_conversations: set[str] = field(default_factory=set)
    done_records: set[int] = field(default_factory=set)
    positions: dict[str, int] | None = None
    complete: bool = False

    @property
    def conversations(self) -> int:
        return len(self.done_conversations)

    def add(self, commit: Commit) -> None:
        self.rows += commit.rows
        self.input_records += commit.input_records
        self.errors.update(commit.errors)
        self.done_conversations.update(cid for cid, _ in commit.conversations)
        self.done_records.update(commit.records)
        self.positions = commit.positions


def manifest_path(output: Path) -> Path:
    return output.with_name(output.name + ".manifest")


class Manifest:
    def __init__(self, path: Path, file: Any) -> None:
        self.path = path
        self._file = file

    @classmethod
    def open(cls, path: Path, header: dict[str, Any], *, restart: bool = False) -> tuple[Manifest, Progress]:
        """Continue the manifest at `path` if it was written for the same `header`, or start a new one."""
        header = json.loads(json.dumps({"format": FORMAT, **header}))  # as it reads back (tuples become lists)
        lines, valid_bytes = ([], 0) if restart else _read_lines(path)
        if not lines:
            return cls._create(path, header), Progress()
        if lines[0] != header:
            raise ManifestError(_mismatch(path, lines[0], header))
        progress = Progress()
        for line in lines[1:]:
            if line.get("complete"):
                progress.complete = True
            else:
                progress.add(Commit.from_json(line))
        file = path.open("r+b")
        file.truncate(valid_bytes)
        file.seek(valid_bytes)
        return cls(path, file), progress

    @classmethod
    def _create(cls, path: Path, header: dict[str, Any]) -> Manifest:
        manifest = cls(path, path.open("wb"))
        manifest._append(header)
        return manifest

    def commit(self, commit: Commit) -> None:
        self._append(commit.to_json())

    def mark_complete(self) -> None:
        self._append({"complete": True})

    def close(self) -> None:
        self._file.close()

    def _append(self, record: dict[str, Any]) -> None:
        # One write per line: a kill leaves at most one torn line, at the end.
        self._file.write((json.dumps(record, ensure_ascii=False) + "\n").encode())
        self._file.flush()
        os.fsync(self._file.fileno())


def _read_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The complete lines of the manifest and their length in bytes; a torn last line is left out."""
    if not path.is_file():
        return [], 0
    data = path.read_bytes()
    lines, valid = [], 0
    for number, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            record = json.loads(raw) if raw.endswith(b"\n") else None
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if valid + len(raw) < len(data):  # only the last line may be torn
                raise ManifestError(f"{path} line {number} is damaged; remove it and the output to start over")
            break
        lines.append(record)
        valid += len(raw)
    return lines, valid


def _mismatch(path: Path, found: dict[str, Any], expected: dict[str, Any]) -> str:
    keys = sorted(key for key in found.keys() | expected.keys() if found.get(key) != expected.get(key))
    details = "; ".join(f"{key}: {found.get(key)!r} then, {expected.get(key)!r} now" for key in keys)
    return (
        f"{path} belongs to another run ({details}); pass --restart to score from the beginning, "
        "or choose another output"
    )
