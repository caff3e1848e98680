"""A worker process for the crash and shutdown tests, with a two-step job runner that needs no model.

    python -m tests.retraining.slow_worker DATABASE_URL JOBS_ROOT COUNTS_DIR MODE

MODE "hang": step b sleeps (only kill -9 ends it); "cooperative": step b waits for the stop signal.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from core.db.session import make_engine
from retraining.queue import JobQueue, SingleWorkerLock
from retraining.steps import JobContext, Outcome
from retraining.worker import Runner, Worker, worker_id

LEASE_S = 1.0


def count(counts: Path, step: str) -> int:
    path = counts / step
    return int(path.read_text()) if path.exists() else 0


def _bump(counts: Path, step: str) -> None:
    counts.mkdir(parents=True, exist_ok=True)
    (counts / step).write_text(str(count(counts, step) + 1))


def two_step_runner(counts: Path, mode: str = "fast") -> Runner:
    def step_b(ctx: JobContext) -> None:
        if mode == "hang":
            time.sleep(600)
        elif mode == "cooperative":
            ctx.stop.wait(600)
        _bump(counts, "b")

    def run(ctx: JobContext) -> Outcome:
        ctx.step("a", lambda _out: _bump(counts, "a"))
        ctx.step("b", lambda _out: step_b(ctx))
        return Outcome({"steps": ["a", "b"]}, None)

    return run


def make_worker(url: str, jobs_root: Path, runner: Runner, owner: str | None = None) -> Worker:
    queue = JobQueue(make_engine(url), owner or worker_id(), lease_s=LEASE_S)
    return Worker(queue, jobs_root, runner, poll_s=0.1, heartbeat_s=0.2, lock=SingleWorkerLock.for_database(url))


def main(url: str, jobs_root: str, counts: str, mode: str) -> int:
    worker = make_worker(url, Path(jobs_root), two_step_runner(Path(counts), mode))
    worker.install_signal_handlers()
    worker.run(once=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
