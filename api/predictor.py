"""One prediction request end to end: decode audio into voices (a channel of a recording is a voice of its own,
api/voices.py), score through the batcher, answer, hand off the log rows."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from api.batcher import History, MicroBatcher, Scored
from api.domain_errors import InputTooLarge, InvalidInput
from api.inputs import RawTurn
from api.metrics import Metrics
from api.prediction_log import PredictionLogger
from api.reload import LoadedModel
from api.schemas import SilentChannel, UtterancePrediction
from api.voices import Voice, Voices, decode_voices
from core.audit import selected_for_audit
from core.db.crud import PredictionRecord
from core.db.models import ContextMode, RequestKind
from core.settings import Settings
from model.audio import SAMPLE_RATE
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
    multichannel: bool = True  # False: audio of several channels is refused (one answer per turn sent)


@dataclass(frozen=True)
class Answer:
    model_version: str
    latency_ms: float
    turns: list[UtterancePrediction]
    embeddings: tuple[np.ndarray, ...] = ()  # each turn's utterance embedding (a live stream keeps them)
    silent: tuple[SilentChannel, ...] = ()  # channels of multi-channel audio without a voice


# Hands an answered and logged request to shadow scoring (api/shadow.py): its dialogues as scored, the answers in
# the same turn order, and whether they were scored causally.
ShadowOffer = Callable[[list[list[UtteranceInput]], list[UtterancePrediction], bool], None]


class Predictor:
    def __init__(
        self,
        batcher: MicroBatcher,
        logger: PredictionLogger,
        metrics: Metrics,
        settings: Settings,
        shadow: ShadowOffer | None = None,
    ) -> None:
        self._batcher = batcher
        self._logger = logger
        self._metrics = metrics
        self._settings = settings
        self._shadow = shadow

    async def predict(self, turns: list[RawTurn], info: RequestInfo, history: History | None = None) -> Answer:
        """With a live stream's `history`, `turns` come after the kept turns: only they are encoded, answered and
        logged, numbered on from them. A turn whose audio has several channels is answered once per channel with
        a voice (an utterance's channels each alone, a dialogue's as consecutive turns of the dialogue)."""
        if any(turn.audio is not None for turn in turns):  # decoding blocks: off the event loop
            voices = await asyncio.to_thread(self._decode_all, turns, info)
        else:  # text alone: cheaper inline than the thread hand-off
            voices = self._decode_all(turns, info)
        scored = await self._score_voices(voices.scored, info, history)
        first_index = len(history) if history is not None else 0
        latency_ms = round((time.perf_counter() - info.started) * 1000, 3)
        created_at = datetime.now(UTC)
        answers, records = [], []
        for voice, (model, prediction) in zip(voices.scored, scored, strict=True):
            runtime = model.runtime
            answer = _answer(prediction, runtime.emotions, runtime.sentiments, model.version, latency_ms)
            answer.audit = selected_for_audit(answer.prediction_id, self._settings.audit_share)
            _describe(answer, voice, info, first_index)
            answers.append(answer)
            records.append(self._record(answer, voice, prediction, info, created_at))
            self._count(answer, prediction)
        if self._settings.log_predictions:
            self._logger.submit(records)
            if self._shadow is not None and not info.streamed:  # a stream turn follows the champion's own context
                self._shadow(_dialogues(voices.scored, info), answers, info.context == ContextMode.CAUSAL)
        silent = tuple(_silent(voice, info, first_index) for voice in voices.silent)
        embeddings = tuple(prediction.embedding for _, prediction in scored)
        return Answer(scored[0][0].version, latency_ms, answers, embeddings, silent)

    async def _score_voices(
        self, voices: list[Voice], info: RequestInfo, history: History | None
    ) -> list[tuple[LoadedModel, TurnPrediction]]:
        causal = info.context == ContextMode.CAUSAL
        results = await asyncio.gather(
            *(self._score(dialogue, causal, history) for dialogue in _dialogues(voices, info))
        )
        return [(result.model, prediction) for result in results for prediction in result.turns]

    async def _score(self, inputs: list[UtteranceInput], causal: bool, history: History | None) -> Scored:
        try:
            return await self._batcher.score(inputs, causal, history)
        except PreprocessError as error:  # the model's own input checks
            raise InvalidInput("body", str(error)) from None

    def _decode_all(self, turns: list[RawTurn], info: RequestInfo) -> Voices:
        in_body = info.kind == RequestKind.DIALOGUE and not info.streamed
        prefixes = [f"turns.{i}." if in_body else "" for i in range(len(turns))]
        voices = decode_voices(turns, prefixes, self._settings, multichannel=info.multichannel)
        limit = self._settings.max_dialogue_turns
        if info.kind == RequestKind.DIALOGUE and len(voices.scored) > limit:
            message = f"the dialogue has {len(voices.scored)} turns once its channels are split; the limit is {limit}"
            raise InputTooLarge("turns", message, limit)
        if not voices.scored:
            field = "turns" if in_body else "audio"
            raise InvalidInput(field, "nothing to score: every channel of the audio is silent and there is no text")
        return voices

    def _record(
        self,
        answer: UtterancePrediction,
        voice: Voice,
        prediction: TurnPrediction,
        info: RequestInfo,
        created_at: datetime,
    ) -> PredictionRecord:
        turn, audio = voice.turn, voice.turn.audio
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
            audio=voice.stored,
            audio_seconds=len(audio) / SAMPLE_RATE if audio is not None else None,
            latency_ms=answer.latency_ms,
            embedding=prediction.embedding_bytes(),
            **prediction.logged_fields(),
        )

    def _count(self, answer: UtterancePrediction, prediction: TurnPrediction) -> None:
        self._metrics.predictions.labels(answer.emotion, answer.model_version).inc()
        if prediction.rescored:
            self._metrics.rescored.labels(answer.model_version).inc()
        self._metrics.confidence.labels(answer.model_version).observe(answer.confidence)


def _describe(answer: UtterancePrediction, voice: Voice, info: RequestInfo, first_index: int) -> None:
    """Where the answer came from: its turn of a dialogue, and the channel (with its speaker) of a recording."""
    if info.kind == RequestKind.DIALOGUE:
        answer.turn_index, answer.speaker = first_index + voice.source, voice.turn.speaker
    if voice.turn.channel is not None:
        answer.channel, answer.speaker = voice.turn.channel, voice.turn.speaker


def _silent(voice: Voice, info: RequestInfo, first_index: int) -> SilentChannel:
    turn = voice.turn
    assert turn.channel is not None and turn.speaker is not None and turn.level_dbfs is not None
    return SilentChannel(
        turn_index=first_index + voice.source if info.kind == RequestKind.DIALOGUE else None,
        channel=turn.channel,
        speaker=turn.speaker,
        level_dbfs=round(turn.level_dbfs, 1) if math.isfinite(turn.level_dbfs) else None,
    )


def _dialogues(voices: list[Voice], info: RequestInfo) -> list[list[UtteranceInput]]:
    """A dialogue's voices as one dialogue; an utterance's (its channels) each as a dialogue of its own."""
    inputs = [UtteranceInput(voice.turn.text, voice.turn.audio, voice.turn.speaker) for voice in voices]
    return [inputs] if info.kind == RequestKind.DIALOGUE else [[one] for one in inputs]


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
