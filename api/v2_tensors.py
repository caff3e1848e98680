"""Tensors of the Open Inference Protocol in and out: JSON `data`, or Triton's binary tensor extension.

Binary extension: the `Inference-Header-Content-Length` header gives the length of the JSON part; the bytes after
it are the inputs that declare `parameters.binary_data_size`, in the order they are listed. A BYTES tensor's
elements are each a 4-byte little-endian length and that many bytes; FP32 is little-endian float32 and BOOL one
byte per element, row-major. Outputs asked for with `parameters.binary_data: true` (or every output, with the
request parameter `binary_data_output: true`, which tritonclient sends when it names no outputs) come back the same
way, after the JSON part, whose length the response's `Inference-Header-Content-Length` gives.

Inputs of the model, all BYTES `[n]`: `text` (UTF-8), `speaker` (UTF-8) and `audio` (a WAV, FLAC, OGG or MP3 file: raw
bytes in binary form, base64 in JSON, where BYTES elements are strings). An empty element is an absent value.
Errors are raised as `Problem`s naming the input (`inputs.text`) and, for a value, the row (`turns.3.text`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from api.errors import Problem, invalid, too_large
from api.v2_schemas import InferenceRequest, RequestInput

HEADER_LENGTH = "inference-header-content-length"
INPUTS = ("text", "speaker", "audio")  # every input is BYTES [n]; each row needs text or audio
BYTES, FP32, BOOL = "BYTES", "FP32", "BOOL"
CONTEXT, CONVERSATION_ID, BINARY_OUTPUT = "context", "conversation_id", "binary_data_output"
IGNORED_PARAMETERS = frozenset({"priority", "timeout"})  # tritonclient's scheduling hints: nothing to schedule
IGNORED_INPUT_PARAMETERS = frozenset({"content_type"})  # MLServer's codec hint: the datatype already says it
LENGTH_PREFIX = struct.Struct("<I")


@dataclass(frozen=True)
class Column:
    """One input tensor's elements: bytes when sent binary, str when sent in JSON."""

    name: str
    values: list[bytes] | list[str]
    binary: bool


@dataclass(frozen=True)
class Rows:
    """The request's rows as a /v1 dialogue body (`turns`: text, speaker, base64 audio) and each row's raw audio
    bytes (binary form), for api.inputs.dialogue_of."""

    turns: list[dict[str, str | None]]
    uploads: list[bytes | None]


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str
    shape: list[int]
    values: np.ndarray | list[str] | list[bool]


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON part and the binary part of a request body."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or not 0 < int(header_length) <= len(body):
        raise invalid(
            "Inference-Header-Content-Length",
            f"must be the length of the JSON part, between 1 and the body's {len(body)} bytes; got {header_length!r}",
            status=400,
        )
    return body[: int(header_length)], body[int(header_length) :]


def check_parameters(request: InferenceRequest) -> dict[str, Any]:
    """The request parameters that matter here (`context`, `conversation_id`, `binary_data_output`)."""
    parameters = dict(request.parameters or {})
    unknown = sorted(set(parameters) - {CONTEXT, CONVERSATION_ID, BINARY_OUTPUT} - IGNORED_PARAMETERS)
    if unknown:
        raise invalid(
            f"parameters.{unknown[0]}",
            f"unknown request parameter {unknown[0]!r}; this model takes {CONTEXT!r} (causal or bidirectional), "
            f"{CONVERSATION_ID!r} and {BINARY_OUTPUT!r} (sequences and other extensions are not supported)",
            status=400,
        )
    if CONVERSATION_ID in parameters and CONTEXT not in parameters:
        raise invalid(
            f"parameters.{CONVERSATION_ID}", f"{CONVERSATION_ID!r} names a dialogue: give {CONTEXT!r} too", status=400
        )
    if not isinstance(parameters.get(BINARY_OUTPUT, False), bool):
        raise invalid(f"parameters.{BINARY_OUTPUT}", f"{BINARY_OUTPUT!r} must be true or false", status=400)
    return parameters


def read_columns(request: InferenceRequest, binary: bytes, max_rows: int) -> list[Column]:
    """Each input's elements, after checking names, datatypes, shapes (`[n]`, the same n everywhere, at most
    `max_rows`) and that the binary part holds exactly the declared tensors."""
    names = [tensor.name for tensor in request.inputs]
    for tensor in request.inputs:
        _check_input(tensor, names, max_rows)
    rows = {tensor.shape[0] for tensor in request.inputs}
    if len(rows) > 1:
        shapes = ", ".join(f"{tensor.name} {tensor.shape}" for tensor in request.inputs)
        raise invalid("inputs", f"every input must have the same number of rows; got {shapes}", status=400)
    columns, offset = [], 0
    for tensor in request.inputs:
        size = _binary_size(tensor)
        if size is None:
            columns.append(Column(tensor.name, _json_elements(tensor), binary=False))
            continue
        if offset + size > len(binary):
            raise _binary_problem(f"input {tensor.name!r} declares {size} bytes beyond the {len(binary)} sent")
        columns.append(Column(tensor.name, _bytes_elements(binary[offset : offset + size], tensor), binary=True))
        offset += size
    if offset != len(binary):
        raise _binary_problem(f"the body holds {len(binary) - offset} bytes after the declared binary tensors")
    return columns


def rows_of(columns: Iterable[Column]) -> Rows:
    by_name = {column.name: column for column in columns}
    count = len(next(iter(by_name.values())).values)
    turns: list[dict[str, str | None]] = [{} for _ in range(count)]
    uploads: list[bytes | None] = [None] * count
    for name, column in by_name.items():
        for row, value in enumerate(column.values):
            if name == "audio" and isinstance(value, bytes):
                uploads[row] = value or None
            else:
                turns[row][name] = _text(value, f"turns.{row}.{name}") or None
    return Rows(turns, uploads)


