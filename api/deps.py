"""The service's long-lived parts and the FastAPI dependencies that hand them to routes."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.auth import Authenticator, Principal, authorize
from api.batcher import MicroBatcher
from api.calls import CallRunner
from api.inputs import is_json, media_type, unsupported_media_type
from api.metrics import Metrics
from api.prediction_log import PredictionLogger
from api.predictor import Predictor
from api.reload import ModelHolder, ModelReloader
from api.shadow import ShadowScorer
from api.versions import VersionPool
from core.db.models import Role
from core.redaction import Redaction
from core.settings import Settings
from model.registry import ModelRegistry


@dataclass(frozen=True)
class ServiceState:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    metrics: Metrics
    registry: ModelRegistry
    holder: ModelHolder
    reloader: ModelReloader
    batcher: MicroBatcher
    logger: PredictionLogger
    predictor: Predictor
    versions: VersionPool  # other registered versions, served by name under /v2
    shadow: ShadowScorer  # a share of the champion's requests scored again by a challenger, in the background
    auth: Authenticator
    calls: CallRunner  # whole call recordings, processed off the request path
    redaction: Redaction  # what is redacted before anything is stored


# Cheap dependencies are `async def`: FastAPI runs a plain `def` dependency on a worker thread, a hand-off that cost
# more than the work on every request (docs/BENCHMARKS.md "Serving peers").
async def get_state(request: Request) -> ServiceState:
    return request.app.state.service  # type: ignore[no-any-return]


StateDep = Annotated[ServiceState, Depends(get_state)]


def get_session(state: StateDep) -> Iterator[Session]:
    with state.sessions() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


async def _predict_key(request: Request, state: StateDep) -> Principal:
    return await authorize(request, state.auth, Role.PREDICT)


async def _admin_key(request: Request, state: StateDep) -> Principal:
    return await authorize(request, state.auth, Role.ADMIN)


PredictKey = Annotated[Principal, Depends(_predict_key)]
AdminKey = Annotated[Principal, Depends(_admin_key)]


async def require_json(request: Request) -> None:
    """415 instead of a confusing 422 when a JSON endpoint receives another media type."""
    media = media_type(request)
    if not is_json(media):
        raise unsupported_media_type(media, "application/json")
