"""Whole calls: POST a recording, GET its turns and summary once processed (api/calls.py), and its timeline picture.
README "Whole calls"."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from api.calls import calls_dir, timeline_path
from api.deps import PredictKey, ServiceState, StateDep
from api.errors import Problem, invalid, problem_responses, too_large, unavailable
from api.inputs import MULTIPART, media_type, unsupported_media_type
from core.db.calls import count_calls, get_call, queue_call
from core.db.models import Call, CallStatus, ContextMode
from core.settings import Settings
from model.audio import (
    AudioError,
    AudioTooLarge,
    AudioTooLong,
    AudioTooManyChannels,
    check_audio_header,
)
from model.channels import parse_channel_names
from scoring.calls.pipeline import CallOptions

router = APIRouter(prefix="/v1/calls", tags=["calls"])

FIELDS = {"roles", "context"}
CALL_FORM = {
    "type": "object",
    "required": ["audio"],
    "properties": {
        "audio": {"type": "string", "format": "binary", "description": "The call: WAV, FLAC, OGG or MP3, 8-48 kHz."},
        "roles": {
            "type": "string",
            "description": "Speaker of each channel, in order.",
            "examples": ["agent,customer"],
        },
        "context": {"type": "string", "enum": ["bidirectional", "causal"], "default": "bidirectional"},
    },
}


@router.post(
    "",
    status_code=202,
    responses=problem_responses(401, 403, 413, 415, 422, 503),
    openapi_extra={"requestBody": {"required": True, "content": {MULTIPART: {"schema": CALL_FORM}}}},
)
async def post_call(request: Request, state: StateDep, _key: PredictKey) -> JSONResponse:
    """Queue a call recording; its turns and summary arrive at the `Location` it answers."""
    settings = state.settings
    media = media_type(request)
    if media != MULTIPART:
        raise unsupported_media_type(media, MULTIPART)
    async with request.form(max_files=1, max_fields=len(FIELDS), max_part_size=64 * 1024) as form:
        upload = _upload(form, settings)
        roles, context = _fields(form)
        queued = await run_in_threadpool(_queued, state.sessions)
        if queued >= settings.max_queued_calls:
            limit = settings.max_queued_calls
            raise unavailable(f"{queued} calls are waiting; the limit is {limit}", kind="call-queue-full")
        call_id = uuid.uuid4()
        path = calls_dir(settings) / f"{call_id}.audio"
        size = await run_in_threadpool(_store, upload, path)
        await run_in_threadpool(_check_recording, path, roles, settings)
    await run_in_threadpool(_queue, state, call_id, path, size, roles, context)
    state.calls.wake()
    location = f"/v1/calls/{call_id}"
    return JSONResponse({"id": str(call_id), "status": "queued"}, status_code=202, headers={"Location": location})


@router.get("/{call_id}", responses=problem_responses(401, 403, 404))
async def get_call_result(call_id: str, state: StateDep, _key: PredictKey) -> dict[str, Any]:
    """The call's status; once `done`, its turns and summary; once `failed`, why."""
    call = await run_in_threadpool(_find, state, call_id)
    document: dict[str, Any] = {
        "id": str(call.id),
        "status": call.status.value,
        "roles": call.roles,
        "context": call.context.value,
        "created_at": call.created_at.isoformat(),
        "started_at": call.started_at.isoformat() if call.started_at else None,
        "finished_at": call.finished_at.isoformat() if call.finished_at else None,
        "attempts": call.attempts,
    }
    if call.status == CallStatus.FAILED:
        document["error"] = call.error
    if call.status == CallStatus.DONE and call.result is not None:
        document.update(call.result)
    return document


