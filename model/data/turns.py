"""The call-centre turn format shared by the API and batch scoring (one record per turn), streamed from and to
JSONL, CSV and Parquet.

Readers never load a whole file and never stop at a bad row: each record comes back as a `TurnRow` (the
validated turn) or a `RowError`, both carrying the 1-based record number (JSONL: the line number; CSV: the
record after the header; Parquet: the row). Only a file that cannot be read as a whole raises (unknown
suffix, missing or corrupt file, required columns absent). Columns or keys outside the format are ignored.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.data.meld import Dialogue

_Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class Turn(BaseModel):
    """One turn of a conversation; text, audio or both. `audio_path` is relative to an audio root."""

    model_config = ConfigDict(frozen=True, extra="ignore", coerce_numbers_to_str=True)

    conversation_id: Annotated[str, Field(min_length=1)]
    turn: Annotated[int, Field(ge=0)]
    speaker: Annotated[str, Field(min_length=1)]
    text: str | None = None
    audio_path: str | None = None
    start_s: _Seconds | None = None
    end_s: _Seconds | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("turn", mode="before")
    @classmethod
    def _not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("must be an integer, not a boolean")
        return value

    @field_validator("text", "audio_path", mode="before")
    @classmethod
    def _empty_is_missing(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("conversation_id", "speaker", "text", "audio_path")
    @classmethod
    def _encodable(cls, value: str | None) -> str | None:
        if value is not None:
            value.encode("utf-8")  # lone surrogates (undecodable input bytes) raise here
        return value

    @field_validator("audio_path")
    @classmethod
    def _relative(cls, value: str | None) -> str | None:
        if value is not None:
            _relative_parts(value)
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata(cls, value: Any) -> Any:
        if value == "":
            return None
        if isinstance(value, str):  # CSV and Parquet carry metadata as a JSON object
            try:
                return json.loads(value)
            except ValueError as error:
                raise ValueError(f"invalid JSON: {error}") from None
        if isinstance(value, list) and all(isinstance(pair, tuple) and len(pair) == 2 for pair in value):
            return dict(value)  # a Parquet map column reads as (key, value) tuples
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Turn:
        if self.text is None and self.audio_path is None:
            raise ValueError("a turn needs text, audio_path or both")
        if self.start_s is not None and self.end_s is not None and self.end_s < self.start_s:
            raise ValueError(f"end_s ({self.end_s}) is before start_s ({self.start_s})")
        return self


FIELDS: tuple[str, ...] = tuple(Turn.model_fields)
REQUIRED: tuple[str, ...] = tuple(name for name, field in Turn.model_fields.items() if field.is_required())
# Written by write_turns; metadata is a JSON object as text (its keys vary from row to row).
PARQUET_SCHEMA = pa.schema(
    [
        ("conversation_id", pa.string()),
        ("turn", pa.int64()),
        ("speaker", pa.string()),
        ("text", pa.string()),
        ("audio_path", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("metadata", pa.string()),
    ]
)


@dataclass(frozen=True, slots=True)
class TurnRow:
    row: int
    turn: Turn


@dataclass(frozen=True, slots=True)
class RowError:
    row: int
    message: str


ReadResult = TurnRow | RowError


class UnsafeAudioPath(ValueError):
    """An audio path that is absolute or leads outside the audio root."""


def read_turns(path: Path, *, batch_size: int = 10_000) -> Iterator[ReadResult]:
    """Stream the turns of a .jsonl/.ndjson, .csv or .parquet file."""
    kind = _kind(path)
    if kind == "jsonl":
        return read_jsonl(path)
    if kind == "csv":
        return read_csv(path)
    return read_parquet(path, batch_size=batch_size)


def read_jsonl(path: Path) -> Iterator[ReadResult]:
    """One JSON object per line; blank lines are skipped (but counted)."""
    with Path(path).open("rb") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
                yield RowError(number, f"invalid JSON: {error}")
                continue
            yield _validate(number, record)


def read_csv(path: Path) -> Iterator[ReadResult]:
    """A header row naming the fields; empty cells are missing values, metadata is a JSON object."""
    # surrogateescape keeps undecodable bytes to the row they are in, where validation reports them.
    with Path(path).open(encoding="utf-8-sig", errors="surrogateescape", newline="") as file:
        reader = csv.DictReader(file)
        _require_columns(reader.fieldnames or (), path)
        number = 0
        while True:
            number += 1
            try:
                record = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield RowError(number, f"malformed CSV: {error}")
                continue
            if None in record:
                yield RowError(number, f"{len(record[None])} more values than columns")
                continue
            yield _validate(number, {key: None if value == "" else value for key, value in record.items()})


def read_parquet(path: Path, *, batch_size: int = 10_000) -> Iterator[ReadResult]:
    """Row groups are read `batch_size` rows at a time, only the columns of the format."""
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    _require_columns(names, path)
    number = 0
    for batch in parquet.iter_batches(batch_size=batch_size, columns=[n for n in FIELDS if n in names]):
        for record in batch.to_pylist():
            number += 1
            yield _validate(number, record)


def write_turns(turns: Iterable[Turn], path: Path, *, batch_size: int = 10_000) -> int:
    """Stream `turns` to a .jsonl/.ndjson, .csv or .parquet file; returns the number written."""
    kind = _kind(path)
    if kind == "jsonl":
        return _write_jsonl(turns, path)
    if kind == "csv":
        return _write_csv(turns, path)
    return _write_parquet(turns, path, batch_size)


def resolve_audio_path(root: Path, relative: str) -> Path:
    """The real path of `relative` inside `root`. Refuses absolute paths, `..` components and symbolic
    links that lead outside the root (links that stay inside are followed). The file need not exist."""
    base = Path(root).resolve(strict=True)
    target = base.joinpath(*_relative_parts(relative)).resolve()
    if not target.is_relative_to(base):
        raise UnsafeAudioPath(f"audio path {relative!r} leads outside the audio root")
    return target


def meld_to_turns(dialogues: Iterable[Dialogue]) -> Iterator[Turn]:
    """MELD dialogues as text-only turns; conversation ids are 'meld-{split}-{dialogue id}', the turn is
    MELD's Utterance_ID and the gold labels travel in metadata (emotion, sentiment)."""
    for dialogue in dialogues:
        for utterance in dialogue.utterances:
            yield Turn(
                conversation_id=f"meld-{dialogue.split}-{dialogue.dialogue_id}",
                turn=utterance.turn,
                speaker=utterance.speaker,
                text=utterance.text,
                start_s=utterance.start_s,
                end_s=utterance.end_s,
                metadata={"emotion": utterance.emotion, "sentiment": utterance.sentiment},
            )


