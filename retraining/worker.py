"""The `equipoise worker` loop: claim a job, run it with a heartbeat thread renewing its lease, record the outcome.

Outcomes: success -> succeeded with the result; an exception -> back to the queue after an exponential back-off
while attempts remain, else failed with the error; a `PermanentError` -> failed at once. SIGTERM (or SIGINT)
asks for a graceful stop: no new claims, and the running job stops at its next step boundary and goes back to
the queue without using up an attempt (its finished steps are kept, so it resumes). A second signal stops at once.
A worker killed outright loses its lease when the lease expires; the next worker takes the job over.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from core.db.models import JobStatus
from retraining.queue import (
    Backoff,
    ClaimedJob,
    JobQueue,
    LeaseLost,
    PermanentError,
    SingleWorkerLock,
    WorkerLockHeld,
)
from retraining.steps import Interrupted, JobContext, Outcome

if TYPE_CHECKING:
    from core.settings import Settings

log = logging.getLogger("equipoise.worker")
Runner = Callable[[JobContext], Outcome]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Heartbeat:
    """A daemon thread renewing the job's lease every `interval` seconds; sets `lost` when the lease is gone."""

    def __init__(self, queue: JobQueue, job_id: int, interval: float, lost: threading.Event) -> None:
        self.queue, self.job_id, self.interval, self.lost = queue, job_id, interval, lost
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._done.wait(self.interval):
            try:
                if not self.queue.heartbeat(self.job_id):
                    self.lost.set()
                    return
            except Exception:  # noqa: BLE001 - a database hiccup; the next beat retries before the lease runs out
                log.warning("job %s: heartbeat failed", self.job_id, exc_info=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()


class Worker:
    def __init__(
        self,
        queue: JobQueue,
        jobs_root: Path,
        runner: Runner,
        *,
        poll_s: float = 5.0,
        heartbeat_s: float | None = None,
        lock: SingleWorkerLock | None = None,
    ) -> None:
        self.queue, self.jobs_root, self.runner = queue, jobs_root, runner
        self.poll_s = poll_s
        self.heartbeat_s = heartbeat_s or queue.lease.total_seconds() / 4
        self.lock = lock
        self.stop = threading.Event()

    def run(self, *, once: bool = False) -> int:
        """Process jobs until stopped (with `once`: until the queue has nothing claimable). Returns the number of
        jobs run."""
        if self.lock is not None and not self._acquire_lock(wait=not once):
            return 0
        processed = 0
        try:
            while not self.stop.is_set():
                try:
                    job = self.queue.claim()
                    if job is None:
                        if once:
                            break
                        self.stop.wait(self.poll_s)
                        continue
                    self.process(job)
                    processed += 1
                except SQLAlchemyError:
                    # Database unreachable: a job in hand is retried (here or elsewhere) once its lease expires.
                    log.warning("database error; retrying", exc_info=True)
                    self.stop.wait(self.poll_s)
        finally:
            if self.lock is not None:
                self.lock.release()
        return processed

    def _acquire_lock(self, *, wait: bool) -> bool:
        assert self.lock is not None
        waiting = False
        while not self.stop.is_set():
            try:
                self.lock.acquire()
                return True
            except WorkerLockHeld as held:
                if not wait:
                    log.info("%s; nothing to do", held)
                    return False
                if not waiting:
                    log.info("%s; waiting (SQLite serves one worker at a time)", held)
                    waiting = True
                self.stop.wait(self.poll_s)
        return False

    def process(self, job: ClaimedJob) -> JobStatus | None:
        """Run one claimed job to its outcome; None when the lease was lost to another worker meanwhile."""
        ctx = JobContext(job, self.queue, self.jobs_root, stop=self.stop)
        taken = f"took over from {job.previous_owner} (its lease expired)" if job.previous_owner else "claimed"
        ctx.log(f"{taken}: attempt {job.attempts}/{job.max_attempts}, engine {job.engine}")
        with Heartbeat(self.queue, job.id, self.heartbeat_s, ctx.lost):
            try:
                outcome = self.runner(ctx)
            except Interrupted:
                ctx.log("worker stopping: job released, it resumes from its finished steps")
                return JobStatus.QUEUED if self.queue.release(job.id) else None
            except LeaseLost as error:
                log.warning("%s", error)
                return None
            except PermanentError as error:
                return self._failed(ctx, f"{type(error).__name__}: {error}", retry=False)
            except Exception as error:  # noqa: BLE001 - any failure of a step is retried with back-off
                log.exception("job %s failed", job.id)
                detail = "".join(traceback.format_exception(error, limit=-8))
                return self._failed(ctx, f"{type(error).__name__}: {error}\n{detail}", retry=True)
        if not self.queue.finish(job.id, outcome.result, outcome.candidate_version):
            return None
        log.info("job %s succeeded: %s", job.id, outcome.result.get("promoted"))
        return JobStatus.SUCCEEDED

    def _failed(self, ctx: JobContext, error: str, *, retry: bool) -> JobStatus | None:
        ctx.log(f"attempt {ctx.job.attempts}/{ctx.job.max_attempts} failed: {error.splitlines()[0]}")
        status = self.queue.fail(ctx.job.id, error, retry=retry)
        if status == JobStatus.QUEUED:
            log.info("job %s: retry later (back-off)", ctx.job.id)
        return status

    def install_signal_handlers(self) -> None:
        """First SIGTERM/SIGINT: graceful stop; a second one: the default behaviour (stop now)."""

        def graceful(signum: int, _frame: FrameType | None) -> None:
            log.info("signal %s: stopping after the current step", signal.Signals(signum).name)
            self.stop.set()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)

        signal.signal(signal.SIGTERM, graceful)
        signal.signal(signal.SIGINT, graceful)


def run_worker(settings: Settings, *, once: bool = False, poll_s: float = 5.0, lease_s: float = 120.0) -> int:
    """The worker of `equipoise worker`, on the configured database and registry."""
    from core.db.session import make_engine
    from model.registry import ModelRegistry
    from retraining.pipeline import Environment, retrain

    url = str(settings.database_url)
    engine = make_engine(url)
    assert settings.registry_dir is not None  # derived from state_dir when unset
    environment = Environment.from_settings(settings, ModelRegistry(engine, settings.registry_dir))
    queue = JobQueue(engine, worker_id(), lease_s=lease_s, backoff=Backoff())
    worker = Worker(
        queue,
        settings.state_dir / "jobs",
        lambda ctx: retrain(ctx, environment),
        poll_s=poll_s,
        lock=SingleWorkerLock.for_database(url),
    )
    worker.install_signal_handlers()
    log.info("worker %s on %s", queue.owner, engine.url.render_as_string(hide_password=True))
    try:
        return worker.run(once=once)
    finally:
        engine.dispose()
