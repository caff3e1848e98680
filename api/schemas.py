"""Request and response bodies. Limits that are settings (text length, turns, audio size) are checked in
api/inputs.py against the live settings; the static bounds here only keep stored columns in range.

Every string a request stores or hands to the model is `Text`: without NUL characters (PostgreSQL text columns
cannot hold them) and without lone surrogates (JSON's `\\ud800` escapes decode to them, and neither the tokenizer
nor a UTF-8 response can take them), so such input is a 422 on every database rather than a 500 on some.
"""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    field_validator,
)

from core.db.models import ContextMode, FeedbackKind, JobStatus, JobTrigger, ModelStatus
from model.channels import parse_channel_names


def storable_text(value: str) -> str:
    """`value` unchanged if every database can store it and UTF-8 can encode it; ValueError otherwise."""
    if "\x00" in value:
        raise ValueError("must not contain NUL (U+0000) characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode: it contains a lone surrogate (an unpaired \\uD800-\\uDFFF)") from None
    return value


def storable_json(value: Any, max_depth: int | None = None) -> Any:
    """`value` unchanged if it can be stored as JSON on every database and answered back: strings (keys
    included) are `Text`, numbers are finite (JSON has no NaN or infinity) and containers nest at most
    `max_depth` deep (the response serializer gives up at a few hundred levels, after the row is written).
    Iterative, so the check itself cannot overflow the stack."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list | tuple) and max_depth is not None and depth >= max_depth:
            raise ValueError(f"must not nest objects and arrays more than {max_depth} levels deep")
        if isinstance(item, dict):
            pending.extend((key, depth) for key in item)
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list | tuple):
            pending.extend((child, depth + 1) for child in item)
        elif isinstance(item, str):
            storable_text(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("numbers must be finite: JSON has no NaN or infinity")
    return value


MAX_PARAMS_DEPTH = 32  # nesting of a job's `params` (the dict itself is level 1)
Text = Annotated[str, AfterValidator(storable_text)]
Name = Annotated[str, StringConstraints(max_length=256), AfterValidator(storable_text)]


def _channel_names(value: Any) -> Any:
    return parse_channel_names(value) if isinstance(value, str | list) else value


CHANNELS_DESCRIPTION = (
    "Speaker names of the channels of multi-channel audio, in channel order: `agent,customer` or a list; "
    "default channel-0, channel-1, ... Their number must be the audio's channel count; unused for one-channel audio."
)
ChannelNames = Annotated[
    tuple[Name, ...],
    BeforeValidator(_channel_names),
    WithJsonSchema(
        {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}], "examples": ["agent,customer"]}
    ),
]


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
    """One utterance: text, audio (base64 of a WAV, FLAC, OGG or MP3 file), or both. Audio of k > 1 channels is k
    speakers, one per channel, each answered on its own (README "Multi-channel audio")."""

    text: Text | None = Field(default=None, description="The words spoken; empty counts as absent.")
    audio: str | None = Field(default=None, description="Base64 of a WAV, FLAC, OGG or MP3 file.")
    speaker: Name | None = Field(
        default=None, description="Who spoke; with multi-channel audio, the channel whose words `text` is."
    )
    channels: ChannelNames | None = Field(default=None, description=CHANNELS_DESCRIPTION)


class DialogueRequest(_Strict):
    """A dialogue: the turns in order. `context` chooses whether a turn sees later turns."""

    turns: list[UtteranceRequest] = Field(min_length=1)
    context: ContextMode = ContextMode.BIDIRECTIONAL
    conversation_id: Name | None = None
    channels: ChannelNames | None = Field(
        default=None, description=CHANNELS_DESCRIPTION + " For every turn that does not name its own."
    )


class UtterancePrediction(BaseModel):
    prediction_id: uuid.UUID
    turn_index: int | None = None
    speaker: str | None = None
    channel: int | None = Field(default=None, description="The audio channel (0-based) it came from, if more than one.")
    emotion: str
    confidence: float
    probabilities: dict[str, float] = Field(description="Emotion probabilities by label name.")
    sentiment: str
    sentiment_probabilities: dict[str, float]
    model_version: str
    latency_ms: float
    audit: bool = Field(
        default=False,
        description="Offered for random labelling: send its true label with `kind: audit` (core/audit.py).",
    )


class SilentChannel(BaseModel):
    """A channel of multi-channel audio without a voice: reported, not scored."""

    turn_index: int | None = None
    channel: int
    speaker: str
    level_dbfs: float | None = Field(description="Level of its loudest 20 ms (dB full scale); null: digital silence.")


class ChannelsPrediction(BaseModel):
    """An utterance whose audio has several channels: one prediction per channel with a voice, each scored alone."""

    model_version: str
    latency_ms: float
    channels: list[UtterancePrediction]
    silent_channels: list[SilentChannel] = []


class DialoguePrediction(BaseModel):
    conversation_id: str | None
    context: ContextMode
    model_version: str
    latency_ms: float
    turns: list[UtterancePrediction] = Field(
        description="In turn order; a turn with multi-channel audio gives one per channel with a voice, in channel "
        "order, sharing its `turn_index`."
    )
    silent_channels: list[SilentChannel] = []


class FeedbackRequest(_Strict):
    prediction_id: uuid.UUID
    label: Text = Field(max_length=32, description="The true emotion; one of the model's labels.")
    sentiment: Text | None = Field(default=None, max_length=32)
    source: Text | None = Field(default=None, max_length=64)
    kind: FeedbackKind = Field(
        default=FeedbackKind.CORRECTION,
        description="`audit`: the label answers an audit offer (the prediction said `audit: true`); "
        "`correction`: a user correcting a mistake.",
    )


class FeedbackResponse(BaseModel):
    id: int
    prediction_id: uuid.UUID
    label: str
    sentiment: str | None
    kind: FeedbackKind
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
    reason: Text = Field(min_length=1, max_length=2_000)
    tier: Literal[1, 2, 3] | None = Field(default=None, description="1 prior correction, 2 head, 3 full; null: auto.")
    params: dict[str, Any] = Field(
        default_factory=dict, description=f"Options of the retraining run; at most {MAX_PARAMS_DEPTH} levels deep."
    )

    @field_validator("params")
    @classmethod
    def _storable_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        return storable_json(value, max_depth=MAX_PARAMS_DEPTH)  # type: ignore[no-any-return]


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
