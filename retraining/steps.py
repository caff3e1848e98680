"""Resumable job steps: each writes its output under `<state_dir>/jobs/<id>/<step>/` and counts as done once that
directory exists, so a retried or taken-over job skips what an earlier attempt finished.

A step builds into a private staging directory and appears by one rename, so a worker killed mid-step leaves
no half-written output behind (only a stale staging directory, removed on the next attempt).
"""

from __future__ import annotations

import logging
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retraining.queue import ClaimedJob, JobQueue, LeaseLost

log = logging.getLogger("equipoise.worker")


@dataclass(frozen=True)
class Outcome:
    """What a finished job records: its result and the candidate it registered (if any)."""

    result: dict[str, Any]
    candidate_version: str | None


class Interrupted(RuntimeError):
    """The worker is shutting down; the job goes back to the queue and resumes from its finished steps."""


class JobContext:
    """What a running job sees: its claim, its step directories, its log, and whether it must stop."""

    def __init__(
        self,
        job: ClaimedJob,
        queue: JobQueue,
        jobs_root: Path,
        *,
        stop: threading.Event | None = None,
        lost: threading.Event | None = None,
    ) -> None:
        self.job = job
        self.queue = queue
        self.root = jobs_root / str(job.id)
        self.stop = stop or threading.Event()
        self.lost = lost or threading.Event()

    def log(self, message: str) -> None:
        log.info("job %s: %s", self.job.id, message)
        if not self.queue.append_log(self.job.id, message):
            self.lost.set()

    def check(self) -> None:
        """Raise when the job must not go on: lease lost to another worker, or shutdown requested."""
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job.id}: lease lost; another worker owns it now")
        if self.stop.is_set():
            raise Interrupted(f"job {self.job.id}: worker shutting down")

    def step_dir(self, name: str) -> Path:
        return self.root / name

    def done(self, name: str) -> bool:
        return self.step_dir(name).is_dir()

    def step(self, name: str, build: Callable[[Path], None]) -> Path:
        """The output directory of step `name`, running `build(directory)` unless an earlier attempt finished it."""
        self.check()
        final = self.step_dir(name)
        if final.is_dir():
            self.log(f"step {name}: done by an earlier attempt, skipped")
            return final
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(f".{name}.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = self.root / f".{name}.staging-{uuid.uuid4().hex}"
        staging.mkdir()
        self.log(f"step {name}: started")
        try:
            build(staging)
            self.check()
            staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.log(f"step {name}: done")
        return final
