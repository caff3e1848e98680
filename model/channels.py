"""Multi-channel recordings, as the service and batch scoring read them: each channel is a speaker of its own.

A call recorder puts each party on a channel of its own (agent left, customer right), so a turn whose audio has k > 1
channels becomes k turns, one per channel, in channel order; channel i is the speaker `channel-i` unless names are
given (`agent,customer`). The channels are never mixed. Text sent with such audio belongs to one party only, so it
must say whose it is: its `speaker` names one of the channels, and only that channel's turn carries the text. A
channel whose loudest 20 ms is below the silence level (model.audio.level_dbfs) has no voice: it is reported
silent, not scored, unless it carries the text, which is then scored alone. Single-channel audio is a turn as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from model.audio import level_dbfs

DEFAULT_NAME = "channel-{}"
MAX_NAME_CHARS = 256


class ChannelError(ValueError):
    """A multi-channel turn that cannot be split as asked; `code` says why, `limit` what was allowed."""

    code = "channel_error"

    def __init__(self, message: str, limit: int | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.limit = limit


class ChannelNamesMismatch(ChannelError):
    """The number of channel names is not the audio's number of channels."""

    code = "channel_names_mismatch"


class UnattributedText(ChannelError):
    """Text came with multi-channel audio without naming the channel that spoke it."""

    code = "text_channel_unknown"


@dataclass(frozen=True)
class ChannelTurn:
    """One voice of a turn: `channel` is None for single-channel audio or text alone; `audio` is the channel's
    16 kHz waveform, None when it is silent (or there is none); `level_dbfs` is set for the channels of a
    multi-channel recording."""

    channel: int | None
    speaker: str | None
    text: str | None
    audio: np.ndarray | None
    level_dbfs: float | None = None

    @property
    def silent(self) -> bool:
        """Nothing to score: a silent channel without text."""
        return self.channel is not None and self.audio is None and self.text is None


def parse_channel_names(value: str | Sequence[str]) -> tuple[str, ...]:
    """`agent,customer` (or a list of names) as distinct, non-empty names; ValueError naming the problem."""
    parts = value.split(",") if isinstance(value, str) else list(value)
    if not all(isinstance(part, str) for part in parts):
        raise ValueError("channel names are strings: `agent,customer` or a list of names")
    names = tuple(part.strip() for part in parts)
    if not names or any(not name for name in names):
        raise ValueError("channel names are non-empty and separated by commas, e.g. `agent,customer`")
    if len(set(names)) != len(names):
        raise ValueError(f"channel names must differ from each other: {', '.join(names)}")
    if any(len(name) > MAX_NAME_CHARS for name in names):
        raise ValueError(f"a channel name has at most {MAX_NAME_CHARS} characters")
    return names


def channel_speakers(count: int, names: Sequence[str] | None) -> tuple[str, ...]:
    """The speakers of `count` channels: `names`, which must be `count`, or channel-0, channel-1, ..."""
    if names is None:
        return tuple(DEFAULT_NAME.format(index) for index in range(count))
    if len(names) != count:
        raise ChannelNamesMismatch(
            f"the audio has {count} channels but {len(names)} channel names were given ({', '.join(names)})", count
        )
    return tuple(names)


def split_channels(
    text: str | None,
    audio: np.ndarray | None,
    speaker: str | None,
    names: Sequence[str] | None,
    silence_dbfs: float,
) -> list[ChannelTurn]:
    """One turn (decoded audio [channels, samples] or None) as one ChannelTurn per channel. `names` and the
    silence level apply only to audio of more than one channel; there, `speaker` says whose `text` is."""
    if audio is None or len(audio) == 1:
        return [ChannelTurn(None, speaker, text, audio[0] if audio is not None else None)]
    speakers = channel_speakers(len(audio), names)
    text_channel = _text_channel(text, speaker, speakers)
    turns = []
    for index, (name, wave) in enumerate(zip(speakers, audio, strict=True)):
        level = level_dbfs(wave)
        voiced = wave if level >= silence_dbfs else None
        turns.append(ChannelTurn(index, name, text if index == text_channel else None, voiced, level))
    return turns


def _text_channel(text: str | None, speaker: str | None, speakers: tuple[str, ...]) -> int | None:
    if text is None:
        return None
    if speaker not in speakers:
        said = f"`speaker` is {speaker!r}" if speaker is not None else "no `speaker` is given"
        raise UnattributedText(
            f"text sent with {len(speakers)}-channel audio must say whose words it is: set `speaker` to the channel "
            f"that spoke it, one of {', '.join(speakers)} ({said})",
            ",".join(speakers),
        )
    return speakers.index(speaker)
