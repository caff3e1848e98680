"""Prediction endpoints: one utterance, or a dialogue with its context mode; JSON or multipart. Audio of several
channels is one speaker per channel (README "Multi-channel audio")."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel

from api.deps import PredictKey, StateDep
from api.errors import problem_responses
from api.inputs import read_dialogue, read_utterance
from api.predictor import Answer, RequestInfo
from api.schemas import (
    CHANNELS_DESCRIPTION,
    ChannelsPrediction,
    DialoguePrediction,
    DialogueRequest,
    UtterancePrediction,
    UtteranceRequest,
)
from core.db.models import RequestKind

router = APIRouter(prefix="/v1/predict", tags=["predict"])

PROBLEMS = problem_responses(400, 401, 403, 413, 415, 422, 503)
AUDIO_FILE = {"type": "string", "format": "binary", "description": "A WAV, FLAC, OGG or MP3 file."}
CHANNELS_FIELD = {"type": "string", "description": CHANNELS_DESCRIPTION, "examples": ["agent,customer"]}
UTTERANCE_FORM = {
    "type": "object",
    "properties": {
        "text": {"type": "string"},
        "speaker": {"type": "string"},
        "channels": CHANNELS_FIELD,
        "audio": AUDIO_FILE,
    },
}
DIALOGUE_FORM = {
    "type": "object",
    "required": ["turns"],
    "properties": {
        "turns": {"type": "string", "description": "JSON array of turns ({text, speaker}) in order."},
        "context": {"type": "string", "enum": ["causal", "bidirectional"], "default": "bidirectional"},
        "conversation_id": {"type": "string"},
        "channels": CHANNELS_FIELD,
        "audio_0": {**AUDIO_FILE, "description": "Audio of turn 0; audio_1 for turn 1, and so on."},
    },
}


def _request_body(model: type[BaseModel], form: dict[str, Any]) -> dict[str, Any]:
    """Both media types in the OpenAPI document (the body is read by hand to accept either)."""
    reference = {"$ref": f"#/components/schemas/{model.__name__}"}
    content = {"application/json": {"schema": reference}, "multipart/form-data": {"schema": form}}
    return {"requestBody": {"required": True, "content": content}}


@router.post(
    "/utterance",
    response_model=UtterancePrediction | ChannelsPrediction,
    responses=PROBLEMS,
    openapi_extra=_request_body(UtteranceRequest, UTTERANCE_FORM),
)
async def predict_utterance(
    request: Request, state: StateDep, _key: PredictKey
) -> UtterancePrediction | ChannelsPrediction:
    """The emotion of one utterance (text, audio or both); for audio of several channels, of each channel alone
    (`channels`, with the silent ones in `silent_channels`)."""
    info = RequestInfo(RequestKind.UTTERANCE, None, None, time.perf_counter())
    turn = await read_utterance(request, state.settings)
    answer = await state.predictor.predict([turn], info)
    return _utterance_answer(answer)


def _utterance_answer(answer: Answer) -> UtterancePrediction | ChannelsPrediction:
    (first, *others) = answer.turns
    if first.channel is None and not others and not answer.silent:
        return first
    return ChannelsPrediction(
        model_version=answer.model_version,
        latency_ms=answer.latency_ms,
        channels=answer.turns,
        silent_channels=list(answer.silent),
    )


@router.post(
    "/dialogue",
    response_model=DialoguePrediction,
    responses=PROBLEMS,
    openapi_extra=_request_body(DialogueRequest, DIALOGUE_FORM),
)
async def predict_dialogue(request: Request, state: StateDep, _key: PredictKey) -> DialoguePrediction:
    """The emotion of every turn of a dialogue, each seeing past turns (causal) or the whole dialogue."""
    started = time.perf_counter()
    dialogue = await read_dialogue(request, state.settings)
    info = RequestInfo(RequestKind.DIALOGUE, dialogue.context, dialogue.conversation_id, started)
    answer = await state.predictor.predict(dialogue.turns, info)
    return DialoguePrediction(
        conversation_id=dialogue.conversation_id,
        context=dialogue.context,
        model_version=answer.model_version,
        latency_ms=answer.latency_ms,
        turns=answer.turns,
        silent_channels=list(answer.silent),
    )
