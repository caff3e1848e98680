"""One call of `equipoise score --calls` scored into rows: one prediction row per turn (scoring.output's columns
plus the turn's times and redacted transcript) and one summary row (scoring.summary's columns plus the call's
analytics). A recording that cannot be used is one error row, as an unreadable turn record is."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa

from model.audio import AudioError
from model.channels import ChannelError
from model.runtime import TurnPrediction
from model.speech_to_text import SpeechToText
from scoring.calls.emotion import CallEmotions
from scoring.calls.pipeline import CallOptions, CallResult, Turn, process_call
from scoring.calls.sources import CallJob
from scoring.engine import LoggedTurn, ModelInfo, Row, Runtime, RuntimeSpec, logged_turn, output_row
from scoring.inputs import AUDIO_NOT_FOUND, AUDIO_NOT_HEARD, AUDIO_UNREADABLE, TurnError
from scoring.output import prediction_schema
from scoring.summary import SUMMARY_SCHEMA, summarize

NO_SPEECH = "no_speech"
TURN_COLUMNS = [("start_s", pa.float64()), ("end_s", pa.float64()), ("text", pa.string())]
CALL_COLUMNS = [
    ("recording", pa.string()),
    ("duration_s", pa.float64()),
    ("speech_s", pa.float64()),
    ("silence_s", pa.float64()),
    ("talk_silence_ratio", pa.float64()),
    ("talk_over_count", pa.int64()),
    ("talk_over_s", pa.float64()),
    ("speakers", pa.string()),  # JSON: scoring.calls.analytics.SpeakerAnalytics per channel
    ("note", pa.string()),
]


def turn_schema(emotions: tuple[str, ...]) -> pa.Schema:
    base = prediction_schema(emotions)
    at = base.get_field_index("channel") + 1
    return pa.schema([*base][:at] + [pa.field(n, t) for n, t in TURN_COLUMNS] + [*base][at:])


CALL_SUMMARY_SCHEMA = pa.schema([*SUMMARY_SCHEMA] + [pa.field(name, kind) for name, kind in CALL_COLUMNS])


@dataclass(frozen=True)
class CallSpec:
    """Everything a worker needs to score calls; picklable, so each Ray actor loads its own models."""

    runtime: RuntimeSpec
    stt_threads: int = 0
    causal: bool = False
    options: CallOptions = field(default_factory=CallOptions)
    timelines: bool = False
    log: bool = False  # also return the turns as the predictions table needs them (`--log-to-db`)


@dataclass(frozen=True)
class ScoredCall:
    call_id: str
    rows: list[Row]
    summary: Row
    error_kinds: list[str]
    audio_s: float
    png: bytes | None = None
    logged: list[LoggedTurn] = field(default_factory=list)  # with CallSpec.log


class CallScorer:
    """The served model and the speech-to-text model, loaded once; `__call__` scores one call."""

    def __init__(self, spec: CallSpec, runtime: Runtime | None = None, stt: SpeechToText | None = None) -> None:
        self.spec = spec
        self.runtime = runtime if runtime is not None else spec.runtime.load()
        self.stt = stt if stt is not None else SpeechToText(spec.runtime.device, spec.stt_threads)
        self.model = ModelInfo.of(self.runtime)

    def __call__(self, job: CallJob) -> ScoredCall:
        if job.error is not None:
            return self._failed(job, job.error)
        emotions = CallEmotions(self.runtime, self.spec.causal)  # type: ignore[arg-type]
        started = time.perf_counter()
        try:
            result = process_call(job.path, job.roles, stt=self.stt, options=self.spec.options, emotions=emotions)
        except (AudioError, ChannelError) as error:
            return self._failed(job, TurnError(error.code, f"{job.path}: {error}"))
        except FileNotFoundError:
            return self._failed(job, TurnError(AUDIO_NOT_FOUND, f"{job.path}: no such file"))
        except OSError as error:
            return self._failed(job, TurnError(AUDIO_UNREADABLE, f"{job.path}: {error.strerror or error}"))
        return self._scored(job, result, emotions.predictions, time.perf_counter() - started)

    def score(self, job: CallJob) -> ScoredCall:
        """`self(job)` by name (a Ray actor's method)."""
        return self(job)

    def _scored(
        self, job: CallJob, result: CallResult, predictions: list[TurnPrediction | None], seconds: float
    ) -> ScoredCall:
        pairs = list(zip(result.turns, predictions, strict=True))
        rows = [self._row(job, turn, p) for turn, p in pairs]
        latency_ms = seconds * 1000 / max(len(pairs), 1)
        scored = [(turn, p) for turn, p in pairs if p is not None]
        logged = [_logged(job, turn, p, latency_ms) for turn, p in scored] if self.spec.log else []
        kinds = [AUDIO_NOT_HEARD] * (len(pairs) - len(scored))
        if not rows:
            error = TurnError(NO_SPEECH, f"{job.path}: no speech was found in the recording")
            rows, kinds = [_error_row(self.model, job, error)], [NO_SPEECH]
        png = result.timeline_png() if self.spec.timelines else None
        summary = self._summary(job, rows, result)
        return ScoredCall(job.call_id, rows, summary, kinds, result.duration_s, png, logged)

    def _row(self, job: CallJob, turn: Turn, prediction: TurnPrediction | None) -> Row:
        """The turn's prediction, or, where the model could not score it, the turn with its error."""
        error = None if prediction is not None else _unheard(job, turn)
        row = output_row(
            self.model, job.call_id, turn.turn, turn.speaker, prediction, error, channel=turn.audio.channel
        )
        return {**row, "start_s": round(turn.start_s, 3), "end_s": round(turn.end_s, 3), "text": turn.text}

    def _summary(self, job: CallJob, rows: list[Row], result: CallResult | None) -> Row:
        summary = summarize(job.call_id, rows, self.model.version, self.spec.options.summary)
        if result is None:
            return {**summary, **dict.fromkeys(name for name, _ in CALL_COLUMNS), "recording": _path(job)}
        analytics = result.analytics
        speakers = [_speaker(asdict(speaker)) for speaker in analytics.speakers]
        return {
            **summary,
            "recording": _path(job),
            "duration_s": analytics.duration_s,
            "speech_s": analytics.speech_s,
            "silence_s": analytics.silence_s,
            "talk_silence_ratio": analytics.talk_silence_ratio,
            "talk_over_count": analytics.talk_over_count,
            "talk_over_s": analytics.talk_over_s,
            "speakers": json.dumps(speakers, allow_nan=False),
            "note": result.note,
        }

    def _failed(self, job: CallJob, error: TurnError) -> ScoredCall:
        rows = [_error_row(self.model, job, error)]
        return ScoredCall(job.call_id, rows, self._summary(job, rows, None), [error.kind], 0.0)


def _logged(job: CallJob, turn: Turn, prediction: TurnPrediction, latency_ms: float) -> LoggedTurn:
    return logged_turn(
        prediction,
        conversation_id=job.call_id,
        turn=turn.turn,
        speaker=turn.speaker,
        text=turn.text,
        audio_path=_path(job),
        audio_seconds=turn.end_s - turn.start_s,
        latency_ms=latency_ms,
        channel=turn.audio.channel,
        span_s=(turn.start_s, turn.end_s),
    )


def _unheard(job: CallJob, turn: Turn) -> TurnError:
    message = "no words were recognised, and the model was trained on text alone: it does not recognise audio"
    return TurnError(AUDIO_NOT_HEARD, f"{job.path}: turn {turn.turn}: {message}")


def _error_row(model: ModelInfo, job: CallJob, error: TurnError) -> Row:
    row = output_row(model, job.call_id, None, None, None, error)
    return {**row, **dict.fromkeys(name for name, _ in TURN_COLUMNS)}


def _path(job: CallJob) -> str | None:
    return str(job.path) if job.path is not None else None


def _speaker(analytics: dict[str, Any]) -> dict[str, Any]:
    """A speaker's analytics, JSON-ready (tuples as lists)."""
    return json.loads(json.dumps(analytics, default=list))
