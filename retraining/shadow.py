"""Shadow pairs for the gate: the champion's and the candidate's predictions as the service served them, on the
same live turns.

When the service scored a share of its traffic with the candidate in shadow (api/shadow.py), every logged turn
answered by the job's base version and shadowed by the candidate carries both models' predictions on exactly the
inputs and the context the live request had. On the labelled held-out turns among them the gate can compare
those (retraining/gate.py) instead of scoring both models again: nothing is re-encoded, so turns whose raw audio
was not stored count too. Only versions with the same emotion labels, in the same order, are paired.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import Engine, select

from core.db.models import Prediction, ShadowPrediction
from core.db.session import session_scope
from model.artifact import ModelArtifact
from retraining.dataset import DialogueSet, served_probabilities

_CHUNK = 5_000  # ids per IN (...) list


@dataclass(frozen=True)
class ServedPairs:
    """Per turn of a DialogueSet: whether both models served it, and their served emotion probabilities."""

    rows: np.ndarray  # bool [N]
    champion: np.ndarray  # float [N, C], zeros where not paired
    candidate: np.ndarray  # float [N, C]

    @classmethod
    def none(cls, size: int, classes: int) -> ServedPairs:
        return cls(np.zeros(size, dtype=bool), np.zeros((size, classes)), np.zeros((size, classes)))


def served_pairs(engine: Engine, data: DialogueSet, champion: ModelArtifact, candidate: ModelArtifact) -> ServedPairs:
    """The turns of `data` (by their logged prediction id) answered by `champion` and shadowed by `candidate`."""
    emotions = champion.emotions
    pairs = ServedPairs.none(len(data), len(emotions))
    if candidate.emotions.names != emotions.names:
        return pairs
    position = {uuid.UUID(p): i for i, p in enumerate(data.prediction_ids) if p is not None}
    for live_id, served, shadowed in _pairs(engine, list(position), champion.version, candidate.version):
        i = position[live_id]
        pairs.rows[i] = True
        pairs.champion[i] = served_probabilities(served, emotions)
        pairs.candidate[i] = served_probabilities(shadowed, emotions)
    return pairs


def _pairs(
    engine: Engine, ids: Sequence[uuid.UUID], champion: str, candidate: str
) -> list[tuple[uuid.UUID, object, object]]:
    found: list[tuple[uuid.UUID, object, object]] = []
    with session_scope(engine) as session:
        for start in range(0, len(ids), _CHUNK):
            query = (
                select(Prediction.id, Prediction.probabilities, ShadowPrediction.probabilities)
                .join(ShadowPrediction, ShadowPrediction.live_prediction_id == Prediction.id)
                .where(
                    Prediction.id.in_(ids[start : start + _CHUNK]),
                    Prediction.model_version == champion,
                    ShadowPrediction.model_version == candidate,
                )
            )
            found.extend((row[0], row[1], row[2]) for row in session.execute(query))
    return found
