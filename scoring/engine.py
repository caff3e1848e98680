"""What the local and the Ray engine share: the model to load, and `score_chunk`, which turns a chunk of
conversations into output rows with one `InferenceRuntime.classify` call (the call the API makes)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from model.audio import SAMPLE_RATE
from model.data.turns import RowError
from model.labels import LabelSet
from model.runtime import TurnPrediction, UtteranceInput
from scoring.conversations import Conversation, Item, SourcePlan
from scoring.inputs import InputOptions, PreparedTurn, TurnError, prepare_conversation, record_error

Row = dict[str, Any]


class Runtime(Protocol):
    """What scoring needs of model.runtime.InferenceRuntime."""

    version: str
    emotions: LabelSet
    sentiments: LabelSet

    def classify(self, dialogues: Sequence[Sequence[UtteranceInput]], causal: bool) -> list[list[TurnPrediction]]: ...


@dataclass(frozen=True)
class ModelInfo:
    version: str
    emotions: tuple[str, ...]
    sentiments: tuple[str, ...]
    sha256: str | None = None  # the artifact's
    precision: str = "fp32"
    hears_audio: bool = True  # False: trained on text alone, a turn with audio and no text is an error row

    @classmethod
    def of(cls, runtime: Runtime) -> ModelInfo:
        artifact = getattr(runtime, "artifact", None)
        return cls(
            runtime.version,
            runtime.emotions.names,
            runtime.sentiments.names,
            getattr(artifact, "sha256", None),
            encoding(getattr(runtime, "precision", "fp32"), getattr(runtime, "rescore_margin", 0.0)),
            getattr(runtime, "hears_audio", True),
        )


def encoding(precision: str, rescore_margin: float) -> str:
    """How turns are encoded, as run headers record it: the precision, and near-tie re-scoring when on (int8 only,
    as InferenceRuntime.load applies the margin)."""
    rescoring = precision == "int8" and rescore_margin > 0
    return f"{precision}, near ties < {rescore_margin:g} re-scored in fp32" if rescoring else precision


@dataclass(frozen=True)
class RuntimeSpec:
    """An artifact and how to open it; picklable, so each Ray actor opens its own sessions."""

    artifact_dir: Path
    device: Literal["auto", "cpu", "cuda"] = "auto"
    intra_op_threads: int = 0
    precision: Literal["fp32", "int8"] = "fp32"
    rescore_margin: float = 0.0  # int8 near ties re-scored in fp32 (model/runtime.py)
    packed_text_path: bool = True

    def load(self) -> Runtime:
        from model.runtime import InferenceRuntime

        return InferenceRuntime.load(
            self.artifact_dir,
            self.device,
            self.intra_op_threads,
            self.precision,
            rescore_margin=self.rescore_margin,
            packed_text_path=self.packed_text_path,
        )

    def info(self) -> ModelInfo:
        """The model's version and labels without opening ONNX Runtime sessions."""
        from model.artifact import load_artifact

        artifact = load_artifact(self.artifact_dir)
        return ModelInfo(
            artifact.version,
            artifact.emotions.names,
            artifact.sentiments.names,
            artifact.sha256,
            encoding(self.precision, self.rescore_margin),
        )


@dataclass(frozen=True)
class ScoringOptions:
    causal: bool
    inputs: InputOptions
    keep_logged: bool = False  # keep what database logging needs (embeddings, text)


@dataclass(frozen=True, slots=True)
class LoggedTurn:
    """A scored turn as the predictions table needs it."""

    conversation_id: str
    turn: int
    speaker: str
    text: str | None
    audio_path: str | None
    audio_seconds: float | None
    label: str
    label_index: int
    confidence: float
    probabilities: list[float]
    sentiment: str
    embedding: bytes  # float32 little-endian
    latency_ms: float  # the chunk's classify time per turn
    channel: int | None = None  # the audio channel of a multi-channel row (audio_path is then the whole recording)
    span_s: tuple[float, float] | None = None  # a whole call's turn: where it lies in the recording, in seconds


@dataclass(frozen=True)
class ScoredItem:
    """The output rows of one conversation (in turn order), or the one error row of an unreadable record."""

    conversation_id: str | None
    record: int | None  # an unreadable record's number
    rows: list[Row]
    error_kinds: list[str]
    logged: list[LoggedTurn]
    input_records: int = 1  # the input records it covers (a multi-channel record gives a row per channel)


