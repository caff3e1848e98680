"""Reading prediction requests, as JSON (audio in base64) or as multipart uploads, into checked turns.

Multipart: an utterance is the fields `text`, `speaker`, `channels` and the file `audio`; a dialogue is the field
`turns` (the JSON array of turns, without audio), `context`, `conversation_id`, `channels` and the files `audio_<i>`
holding the audio of turn i (0-based). Both forms go through the same pydantic models and the same limit checks, which
read the limits from the live settings and answer 413 naming the limit.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile

from api.errors import Problem, invalid, too_large, unsupported, validation_problem
from api.schemas import DialogueRequest, UtteranceRequest
from core.db.models import ContextMode
from core.settings import Settings

MULTIPART = "multipart/form-data"
MAX_FORM_FIELDS = 16

Model = TypeVar("Model", bound=BaseModel)


@dataclass(frozen=True)
class RawTurn:
    """One utterance as received: text (None when absent or empty) and the encoded audio file's bytes; the names
    of its audio's channels (model.channels) and the request field that gave them, when some were given."""

    text: str | None
    audio: bytes | None
    speaker: str | None
    channels: tuple[str, ...] | None = None
    channels_field: str = "channels"


@dataclass(frozen=True)
class RawDialogue:
    turns: list[RawTurn]
    context: ContextMode
    conversation_id: str | None


async def read_utterance(request: Request, settings: Settings) -> RawTurn:
    if _media_type(request) == MULTIPART:
        form = await _form(request, settings, max_files=1)
        parsed = _validate(UtteranceRequest, _fields(form))
        return _turn(parsed, await _read_upload(form, "audio", "", settings), "", settings)
    parsed = _validate(UtteranceRequest, await _json(request))
    return _turn(parsed, None, "", settings)


async def read_dialogue(request: Request, settings: Settings) -> RawDialogue:
    uploads: list[bytes | None]
    if _media_type(request) == MULTIPART:
        form = await _form(request, settings, max_files=settings.max_dialogue_turns)
        fields = _fields(form)
        fields["turns"] = _json_field(fields.get("turns"), "turns")
        _check_turn_count(fields["turns"], settings)
        parsed = _validate(DialogueRequest, fields)
        _reject_stray_files(form, len(parsed.turns))
        uploads = [await _read_upload(form, f"audio_{i}", f"turns.{i}.", settings) for i in range(len(parsed.turns))]
    else:
        body = await _json(request)
        _check_turn_count(body.get("turns") if isinstance(body, dict) else None, settings)
        parsed = _validate(DialogueRequest, body)
        uploads = [None] * len(parsed.turns)
    return _dialogue(parsed, uploads, settings)


def dialogue_of(body: dict[str, Any], uploads: list[bytes | None], settings: Settings) -> RawDialogue:
    """A dialogue from parts another transport decoded (the /v2 tensors): `body` as a JSON dialogue request,
    `uploads[i]` the audio file of turn i; the same schema and limit checks as a /v1 request."""
    _check_turn_count(body.get("turns"), settings)
    parsed = _validate(DialogueRequest, body)
    for index, upload in enumerate(uploads):
        if upload is not None:
            _check_audio_size(len(upload), f"turns.{index}.", settings)
    return _dialogue(parsed, uploads, settings)


def parse_json(body: bytes) -> Any:
    """A request body as JSON; 400 naming the body when it is not UTF-8 JSON or nests too deeply."""
    try:
        return json.loads(body)
    except RecursionError:  # the parser recurses once per level of nesting
        raise invalid("body", "The request body is nested too deeply to parse.", status=400) from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4,300 digits
        raise invalid("body", f"The request body is not valid UTF-8 JSON: {error}", status=400) from None


def _dialogue(parsed: DialogueRequest, uploads: list[bytes | None], settings: Settings) -> RawDialogue:
    turns = [
        _turn(turn, upload, f"turns.{index}.", settings, parsed.channels)
        for index, (turn, upload) in enumerate(zip(parsed.turns, uploads, strict=True))
    ]
    return RawDialogue(turns, parsed.context, parsed.conversation_id)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def is_json(media: str) -> bool:
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def unsupported_media_type(media: str, accepted: str) -> Problem:
    detail = f"Content-Type {media or '(none)'} is not supported; send {accepted}."
    return unsupported("content-type", detail, "unsupported media type", accepted)


