"""Windows of logged predictions, read from the database in the shape the monitor needs."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import ColumnElement, Subquery, func, select
from sqlalchemy.orm import Session

from core.db.models import Feedback, Prediction


@dataclass(frozen=True)
class Window:
    """Consecutive predictions of one model version, oldest first."""

    model_version: str
    names: tuple[str, ...]
    ids: list[uuid.UUID]
    created_at: list[datetime]
    probabilities: np.ndarray  # [N, C], in the order of `names`
    embeddings: np.ndarray | None  # [N, D] when every row logged one
    true: np.ndarray  # [N] class index from the newest feedback label, -1 where unlabelled

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def labelled(self) -> np.ndarray:
        return self.true >= 0

    @property
    def start(self) -> datetime:
        return self.created_at[0]

    @property
    def end(self) -> datetime:
        return self.created_at[-1]


def _probability_row(stored: list[float] | dict[str, float], names: Sequence[str]) -> list[float]:
    return [float(stored[name]) for name in names] if isinstance(stored, dict) else [float(p) for p in stored]


def _newest_feedback_ids(*where: ColumnElement[bool]) -> Subquery:
    """(prediction_id, feedback_id): the newest feedback of each prediction matching `where` (a prediction's
    label is the last one sent for it)."""
    return (
        select(Feedback.prediction_id, func.max(Feedback.id).label("feedback_id"))
        .join(Prediction, Prediction.id == Feedback.prediction_id)
        .where(*where)
        .group_by(Feedback.prediction_id)
        .subquery()
    )


def _newest_feedback(session: Session, ids: list[uuid.UUID]) -> dict[uuid.UUID, str]:
    newest = _newest_feedback_ids(Prediction.id.in_(ids))
    rows = session.execute(
        select(Feedback.prediction_id, Feedback.label).join(newest, Feedback.id == newest.c.feedback_id)
    )
    return {prediction_id: label for prediction_id, label in rows}


def _same_instant_tail(session: Session, model_version: str, last: Prediction) -> list[Prediction]:
    """Rows logged at the same instant as the window's last row: a window never splits an instant, because
    the next window starts strictly after its end time."""
    query = select(Prediction).where(
        Prediction.model_version == model_version, Prediction.created_at == last.created_at, Prediction.id > last.id
    )
    return list(session.scalars(query.order_by(Prediction.id)))


def load_window(
    session: Session, model_version: str, names: Sequence[str], *, after: datetime | None, limit: int
) -> Window:
    """Up to `limit` predictions of `model_version` logged after `after`, oldest first, with feedback joined."""
    query = select(Prediction).where(Prediction.model_version == model_version)
    if after is not None:
        query = query.where(Prediction.created_at > after)
    rows = list(session.scalars(query.order_by(Prediction.created_at, Prediction.id).limit(limit)))
    if len(rows) == limit:
        rows += _same_instant_tail(session, model_version, rows[-1])
    labels = _newest_feedback(session, [row.id for row in rows]) if rows else {}
    index = {name: k for k, name in enumerate(names)}
    embeddings = [row.embedding for row in rows]
    return Window(
        model_version=model_version,
        names=tuple(names),
        ids=[row.id for row in rows],
        created_at=[row.created_at for row in rows],
        probabilities=np.array([_probability_row(row.probabilities, names) for row in rows]).reshape(-1, len(names)),
        embeddings=(
            np.stack([np.frombuffer(e, dtype="<f4") for e in embeddings]) if rows and all(embeddings) else None
        ),
        true=np.array([index.get(labels.get(row.id, ""), -1) for row in rows], dtype=np.int64),
    )


def load_labelled(
    session: Session, model_version: str, names: Sequence[str], *, until: datetime, limit: int
) -> tuple[np.ndarray, np.ndarray]:
    """Served probabilities [N, C] and newest feedback label (class index) [N] of the newest `limit` predictions
    of `model_version` logged up to `until` that carry a feedback label in `names`, newest first."""
    newest = _newest_feedback_ids(Prediction.model_version == model_version, Prediction.created_at <= until)
    rows = session.execute(
        select(Prediction.probabilities, Feedback.label)
        .join(newest, newest.c.prediction_id == Prediction.id)
        .join(Feedback, Feedback.id == newest.c.feedback_id)
        .where(Feedback.label.in_(names))
        .order_by(Prediction.created_at.desc(), Prediction.id.desc())
        .limit(limit)
    ).all()
    index = {name: k for k, name in enumerate(names)}
    probabilities = np.array([_probability_row(stored, names) for stored, _ in rows]).reshape(-1, len(names))
    return probabilities, np.array([index[label] for _, label in rows], dtype=np.int64)
