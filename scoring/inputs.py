"""A conversation's turns as model inputs. A turn that cannot be used becomes a `TurnError` (its kind is what the
final report counts) and is left out of the dialogue the model sees; the other turns are scored."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.text import is_present
from model.audio import AudioError, decode_audio
from model.data.turns import RowError, TurnRow, UnsafeAudioPath, resolve_audio_path
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
# Audio decoding adds the codes of model.audio: audio_too_large, audio_too_long, audio_empty, audio_undecodable.


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


@dataclass(frozen=True, slots=True)
class PreparedTurn:
    source: TurnRow
    utterance: UtteranceInput | None  # None exactly when error is set
    error: TurnError | None = None


def record_error(error: RowError) -> TurnError:
    return TurnError(INVALID_ROW, f"record {error.row}: {error.message}")


def prepare_conversation(conversation: Conversation, options: InputOptions) -> list[PreparedTurn]:
    """One PreparedTurn per turn, in turn order; a repeated turn index keeps its first record."""
    turns = conversation.turns
    if len(turns) > options.max_turns:
        error = TurnError(CONVERSATION_TOO_LONG, f"{len(turns)} turns; the limit is {options.max_turns}")
        return [PreparedTurn(row, None, error) for row in turns]
    prepared = []
    for previous, row in zip((None, *turns), turns, strict=False):
        if previous is not None and previous.turn.turn == row.turn.turn:
            message = f"turn {row.turn.turn} already given by record {previous.row}"
            prepared.append(PreparedTurn(row, None, TurnError(DUPLICATE_TURN, message)))
        else:
            prepared.append(prepare_turn(row, options))
    return prepared


def prepare_turn(row: TurnRow, options: InputOptions) -> PreparedTurn:
    turn = row.turn
    if turn.text is not None and len(turn.text) > options.max_text_chars:
        message = f"the text has {len(turn.text)} characters; the limit is {options.max_text_chars}"
        return PreparedTurn(row, None, TurnError(TEXT_TOO_LONG, message))
    audio = load_audio(turn.audio_path, options) if turn.audio_path is not None else None
    if isinstance(audio, TurnError):
        return PreparedTurn(row, None, audio)
    if audio is None and not is_present(turn.text):
        return PreparedTurn(row, None, TurnError(EMPTY_TURN, "the turn has neither text nor audio"))
    return PreparedTurn(row, UtteranceInput(text=turn.text, audio=audio, speaker=turn.speaker))


def load_audio(relative: str, options: InputOptions) -> np.ndarray | TurnError:
    """The decoded waveform of `relative` under the audio root, or why it cannot be used."""
    try:
        path = resolve_audio_path(options.audio_root, relative)
        return decode_audio(path, max_bytes=options.max_audio_bytes, max_seconds=options.max_audio_seconds)
    except UnsafeAudioPath as error:
        return TurnError(UNSAFE_AUDIO_PATH, str(error))
    except AudioError as error:
        return TurnError(error.code, f"{relative}: {error.message}")
    except FileNotFoundError:
        return TurnError(AUDIO_NOT_FOUND, f"{relative}: no such file under the audio root")
    except OSError as error:
        return TurnError(AUDIO_UNREADABLE, f"{relative}: {error.strerror or error}")