def _relative_parts(relative: str) -> tuple[str, ...]:
    path = PurePosixPath(relative)
    if not path.parts or "\x00" in relative:
        raise UnsafeAudioPath("audio path is empty or contains a NUL character")
    if path.is_absolute() or ".." in path.parts:
        raise UnsafeAudioPath(f"audio path {relative!r} must be relative to the audio root, without '..'")
    return path.parts


def _validate(number: int, record: Any) -> ReadResult:
    if not isinstance(record, Mapping):
        return RowError(number, f"expected an object, got {type(record).__name__}")
    try:
        return TurnRow(number, Turn.model_validate(record))
    except ValidationError as error:
        return RowError(number, _describe(error))


def _describe(error: ValidationError) -> str:
    parts = []
    for detail in error.errors(include_url=False):
        location = ".".join(str(part) for part in detail["loc"])
        message = detail["msg"].removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts)


def _require_columns(columns: Iterable[str], path: Path) -> None:
    missing = [name for name in REQUIRED if name not in set(columns)]
    if missing:
        raise ValueError(f"{Path(path).name} lacks the required column(s) {', '.join(missing)}")


_SUFFIXES: Mapping[str, str] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


def _kind(path: Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"unsupported turn file {Path(path).name}; expected one of {', '.join(_SUFFIXES)}")
    return _SUFFIXES[suffix]


def _flat(turn: Turn) -> dict[str, Any]:
    """A turn as one flat row, metadata as JSON text (CSV and Parquet)."""
    record = turn.model_dump()
    if record["metadata"] is not None:
        record["metadata"] = json.dumps(record["metadata"], ensure_ascii=False)
    return record


def _write_jsonl(turns: Iterable[Turn], path: Path) -> int:
    count = 0
    with Path(path).open("w", encoding="utf-8") as file:
        for turn in turns:
            file.write(turn.model_dump_json(exclude_none=True) + "\n")
            count += 1
    return count


def _write_csv(turns: Iterable[Turn], path: Path) -> int:
    count = 0
    with Path(path).open("w", encoding="utf-8", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FIELDS)
        writer.writeheader()
        for turn in turns:
            writer.writerow(_flat(turn))
            count += 1
    return count


def _write_parquet(turns: Iterable[Turn], path: Path, batch_size: int) -> int:
    count = 0
    iterator = iter(turns)
    with pq.ParquetWriter(os.fspath(path), PARQUET_SCHEMA) as writer:
        while chunk := [_flat(turn) for turn in islice(iterator, batch_size)]:
            writer.write_batch(pa.RecordBatch.from_pylist(chunk, schema=PARQUET_SCHEMA))
            count += len(chunk)
    return count
