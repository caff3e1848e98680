"""Streaming writers of output rows (JSONL, CSV, Parquet, by suffix) that can be cut back to a committed position.

`commit()` makes everything appended so far durable and returns a position; a writer re-opened at that position
drops whatever was written after it. JSONL and CSV append to the file itself and the position is a byte offset.
Parquet cannot be appended to, so each commit is an immutable part file in `<output>.parts/` (the position is
the number of parts) and `finish()` merges the parts into the output; `cleanup()` then removes them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from core.files import fsync_dir

if TYPE_CHECKING:
    from scoring.manifest import Manifest

Row = Mapping[str, Any]
FORMATS: Mapping[str, str] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}
OUTPUT, SUMMARY = "output", "summary"  # a run's sinks, by the names its manifest keeps their positions under


class ResumeError(ValueError):
    """An output does not match what the manifest says was committed."""


class Sink(Protocol):
    path: Path

    def append(self, rows: Sequence[Row]) -> None: ...
    def commit(self) -> int: ...
    def finish(self) -> None: ...
    def cleanup(self) -> None: ...
    def close(self) -> None: ...


@contextmanager
def open_sinks(
    paths: Sequence[Path],
    schemas: tuple[pa.Schema, pa.Schema],
    positions: Mapping[str, int] | None,
) -> Iterator[dict[str, Sink]]:
    """A run's sinks: its output (`paths[0]`) and, when given, its summary (`paths[1]`), with their `schemas`,
    each cut back to its committed position; closed when the block ends."""
    sinks: dict[str, Sink] = {}
    try:
        for name, path, schema in zip((OUTPUT, SUMMARY), paths, schemas, strict=False):
            sinks[name] = open_sink(path, schema, (positions or {}).get(name))
        yield sinks
    finally:
        for sink in sinks.values():
            sink.close()


def complete_run(sinks: Mapping[str, Sink], manifest: Manifest) -> None:
    """Finish every output, mark the run complete, then remove what only resuming needed."""
    for sink in sinks.values():
        sink.finish()
    manifest.mark_complete()
    for sink in sinks.values():
        sink.cleanup()


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"unsupported output file {path.name}; expected one of {', '.join(FORMATS)}")
    return FORMATS[suffix]


def prediction_schema(emotions: Sequence[str]) -> pa.Schema:
    """The per-utterance output columns for a model's emotion labels."""
    return pa.schema(
        [
            ("conversation_id", pa.string()),
            ("turn", pa.int64()),
            ("speaker", pa.string()),
            ("channel", pa.int64()),  # the audio channel of a multi-channel row; null otherwise
            ("label", pa.string()),
            *[(f"p_{name}", pa.float64()) for name in emotions],
            ("sentiment", pa.string()),
            ("confidence", pa.float64()),
            ("model_version", pa.string()),
            ("error", pa.string()),
        ]
    )


def open_sink(path: Path, schema: pa.Schema, position: int | None) -> Sink:
    """A writer for `path`: new (position None) or cut back to a committed position."""
    kind = output_format(path)
    if kind == "parquet":
        return ParquetSink(path, schema, position)
    return TextSink(path, schema, position, csv_format=kind == "csv")


def parts_dir(path: Path) -> Path:
    return path.with_name(path.name + ".parts")


class TextSink:
    def __init__(self, path: Path, schema: pa.Schema, position: int | None, *, csv_format: bool) -> None:
        self.path = path
        self._columns = schema.names
        self._csv = csv_format
        if position is None:
            self._file = path.open("wb")
            if csv_format:
                self._file.write(self._encode([dict(zip(self._columns, self._columns, strict=True))]))
            return
        if not path.is_file() or path.stat().st_size < position:
            raise ResumeError(
                f"{path} is missing or shorter than its last committed size ({position} bytes); "
                "pass --restart to score from the beginning"
            )
        self._file = path.open("r+b")
        self._file.truncate(position)
        self._file.seek(position)

    def append(self, rows: Sequence[Row]) -> None:
        self._file.write(self._encode(rows))

    def commit(self) -> int:
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell()

    def finish(self) -> None:
        self.commit()

    def cleanup(self) -> None:
        pass

    def close(self) -> None:
        self._file.close()

    def _encode(self, rows: Sequence[Row]) -> bytes:
        if not self._csv:
            return "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows).encode()
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerows([[_csv_cell(row[name]) for name in self._columns] for row in rows])
        return buffer.getvalue().encode()


def _csv_cell(value: Any) -> Any:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, list) else value


class ParquetSink:
    def __init__(self, path: Path, schema: pa.Schema, position: int | None) -> None:
        self.path = path
        self._schema = schema
        self._parts = parts_dir(path)
        self._buffer: list[Row] = []
        if position is None:
            shutil.rmtree(self._parts, ignore_errors=True)
            path.unlink(missing_ok=True)
        self._parts.mkdir(parents=True, exist_ok=True)
        self._count = position or 0
        committed = {_part_name(number) for number in range(self._count)}
        for entry in self._parts.iterdir():  # parts of uncommitted work, interrupted writes
            if entry.name not in committed:
                entry.unlink()
        if len(self._part_paths()) != self._count:
            raise ResumeError(
                f"{self._parts} lacks some of the {self._count} committed part files; "
                "pass --restart to score from the beginning"
            )

    def append(self, rows: Sequence[Row]) -> None:
        self._buffer.extend(rows)

    def commit(self) -> int:
        if self._buffer:
            table = pa.Table.from_pylist(list(self._buffer), schema=self._schema)
            _write_atomically(self._parts / _part_name(self._count), table)
            self._count += 1
            self._buffer = []
        return self._count

    def finish(self) -> None:
        """Merge the committed parts into the output (atomically replaced)."""
        self.commit()
        staging = self.path.with_name(f".{self.path.name}.merging")
        with pq.ParquetWriter(staging, self._schema) as writer:
            for part in self._part_paths():
                writer.write_table(pq.read_table(part, schema=self._schema))
        _replace(staging, self.path)

    def cleanup(self) -> None:
        cleanup_parts(self.path)

    def close(self) -> None:
        self._buffer = []

    def _part_paths(self) -> list[Path]:
        return sorted(self._parts.glob("part-*.parquet"))


def cleanup_parts(path: Path) -> None:
    """Remove the part files of a finished Parquet output (none for the other formats)."""
    shutil.rmtree(parts_dir(path), ignore_errors=True)


def _part_name(number: int) -> str:
    return f"part-{number:06d}.parquet"


def _write_atomically(path: Path, table: pa.Table) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, staging)
    _replace(staging, path)


def _replace(staging: Path, path: Path) -> None:
    with staging.open("rb") as file:
        os.fsync(file.fileno())
    os.replace(staging, path)
    fsync_dir(path.parent)
