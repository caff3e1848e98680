"""The retention purge: predictions older than `retention_days`, their feedback and their stored audio."""

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


def purge(engine: Engine, retention_days: int, now: datetime | None = None) -> PurgeResult:
    cutoff = (now or datetime.now(UTC)) - timedelta(days=retention_days)
    predictions = audio_files = 0
    while True:
        with session_scope(engine) as session:
            deleted, audio_paths = crud.purge_predictions_before(session, cutoff, CHUNK)
        predictions += deleted
        audio_files += sum(_remove(Path(path)) for path in audio_paths)
        if deleted < CHUNK:
            return PurgeResult(cutoff, predictions, audio_files)


def _remove(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as error:
        log.warning("cannot remove purged audio %s: %s", path, error)
        return False
    return True
