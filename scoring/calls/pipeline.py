"""One call recording in, turns and call analytics out: decode, voice activity per channel, turns, speech to text
(redacted), optional emotion per turn, analytics. The service's worker and batch scoring both call `process_call`.

Channels are speakers (model.channels names them). A mono recording is one speaker: no diarisation model is pinned,
and the result says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from core.redaction import holds_redaction
from core.settings import MAX_AUDIO_CHANNELS, MAX_CALL_BYTES, MAX_CALL_SECONDS, Settings
from model.audio import SAMPLE_RATE, AudioSource, decode_channels, level_dbfs
from model.channels import channel_speakers, parse_channel_names
from model.speech_to_text import SpeechToText, Transcript, Word
from scoring.calls.analytics import CallAnalytics, TimedTurn, TurnEmotion, analyse
from scoring.calls.segment import SegmentOptions, TurnSpan, build_turns, channel_segments, talk_over
from scoring.calls.timeline import timeline_png
from scoring.calls.transcribe import transcribe_turns
from scoring.summary import SummaryOptions

# Telephone audio is 8 kHz; studio and browser recordings up to 48 kHz. Outside that the recording is refused.
CALL_SOURCE_RATES = (8_000, 48_000)
MONO_NOTE = "one channel: the recording is one speaker (no diarisation model is pinned)"
STAGES = ("decode", "vad", "asr", "emotion", "analytics")


@dataclass(frozen=True)
class CallOptions:
    segment: SegmentOptions = field(default_factory=SegmentOptions)
    summary: SummaryOptions = field(default_factory=SummaryOptions)
    max_seconds: float = MAX_CALL_SECONDS
    max_bytes: int = MAX_CALL_BYTES
    max_channels: int = MAX_AUDIO_CHANNELS

    @classmethod
    def from_settings(cls, settings: Settings) -> CallOptions:
        return cls(
            max_seconds=settings.max_call_seconds,
            max_bytes=settings.max_call_bytes,
            max_channels=settings.max_audio_channels,
        )

    def audio_limits(self) -> dict[str, Any]:
        """The limits a call's recording is checked and decoded under (model.audio), one set for both."""
        return dict(
            max_bytes=self.max_bytes,
            max_seconds=self.max_seconds,
            max_channels=self.max_channels,
            source_rates=CALL_SOURCE_RATES,
        )


@dataclass(frozen=True)
class AudioSlice:
    """Where a turn's audio lies in the decoded call: a channel and a range of 16 kHz samples."""

    channel: int
    start: int
    end: int

    def cut(self, channels: np.ndarray) -> np.ndarray:
        return channels[self.channel, self.start : self.end]


@dataclass(frozen=True)
class Turn:
    turn: int
    start_s: float
    end_s: float
    speaker: str
    text: str  # redacted
    words: tuple[Word, ...]  # redacted; times in seconds from the start of the call
    audio: AudioSlice
    level_dbfs: float | None
    emotion: TurnEmotion | None = None

    def timed(self) -> TimedTurn:
        return TimedTurn(self.turn, self.speaker, self.audio.channel, self.start_s, self.end_s, len(self.words))


@dataclass(frozen=True)
class CallResult:
    speakers: tuple[str, ...]
    turns: tuple[Turn, ...]
    analytics: CallAnalytics
    timings: dict[str, float]  # seconds per stage (STAGES)
    note: str | None  # MONO_NOTE for a mono recording
    channels: np.ndarray = field(repr=False, compare=False)  # decoded [speakers, samples] at 16 kHz

    @property
    def duration_s(self) -> float:
        return self.channels.shape[1] / SAMPLE_RATE

    def timeline_png(self) -> bytes:
        labels = [turn.emotion.label if turn.emotion else None for turn in self.turns]
        return timeline_png(self.speakers, [turn.timed() for turn in self.turns], labels, self.duration_s)

    def redacted_spans(self) -> list[tuple[float, float]]:
        """Where the redacted words were said, in seconds from the start of the call; a turn whose text was
        redacted but whose words do not show where is a span whole."""
        spans = []
        for turn in self.turns:
            if not holds_redaction(turn.text):
                continue
            words = [(word.start_s, word.end_s) for word in turn.words if holds_redaction(word.text)]
            spans.extend(words or [(turn.start_s, turn.end_s)])
        return spans

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: everything but the decoded audio."""
        return {
            "speakers": list(self.speakers),
            "diarised": False,
            "note": self.note,
            "duration_s": self.duration_s,
            "turns": [asdict(turn) for turn in self.turns],
            "summary": asdict(self.analytics),
            "timings": dict(self.timings),
        }


# One emotion per turn, None for a turn the model cannot score (no words, for a model trained on text alone).
EmotionScorer = Callable[[Sequence[Turn], np.ndarray], Sequence[TurnEmotion | None]]


def process_call(
    source: AudioSource,
    roles: str | Sequence[str] | None = None,
    *,
    stt: SpeechToText,
    options: CallOptions | None = None,
    emotions: EmotionScorer | None = None,
) -> CallResult:
    """Turns and analytics of one recording (a path or the bytes of a WAV, FLAC, OGG or MP3 file). `roles` names the
    channels (`agent,customer`); `emotions`, when given, scores the turns (their audio: `turn.audio.cut(channels)`).

    Raises model.audio.AudioError subclasses for a recording that is refused (size, duration, channels, sample rate,
    undecodable, empty) and model.channels.ChannelNamesMismatch when `roles` does not name every channel."""
    options = options or CallOptions()
    timings = dict.fromkeys(STAGES, 0.0)
    names = parse_channel_names(roles) if roles is not None else None
    with _timed(timings, "decode"):
        channels = decode_channels(source, **options.audio_limits())
    speakers = channel_speakers(len(channels), names)
    with _timed(timings, "vad"):
        segments = channel_segments(channels, options.segment)
        spans = build_turns(segments, options.segment.merge_gap_s)
    with _timed(timings, "asr"):
        transcripts = transcribe_turns(spans, channels, stt)
    pairs = enumerate(zip(spans, transcripts, strict=True))
    turns = [_turn(index, span, found, speakers, channels) for index, (span, found) in pairs]
    scored = None
    if emotions is not None:
        with _timed(timings, "emotion"):
            scored = list(emotions(turns, channels))
        if len(scored) != len(turns):
            raise ValueError(f"the emotion scorer gave {len(scored)} emotions for {len(turns)} turns")
        turns = [replace(turn, emotion=emotion) for turn, emotion in zip(turns, scored, strict=True)]
    with _timed(timings, "analytics"):
        overlap = talk_over(segments, options.segment.min_talk_over_s)
        timed = [turn.timed() for turn in turns]
        analytics = analyse(channels, speakers, segments, overlap, timed, scored, options.summary)
    note = MONO_NOTE if len(channels) == 1 else None
    return CallResult(tuple(speakers), tuple(turns), analytics, timings, note, channels)


def _turn(index: int, span: TurnSpan, found: Transcript, speakers: Sequence[str], channels: np.ndarray) -> Turn:
    audio = AudioSlice(span.channel, span.start, span.end)
    level = level_dbfs(audio.cut(channels))
    return Turn(
        turn=index,
        start_s=span.start / SAMPLE_RATE,
        end_s=span.end / SAMPLE_RATE,
        speaker=speakers[span.channel],
        text=found.text,
        words=found.words,
        audio=audio,
        level_dbfs=level if np.isfinite(level) else None,
    )


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] += time.perf_counter() - start
