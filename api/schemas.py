"""Request and response bodies. Limits that are settings (text length, turns, audio size) are checked in
api/inputs.py against the live settings; the static bounds here only keep stored columns in range."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from equipoise.db.models import ContextMode, JobStatus, JobTrigger, ModelStatus

Name = Annotated[str, StringConstraints(max_length=256)]


class ProblemFieldError(BaseModel):
    field: str
    message: str
    limit: float | int | str | None = None


class ProblemDetails(BaseModel):
    """RFC 9457 problem details, served as application/problem+json."""

    type: str
    title: str
    status: int
    detail: str
    errors: list[ProblemFieldError] = []


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UtteranceRequest(_Strict):
    """One utterance: text, audio (base64 of a WAV, FLAC or OGG file), or both."""

    text: str | None = Field(default=None, description="The words spoken; empty counts as absent.")
    audio: str | None = Field(default=None, description="Base64 of a WAV, FLAC or OGG file.")
    speaker: Name | None = None


class DialogueRequest(_Strict):
    """A dialogue: the turns in order. `context` chooses whether a turn sees later turns."""

    turns: list[UtteranceRequest] = Field(min_length=1)
    context: ContextMode = ContextMode.BIDIRECTIONAL
    conversation_id: Name | None = None


class UtterancePrediction(BaseModel):
    prediction_id: uuid.UUID
    turn_index: int | None = None
    speaker: str | None = None
    emotion: str
    confidence: float
    probabilities: dict[str, float] = Field(description="Emotion probabilities by label name.")
    sentiment: str
    sentiment_probabilities: dict[str, float]
    model_version: str
    latency_ms: float


class DialoguePrediction(BaseModel):
    conversation_id: str | None
    context: ContextMode
    model_version: str
    latency_ms: float
    turns: list[UtterancePrediction]


class FeedbackRequest(_Strict):
    prediction_id: uuid.UUID
    label: str = Field(max_length=32, description="The true emotion; one of the model's labels.")
    sentiment: str | None = Field(default=None, max_length=32)
    source: str | None = Field(default=None, max_length=64)


class FeedbackResponse(BaseModel):
    id: int
    prediction_id: uuid.UUID
    label: str
    sentiment: str | None
    predicted: str
    model_version: str
    created_at: datetime


class ModelVersionOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    version: str
    status: ModelStatus
    created_at: datetime
    promoted_at: datetime | None
    retired_at: datetime | None
    parent_version: str | None
    artifact_sha256: str
    labels: list[Any]
    metrics: dict[str, Any]
    rejection_reason: str | None


class ModelList(BaseModel):
    serving: str | None = Field(description="The version this process is serving right now.")
    versions: list[ModelVersionOut]


class JobRequest(_Strict):
    reason: str = Field(min_length=1, max_length=2_000)
    tier: Literal[1, 2, 3] | None = Field(default=None, description="1 prior correction, 2 head, 3 full; null: auto.")
    params: dict[str, Any] = Field(default_factory=dict)


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    status: JobStatus
    trigger: JobTrigger
    tier: int | None
    reason: str
    params: dict[str, Any]
    base_version: str | None
    candidate_version: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    result: dict[str, Any]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    model_version: str
    database: Literal["reachable"] = "reachable"
