"""A request's turns decoded into the voices the model scores, by the multi-channel rule of model/channels.py:
audio of k > 1 channels is k voices, one per channel, named and attributed as that module says; a silent channel
is set aside to be reported. Transport-free: refusals are domain errors naming the request field and the limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from api.domain_errors import InputTooLarge, InvalidInput
from api.inputs import RawTurn
from core.settings import Settings
from model.audio import (
    AudioError,
    AudioTooLarge,
    AudioTooLong,
    AudioTooManyChannels,
    decode_channels,
    encode_flac,
)
from model.channels import ChannelNamesMismatch, ChannelTurn, UnattributedText, split_channels


@dataclass(frozen=True)
class Voice:
    """One voice of request turn `source`; `stored` is the audio file kept when raw-audio storage is on: the file
    as sent for single-channel audio, the channel alone (FLAC) for a channel of a recording."""

    source: int
    turn: ChannelTurn
    stored: bytes | None = None


@dataclass(frozen=True)
class Voices:
    scored: list[Voice]  # in turn order, then channel order
    silent: list[Voice]


def decode_voices(
    turns: Sequence[RawTurn], prefixes: Sequence[str], settings: Settings, *, multichannel: bool
) -> Voices:
    """`prefixes[i]` is the field prefix of turn i in the request (`turns.3.` or ``). Without `multichannel`, audio
    of more than one channel is refused (a transport that answers one row per turn sent)."""
    scored: list[Voice] = []
    silent: list[Voice] = []
    for index, (turn, prefix) in enumerate(zip(turns, prefixes, strict=True)):
        audio = _decode(turn.audio, f"{prefix}audio", settings)
        if audio is not None and len(audio) > 1 and not multichannel:
            raise InvalidInput(
                f"{prefix}audio",
                f"the audio has {len(audio)} channels; here a turn is one voice, so send one channel per turn "
                "(or the recording to /v1/predict, which answers each channel)",
                limit=1,
            )
        for split in _split(turn, audio, prefix, settings):
            stored = _stored(turn, split, settings.store_audio)
            (silent if split.silent else scored).append(Voice(index, split, stored))
    return Voices(scored, silent)


def _decode(audio: bytes | None, field: str, settings: Settings) -> np.ndarray | None:
    if audio is None:
        return None
    try:
        return decode_channels(
            audio,
            max_bytes=settings.max_audio_bytes,
            max_seconds=settings.max_audio_seconds,
            max_channels=settings.max_audio_channels,
        )
    except (AudioTooLarge, AudioTooLong, AudioTooManyChannels) as error:
        raise InputTooLarge(field, error.message, error.limit or 0) from None
    except AudioError as error:
        raise InvalidInput(field, error.message) from None


def _split(turn: RawTurn, audio: np.ndarray | None, prefix: str, settings: Settings) -> list[ChannelTurn]:
    try:
        return split_channels(turn.text, audio, turn.speaker, turn.channels, settings.channel_silence_dbfs)
    except ChannelNamesMismatch as error:
        raise InvalidInput(turn.channels_field, error.message, limit=error.limit) from None
    except UnattributedText as error:
        raise InvalidInput(f"{prefix}speaker", error.message, limit=error.limit) from None


def _stored(turn: RawTurn, split: ChannelTurn, store_audio: bool) -> bytes | None:
    if not store_audio or split.audio is None:
        return None
    return turn.audio if split.channel is None else encode_flac(split.audio)
