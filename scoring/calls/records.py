"""A processed call as stored: its turns as prediction records (request kind `call`) and the call's JSON result.

Each turn's prediction id is derived from the call id and the turn's index, so processing a call again (after its
runner died) gives the same ids, and the insert-if-absent of the rows stores each turn once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime
from typing import Any

from core.db.crud import CallTurn, PredictionRecord
from core.db.models import ContextMode, RequestKind
from model.runtime import TurnPrediction
from scoring.calls.pipeline import CallResult, Turn


def turn_prediction_id(call_id: uuid.UUID, turn: int) -> uuid.UUID:
    return uuid.uuid5(call_id, f"turn-{turn}")


def call_records(
    call_id: uuid.UUID,
    result: CallResult,
    predictions: Sequence[TurnPrediction | None],
    *,
    model_version: str,
    context: ContextMode,
    created_at: datetime,
    latency_ms: float,
) -> list[PredictionRecord]:
    """One record per scored turn; `predictions` are the model's answers for `result.turns`, in order (None: the
    turn was not scored, and has no prediction)."""
    if len(predictions) != len(result.turns):
        raise ValueError(f"{len(predictions)} predictions for {len(result.turns)} turns")
    return [
        _record(call_id, turn, prediction, model_version, context, created_at, latency_ms)
        for turn, prediction in zip(result.turns, predictions, strict=True)
        if prediction is not None
    ]


def _record(
    call_id: uuid.UUID,
    turn: Turn,
    prediction: TurnPrediction,
    model_version: str,
    context: ContextMode,
    created_at: datetime,
    latency_ms: float,
) -> PredictionRecord:
    return PredictionRecord(
        id=turn_prediction_id(call_id, turn.turn),
        created_at=created_at,
        model_version=model_version,
        request_kind=RequestKind.CALL,
        context_mode=context,
        conversation_id=str(call_id),
        turn_index=turn.turn,
        speaker=turn.speaker,
        text=turn.text,
        has_audio=True,
        audio_seconds=turn.end_s - turn.start_s,
        latency_ms=latency_ms,
        embedding=prediction.embedding_bytes(),
        **prediction.logged_fields(),
        call=CallTurn(call_id, turn.start_s, turn.end_s),
    )


def call_document(call_id: uuid.UUID, result: CallResult, model_version: str | None) -> dict[str, Any]:
    """The call's result as the API answers it: the turns (with their prediction ids) and the summary."""
    document = result.to_dict()
    document["model_version"] = model_version
    document["turns"] = [_turn_document(call_id, turn) for turn in result.turns]
    return document


def _turn_document(call_id: uuid.UUID, turn: Turn) -> dict[str, Any]:
    emotion = turn.emotion
    return {
        "turn": turn.turn,
        "start_s": round(turn.start_s, 3),
        "end_s": round(turn.end_s, 3),
        "speaker": turn.speaker,
        "channel": turn.audio.channel,
        "text": turn.text,
        "words": [asdict(word) for word in turn.words],
        "level_dbfs": turn.level_dbfs,
        "emotion": emotion.label if emotion else None,
        "probabilities": dict(emotion.probabilities) if emotion else None,
        "sentiment": emotion.sentiment if emotion else None,
        "sentiment_probabilities": dict(emotion.sentiment_probabilities or {}) if emotion else None,
        "prediction_id": str(turn_prediction_id(call_id, turn.turn)) if emotion else None,
    }
