"""Speech segments per channel, turns across channels, and talk-over.

Each channel is one speaker. Silero VAD cuts a channel into speech segments; a speaker's segments become one turn
while the pause between them is shorter than `merge_gap_s` and nobody else starts speaking in it. Turns are ordered
by start time. Talk-over is time when two or more channels speak at once; an episode shorter than `min_talk_over_s`
is not counted (the VAD pads each segment by `pad_s`, so adjacent turns of two speakers touch without overlapping).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from model.audio import SAMPLE_RATE
from model.speech_to_text import VoiceActivityOptions, voice_activity


@dataclass(frozen=True)
class SegmentOptions:
    """Every default of segmentation, in seconds. `merge_gap_s` (1 s) joins the pauses of one speaker inside a
    sentence or between two sentences of one answer; a listener takes the floor after a gap of about 0.2-0.5 s."""

    vad: VoiceActivityOptions = field(default_factory=VoiceActivityOptions)
    merge_gap_s: float = 1.0
    min_talk_over_s: float = 0.25

    def __post_init__(self) -> None:
        if self.merge_gap_s < 0 or self.min_talk_over_s < 0:
            raise ValueError("merge_gap_s and min_talk_over_s cannot be negative")


@dataclass(frozen=True)
class Segment:
    channel: int
    start: int  # samples at 16 kHz
    end: int

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE


@dataclass(frozen=True)
class TurnSpan:
    """A turn before transcription: one channel's audio from `start` to `end` (samples at 16 kHz)."""

    channel: int
    start: int
    end: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class TalkOver:
    """Episodes of simultaneous speech: (start_s, end_s, the channel that started speaking last)."""

    episodes: tuple[tuple[float, float, int], ...]

    @property
    def count(self) -> int:
        return len(self.episodes)

    @property
    def seconds(self) -> float:
        return sum(end - start for start, end, _ in self.episodes)


def channel_segments(channels: np.ndarray, options: SegmentOptions) -> list[Segment]:
    """The speech segments of every channel of [channels, samples], ordered by start."""
    segments = [
        Segment(channel, start, end)
        for channel, wave in enumerate(channels)
        for start, end in voice_activity(wave, options.vad)
    ]
    return sorted(segments, key=lambda segment: (segment.start, segment.channel))


def build_turns(segments: Sequence[Segment], merge_gap_s: float) -> list[TurnSpan]:
    """Segments (ordered by start) grouped into turns ordered by start (see the module's rule)."""
    starts = [segment.start for segment in segments]
    merge_gap = round(merge_gap_s * SAMPLE_RATE)
    groups: list[list[Segment]] = []
    latest: dict[int, list[Segment]] = {}  # the latest group of each channel
    for segment in segments:
        group = latest.get(segment.channel)
        if group is None or not _continues(group[-1], segment, segments, starts, merge_gap):
            group = latest[segment.channel] = []
            groups.append(group)
        group.append(segment)
    turns = [TurnSpan(g[0].channel, g[0].start, max(s.end for s in g), tuple(g)) for g in groups]
    return sorted(turns, key=lambda turn: (turn.start, turn.channel))


def _continues(
    last: Segment, segment: Segment, segments: Sequence[Segment], starts: Sequence[int], merge_gap: int
) -> bool:
    """Whether `segment` extends the turn ending with `last`: a short pause that no other speaker starts in."""
    if segment.start - last.end >= merge_gap:
        return False
    inside = segments[bisect_left(starts, last.end) : bisect_left(starts, segment.start)]
    return all(other.channel == segment.channel for other in inside)


def talk_over(segments: Sequence[Segment], min_seconds: float) -> TalkOver:
    """Maximal intervals where at least two channels' segments overlap, at least `min_seconds` long."""
    events = sorted([(s.start, 1, s.channel) for s in segments] + [(s.end, -1, s.channel) for s in segments])
    active: dict[int, int] = {}
    episodes: list[tuple[float, float, int]] = []
    started: tuple[int, int] | None = None  # (sample, the channel whose start made it two)
    for sample, step, channel in events:
        active[channel] = active.get(channel, 0) + step
        speaking = sum(1 for count in active.values() if count > 0)
        if started is None and speaking >= 2:
            started = (sample, channel)
        elif started is not None and speaking < 2:
            if (sample - started[0]) / SAMPLE_RATE >= min_seconds:
                episodes.append((started[0] / SAMPLE_RATE, sample / SAMPLE_RATE, started[1]))
            started = None
    return TalkOver(tuple(episodes))


def speech_seconds(segments: Sequence[Segment]) -> float:
    """Seconds during which at least one of `segments` is speech (their union)."""
    total, reached = 0, 0
    for start, end in sorted((s.start, s.end) for s in segments):
        total += max(0, end - max(start, reached))
        reached = max(reached, end)
    return total / SAMPLE_RATE
