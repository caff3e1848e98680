"""Queries of the service: predictions, feedback, retraining jobs and the retention purge."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from equipoise.db.models import Feedback, JobTrigger, Prediction, RetrainingJob


def insert_predictions_if_absent(connection: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert the rows whose id is not stored yet, so that replaying a batch twice stores it once."""
    if not rows:
        return
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(Prediction).on_conflict_do_nothing(index_elements=[Prediction.id])
    connection.execute(statement, list(rows))


def get_prediction(session: Session, prediction_id: uuid.UUID) -> Prediction | None:
    return session.get(Prediction, prediction_id)


def add_feedback(
    session: Session, prediction: Prediction, label: str, sentiment: str | None, source: str | None
) -> Feedback:
    feedback = Feedback(prediction=prediction, label=label, sentiment=sentiment, source=source)
    session.add(feedback)
    session.flush()
    return feedback


def create_job(
    session: Session, *, reason: str, tier: int | None, params: dict[str, Any], base_version: str | None
) -> RetrainingJob:
    job = RetrainingJob(trigger=JobTrigger.ADMIN, reason=reason, tier=tier, params=params, base_version=base_version)
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: int) -> RetrainingJob | None:
    return session.get(RetrainingJob, job_id)


def purge_predictions_before(session: Session, cutoff: datetime, limit: int) -> tuple[int, list[str]]:
    """Delete up to `limit` predictions created before `cutoff` and their feedback; returns the number of
    predictions deleted and the audio files they referenced (to be removed once the transaction commits)."""
    chosen = session.execute(
        select(Prediction.id, Prediction.audio_path).where(Prediction.created_at < cutoff).limit(limit)
    ).all()
    if not chosen:
        return 0, []
    ids = [row.id for row in chosen]
    session.execute(delete(Feedback).where(Feedback.prediction_id.in_(ids)))
    session.execute(delete(Prediction).where(Prediction.id.in_(ids)))
    return len(ids), [row.audio_path for row in chosen if row.audio_path]
