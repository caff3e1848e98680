"""Administration: the model registry (list, promote, roll back) and retraining jobs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from starlette.concurrency import run_in_threadpool

from api.deps import AdminKey, SessionDep, StateDep, require_json
from api.errors import Problem, problem_responses
from api.schemas import JobOut, JobRequest, ModelList, ModelVersionOut
from core.db import crud
from core.db.models import ModelVersion
from model.artifact import VERSION_PATTERN
from model.registry import RegistryError, UnknownVersion

router = APIRouter(prefix="/v1", tags=["admin"])
PROBLEMS = problem_responses(401, 403, 404, 409, 503)
# Job ids are 32-bit on PostgreSQL: a larger id is refused (422) before it reaches the database (which errs on it).
JobId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The id returned when the job was created.")]


@router.get("/models", response_model=ModelList, responses=PROBLEMS)
async def list_models(state: StateDep, _key: AdminKey) -> ModelList:
    """Every registered version, newest first, and the version this process serves."""
    versions = await run_in_threadpool(state.registry.list)
    serving = state.holder.current.version if state.holder.current else None
    return ModelList(serving=serving, versions=[ModelVersionOut.model_validate(row) for row in versions])


@router.post("/models/{version}/promote", response_model=ModelVersionOut, responses=PROBLEMS)
async def promote_model(version: str, state: StateDep, _key: AdminKey) -> ModelVersionOut:
    """Make `version` the champion (the old one is retired); the service reloads it within moments."""
    if not VERSION_PATTERN.fullmatch(version):  # never registered; and a NUL in it would make PostgreSQL err
        raise Problem(404, str(UnknownVersion(f"no model version {version!r}")), kind="not-found")
    row = await _registry_call(lambda: state.registry.promote(version))
    state.reloader.poke()
    return ModelVersionOut.model_validate(row)


@router.post("/models/rollback", response_model=ModelVersionOut, responses=PROBLEMS)
async def rollback_model(state: StateDep, _key: AdminKey) -> ModelVersionOut:
    """Reject the champion and re-crown the previous one."""
    row = await _registry_call(state.registry.rollback)
    state.reloader.poke()
    return ModelVersionOut.model_validate(row)


async def _registry_call(call: Callable[[], ModelVersion]) -> ModelVersion:
    try:
        return await run_in_threadpool(call)
    except UnknownVersion as error:
        raise Problem(404, str(error), kind="not-found") from None
    except RegistryError as error:
        raise Problem(409, str(error), kind="conflict") from None


@router.post(
    "/jobs",
    status_code=201,
    response_model=JobOut,
    responses=problem_responses(401, 403, 415, 422, 503),
    dependencies=[Depends(require_json)],
)
def create_job(body: JobRequest, session: SessionDep, state: StateDep, _key: AdminKey) -> JobOut:
    """Queue a retraining job against the current champion; a worker picks it up."""
    champion = state.registry.champion()
    job = crud.create_job(
        session,
        reason=body.reason,
        tier=body.tier,
        params=body.params,
        base_version=champion.version if champion else None,
    )
    session.commit()
    return JobOut.model_validate(job)


@router.get("/jobs/{job_id}", response_model=JobOut, responses=PROBLEMS)
def get_job(job_id: JobId, session: SessionDep, _key: AdminKey) -> JobOut:
    job = crud.get_job(session, job_id)
    if job is None:
        raise Problem(404, f"No job with id {job_id}.", kind="not-found")
    return JobOut.model_validate(job)