class Engine(Protocol):
    model: ModelInfo

    def score(self, plan: SourcePlan, options: ScoringOptions) -> Iterator[list[ScoredItem]]:
        """Scored chunks, in the order `iter_chunks(plan)` gives them."""
        ...


def score_chunk(runtime: Runtime, items: Sequence[Item], options: ScoringOptions) -> list[ScoredItem]:
    model = ModelInfo.of(runtime)
    prepared = [prepare_conversation(i, options.inputs) if isinstance(i, Conversation) else None for i in items]
    dialogues = [[t.utterance for t in turns if t.utterance is not None] for turns in prepared if turns is not None]
    start = time.perf_counter()
    predictions = iter(runtime.classify(dialogues, options.causal))
    latency_ms = 1e3 * (time.perf_counter() - start) / max(1, sum(map(len, dialogues)))
    return [
        _bad_record(item, model)
        if turns is None
        else _scored(item, turns, next(predictions), model, latency_ms if options.keep_logged else None)
        for item, turns in zip(items, prepared, strict=True)
    ]


def output_row(
    model: ModelInfo,
    conversation_id: str | None,
    turn: int | None,
    speaker: str | None,
    prediction: TurnPrediction | None,
    error: TurnError | None = None,
    *,
    channel: int | None = None,
) -> Row:
    probabilities = prediction.emotion_probs if prediction is not None else [None] * len(model.emotions)
    return {
        "conversation_id": conversation_id,
        "turn": turn,
        "speaker": speaker,
        "channel": channel,
        "label": prediction.emotion if prediction is not None else None,
        **{f"p_{name}": _float(p) for name, p in zip(model.emotions, probabilities, strict=True)},
        "sentiment": prediction.sentiment if prediction is not None else None,
        "confidence": float(np.max(prediction.emotion_probs)) if prediction is not None else None,
        "model_version": model.version,
        "error": str(error) if error is not None else None,
    }


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def _bad_record(error: RowError, model: ModelInfo) -> ScoredItem:
    turn_error = record_error(error)
    return ScoredItem(None, error.row, [output_row(model, None, None, None, None, turn_error)], [turn_error.kind], [])


def _scored(
    conversation: Conversation,
    turns: list[PreparedTurn],
    predictions: list[TurnPrediction],
    model: ModelInfo,
    latency_ms: float | None,  # None: nothing is logged
) -> ScoredItem:
    remaining = iter(predictions)
    rows, kinds, logged = [], [], []
    for turn in turns:
        source = turn.source.turn
        prediction = None if turn.error is not None else next(remaining)
        rows.append(
            output_row(
                model, source.conversation_id, source.turn, turn.speaker, prediction, turn.error, channel=turn.channel
            )
        )
        if turn.error is not None:
            kinds.append(turn.error.kind)
        elif latency_ms is not None:
            logged.append(_logged(turn, prediction, model, latency_ms))
    return ScoredItem(conversation.conversation_id, None, rows, kinds, logged, len(conversation.turns))


def _logged(turn: PreparedTurn, prediction: TurnPrediction, model: ModelInfo, latency_ms: float) -> LoggedTurn:
    source, audio = turn.source.turn, turn.utterance.audio if turn.utterance is not None else None
    return logged_turn(
        prediction,
        conversation_id=source.conversation_id,
        turn=source.turn,
        speaker=turn.speaker,
        text=turn.utterance.text if turn.utterance is not None else None,
        audio_path=source.audio_path if audio is not None else None,
        audio_seconds=len(audio) / SAMPLE_RATE if audio is not None else None,
        latency_ms=latency_ms,
        channel=turn.channel,
    )


def logged_turn(
    prediction: TurnPrediction,
    *,
    conversation_id: str,
    turn: int,
    speaker: str,
    text: str | None,
    audio_path: str | None,
    audio_seconds: float | None,
    latency_ms: float,
    channel: int | None = None,
    span_s: tuple[float, float] | None = None,
) -> LoggedTurn:
    """A scored turn of a turn table or of a whole call as the predictions table needs it."""
    return LoggedTurn(
        conversation_id=conversation_id,
        turn=turn,
        speaker=speaker,
        text=text,
        audio_path=audio_path,
        audio_seconds=audio_seconds,
        embedding=prediction.embedding_bytes(),
        latency_ms=latency_ms,
        channel=channel,
        span_s=span_s,
        **prediction.logged_fields(),
    )