@router.get(
    "/{call_id}/timeline.png",
    responses={**problem_responses(401, 403, 404, 409), 200: {"content": {"image/png": {}}}},
    response_class=Response,
)
async def get_call_timeline(call_id: str, state: StateDep, _key: PredictKey) -> Response:
    """The call's timeline: each speaker's turns over time, coloured by emotion."""
    call = await run_in_threadpool(_find, state, call_id)
    if call.status != CallStatus.DONE:
        raise Problem(409, f"the call is {call.status.value}, not done: it has no timeline yet", kind="call-not-done")
    path = timeline_path(state.settings, call.id)
    if not path.is_file():
        raise Problem(404, f"the timeline of call {call.id} is no longer stored", kind="not-found")
    return Response(await run_in_threadpool(path.read_bytes), media_type="image/png")


def _upload(form: FormData, settings: Settings) -> UploadFile:
    upload = form.get("audio")
    if not isinstance(upload, UploadFile):
        raise invalid("audio", "the `audio` file is required: the call recording (WAV, FLAC, OGG or MP3)")
    size, limit = upload.size or 0, settings.max_call_bytes
    if size == 0:
        raise invalid("audio", "the audio file is empty (0 bytes)")
    if size > limit:
        raise too_large("audio", f"the audio file has {size} bytes; the limit is {limit} bytes", limit)
    return upload


def _fields(form: FormData) -> tuple[tuple[str, ...] | None, ContextMode]:
    fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    stray = sorted(set(fields) - FIELDS) + sorted(
        k for k, v in form.multi_items() if k != "audio" and not isinstance(v, str)
    )
    if stray:
        raise invalid(stray[0], f"unexpected field {stray[0]!r}; a call takes `audio`, `roles` and `context`")
    try:
        roles = parse_channel_names(fields["roles"]) if "roles" in fields else None
    except ValueError as error:
        raise invalid("roles", str(error)) from None
    context = fields.get("context", ContextMode.BIDIRECTIONAL.value)
    if context not in {mode.value for mode in ContextMode}:
        raise invalid("context", f"context is `bidirectional` or `causal`, not {context!r}", "bidirectional|causal")
    return roles, ContextMode(context)


def _queued(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return count_calls(session, CallStatus.QUEUED)


def _queue(
    state: ServiceState, call_id: uuid.UUID, path: Path, size: int, roles: tuple[str, ...] | None, context: ContextMode
) -> None:
    stored_roles = [str(state.redaction.identifier(role)) for role in roles] if roles is not None else None
    with state.sessions() as session:
        queue_call(session, call_id, audio_path=str(path), audio_bytes=size, roles=stored_roles, context=context)


def _store(upload: UploadFile, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    upload.file.seek(0)
    with path.open("wb") as target:
        shutil.copyfileobj(upload.file, target, length=1024 * 1024)
    return path.stat().st_size


def _check_recording(path: Path, roles: tuple[str, ...] | None, settings: Settings) -> None:
    """Refuse what the header already shows to be out of bounds (size, format, rate, channels, declared length)
    or not matching `roles`, before the call is queued; the stored file goes with the refusal."""
    try:
        header = check_audio_header(path, **CallOptions.from_settings(settings).audio_limits())
    except AudioError as error:
        path.unlink(missing_ok=True)
        if isinstance(error, AudioTooLarge | AudioTooLong | AudioTooManyChannels):
            raise too_large("audio", error.message, error.limit or 0) from None
        raise invalid("audio", error.message, error.limit) from None
    if roles is not None and len(roles) != header.channels:
        path.unlink(missing_ok=True)
        message = f"{len(roles)} roles for a recording of {header.channels} channels; name one speaker per channel"
        raise invalid("roles", message, header.channels)


def _find(state: ServiceState, call_id: str) -> Call:
    try:
        key = uuid.UUID(call_id)
    except ValueError:
        raise Problem(404, f"No call with id {call_id}.", kind="not-found") from None
    with state.sessions() as session:
        call = get_call(session, key)
    if call is None:
        raise Problem(404, f"No call with id {call_id}.", kind="not-found")
    return call
