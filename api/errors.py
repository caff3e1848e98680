"""Every error leaves the service as RFC 9457 problem+json: type, title, status, detail and `errors`.

`errors` lists `{field, message, limit}` so a client can point at the offending field and the limit it broke.
`Problem` subclasses Starlette's HTTPException so FastAPI re-raises it untouched from body reading.
The data plane raises transport-free errors (api/domain_errors.py) instead; `domain_problem` maps them.
Under /v2 (the Open Inference Protocol) the same problem is answered in that protocol's shape instead:
`{"error": message}` (what its clients read), plus the same `errors` list, with the same status and headers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.domain_errors import (
    DomainError,
    InputTooLarge,
    InvalidInput,
    ModelChanged,
    ModelUnavailable,
    Overloaded,
)
from api.schemas import ProblemDetails

PROBLEM_MEDIA_TYPE = "application/problem+json"
V2_PREFIX = "/v2"  # the Open Inference Protocol's paths (api/routes/v2.py)
PROBLEM_TYPE_BASE = "https://equipoise.dev/problems/"
RETRY_AFTER_S = 1
REQUEST_PARTS = frozenset({"body", "path", "query", "header", "cookie"})

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str
    limit: float | int | str | None = None


class Problem(StarletteHTTPException):
    """An error response; raise it anywhere on the request path."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        errors: Iterable[FieldError] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=detail, headers=dict(headers) if headers else None)
        self.kind = kind or _slug(status)
        self.errors = list(errors)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the problem statuses a route can answer."""
    schema = {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}
    return {
        status: {"model": ProblemDetails, "description": _title(status), "content": {PROBLEM_MEDIA_TYPE: schema}}
        for status in statuses
    }


def too_large(field: str, message: str, limit: float | int) -> Problem:
    return Problem(413, message, kind="too-large", errors=[FieldError(field, message, limit)])


def invalid(field: str, message: str, limit: float | int | str | None = None, status: int = 422) -> Problem:
    return Problem(status, message, kind="validation", errors=[FieldError(field, message, limit)])


def unsupported(
    field: str, detail: str, message: str, accepted: str, headers: Mapping[str, str] | None = None
) -> Problem:
    """415: the request comes in a form (`field`: its media type, its content coding) the service does not read."""
    return Problem(
        415, detail, kind="unsupported-media-type", errors=[FieldError(field, message, accepted)], headers=headers
    )


def unavailable(detail: str, kind: str = "unavailable", status: int = 503) -> Problem:
    return Problem(status, detail, kind=kind, headers={"Retry-After": str(RETRY_AFTER_S)})


def problem_response(
    status: int,
    detail: str,
    *,
    kind: str | None = None,
    errors: Iterable[FieldError] = (),
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    body = problem_body(status, detail, kind=kind, errors=errors)
    return JSONResponse(body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM_MEDIA_TYPE)


def problem_body(
    status: int, detail: str, *, kind: str | None = None, errors: Iterable[FieldError] = ()
) -> dict[str, Any]:
    """The problem+json document: the body of an error response, and what a live stream's error message carries."""
    return {
        "type": PROBLEM_TYPE_BASE + (kind or _slug(status)),
        "title": _title(status),
        "status": status,
        "detail": detail,
        "errors": [asdict(error) for error in errors],
    }


def v2_error_response(
    status: int, detail: str, errors: Iterable[FieldError] = (), headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """The Open Inference Protocol's error body: `error` names each field and its limit, as a client of that
    protocol shows only this string."""
    errors = list(errors)
    named = [
        f"{error.field}: {error.message}"
        + (f" (limit {error.limit})" if error.limit is not None and str(error.limit) not in error.message else "")
        for error in errors
    ]
    if not named:
        message = detail
    elif all(error.message == detail for error in errors):
        message = "; ".join(named)
    else:
        message = f"{detail} [{'; '.join(named)}]"
    body = {"error": message, "errors": [asdict(error) for error in errors]}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def speaks_v2(request: Request) -> bool:
    path = request.url.path
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def validation_problem(error: ValidationError | RequestValidationError) -> Problem:
    """A pydantic error as one problem: 400 when the body is not JSON at all, 422 otherwise."""
    issues = error.errors()
    field_errors = [_field_error(issue) for issue in issues]
    if any(issue["type"] in {"json_invalid", "json_type"} for issue in issues):
        return Problem(400, "The request body is not valid JSON.", kind="malformed", errors=field_errors)
    return Problem(422, "The request does not match the expected schema.", kind="validation", errors=field_errors)


def domain_problem(error: DomainError) -> Problem:
    """The one place a data-plane refusal becomes an HTTP problem."""
    match error:
        case InputTooLarge():
            return too_large(error.field, error.message, error.limit)
        case InvalidInput():
            return invalid(error.field, error.message, error.limit)
        case Overloaded():
            return unavailable(f"The service is overloaded ({error}); retry shortly.", kind="overloaded")
        case ModelUnavailable():
            return unavailable(f"No model is being served: {error}.", kind="no-model")
        case ModelChanged():
            return Problem(409, str(error), kind="model-changed")
    raise TypeError(f"no problem is mapped for {type(error).__name__}")


def _field_error(issue: Mapping[str, Any]) -> FieldError:
    location = [str(part) for part in issue.get("loc", ())]
    if location and location[0] in REQUEST_PARTS:
        location = location[1:]
    if issue["type"] == "json_invalid":  # the location is a character offset, not a field
        location = []
    field = ".".join(location) or "body"
    context = issue.get("ctx") or {}
    limit = next((context[key] for key in ("max_length", "min_length", "le", "ge", "lt", "gt") if key in context), None)
    return FieldError(field, str(issue.get("msg", "invalid value")), limit if isinstance(limit, int | float) else None)


def _slug(status: int) -> str:
    return _title(status).lower().replace(" ", "-")


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _respond(request: Request, problem: Problem) -> JSONResponse:
    if speaks_v2(request):
        return v2_error_response(problem.status_code, problem.detail, problem.errors, problem.headers)
    return problem_response(
        problem.status_code, problem.detail, kind=problem.kind, errors=problem.errors, headers=problem.headers
    )


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc, Problem):
        return _respond(request, exc)
    # The framework's own 400s all come from reading the body (undecodable JSON, broken multipart).
    errors = [FieldError("body", str(exc.detail))] if exc.status_code == 400 else []
    return _respond(request, Problem(exc.status_code, str(exc.detail), errors=errors, headers=exc.headers))


async def _request_validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _respond(request, validation_problem(exc))


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return _respond(request, domain_problem(exc))


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", exc)
    return _respond(request, unavailable("The database is unavailable; retry shortly.", kind="database-unavailable"))


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _respond(request, Problem(500, "An internal error occurred; it has been logged."))


def install(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(DomainError, _domain_error)
    for connection_error in (OperationalError, InterfaceError, SQLAlchemyTimeoutError):
        app.add_exception_handler(connection_error, _database_unavailable)
    app.add_exception_handler(Exception, _unhandled)
