"""The retention purge: predictions older than `retention_days`, their feedback and their stored audio; then the
calls that ended before then, with their uploaded recordings and timeline pictures."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import Engine

from core.db import crud
from core.db.session import session_scope

log = logging.getLogger(__name__)
CHUNK = 5_000  # rows per transaction, so a large purge neither holds long locks nor one huge transaction


@dataclass(frozen=True)
class PurgeResult:
    cutoff: datetime
    predictions: int
    audio_files: int
    calls: int = 0


def purge(engine: Engine, retention_days: int, now: datetime | None = None) -> PurgeResult:
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    predictions = audio_files = 0
    while True:
        with session_scope(engine) as session:
            deleted, audio_paths = crud.purge_predictions_before(session, cutoff, CHUNK)
        predictions += deleted
        audio_files += sum(_remove(Path(path)) for path in audio_paths)
        if deleted < CHUNK:
            break
    calls = 0
    while True:
        with session_scope(engine) as session:
            deleted, recordings = crud.purge_calls_before(session, cutoff, CHUNK)
        calls += deleted
        audio_files += sum(_remove(Path(path)) for path in recordings)
        for path in recordings:
            _remove(Path(path).with_suffix(".png"))  # the call's timeline picture, beside its recording
        if deleted < CHUNK:
            return PurgeResult(cutoff, predictions, audio_files, calls)


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as error:
        log.warning("cannot remove purged audio %s: %s", path, error)
        return False
    return True
