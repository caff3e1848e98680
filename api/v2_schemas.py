"""Bodies of the Open Inference Protocol (KServe v2 REST, as Triton, MLServer and Seldon speak it): the JSON part
of an inference request and the metadata and inference answers. The tensors themselves are read and written by
api/v2_tensors.py (JSON or the binary tensor extension)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schemas import Name

MAX_TENSORS = 16  # inputs or outputs named in one request: the model has 3 inputs and 6 outputs
MAX_RANK = 8
Dimension = Annotated[int, Field(ge=0)]
Parameters = dict[str, Any]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RequestInput(_Strict):
    name: Name
    shape: list[Dimension] = Field(max_length=MAX_RANK)
    datatype: Name
    parameters: Parameters | None = Field(
        default=None, description="`binary_data_size`: the tensor's bytes follow the JSON (binary extension)."
    )
    data: list[Any] | None = Field(default=None, description="Row-major elements, flat or nested; absent if binary.")


class RequestOutput(_Strict):
    name: Name
    parameters: Parameters | None = Field(default=None, description="`binary_data: true` for binary data.")


class InferenceRequest(_Strict):
    """Rows of the input tensors are utterances; the `context` parameter makes them the turns of one dialogue."""

    id: Name | None = None
    parameters: Parameters | None = Field(
        default=None,
        description="`context`: `causal` or `bidirectional` (rows are the turns of one dialogue, in order; "
        "absent: each row is an independent utterance); `conversation_id` (with `context`); "
        "`binary_data_output`: every output as binary data.",
    )
    inputs: list[RequestInput] = Field(min_length=1, max_length=MAX_TENSORS)
    outputs: list[RequestOutput] | None = Field(default=None, max_length=MAX_TENSORS)


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any length (the rows).")
    parameters: Parameters | None = None


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="Registered versions; each can be called under /versions/{version}.")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: Parameters | None = Field(default=None, description="`version`: the version these describe.")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: Literal[True] = True


class Ready(BaseModel):
    ready: Literal[True] = True


class ModelReady(BaseModel):
    name: str
    version: str
    ready: Literal[True] = True


class V2Error(BaseModel):
    """The protocol's error body; `errors` lists the fields and limits, as /v1's problem details do."""

    error: str
    errors: list[dict[str, Any]] = []