def binary_outputs(request: InferenceRequest, parameters: Mapping[str, Any], available: list[str]) -> dict[str, bool]:
    """The outputs to answer, in order, each with whether it goes binary: the requested ones, or all."""
    default = bool(parameters.get(BINARY_OUTPUT, False))
    if request.outputs is None:
        return dict.fromkeys(available, default)
    chosen: dict[str, bool] = {}
    for output in request.outputs:
        if output.name not in available:
            raise invalid(
                "outputs", f"unknown output {output.name!r}; this model has {', '.join(available)}", status=400
            )
        options = dict(output.parameters or {})
        binary = options.pop("binary_data", default)
        if options or not isinstance(binary, bool):
            raise invalid(
                f"outputs.{output.name}.parameters",
                "the only output parameter is binary_data (true or false); classification is not supported, "
                "read `probabilities`",
                status=400,
            )
        chosen[output.name] = binary
    return chosen


def encode(header: dict[str, Any], tensors: list[Tensor], binary: Mapping[str, bool]) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the length of its JSON part."""
    parts: list[bytes] = []
    outputs = []
    for tensor in tensors:
        output: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": tensor.shape}
        if binary[tensor.name]:
            raw = _to_bytes(tensor)
            output["parameters"] = {"binary_data_size": len(raw)}
            parts.append(raw)
        else:
            output["data"] = _to_json(tensor)
        outputs.append(output)
    head = json.dumps(header | {"outputs": outputs}, separators=(",", ":")).encode()
    return head + b"".join(parts), len(head) if parts else None


def _check_input(tensor: RequestInput, names: list[str], max_rows: int) -> None:
    field = f"inputs.{tensor.name}"
    if tensor.name not in INPUTS:
        raise invalid(field, f"unknown input {tensor.name!r}; this model takes {', '.join(INPUTS)}", status=400)
    if names.count(tensor.name) > 1:
        raise invalid(field, f"input {tensor.name!r} is given more than once", status=400)
    if tensor.datatype != BYTES:
        raise invalid(f"{field}.datatype", f"input {tensor.name!r} is {BYTES}, not {tensor.datatype}", status=400)
    if len(tensor.shape) != 1 or tensor.shape[0] < 1:
        raise invalid(f"{field}.shape", f"input {tensor.name!r} has shape [n], n >= 1; got {tensor.shape}", status=400)
    if tensor.shape[0] > max_rows:
        message = f"input {tensor.name!r} has {tensor.shape[0]} rows; the limit is {max_rows}"
        raise too_large(f"{field}.shape", message, max_rows)
    unknown = sorted(set(tensor.parameters or {}) - {"binary_data_size"} - IGNORED_INPUT_PARAMETERS)
    if unknown:
        raise invalid(f"{field}.parameters", f"unknown input parameter {unknown[0]!r}", status=400)
    if (tensor.data is None) == (_binary_size(tensor) is None):
        raise invalid(field, f"input {tensor.name!r} needs either `data` or parameters.binary_data_size", status=400)


def _binary_size(tensor: RequestInput) -> int | None:
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise invalid(f"inputs.{tensor.name}.parameters.binary_data_size", "must be a byte count", status=400)
    return size


def _json_elements(tensor: RequestInput) -> list[str]:
    data = tensor.data or []
    if len(data) != tensor.shape[0]:
        raise invalid(
            f"inputs.{tensor.name}.data",
            f"input {tensor.name!r} has shape {tensor.shape} but {len(data)} elements",
            status=400,
        )
    for row, value in enumerate(data):
        if not isinstance(value, str):
            raise invalid(
                f"inputs.{tensor.name}.data",
                f"element {row} of {tensor.name!r} is {type(value).__name__}; {BYTES} elements in JSON are strings",
                status=400,
            )
    return list(data)


def _bytes_elements(blob: bytes, tensor: RequestInput) -> list[bytes]:
    values: list[bytes] = []
    offset, expected = 0, tensor.shape[0]
    while offset < len(blob) and len(values) < expected:
        if offset + LENGTH_PREFIX.size > len(blob):
            break
        (length,) = LENGTH_PREFIX.unpack_from(blob, offset)
        offset += LENGTH_PREFIX.size
        if offset + length > len(blob):
            break
        values.append(blob[offset : offset + length])
        offset += length
    if len(values) != expected or offset != len(blob):
        raise _binary_problem(
            f"input {tensor.name!r} has shape {tensor.shape}, but its {len(blob)} bytes are not {expected} "
            "length-prefixed elements"
        )
    return values


def _text(value: bytes | str, field: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(field, "is not valid UTF-8") from None


def _binary_problem(message: str) -> Problem:
    return invalid("body", f"binary tensor data: {message}", status=400)


def _to_bytes(tensor: Tensor) -> bytes:
    if tensor.datatype == BYTES:
        encoded = [str(value).encode() for value in tensor.values]
        return b"".join(LENGTH_PREFIX.pack(len(item)) + item for item in encoded)
    dtype = "<f4" if tensor.datatype == FP32 else np.uint8
    return np.asarray(tensor.values, dtype=dtype).tobytes()


def _to_json(tensor: Tensor) -> list[Any]:
    if tensor.datatype == FP32:
        return [float(value) for value in np.asarray(tensor.values, dtype=np.float32).ravel()]
    return list(tensor.values)
