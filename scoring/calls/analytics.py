"""Per-call analytics: talk, silence and talk-over per speaker, speaking rate and loudness, and, when each turn's
emotion is given, the emotion and sentiment timeline, sentiment by quarter of the call and escalation points.

Escalation points are scoring.summary's rule (the customer's anger rising), applied to the call's turns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from model.audio import SAMPLE_RATE, level_dbfs
from scoring.calls.segment import Segment, TalkOver, speech_seconds
from scoring.summary import SummaryOptions, escalation_points, is_negative

QUARTERS = 4


@dataclass(frozen=True)
class TurnEmotion:
    """A turn's emotion as the model gives it; the sentiment is optional. The sentiment score is P(positive) -
    P(negative) when its probabilities are given, else +1, -1 or 0 from its label."""

    label: str
    probabilities: Mapping[str, float]
    sentiment: str | None = None
    sentiment_probabilities: Mapping[str, float] | None = None

    @property
    def sentiment_score(self) -> float | None:
        if self.sentiment_probabilities is not None:
            p = self.sentiment_probabilities
            return float(p.get("positive", 0.0)) - float(p.get("negative", 0.0))
        return {"positive": 1.0, "negative": -1.0}.get(self.sentiment, 0.0) if self.sentiment else None


@dataclass(frozen=True)
class TimedTurn:
    """What analytics need of a turn."""

    turn: int
    speaker: str
    channel: int
    start_s: float
    end_s: float
    words: int


@dataclass(frozen=True)
class SpeakerAnalytics:
    speaker: str
    channel: int
    turns: int
    talk_s: float  # voice activity of the speaker's channel
    talk_share: float | None  # of all speakers' talk time
    words: int
    words_per_minute: float | None  # per minute of the speaker's talk time
    loudness_dbfs: float | None  # RMS over the speaker's speech
    peak_dbfs: float | None  # the loudest 20 ms (model.audio.level_dbfs)
    talk_over_started: int  # talk-over episodes this speaker started by speaking over another
    emotion_timeline: tuple[dict[str, Any], ...] = ()
    sentiment_by_quarter: tuple[float | None, ...] = ()
    negative_share: float | None = None


@dataclass(frozen=True)
class CallAnalytics:
    duration_s: float
    speech_s: float  # someone speaks
    silence_s: float  # nobody speaks
    talk_silence_ratio: float | None  # speech_s / silence_s; None when there is no silence
    talk_over_count: int
    talk_over_s: float
    speakers: tuple[SpeakerAnalytics, ...]
    escalation_points: tuple[int, ...] | None  # turn indices; None without emotions


def analyse(
    channels: np.ndarray,
    speakers: Sequence[str],
    segments: Sequence[Segment],
    overlap: TalkOver,
    turns: Sequence[TimedTurn],
    emotions: Sequence[TurnEmotion | None] | None = None,
    options: SummaryOptions | None = None,
) -> CallAnalytics:
    """The analytics of one call: decoded `channels` [speakers, samples] at 16 kHz, their speech segments, the
    talk-over found in them, the turns, and optionally each turn's emotion (in turn order; None for a turn the
    model could not score, which the emotion figures leave out)."""
    if emotions is not None and len(emotions) != len(turns):
        raise ValueError(f"{len(emotions)} emotions were given for {len(turns)} turns")
    duration_s = channels.shape[1] / SAMPLE_RATE
    speech_s = speech_seconds(segments)
    silence_s = max(0.0, duration_s - speech_s)
    talk = [speech_seconds([s for s in segments if s.channel == channel]) for channel in range(len(speakers))]
    rows = _emotion_rows(turns, emotions) if emotions is not None else None
    per_speaker = tuple(
        _speaker(channels, channel, name, segments, overlap, turns, talk, rows, duration_s, options)
        for channel, name in enumerate(speakers)
    )
    return CallAnalytics(
        duration_s=duration_s,
        speech_s=speech_s,
        silence_s=silence_s,
        talk_silence_ratio=speech_s / silence_s if silence_s > 0 else None,
        talk_over_count=overlap.count,
        talk_over_s=overlap.seconds,
        speakers=per_speaker,
        escalation_points=tuple(escalation_points(rows, options or SummaryOptions())) if rows is not None else None,
    )


def _speaker(
    channels: np.ndarray,
    channel: int,
    name: str,
    segments: Sequence[Segment],
    overlap: TalkOver,
    turns: Sequence[TimedTurn],
    talk: Sequence[float],
    rows: Sequence[dict[str, Any]] | None,
    duration_s: float,
    options: SummaryOptions | None,
) -> SpeakerAnalytics:
    own = [turn for turn in turns if turn.channel == channel]
    speech = [channels[channel, s.start : s.end] for s in segments if s.channel == channel]
    wave = np.concatenate(speech) if speech else np.zeros(0, dtype=np.float32)
    words = sum(turn.words for turn in own)
    talk_s = talk[channel]
    emotional = _speaker_emotions(rows, name, duration_s, options) if rows is not None else {}
    return SpeakerAnalytics(
        speaker=name,
        channel=channel,
        turns=len(own),
        talk_s=talk_s,
        talk_share=talk_s / sum(talk) if sum(talk) > 0 else None,
        words=words,
        words_per_minute=words / (talk_s / 60) if talk_s > 0 else None,
        loudness_dbfs=_finite(rms_dbfs(wave)),
        peak_dbfs=_finite(level_dbfs(wave)),
        talk_over_started=sum(1 for *_, starter in overlap.episodes if starter == channel),
        **emotional,
    )


def _speaker_emotions(
    rows: Sequence[dict[str, Any]], speaker: str, duration_s: float, options: SummaryOptions | None
) -> dict[str, Any]:
    own = [row for row in rows if row["speaker"] == speaker]
    timeline = tuple(
        {key: row[key] for key in ("turn", "start_s", "end_s", "label", "sentiment", "sentiment_score")} for row in own
    )
    negative = sum(is_negative(row, options or SummaryOptions()) for row in own)
    return {
        "emotion_timeline": timeline,
        "sentiment_by_quarter": sentiment_by_quarter(own, duration_s),
        "negative_share": negative / len(own) if own else None,
    }


def sentiment_by_quarter(rows: Sequence[Mapping[str, Any]], duration_s: float) -> tuple[float | None, ...]:
    """The mean sentiment score of the turns whose midpoint falls in each quarter of the call; None for a quarter
    without a scored turn."""
    sums, counts = [0.0] * QUARTERS, [0] * QUARTERS
    for row in rows:
        if row["sentiment_score"] is None or duration_s <= 0:
            continue
        middle = (row["start_s"] + row["end_s"]) / 2
        quarter = min(QUARTERS - 1, max(0, int(middle / duration_s * QUARTERS)))
        sums[quarter] += row["sentiment_score"]
        counts[quarter] += 1
    return tuple(total / count if count else None for total, count in zip(sums, counts, strict=True))


def _emotion_rows(turns: Sequence[TimedTurn], emotions: Sequence[TurnEmotion | None]) -> list[dict[str, Any]]:
    """Each scored turn as a row of scoring.summary's shape (turn, speaker, label, sentiment, p_<emotion>, error)."""
    return [
        {
            "turn": turn.turn,
            "speaker": turn.speaker,
            "start_s": turn.start_s,
            "end_s": turn.end_s,
            "label": emotion.label,
            "sentiment": emotion.sentiment,
            "sentiment_score": emotion.sentiment_score,
            "error": None,
            **{f"p_{name}": float(p) for name, p in emotion.probabilities.items()},
        }
        for turn, emotion in zip(turns, emotions, strict=True)
        if emotion is not None
    ]


def rms_dbfs(wave: np.ndarray) -> float:
    """The RMS level of the whole of `wave` in dB relative to full scale; -inf for silence or no samples."""
    if len(wave) == 0:
        return -math.inf
    rms = float(np.sqrt(np.mean(np.asarray(wave, dtype=np.float64) ** 2)))
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
