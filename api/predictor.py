"""One prediction request end to end: decode audio, score through the batcher, answer, hand off the log rows."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from api.batcher import History, MicroBatcher, Scored
from api.domain_errors import InputTooLarge, InvalidInput
from api.inputs import RawTurn
from api.metrics import Metrics
from api.prediction_log import PredictionLogger
from api.schemas import UtterancePrediction
from core.audit import selected_for_audit
from core.db.crud import PredictionRecord
from core.db.models import ContextMode, RequestKind
from core.settings import Settings
from model.audio import SAMPLE_RATE, AudioError, AudioTooLarge, AudioTooLong, decode_audio
from model.labels import LabelSet
from model.preprocess import PreprocessError
from model.runtime import TurnPrediction, UtteranceInput


@dataclass(frozen=True)
class RequestInfo:
    kind: RequestKind
    context: ContextMode | None
    conversation_id: str | None
    started: float  # time.perf_counter() when the request arrived
    streamed: bool = False  # a live stream's turn: a message of its own, not `turns.<i>` of a body


@dataclass(frozen=True)
class Answer:
    model_version: str
    latency_ms: float
    turns: list[UtterancePrediction]
    embeddings: tuple[np.ndarray, ...] = ()  # each turn's utterance embedding (a live stream keeps them)


class Predictor:
    def __init__(self, batcher: MicroBatcher, logger: PredictionLogger, metrics: Metrics, settings: Settings) -> None:
        self._batcher = batcher
        self._logger = logger
        self._metrics = metrics
        self._settings = settings

    async def predict(self, turns: list[RawTurn], info: RequestInfo, history: History | None = None) -> Answer:
        """With a live stream's `history`, `turns` come after the kept turns: only they are encoded, answered and
        logged, numbered on from them."""
        inputs = await asyncio.to_thread(self._decode_all, turns, info)
        scored = await self._score(inputs, causal=info.context == ContextMode.CAUSAL, history=history)
        first_index = len(history) if history is not None else 0
        latency_ms = round((time.perf_counter() - info.started) * 1000, 3)
        created_at = datetime.now(UTC)
        runtime = scored.model.runtime
        answers, records = [], []
        for index, (turn, utterance, prediction) in enumerate(zip(turns, inputs, scored.turns, strict=True)):
            answer = _answer(prediction, runtime.emotions, runtime.sentiments, scored.model.version, latency_ms)
            answer.audit = selected_for_audit(answer.prediction_id, self._settings.audit_share)
            if info.kind == RequestKind.DIALOGUE:
                answer.turn_index, answer.speaker = first_index + index, turn.speaker
            answers.append(answer)
            records.append(self._record(answer, turn, utterance, prediction, info, created_at))
            self._count(answer, prediction)
        if self._settings.log_predictions:
            self._logger.submit(records)
        return Answer(scored.model.version, latency_ms, answers, tuple(turn.embedding for turn in scored.turns))

    async def _score(self, inputs: list[UtteranceInput], causal: bool, history: History | None) -> Scored:
        try:
            return await self._batcher.score(inputs, causal, history)
        except PreprocessError as error:  # the model's own input checks
            raise InvalidInput("body", str(error)) from None

    def _decode_all(self, turns: list[RawTurn], info: RequestInfo) -> list[UtteranceInput]:
        in_body = info.kind == RequestKind.DIALOGUE and not info.streamed
        fields = [f"turns.{i}.audio" if in_body else "audio" for i in range(len(turns))]
        return [
            UtteranceInput(text=turn.text, audio=self._decode(turn.audio, field), speaker=turn.speaker)
            for turn, field in zip(turns, fields, strict=True)
        ]

    def _decode(self, audio: bytes | None, field: str) -> np.ndarray | None:
        if audio is None:
            return None
        try:
            return decode_audio(
                audio, max_bytes=self._settings.max_audio_bytes, max_seconds=self._settings.max_audio_seconds
            )
        except (AudioTooLarge, AudioTooLong) as error:
            raise InputTooLarge(field, error.message, error.limit or 0) from None
        except AudioError as error:
            raise InvalidInput(field, error.message) from None

    def _record(
        self,
        answer: UtterancePrediction,
        turn: RawTurn,
        utterance: UtteranceInput,
        prediction: TurnPrediction,
        info: RequestInfo,
        created_at: datetime,
    ) -> PredictionRecord:
        audio = utterance.audio
        return PredictionRecord(
            id=answer.prediction_id,
            created_at=created_at,
            model_version=answer.model_version,
            request_kind=info.kind,
            context_mode=info.context,
            conversation_id=info.conversation_id,
            turn_index=answer.turn_index,
            speaker=turn.speaker,
            text=turn.text,
            has_audio=audio is not None,
            audio=turn.audio if self._settings.store_audio else None,
            audio_seconds=len(audio) / SAMPLE_RATE if audio is not None else None,
            label=answer.emotion,
            label_index=prediction.emotion_index,
            confidence=answer.confidence,
            probabilities=[float(p) for p in prediction.emotion_probs],
            sentiment=answer.sentiment,
            latency_ms=answer.latency_ms,
            embedding=np.asarray(prediction.embedding, dtype="<f4").tobytes(),
        )

    def _count(self, answer: UtterancePrediction, prediction: TurnPrediction) -> None:
        self._metrics.predictions.labels(answer.emotion, answer.model_version).inc()
        if prediction.rescored:
            self._metrics.rescored.labels(answer.model_version).inc()
        self._metrics.confidence.labels(answer.model_version).observe(answer.confidence)


def _answer(
    prediction: TurnPrediction, emotions: LabelSet, sentiments: LabelSet, version: str, latency_ms: float
) -> UtterancePrediction:
    emotion_probs = [float(p) for p in prediction.emotion_probs]
    return UtterancePrediction(
        prediction_id=uuid.uuid4(),
        emotion=prediction.emotion,
        confidence=emotion_probs[prediction.emotion_index],
        probabilities=dict(zip(emotions.names, emotion_probs, strict=True)),
        sentiment=prediction.sentiment,
        sentiment_probabilities={
            name: float(p) for name, p in zip(sentiments.names, prediction.sentiment_probs, strict=True)
        },
        model_version=version,
        latency_ms=latency_ms,
    )
