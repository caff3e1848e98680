"""A conversation's turns as model inputs. A turn that cannot be used becomes a `TurnError` (its kind is what the
final report counts) and is left out of the dialogue the model sees; the other turns are scored.

A turn whose audio file has k > 1 channels becomes k turns, one per channel, by the service's rule
(model/channels.py): channel i is the speaker `channel-i` or the i-th of `--channels`, the row's text belongs to
the channel its `speaker` names, and a silent channel is a `silent_channel` row, not a scored voice."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.text import is_present
from model.audio import AudioError, decode_channels
from model.channels import ChannelError, ChannelTurn, split_channels
from model.data.turns import RowError, TurnRow, UnsafeAudioPath, resolve_audio_path
from model.preprocess import heard
from model.runtime import UtteranceInput
from scoring.conversations import Conversation

INVALID_ROW = "invalid_row"
UNSAFE_AUDIO_PATH = "unsafe_audio_path"
AUDIO_NOT_FOUND = "audio_not_found"
AUDIO_UNREADABLE = "audio_unreadable"
EMPTY_TURN = "empty_turn"
TEXT_TOO_LONG = "text_too_long"
DUPLICATE_TURN = "duplicate_turn"
CONVERSATION_TOO_LONG = "conversation_too_long"
SILENT_CHANNEL = "silent_channel"
AUDIO_NOT_HEARD = "audio_not_heard"  # audio and no text for a model trained on text alone
# Audio decoding adds the codes of model.audio: audio_too_large, audio_too_long, audio_too_many_channels,
# audio_empty, audio_undecodable; channel splitting those of model.channels: channel_names_mismatch,
# text_channel_unknown.


@dataclass(frozen=True, slots=True)
class TurnError:
    kind: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


@dataclass(frozen=True)
class InputOptions:
    audio_root: Path
    max_text_chars: int
    max_audio_bytes: int
    max_audio_seconds: float
    max_turns: int  # longer conversations are not scored (every turn an error): the context head is O(T^2)
    max_channels: int
    silence_dbfs: float
    channel_names: tuple[str, ...] | None = None  # speakers of the channels of multi-channel audio
    hears_audio: bool = True  # the model's (model/preprocess.py): False refuses audio with no text


@dataclass(frozen=True, slots=True)
class PreparedTurn:
    source: TurnRow
    utterance: UtteranceInput | None  # None exactly when error is set
    error: TurnError | None = None
    channel: int | None = None  # the audio channel of a multi-channel row
    channel_speaker: str | None = None  # that channel's speaker, in place of the row's

    @property
    def speaker(self) -> str:
        return self.channel_speaker if self.channel_speaker is not None else self.source.turn.speaker


def record_error(error: RowError) -> TurnError:
    return TurnError(INVALID_ROW, f"record {error.row}: {error.message}")


def prepare_conversation(conversation: Conversation, options: InputOptions) -> list[PreparedTurn]:
    """One PreparedTurn per turn (per channel of a multi-channel turn), in turn order; a repeated turn index keeps
    its first record."""
    turns = conversation.turns
    if len(turns) > options.max_turns:
        return _too_long(turns, len(turns), options.max_turns)
    prepared = []
    for previous, row in zip((None, *turns), turns, strict=False):
        if previous is not None and previous.turn.turn == row.turn.turn:
            message = f"turn {row.turn.turn} already given by record {previous.row}"
            prepared.append(PreparedTurn(row, None, TurnError(DUPLICATE_TURN, message)))
        else:
            prepared.extend(prepare_turn(row, options))
    if len(prepared) > options.max_turns:  # channels split into turns of their own
        return _too_long(turns, len(prepared), options.max_turns, " once channels are split")
    return prepared


def _too_long(turns: tuple[TurnRow, ...], count: int, limit: int, why: str = "") -> list[PreparedTurn]:
    error = TurnError(CONVERSATION_TOO_LONG, f"{count} turns{why}; the limit is {limit}")
    return [PreparedTurn(row, None, error) for row in turns]


def prepare_turn(row: TurnRow, options: InputOptions) -> list[PreparedTurn]:
    """The turn as the model's input: one PreparedTurn, or one per channel of multi-channel audio."""
    turn = row.turn
    if turn.text is not None and len(turn.text) > options.max_text_chars:
        message = f"the text has {len(turn.text)} characters; the limit is {options.max_text_chars}"
        return [PreparedTurn(row, None, TurnError(TEXT_TOO_LONG, message))]
    audio = load_audio(turn.audio_path, options) if turn.audio_path is not None else None
    if isinstance(audio, TurnError):
        return [PreparedTurn(row, None, audio)]
    if audio is None and not is_present(turn.text):
        return [PreparedTurn(row, None, TurnError(EMPTY_TURN, "the turn has neither text nor audio"))]
    try:
        voices = split_channels(turn.text, audio, turn.speaker, options.channel_names, options.silence_dbfs)
    except ChannelError as error:
        return [PreparedTurn(row, None, TurnError(error.code, f"{turn.audio_path}: {error.message}"))]
    prepared = [_voice(row, voice, options.silence_dbfs) for voice in voices]
    return prepared if options.hears_audio else [_unheard(turn) for turn in prepared]


def _unheard(turn: PreparedTurn) -> PreparedTurn:
    """An error row for audio with no text, when the model was trained on text alone (it would refuse it)."""
    utterance = turn.utterance
    if utterance is None or heard(False, utterance.text, utterance.audio):
        return turn
    message = "the model was trained on text alone and does not recognise audio; the turn has no text"
    return PreparedTurn(turn.source, None, TurnError(AUDIO_NOT_HEARD, message), turn.channel, turn.channel_speaker)


def _voice(row: TurnRow, voice: ChannelTurn, silence_dbfs: float) -> PreparedTurn:
    if voice.channel is None:
        return PreparedTurn(row, UtteranceInput(text=voice.text, audio=voice.audio, speaker=row.turn.speaker))
    if voice.silent:
        message = (
            f"channel {voice.channel} is silent (loudest 20 ms at {voice.level_dbfs:.1f} dBFS, below {silence_dbfs:g})"
        )
        return PreparedTurn(row, None, TurnError(SILENT_CHANNEL, message), voice.channel, voice.speaker)
    utterance = UtteranceInput(text=voice.text, audio=voice.audio, speaker=voice.speaker)
    return PreparedTurn(row, utterance, None, voice.channel, voice.speaker)


def load_audio(relative: str, options: InputOptions) -> np.ndarray | TurnError:
    """The decoded channels [channels, samples] of `relative` under the audio root, or why they cannot be used."""
    try:
        path = resolve_audio_path(options.audio_root, relative)
        return decode_channels(
            path,
            max_bytes=options.max_audio_bytes,
            max_seconds=options.max_audio_seconds,
            max_channels=options.max_channels,
        )
    except UnsafeAudioPath as error:
        return TurnError(UNSAFE_AUDIO_PATH, str(error))
    except AudioError as error:
        return TurnError(error.code, f"{relative}: {error.message}")
    except FileNotFoundError:
        return TurnError(AUDIO_NOT_FOUND, f"{relative}: no such file under the audio root")
    except OSError as error:
        return TurnError(AUDIO_UNREADABLE, f"{relative}: {error.strerror or error}")
