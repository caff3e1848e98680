"""Windows of logged predictions, read from the database in the shape the monitor needs.

The monitor reads the turns the model saw text for. Its reference (the dev class mix, its covariance, the
calibration record behind the label-shift estimate) describes the text path on MELD dev; an audio-only turn is
served by the speech head under its own temperature, so reading its probabilities as the text path's would
misstate both the mix and the posteriors (a voice-only client would look like drift). Audio-only turns are logged
and open to feedback like any other, and not monitored.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from core.db.crud import newest_feedback_ids, newest_labels
from core.db.models import Feedback, FeedbackKind, Prediction
from monitoring.analysis import LabelledTurns

MONITORED = Prediction.has_text.is_(True)


@dataclass(frozen=True)
class Window:
    """Consecutive predictions of one model version, oldest first."""

    model_version: str
    names: tuple[str, ...]
    ids: list[uuid.UUID]
    created_at: list[datetime]
    conversations: list[str]  # each turn's conversation id; a turn logged without one is its own
    probabilities: np.ndarray  # [N, C], in the order of `names`
    embeddings: np.ndarray | None  # [N, D] when every row logged one
    labels: LabelledTurns  # audit labels where the window has any, else corrections

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def true(self) -> np.ndarray:
        """[N] class index from the newest label of the window's label source, -1 where unlabelled."""
        return self.labels.true

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def start(self) -> datetime:
        return self.created_at[0]

    @property
    def end(self) -> datetime:
        return self.created_at[-1]


def _probability_row(stored: list[float] | dict[str, float], names: Sequence[str]) -> list[float]:
    return [float(stored[name]) for name in names] if isinstance(stored, dict) else [float(p) for p in stored]


def _same_instant_tail(session: Session, model_version: str, last: Prediction) -> list[Prediction]:
    """Rows logged at the same instant as the window's last row: a window never splits an instant, because
    the next window starts strictly after its end time."""
    query = select(Prediction).where(
        Prediction.model_version == model_version,
        Prediction.created_at == last.created_at,
        Prediction.id > last.id,
        MONITORED,
    )
    return list(session.scalars(query.order_by(Prediction.id)))


def window_labels(session: Session, ids: list[uuid.UUID], names: Sequence[str]) -> LabelledTurns:
    """The newest audit label of each prediction when the window has any (a random sample of its turns), else the
    newest correction (biased: users correct mistakes)."""
    index = {name: k for k, name in enumerate(names)}
    for kind in (FeedbackKind.AUDIT, FeedbackKind.CORRECTION):
        labels = newest_labels(session, ids, kind) if ids else {}
        true = np.array([index.get(labels.get(i, ""), -1) for i in ids], dtype=np.int64)
        if (true >= 0).any():
            return LabelledTurns(true, kind)
    return LabelledTurns.unlabelled(len(ids))


def load_window(
    session: Session, model_version: str, names: Sequence[str], *, after: datetime | None, limit: int
) -> Window:
    """Up to `limit` predictions of `model_version` logged after `after`, oldest first, with feedback joined."""
    query = select(Prediction).where(Prediction.model_version == model_version, MONITORED)
    if after is not None:
        query = query.where(Prediction.created_at > after)
    rows = list(session.scalars(query.order_by(Prediction.created_at, Prediction.id).limit(limit)))
    if len(rows) == limit:
        rows += _same_instant_tail(session, model_version, rows[-1])
    ids = [row.id for row in rows]
    embeddings = [row.embedding for row in rows]
    return Window(
        model_version=model_version,
        names=tuple(names),
        ids=ids,
        created_at=[row.created_at for row in rows],
        conversations=[row.conversation_id or f"turn:{row.id}" for row in rows],
        probabilities=np.array([_probability_row(row.probabilities, names) for row in rows]).reshape(-1, len(names)),
        embeddings=(
            np.stack([np.frombuffer(e, dtype="<f4") for e in embeddings]) if rows and all(embeddings) else None
        ),
        labels=window_labels(session, ids, names),
    )


def load_labelled(
    session: Session,
    model_version: str,
    names: Sequence[str],
    *,
    until: datetime,
    limit: int,
    kind: FeedbackKind | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Served probabilities [N, C] and newest label (class index) [N] of the newest `limit` predictions of
    `model_version` logged up to `until` that carry a label in `names` (of `kind` when given), newest first."""
    newest = newest_feedback_ids(
        Prediction.model_version == model_version, Prediction.created_at <= until, MONITORED, kind=kind
    )
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
