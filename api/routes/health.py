"""Liveness, readiness and the Prometheus scrape endpoint (all without authentication)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from sqlalchemy import Engine, text
from starlette.concurrency import run_in_threadpool

from api.deps import StateDep
from api.errors import problem_responses, unavailable
from api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is alive and answering."""
    return Health()


@router.get("/readyz", response_model=Readiness, responses=problem_responses(503))
async def readyz(state: StateDep) -> Readiness:
    """A model is loaded and the database answers; 503 otherwise."""
    model = state.holder.current
    if model is None:
        raise unavailable(f"no model: {state.holder.last_error or 'not loaded yet'}", kind="no-model")
    try:
        await run_in_threadpool(_ping, state.engine)
    except Exception as error:
        raise unavailable(f"database unreachable: {type(error).__name__}", kind="database-unavailable") from None
    return Readiness(model_version=model.version)


def _ping(engine: Engine) -> None:
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(state: StateDep) -> Response:
    """Prometheus exposition of this process's metrics."""
    body, media_type = state.metrics.exposition()
    return Response(body, media_type=media_type)
