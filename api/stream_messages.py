"""The messages of a live stream (/v1/stream): JSON text frames, each an object whose `type` names it.

Client to server: `open` (once, first), `turn` (one per utterance, as it happens), `ping`, `close`.
Server to client: `opened`, `prediction` (one per turn, in turn order), `escalation` (after the prediction of the
customer turn that escalated), `error` (a problem+json document under `problem`), `pong`, `closed`.
A message that cannot be read is answered with an `error` naming the field (and the limit) it broke.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.errors import Problem, invalid, problem_body, validation_problem
from api.inputs import parse_json
from api.schemas import Name, UtterancePrediction, UtteranceRequest

MAX_DECLARED_SPEAKERS = 64
MAX_KEY_CHARS = 512


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid")


class OpenMessage(_Message):
    """Opens the conversation: its id (one is made up when absent), the customer's speaker name, optionally the
    speakers to expect, and the API key when the client could not send it in the handshake's headers."""

    type: Literal["open"]
    conversation_id: Name | None = None
    customer: Name | None = Field(default=None, description='Speaker whose escalations count; default "customer".')
    speakers: list[Name] | None = Field(
        default=None, min_length=1, max_length=MAX_DECLARED_SPEAKERS, description="When given, turns must use these."
    )
    api_key: str | None = Field(default=None, max_length=MAX_KEY_CHARS, description="For browsers: no headers.")


class TurnMessage(UtteranceRequest):
    """One utterance as it happens: text, audio (base64 of a WAV, FLAC, OGG or MP3 file) or both, and its speaker."""

    type: Literal["turn"]
    id: Name | None = Field(default=None, description="The client's reference, echoed in the answer.")


class PingMessage(_Message):
    type: Literal["ping"]


class CloseMessage(_Message):
    """Ends the stream once every turn sent before it is answered."""

    type: Literal["close"]


ClientMessage = OpenMessage | TurnMessage | PingMessage | CloseMessage
MESSAGE_TYPES: dict[str, type[ClientMessage]] = {
    "open": OpenMessage,
    "turn": TurnMessage,
    "ping": PingMessage,
    "close": CloseMessage,
}


class MessageRefused(Exception):
    """A client message that cannot be used: the problem to answer, and the client's id of the turn, if any."""

    def __init__(self, problem: Problem, turn_id: str | None = None) -> None:
        super().__init__(problem.detail)
        self.problem = problem
        self.turn_id = turn_id


def parse_message(data: bytes) -> ClientMessage:
    """One text frame (UTF-8) as a client message; MessageRefused (400 or 422) when it is not one."""
    document = _document(data)
    kind = document.get("type")
    model = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise MessageRefused(
            invalid("type", f"`type` must be one of {', '.join(MESSAGE_TYPES)}, not {kind!r}"), _turn_id(document)
        )
    try:
        return model.model_validate(document)
    except ValidationError as error:
        raise MessageRefused(validation_problem(error), _turn_id(document)) from None


def _document(data: bytes) -> dict[str, Any]:
    try:
        document = parse_json(data)
    except Problem as problem:
        raise MessageRefused(problem) from None
    if not isinstance(document, dict):
        raise MessageRefused(invalid("body", "a message is a JSON object with a `type`", status=400))
    return document


def _turn_id(document: dict[str, Any]) -> str | None:
    """The client's id of a turn that was refused, when it is a plain string worth echoing."""
    value = document.get("id")
    return value if isinstance(value, str) and len(value) <= 256 else None


# ------------------------------------------------------------------------------------------------ server messages


def opened(conversation_id: str, customer: str, model_version: str, limits: dict[str, float | int]) -> dict[str, Any]:
    return {
        "type": "opened",
        "conversation_id": conversation_id,
        "customer": customer,
        "model_version": model_version,
        "limits": limits,
    }


def prediction(answer: UtterancePrediction, turn_id: str | None) -> dict[str, Any]:
    return {"type": "prediction", "id": turn_id, **answer.model_dump(mode="json")}


def error(problem: Problem, turn_id: str | None = None) -> dict[str, Any]:
    body = problem_body(problem.status_code, problem.detail, kind=problem.kind, errors=problem.errors)
    return {"type": "error", "id": turn_id, "problem": body}


def closed(conversation_id: str, turns: int) -> dict[str, Any]:
    return {"type": "closed", "conversation_id": conversation_id, "turns": turns}


PONG: dict[str, Any] = {"type": "pong"}
