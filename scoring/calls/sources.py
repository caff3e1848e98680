"""The recordings of `equipoise score --calls`: every audio file under a directory, or the rows of a CSV/JSONL list
(`path`, optional `call_id` and `roles`) whose paths are relative to the audio root. A row that cannot be used is
a job with an error, which becomes the call's error row; the run goes on."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from model.channels import parse_channel_names
from model.data.turns import UnsafeAudioPath, resolve_audio_path
from scoring.inputs import INVALID_ROW, UNSAFE_AUDIO_PATH, TurnError

# What model.audio decodes (WAV, FLAC, OGG, MP3).
CALL_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3")
LIST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
DUPLICATE_CALL = "duplicate_call"


@dataclass(frozen=True)
class CallJob:
    """One call to score: its id, its recording, its channel names; or why it cannot be scored."""

    index: int
    call_id: str
    path: Path | None
    roles: tuple[str, ...] | None = None
    error: TurnError | None = None


def list_calls(source: Path, audio_root: Path | None, roles: tuple[str, ...] | None) -> list[CallJob]:
    """The calls of `source` in a fixed order; `roles` names the channels of calls whose row does not."""
    if source.is_dir():
        return _unique([_file_job(i, source, path, roles) for i, path in enumerate(_recordings(source))])
    if not source.is_file():
        raise ValueError(f"input {source} not found")
    if source.suffix.lower() not in LIST_SUFFIXES:
        raise ValueError(f"a list of calls is {', '.join(LIST_SUFFIXES)}, not {source.name}")
    root = (audio_root or source.parent).resolve()
    if not root.is_dir():
        raise ValueError(f"audio root {root} is not a directory")
    return _unique([_row_job(i, row, root, roles) for i, row in enumerate(_read_list(source))])


def fingerprint(jobs: list[CallJob]) -> str:
    """What resuming must find unchanged: each call's id, roles and recording (path, size, modification time)."""
    entries = [[job.call_id, job.roles, str(job.path), *_stat(job.path), str(job.error)] for job in jobs]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _stat(path: Path | None) -> tuple[int, int] | tuple[None, None]:
    try:
        stat = path.stat() if path is not None else None
    except OSError:
        stat = None
    return (stat.st_size, stat.st_mtime_ns) if stat is not None else (None, None)


def _recordings(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.suffix.lower() in CALL_SUFFIXES and p.is_file())


def _file_job(index: int, directory: Path, path: Path, roles: tuple[str, ...] | None) -> CallJob:
    return CallJob(index, path.relative_to(directory).with_suffix("").as_posix(), path.resolve(), roles)


def _read_list(path: Path) -> list[dict[str, object] | str]:
    """The rows of a CSV or JSONL list; a JSONL line that is not an object stays a string (an error row)."""
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as file:
            return [dict(row) for row in csv.DictReader(file)]
    rows: list[dict[str, object] | str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                rows.append(line)
    return [row if isinstance(row, dict) else str(row) for row in rows]


def _row_job(index: int, row: dict[str, object] | str, root: Path, roles: tuple[str, ...] | None) -> CallJob:
    fallback = f"row-{index + 1}"
    if not isinstance(row, dict) or not isinstance(row.get("path"), str) or not row["path"]:
        return CallJob(index, fallback, None, error=TurnError(INVALID_ROW, f"row {index + 1} has no `path`"))
    relative = str(row["path"])
    call_id = str(row.get("call_id") or "") or Path(relative).with_suffix("").as_posix()
    try:
        named = parse_channel_names(row["roles"]) if row.get("roles") else roles  # type: ignore[arg-type]
        return CallJob(index, call_id, resolve_audio_path(root, relative), named)
    except UnsafeAudioPath as error:
        return CallJob(index, call_id, None, error=TurnError(UNSAFE_AUDIO_PATH, str(error)))
    except ValueError as error:
        return CallJob(index, call_id, None, error=TurnError(INVALID_ROW, f"row {index + 1} roles: {error}"))


def _unique(jobs: list[CallJob]) -> list[CallJob]:
    """A call id given again is an error row of its own under a numbered id (the first keeps the id)."""
    seen: set[str] = set()
    unique = []
    for job in jobs:
        if job.call_id in seen:
            message = f"call id {job.call_id!r} is given again by row {job.index + 1}"
            job = CallJob(job.index, f"{job.call_id}#{job.index + 1}", None, error=TurnError(DUPLICATE_CALL, message))
        seen.add(job.call_id)
        unique.append(job)
    return unique
