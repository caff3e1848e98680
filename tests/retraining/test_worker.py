"""The worker process: a worker killed mid-job is taken over and the job resumes; SIGTERM hands the job back;
failures are retried and finished steps are not redone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from core.db.models import JobStatus, ModelStatus, ModelVersion, RetrainingJob
from core.db.session import session_scope
from retraining.queue import Backoff, JobQueue, PermanentError, SingleWorkerLock
from retraining.steps import JobContext, Outcome
from retraining.worker import Worker
from tests.retraining.conftest import add_job
from tests.retraining.slow_worker import count, make_worker, two_step_runner

REPO_ROOT = Path(__file__).resolve().parents[2]


def _job(engine: Engine, job_id: int) -> RetrainingJob:
    with session_scope(engine) as session:
        return session.get_one(RetrainingJob, job_id)


def _versions(engine: Engine) -> list[tuple[str, ModelStatus]]:
    with session_scope(engine) as session:
        return [(v.version, v.status) for v in session.scalars(select(ModelVersion).order_by(ModelVersion.version))]


def _start_worker(url: str, tmp_path: Path, mode: str) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        "-m",
        "tests.retraining.slow_worker",
        url,
        str(tmp_path / "jobs"),
        str(tmp_path / "counts"),
        mode,
    ]
    return subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for_log(engine: Engine, job_id: int, text: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while text not in _job(engine, job_id).log:
        if process.poll() is not None:
            pytest.fail(f"worker exited early: {process.stderr.read().decode() if process.stderr else ''}")
        assert time.monotonic() < deadline, f"the worker never logged {text!r}"
        time.sleep(0.1)


def test_killed_worker_is_taken_over_and_the_job_resumes(engine: Engine, tmp_path: Path) -> None:
    url = engine.url.render_as_string(hide_password=False)
    with session_scope(engine) as session:
        session.add(
            ModelVersion(version="v1", status=ModelStatus.CHAMPION, artifact_path="-", artifact_sha256="0" * 64)
        )
    before = _versions(engine)
    job_id = add_job(engine)
    process = _start_worker(url, tmp_path, "hang")
    try:
        _wait_for_log(engine, job_id, "step b: started", process)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        process.kill()
    assert _job(engine, job_id).status == JobStatus.RUNNING  # orphaned until its lease expires

    successor = make_worker(url, tmp_path / "jobs", two_step_runner(tmp_path / "counts"), owner="successor")
    deadline = time.monotonic() + 30
    while successor.run(once=True) == 0:
        assert time.monotonic() < deadline, "the orphaned job was never taken over"
        time.sleep(0.2)

    job = _job(engine, job_id)
    assert (job.status, job.attempts, job.result) == (JobStatus.SUCCEEDED, 2, {"steps": ["a", "b"]})
    assert "took over from" in job.log and "step a: done by an earlier attempt, skipped" in job.log
    assert (count(tmp_path / "counts", "a"), count(tmp_path / "counts", "b")) == (1, 1)
    assert _versions(engine) == before  # the champion and the registry are untouched


def test_sigterm_hands_the_job_back_without_spending_an_attempt(sqlite_engine: Engine, tmp_path: Path) -> None:
    url = sqlite_engine.url.render_as_string(hide_password=False)
    job_id = add_job(sqlite_engine)
    process = _start_worker(url, tmp_path, "cooperative")
    try:
        _wait_for_log(sqlite_engine, job_id, "step b: started", process)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        process.kill()
    job = _job(sqlite_engine, job_id)
    assert (job.status, job.attempts, job.lease_owner) == (JobStatus.QUEUED, 0, None)
    assert "job released" in job.log


def test_a_failing_step_is_retried_and_finished_steps_are_kept(sqlite_engine: Engine, tmp_path: Path) -> None:
    calls: list[str] = []

    def runner(ctx: JobContext) -> Outcome:
        ctx.step("a", lambda _out: calls.append("a"))
        if ctx.job.attempts == 1:
            raise RuntimeError("transient")
        ctx.step("b", lambda _out: calls.append("b"))
        return Outcome({}, None)

    queue = JobQueue(sqlite_engine, "w", backoff=Backoff(base_s=0, jitter=0))
    job_id = add_job(sqlite_engine)
    assert Worker(queue, tmp_path, runner).run(once=True) == 2
    job = _job(sqlite_engine, job_id)
    assert (job.status, job.attempts, calls) == (JobStatus.SUCCEEDED, 2, ["a", "b"])
    assert "failed: RuntimeError: transient" in job.log


def test_a_permanent_error_fails_at_once(sqlite_engine: Engine, tmp_path: Path) -> None:
    def runner(_ctx: JobContext) -> Outcome:
        raise PermanentError("no champion")

    job_id = add_job(sqlite_engine, max_attempts=3)
    Worker(JobQueue(sqlite_engine, "w"), tmp_path, runner).run(once=True)
    job = _job(sqlite_engine, job_id)
    assert (job.status, job.attempts) == (JobStatus.FAILED, 1)
    assert "no champion" in (job.error or "")


def test_a_second_worker_on_one_sqlite_database_stands_by(sqlite_engine: Engine, tmp_path: Path) -> None:
    url = sqlite_engine.url.render_as_string(hide_password=False)
    job_id = add_job(sqlite_engine)
    holder = SingleWorkerLock.for_database(url)
    assert holder is not None
    with holder:  # another worker serves this database
        assert make_worker(url, tmp_path / "jobs", two_step_runner(tmp_path / "counts")).run(once=True) == 0
        assert _job(sqlite_engine, job_id).status == JobStatus.QUEUED
    assert make_worker(url, tmp_path / "jobs", two_step_runner(tmp_path / "counts")).run(once=True) == 1