def _media_type(request: Request) -> str:
    media = media_type(request)
    if media != MULTIPART and not is_json(media):
        raise unsupported_media_type(media, "application/json or multipart/form-data")
    return media


async def _json(request: Request) -> Any:
    return parse_json(await request.body())


def _validate(model: type[Model], data: Any) -> Model:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise validation_problem(error) from None


async def _form(request: Request, settings: Settings, max_files: int) -> FormData:
    return await request.form(max_files=max_files, max_fields=MAX_FORM_FIELDS, max_part_size=settings.max_request_bytes)


def _fields(form: FormData) -> dict[str, Any]:
    """The text fields of a form; unknown ones are kept so that the model's extra="forbid" names them."""
    return {key: value for key, value in form.multi_items() if isinstance(value, str)}


def _json_field(value: Any, field: str) -> Any:
    if not isinstance(value, str):
        raise invalid(field, f"the `{field}` field is required: a JSON array of turns")
    try:
        return json.loads(value)
    except RecursionError:
        raise invalid(field, f"the `{field}` field is nested too deeply to parse", status=400) from None
    except ValueError as error:  # JSONDecodeError, an integer of more than 4,300 digits
        raise invalid(field, f"the `{field}` field is not valid JSON: {error}", status=400) from None


async def _read_upload(form: FormData, name: str, prefix: str, settings: Settings) -> bytes | None:
    upload = form.get(name)
    if not isinstance(upload, UploadFile):
        return None
    _check_audio_size(upload.size or 0, prefix, settings)
    return await upload.read()


def _reject_stray_files(form: FormData, turns: int) -> None:
    expected = {f"audio_{index}" for index in range(turns)}
    stray = sorted(key for key, value in form.multi_items() if isinstance(value, UploadFile) and key not in expected)
    if stray:
        raise invalid(stray[0], f"unexpected file {stray[0]!r}; audio files are named audio_0 … audio_{turns - 1}")


def _check_turn_count(turns: Any, settings: Settings) -> None:
    """Before validating each turn, so that an enormous dialogue is refused cheaply."""
    limit = settings.max_dialogue_turns
    if isinstance(turns, list) and len(turns) > limit:
        raise too_large("turns", f"the dialogue has {len(turns)} turns; the limit is {limit}", limit)


def checked_utterance(parsed: UtteranceRequest, settings: Settings) -> RawTurn:
    """An utterance another transport received as JSON (a live stream's turn), with the same limit checks as /v1."""
    return _turn(parsed, None, "", settings)


def _turn(
    parsed: UtteranceRequest,
    upload: bytes | None,
    prefix: str,
    settings: Settings,
    default_channels: tuple[str, ...] | None = None,
) -> RawTurn:
    text = parsed.text or None
    if text is not None and len(text) > settings.max_text_chars:
        raise too_large(
            f"{prefix}text",
            f"the text has {len(text)} characters; the limit is {settings.max_text_chars}",
            settings.max_text_chars,
        )
    if upload is not None and parsed.audio is not None:
        raise invalid(f"{prefix}audio", "send the audio either as a file or as base64, not both")
    audio = upload if upload is not None else _base64_audio(parsed.audio, prefix, settings)
    if text is None and audio is None:
        raise invalid(f"{prefix}text", "an utterance needs text, audio or both; both are missing or empty")
    if parsed.channels is not None:
        return RawTurn(text, audio, parsed.speaker, parsed.channels, f"{prefix}channels")
    return RawTurn(text, audio, parsed.speaker, default_channels)


def _base64_audio(encoded: str | None, prefix: str, settings: Settings) -> bytes | None:
    if not encoded:
        return None
    _check_audio_size(len(encoded) * 3 // 4, prefix, settings)
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{prefix}audio", "the audio is not valid base64") from None


def _check_audio_size(size: int, prefix: str, settings: Settings) -> None:
    limit = settings.max_audio_bytes
    if size > limit:
        raise too_large(f"{prefix}audio", f"the audio file has {size} bytes; the limit is {limit} bytes", limit)
