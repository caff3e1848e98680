"""The FastAPI application factory and its lifespan.

`create_app()` builds every long-lived part (engine, registry, model holder and reloader, batcher, prediction
logger, version pool, shadow scorer, authenticator) and wires the routes; the lifespan starts them in order and,
on shutdown, stops taking model work and flushes the prediction log (to the database, or to the spool when it is
down).
Run it with `equipoise serve`, or `uvicorn api.app:create_app --factory`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool

from api import errors
from api.auth import Authenticator, check_exposure
from api.batcher import MicroBatcher
from api.calls import CALLS_PATH, CallRunner, call_body_limit
from api.deps import ServiceState
from api.metrics import Metrics
from api.middleware import BodyLimitMiddleware, BodyLimits, ContentDecodingMiddleware, HttpMetricsMiddleware
from api.prediction_log import PredictionLogger, RowPreparer, Spool
from api.predictor import Predictor
from api.reload import ModelHolder, ModelLoader, ModelReloader, runtime_loader
from api.routes import api_router
from api.schemas import DialogueRequest, UtteranceRequest
from api.shadow import ShadowScorer
from api.stream import OpenStreams
from api.v2_schemas import InferenceRequest
from api.versions import VersionPool
from core.db.session import make_engine, session_factory
from core.heap import collector_for_serving
from core.redaction import redaction_from_settings
from core.settings import Settings, get_settings
from model.registry import ModelRegistry
from monitoring.exporter import MonitoringCollector
from monitoring.runner import MonitorSchedule

log = logging.getLogger(__name__)


def build_state(settings: Settings, loader: ModelLoader | None = None) -> ServiceState:
    assert settings.database_url is not None and settings.registry_dir is not None
    engine = make_engine(settings.database_url)
    metrics = Metrics()
    metrics.registry.register(MonitoringCollector(engine))
    registry = ModelRegistry(engine, settings.registry_dir)
    holder = ModelHolder()
    loader = loader or runtime_loader(settings)
    reloader = ModelReloader(registry, holder, loader, metrics, settings.model_poll_interval_s)
    batcher = MicroBatcher.from_settings(holder, metrics, settings)
    redaction = redaction_from_settings(settings)
    preparer = RowPreparer(
        redaction=redaction, audio_dir=settings.state_dir / "audio" if settings.store_audio else None
    )
    logger = PredictionLogger(
        engine,
        Spool(settings.state_dir / "spool"),
        preparer,
        metrics,
        flush_rows=settings.log_flush_rows,
        flush_interval_s=settings.log_flush_interval_s,
    )
    versions = VersionPool(registry, loader, logger, metrics, settings)
    shadow = ShadowScorer(versions, registry, logger, metrics, settings)
    calls = CallRunner(engine, holder, metrics, settings, redaction)
    metrics.calls_queued.set_function(calls.queued_for_metrics)
    return ServiceState(
        settings=settings,
        engine=engine,
        sessions=session_factory(engine),
        metrics=metrics,
        registry=registry,
        holder=holder,
        reloader=reloader,
        batcher=batcher,
        logger=logger,
        predictor=Predictor(batcher, logger, metrics, settings, shadow=shadow.offer),
        versions=versions,
        shadow=shadow,
        auth=Authenticator(engine, required=settings.auth_required, cache_s=settings.api_key_cache_s),
        calls=calls,
        redaction=redaction,
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServiceState = app.state.service
    warning = await run_in_threadpool(check_exposure, state.settings, state.engine)
    if warning:
        log.warning(warning)
    state.logger.start()
    await state.reloader.start()
    state.batcher.start()
    state.shadow.start()
    await run_in_threadpool(state.calls.start)
    schedule = MonitorSchedule(state.engine, state.settings) if state.settings.monitor_in_service else None
    if schedule:
        schedule.start()
    settings = state.settings
    with collector_for_serving(settings.gc_freeze, settings.gc_gen0_threshold) as frozen:
        log.debug(
            "garbage collector: %d start-up objects frozen, youngest generation every %d",
            frozen,
            settings.gc_gen0_threshold,
        )
        try:
            yield
        finally:
            await _stop(state, schedule)


async def _stop(state: ServiceState, schedule: MonitorSchedule | None) -> None:
    if schedule:
        await run_in_threadpool(schedule.stop)
    await run_in_threadpool(state.calls.stop)
    await state.reloader.stop()
    await state.batcher.stop()
    await state.shadow.stop()
    await state.versions.close()
    await run_in_threadpool(state.logger.close)
    state.engine.dispose()
    log.info("stopped; %d prediction rows remain in the spool", state.logger.spooled_rows)


def create_app(settings: Settings | None = None, loader: ModelLoader | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="Equipoise",
        version=version("equipoise"),
        summary="Emotion recognition in conversations, from text and voice.",
        lifespan=lifespan,
    )
    app.state.service = build_state(settings, loader)
    app.state.open_streams = OpenStreams(settings.stream_max_open, app.state.service.metrics.streams_open)
    errors.install(app)
    app.include_router(api_router)
    limits = BodyLimits(settings.max_request_bytes, {CALLS_PATH: call_body_limit(settings)})
    app.add_middleware(ContentDecodingMiddleware, limits=limits)
    app.add_middleware(BodyLimitMiddleware, limits=limits)  # added later, so it sees the body as sent
    app.add_middleware(HttpMetricsMiddleware, metrics=app.state.service.metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """The generated document plus the request models of the hand-parsed prediction bodies."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        _, definitions = models_json_schema(
            [(UtteranceRequest, "validation"), (DialogueRequest, "validation"), (InferenceRequest, "validation")],
            ref_template="#/components/schemas/{model}",
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
        app.openapi_schema = schema
    return app.openapi_schema
