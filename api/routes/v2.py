"""The Open Inference Protocol (KServe v2 REST) beside /v1, so that standard clients (tritonclient, KServe, Seldon,
MLServer's) can call the service. Model `equipoise` is the champion; `/versions/{version}` serves any registered
version by name (api/versions.py loads it on demand). Same keys, limits, prediction logging and micro-batching as
/v1, through the same `Predictor`; errors carry the same status codes in the protocol's `{"error": ...}` body
(api/errors.py). The tensors and the binary extension: api/v2_tensors.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from importlib.metadata import version as package_version
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Path, Request, Response
from pydantic import AfterValidator, ValidationError
from starlette.concurrency import run_in_threadpool

from api.deps import PredictKey, ServiceState, StateDep
from api.domain_errors import ModelUnavailable
from api.errors import V2_PREFIX, Problem, unavailable, validation_problem
from api.inputs import RawDialogue, dialogue_of, is_json, media_type, parse_json, unsupported_media_type
from api.predictor import Predictor, RequestInfo
from api.reload import LoadedModel
from api.routes import health
from api.schemas import UtterancePrediction, storable_text
from api.v2_schemas import (
    InferenceRequest,
    InferenceResponse,
    Live,
    ModelMetadata,
    ModelReady,
    Ready,
    ServerMetadata,
    TensorMetadata,
    V2Error,
)
from api.v2_tensors import (
    BOOL,
    BYTES,
    CONTEXT,
    CONVERSATION_ID,
    FP32,
    HEADER_LENGTH,
    INPUTS,
    Tensor,
    binary_outputs,
    check_parameters,
    encode,
    read_columns,
    rows_of,
    split_body,
)
from api.versions import VersionUnavailable
from core.db.models import RequestKind
from core.settings import Settings
from model.registry import UnknownVersion

router = APIRouter(prefix=V2_PREFIX, tags=["open inference protocol (v2)"])

MODEL_NAME = "equipoise"
PLATFORM = "onnxruntime"
EXTENSIONS = ["binary_tensor_data"]
OUTPUTS = ("label", "probabilities", "sentiment", "sentiment_probabilities", "prediction_id", "audit")
BINARY_MEDIA_TYPE = "application/octet-stream"
ModelName = Annotated[str, Path(max_length=256, description=f"Always {MODEL_NAME!r}.", examples=[MODEL_NAME])]
Version = Annotated[str, Path(max_length=256, description="A registered model version."), AfterValidator(storable_text)]


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": V2Error, "description": "`{error}`: what went wrong"} for status in statuses}


MODEL_ERRORS = _errors(400, 401, 403, 404, 422, 503)
INFER_RESPONSES = {200: {"model": InferenceResponse, "description": "The outputs (binary ones after the JSON part)"}}
INFER_RESPONSES |= _errors(400, 401, 403, 404, 413, 415, 422, 503)
INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "JSON; or, with the Inference-Header-Content-Length header, JSON followed by binary tensors.",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}}},
    }
}


# ------------------------------------------------------------------------------------------------ server


@router.get("", response_model=ServerMetadata)
async def server_metadata() -> ServerMetadata:
    """Name, version and protocol extensions of the server."""
    return ServerMetadata(name=MODEL_NAME, version=package_version("equipoise"), extensions=EXTENSIONS)


@router.get("/health/live", response_model=Live)
async def live() -> Live:
    """The process answers."""
    return Live()


@router.get("/health/ready", response_model=Ready, responses=_errors(400))
async def ready(state: StateDep) -> Ready:
    """A model is loaded and the database answers (as /readyz); 400 otherwise, as the protocol has it."""
    try:
        await health.readyz(state)
    except Problem as problem:
        raise Problem(400, f"not ready: {problem.detail}") from None
    return Ready()


# ------------------------------------------------------------------------------------------------ models


@router.get(
    "/models/{model_name}", response_model=ModelMetadata, responses=MODEL_ERRORS, response_model_exclude_none=True
)
async def champion_metadata(model_name: ModelName, state: StateDep, _key: PredictKey) -> ModelMetadata:
    """Inputs, outputs (with the label order of the probabilities) and registered versions of the champion."""
    async with _serving(state, model_name, None) as (model, _):
        return await _metadata(state, model)


@router.get(
    "/models/{model_name}/versions/{version}",
    response_model=ModelMetadata,
    responses=MODEL_ERRORS,
    response_model_exclude_none=True,
)
async def version_metadata(model_name: ModelName, version: Version, state: StateDep, _key: PredictKey) -> ModelMetadata:
    """The same for a registered version (loaded if it is not yet)."""
    async with _serving(state, model_name, version) as (model, _):
        return await _metadata(state, model)


@router.get("/models/{model_name}/ready", response_model=ModelReady, responses=MODEL_ERRORS)
async def champion_ready(model_name: ModelName, state: StateDep, _key: PredictKey) -> ModelReady:
    """The champion is loaded."""
    async with _serving(state, model_name, None) as (model, _):
        return ModelReady(name=MODEL_NAME, version=model.version)


@router.get("/models/{model_name}/versions/{version}/ready", response_model=ModelReady, responses=MODEL_ERRORS)
async def version_ready(model_name: ModelName, version: Version, state: StateDep, _key: PredictKey) -> ModelReady:
    """The version is loaded (this loads it)."""
    async with _serving(state, model_name, version) as (model, _):
        return ModelReady(name=MODEL_NAME, version=model.version)


@router.post("/models/{model_name}/infer", responses=INFER_RESPONSES, openapi_extra=INFER_BODY)
async def champion_infer(model_name: ModelName, request: Request, state: StateDep, _key: PredictKey) -> Response:
    """Emotions of the rows of `text` / `audio` (and `speaker`), by the champion."""
    return await _infer(request, state, model_name, None)


@router.post("/models/{model_name}/versions/{version}/infer", responses=INFER_RESPONSES, openapi_extra=INFER_BODY)
async def version_infer(
    model_name: ModelName, version: Version, request: Request, state: StateDep, _key: PredictKey
) -> Response:
    """The same, by a registered version."""
    return await _infer(request, state, model_name, version)


# ------------------------------------------------------------------------------------------------ helpers


@contextlib.asynccontextmanager
async def _serving(
    state: ServiceState, model_name: str, version: str | None
) -> AsyncIterator[tuple[LoadedModel, Predictor]]:
    """The model a request names and the predictor that scores with it: the champion unless a version is named."""
    if model_name != MODEL_NAME:
        raise Problem(404, f"unknown model {model_name!r}; this server serves {MODEL_NAME!r}")
    champion = state.holder.current
    if version is None or (champion is not None and champion.version == version):
        if champion is None:
            raise ModelUnavailable(state.holder.last_error or "no model is loaded")
        yield champion, state.predictor
        return
    try:
        async with state.versions.predictor(version) as served:
            yield served
    except UnknownVersion:
        raise Problem(404, f"unknown version {version!r} of model {MODEL_NAME!r}") from None
    except VersionUnavailable as error:
        raise unavailable(str(error), kind="no-model") from None


async def _metadata(state: ServiceState, model: LoadedModel) -> ModelMetadata:
    versions = await run_in_threadpool(lambda: [row.version for row in state.registry.list()])
    emotions, sentiments = list(model.runtime.emotions.names), list(model.runtime.sentiments.names)
    outputs = [
        TensorMetadata(name="label", datatype=BYTES, shape=[-1]),
        TensorMetadata(name="probabilities", datatype=FP32, shape=[-1, len(emotions)], parameters={"labels": emotions}),
        TensorMetadata(name="sentiment", datatype=BYTES, shape=[-1]),
        TensorMetadata(
            name="sentiment_probabilities",
            datatype=FP32,
            shape=[-1, len(sentiments)],
            parameters={"labels": sentiments},
        ),
        TensorMetadata(name="prediction_id", datatype=BYTES, shape=[-1]),
        TensorMetadata(name="audit", datatype=BOOL, shape=[-1]),
    ]
    return ModelMetadata(
        name=MODEL_NAME,
        versions=versions,
        platform=PLATFORM,
        inputs=[TensorMetadata(name=name, datatype=BYTES, shape=[-1]) for name in INPUTS],
        outputs=outputs,
        parameters={"version": model.version},
    )


@dataclass(frozen=True)
class _Inference:
    request: InferenceRequest
    parameters: dict[str, Any]
    outputs: dict[str, bool]  # the outputs to answer, in order: binary or JSON
    dialogue: RawDialogue


async def _infer(request: Request, state: ServiceState, model_name: str, version: str | None) -> Response:
    started = time.perf_counter()
    _check_media(request)
    async with _serving(state, model_name, version) as (_, predictor):
        inference = await _read(request, state.settings)
        as_dialogue = CONTEXT in inference.parameters
        turns = await _predict(predictor, inference.dialogue, as_dialogue, started, state.settings.batch_max_size)
    return _respond(inference, turns)


async def _read(request: Request, settings: Settings) -> _Inference:
    header, binary = split_body(await request.body(), request.headers.get(HEADER_LENGTH))
    try:
        parsed = InferenceRequest.model_validate(parse_json(header))
    except ValidationError as error:
        raise validation_problem(error) from None
    parameters = check_parameters(parsed)
    outputs = binary_outputs(parsed, parameters, list(OUTPUTS))
    rows = rows_of(read_columns(parsed, binary, settings.max_dialogue_turns))
    dialogue = dialogue_of(_dialogue_body(rows.turns, parameters), rows.uploads, settings)
    return _Inference(parsed, parameters, outputs, dialogue)


def _respond(inference: _Inference, turns: list[UtterancePrediction]) -> Response:
    tensors = {tensor.name: tensor for tensor in _tensors(turns)}
    header: dict[str, Any] = {"model_name": MODEL_NAME, "model_version": turns[0].model_version}
    if inference.request.id is not None:
        header["id"] = inference.request.id
    body, json_length = encode(header, [tensors[name] for name in inference.outputs], inference.outputs)
    if json_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type=BINARY_MEDIA_TYPE, headers={"Inference-Header-Content-Length": str(json_length)})


def _check_media(request: Request) -> None:
    media = media_type(request)
    if media not in ("", BINARY_MEDIA_TYPE) and not is_json(media):
        raise unsupported_media_type(media, f"application/json (or {BINARY_MEDIA_TYPE} with binary tensors)")


def _dialogue_body(turns: list[dict[str, str | None]], parameters: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"turns": turns}
    for name in (CONTEXT, CONVERSATION_ID):
        if name in parameters:
            body[name] = parameters[name]
    return body


async def _predict(
    predictor: Predictor, dialogue: RawDialogue, as_dialogue: bool, started: float, wave: int
) -> list[UtterancePrediction]:
    """One dialogue with its context mode; or, without `context`, each row an utterance of its own, sent to the
    micro-batcher `wave` rows at a time (one batch), so that a request never takes more of its queue than that.
    A row is one voice (the outputs have one row per input row): audio of several channels is refused."""
    if as_dialogue:
        info = RequestInfo(
            RequestKind.DIALOGUE, dialogue.context, dialogue.conversation_id, started, multichannel=False
        )
        return (await predictor.predict(dialogue.turns, info)).turns
    info = RequestInfo(RequestKind.UTTERANCE, None, None, started, multichannel=False)
    answers: list[UtterancePrediction] = []
    for start in range(0, len(dialogue.turns), wave):
        rows = dialogue.turns[start : start + wave]
        outcomes = await asyncio.gather(*(predictor.predict([row], info) for row in rows), return_exceptions=True)
        failures = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        if failures:  # every row of the wave has finished (and was logged if it was scored)
            raise failures[0]
        answers += [outcome.turns[0] for outcome in outcomes if not isinstance(outcome, BaseException)]
    return answers


def _tensors(turns: list[UtterancePrediction]) -> list[Tensor]:
    rows = len(turns)
    emotions = np.array([list(turn.probabilities.values()) for turn in turns], dtype=np.float32)
    sentiments = np.array([list(turn.sentiment_probabilities.values()) for turn in turns], dtype=np.float32)
    return [
        Tensor("label", BYTES, [rows], [turn.emotion for turn in turns]),
        Tensor("probabilities", FP32, list(emotions.shape), emotions),
        Tensor("sentiment", BYTES, [rows], [turn.sentiment for turn in turns]),
        Tensor("sentiment_probabilities", FP32, list(sentiments.shape), sentiments),
        Tensor("prediction_id", BYTES, [rows], [str(turn.prediction_id) for turn in turns]),
        Tensor("audit", BOOL, [rows], [turn.audit for turn in turns]),
    ]
