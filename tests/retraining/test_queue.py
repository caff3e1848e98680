"""The job queue on SQLite and PostgreSQL: safe concurrent claims, leases and takeover, retries with back-off."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from core.db.models import JobStatus, RetrainingJob
from core.db.session import session_scope
from retraining.queue import Backoff, JobQueue, SingleWorkerLock, WorkerLockHeld, as_utc
from tests.retraining.conftest import add_job

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _job(engine: Engine, job_id: int) -> RetrainingJob:
    with session_scope(engine) as session:
        return session.get_one(RetrainingJob, job_id)


def _claim_concurrently(engine: Engine, workers: int) -> list[tuple[int, str]]:
    """Each worker thread claims until the queue is empty; returns (job id, owner) of every claim."""
    claims: list[tuple[int, str]] = []
    start = threading.Barrier(workers)

    def work(owner: str) -> None:
        queue = JobQueue(engine, owner)
        start.wait()
        while (job := queue.claim()) is not None:
            claims.append((job.id, owner))

    threads = [threading.Thread(target=work, args=(f"worker-{i}",)) for i in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return claims


@pytest.mark.postgres
def test_postgres_concurrent_workers_never_claim_the_same_job(postgres_url: str) -> None:
    from core.db import migrate
    from core.db.session import make_engine

    migrate.upgrade(postgres_url)
    engine = make_engine(postgres_url, pool_size=8)
    try:
        jobs = [add_job(engine) for _ in range(12)]
        claims = _claim_concurrently(engine, workers=4)
        assert sorted(job for job, _ in claims) == jobs  # every job once, none twice
        for job, owner in claims:
            row = _job(engine, job)
            assert (row.status, row.lease_owner, row.attempts) == (JobStatus.RUNNING, owner, 1)
    finally:
        engine.dispose()


def test_sqlite_claims_are_serialised(sqlite_engine: Engine) -> None:
    jobs = [add_job(sqlite_engine) for _ in range(6)]
    claims = _claim_concurrently(sqlite_engine, workers=3)
    assert Counter(job for job, _ in claims) == Counter(jobs)


def test_sqlite_single_worker_lock(sqlite_url: str, tmp_path: Path) -> None:
    first, second = SingleWorkerLock.for_database(sqlite_url), SingleWorkerLock.for_database(sqlite_url)
    assert first is not None and second is not None
    assert SingleWorkerLock.for_database("postgresql+psycopg://u@h/db") is None
    with first, pytest.raises(WorkerLockHeld):
        second.acquire()
    second.acquire()  # free again once the first worker let go
    second.release()


def test_lease_expiry_lets_another_worker_take_over(engine: Engine) -> None:
    clock = Clock()
    first = JobQueue(engine, "first", lease_s=10, clock=clock)
    second = JobQueue(engine, "second", lease_s=10, clock=clock)
    job_id = add_job(engine)
    assert first.claim() is not None
    clock.advance(6)
    assert second.claim() is None  # leased
    assert first.heartbeat(job_id)  # renewed until T0 + 16
    clock.advance(6)
    assert second.claim() is None
    clock.advance(5)  # T0 + 17: the first worker stopped beating
    taken = second.claim()
    assert taken is not None and taken.previous_owner == "first" and taken.attempts == 2
    # The first worker can no longer touch the job.
    assert not first.heartbeat(job_id)
    assert not first.append_log(job_id, "late")
    assert not first.finish(job_id, {}, None)
    assert first.fail(job_id, "late") is None
    assert second.finish(job_id, {"ok": True}, None)
    row = _job(engine, job_id)
    assert (row.status, row.result, row.lease_owner) == (JobStatus.SUCCEEDED, {"ok": True}, None)


def test_failures_retry_with_exponential_back_off_then_fail(engine: Engine) -> None:
    clock = Clock()
    queue = JobQueue(engine, "w", backoff=Backoff(base_s=10, max_s=1000, jitter=0), clock=clock)
    job_id = add_job(engine, max_attempts=3)
    for attempt, delay in ((1, 10), (2, 20)):
        job = queue.claim()
        assert job is not None and job.attempts == attempt
        assert queue.append_log(job_id, f"attempt {attempt}")
        assert queue.fail(job_id, f"boom {attempt}") == JobStatus.QUEUED
        row = _job(engine, job_id)
        assert as_utc(row.not_before) == clock.now + timedelta(seconds=delay)
        clock.advance(delay - 1)
        assert queue.claim() is None  # still backing off
        clock.advance(1)
    assert queue.claim() is not None
    assert queue.fail(job_id, "boom 3") == JobStatus.FAILED
    row = _job(engine, job_id)
    assert (row.status, row.attempts, row.error) == (JobStatus.FAILED, 3, "boom 3")
    assert row.finished_at is not None and "attempt 1" in row.log and "attempt 2" in row.log
    assert queue.claim() is None


def test_permanent_failure_skips_the_retries(engine: Engine) -> None:
    queue = JobQueue(engine, "w")
    job_id = add_job(engine, max_attempts=5)
    assert queue.claim() is not None
    assert queue.fail(job_id, "bad params", retry=False) == JobStatus.FAILED


def test_lease_expired_on_the_last_attempt_fails_the_job(engine: Engine) -> None:
    clock = Clock()
    job_id = add_job(engine, max_attempts=1)
    assert JobQueue(engine, "dead", lease_s=5, clock=clock).claim() is not None
    clock.advance(6)
    assert JobQueue(engine, "next", lease_s=5, clock=clock).claim() is None
    row = _job(engine, job_id)
    assert row.status == JobStatus.FAILED and "expired on the last attempt" in (row.error or "")


def test_release_requeues_without_spending_an_attempt(engine: Engine) -> None:
    queue = JobQueue(engine, "w")
    job_id = add_job(engine)
    assert queue.claim() is not None
    assert queue.release(job_id)
    row = _job(engine, job_id)
    assert (row.status, row.attempts, row.lease_owner) == (JobStatus.QUEUED, 0, None)
    with session_scope(engine) as session:
        assert session.scalar(select(RetrainingJob.id).where(RetrainingJob.status == JobStatus.QUEUED)) == job_id
