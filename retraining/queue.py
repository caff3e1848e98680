"""The retraining job queue in the `retraining_jobs` table: claiming, leases, heartbeats, retries, logs.

A worker claims one claimable job: queued and past its `not_before`, or running under a lease that expired
(its worker died). Claiming sets the lease and counts an attempt. On PostgreSQL the candidate row is locked
with `FOR UPDATE SKIP LOCKED`, so concurrent workers each get a different job; on SQLite the claim runs in a
`BEGIN IMMEDIATE` transaction (the database's single write lock) and a worker also holds `SingleWorkerLock`.
Every later write (heartbeat, log, finish, retry) is guarded by `lease_owner`, so a worker whose lease was
taken over cannot touch the job any more: its writes report `False` and it stops.
"""

from __future__ import annotations

import fcntl
import os
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy import Connection, Engine, and_, make_url, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from core.db.models import JobStatus, JobTrigger, RetrainingJob
from core.db.session import is_sqlite

Clock = Callable[[], datetime]
JOBS = RetrainingJob.__table__
ENGINES = ("local", "ray")
TIERS = (1, 2, 3)
MAX_ERROR_CHARS = 8_000


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every time here is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class ClaimedJob:
    """A snapshot of a job as its worker claimed it."""

    id: int
    trigger: JobTrigger
    tier: int | None
    engine: str
    reason: str
    params: dict[str, Any]
    base_version: str | None
    attempts: int
    max_attempts: int
    previous_owner: str | None  # the worker whose lease expired, when this claim is a takeover


@dataclass(frozen=True)
class Backoff:
    """Delay before retry n (1-based): base * 2^(n-1), capped, stretched by up to `jitter` (a fraction)."""

    base_s: float = 30.0
    max_s: float = 3600.0
    jitter: float = 0.1

    def delay(self, attempt: int) -> timedelta:
        seconds = min(self.max_s, self.base_s * 2 ** max(attempt - 1, 0))
        return timedelta(seconds=seconds * (1 + self.jitter * random.random()))


class LeaseLost(RuntimeError):
    """Another worker took the job over (this worker's lease expired) or it was cancelled."""


class PermanentError(RuntimeError):
    """A failure that another attempt cannot fix (bad parameters, no model to retrain): failed without retry."""


class JobQueue:
    def __init__(
        self,
        engine: Engine,
        owner: str,
        *,
        lease_s: float = 120.0,
        backoff: Backoff | None = None,
        clock: Clock = utcnow,
    ) -> None:
        self.engine = engine
        self.owner = owner
        self.lease = timedelta(seconds=lease_s)
        self.backoff = backoff or Backoff()
        self.clock = clock
        self.sqlite = is_sqlite(str(engine.url))

    # -------------------------------------------------------------------------------------------- claiming

    def claim(self) -> ClaimedJob | None:
        """Take the oldest claimable job under a fresh lease, or None when there is none."""
        while True:
            with self._write_transaction() as connection:
                now = self.clock()
                row = connection.execute(self._claimable_query(now)).mappings().first()
                if row is None:
                    return None
                if row["status"] == JobStatus.RUNNING and row["attempts"] >= row["max_attempts"]:
                    # Its worker died on the last attempt: nothing is left to retry.
                    self._give_up(
                        connection,
                        row["id"],
                        now,
                        f"lease of {row['lease_owner']} expired on the "
                        f"last attempt ({row['attempts']}/{row['max_attempts']})",
                    )
                    continue
                connection.execute(
                    update(JOBS)
                    .where(JOBS.c.id == row["id"])
                    .values(
                        status=JobStatus.RUNNING,
                        lease_owner=self.owner,
                        lease_expires_at=now + self.lease,
                        heartbeat_at=now,
                        started_at=row["started_at"] or now,
                        attempts=row["attempts"] + 1,
                    )
                )
                return _claimed(row, takeover=row["status"] == JobStatus.RUNNING)

    def _claimable_query(self, now: datetime) -> Any:
        queued = and_(JOBS.c.status == JobStatus.QUEUED, or_(JOBS.c.not_before.is_(None), JOBS.c.not_before <= now))
        abandoned = and_(JOBS.c.status == JobStatus.RUNNING, JOBS.c.lease_expires_at < now)
        query = select(JOBS).where(or_(queued, abandoned)).order_by(JOBS.c.created_at, JOBS.c.id).limit(1)
        return query if self.sqlite else query.with_for_update(skip_locked=True)

    @contextmanager
    def _write_transaction(self) -> Iterator[Connection]:
        with self.engine.connect() as connection:
            if self.sqlite:
                # Take SQLite's write lock before reading, so no other claim reads the same row in between.
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.rollback()
                raise
            connection.commit()

    # -------------------------------------------------------------------------------------- owned updates

    def _owned_update(self, job_id: int, **values: Any) -> bool:
        """Update a running job this worker still owns; False when the lease was lost."""
        with self._write_transaction() as connection:
            result = connection.execute(update(JOBS).where(self._owned(job_id)).values(**values))
            return result.rowcount == 1

    def _owned(self, job_id: int) -> ColumnElement[bool]:
        return and_(JOBS.c.id == job_id, JOBS.c.lease_owner == self.owner, JOBS.c.status == JobStatus.RUNNING)

    def heartbeat(self, job_id: int) -> bool:
        now = self.clock()
        return self._owned_update(job_id, heartbeat_at=now, lease_expires_at=now + self.lease)

    def append_log(self, job_id: int, message: str) -> bool:
        line = f"{self.clock():%Y-%m-%dT%H:%M:%S}Z [{self.owner}] {message}\n"
        return self._owned_update(job_id, log=JOBS.c.log + line)

    def record(self, job_id: int, **values: Any) -> bool:
        """Set columns of the running job (tier, base_version, candidate_version, result)."""
        return self._owned_update(job_id, **values)

    def finish(self, job_id: int, result: dict[str, Any], candidate_version: str | None) -> bool:
        return self._owned_update(
            job_id,
            status=JobStatus.SUCCEEDED,
            result=result,
            candidate_version=candidate_version,
            finished_at=self.clock(),
            error=None,
            **_no_lease(),
        )

    def fail(self, job_id: int, error: str, *, retry: bool = True) -> JobStatus | None:
        """Record a failed attempt: back to the queue after a back-off while attempts remain (and `retry`), else
        failed for good. Returns the new status, or None when the lease was lost."""
        with self._write_transaction() as connection:
            row = connection.execute(select(JOBS.c.attempts, JOBS.c.max_attempts).where(self._owned(job_id))).first()
            if row is None:
                return None
            now, error = self.clock(), error[-MAX_ERROR_CHARS:]
            if retry and row.attempts < row.max_attempts:
                values = dict(status=JobStatus.QUEUED, not_before=now + self.backoff.delay(row.attempts), error=error)
            else:
                values = dict(status=JobStatus.FAILED, finished_at=now, error=error)
            connection.execute(update(JOBS).where(JOBS.c.id == job_id).values(**values, **_no_lease()))
            return values["status"]

    def release(self, job_id: int) -> bool:
        """Hand an interrupted job back (worker shutdown): queued at once, and the attempt does not count."""
        return self._owned_update(
            job_id, status=JobStatus.QUEUED, not_before=None, attempts=JOBS.c.attempts - 1, **_no_lease()
        )

    def _give_up(self, connection: Connection, job_id: int, now: datetime, error: str) -> None:
        connection.execute(
            update(JOBS)
            .where(JOBS.c.id == job_id)
            .values(status=JobStatus.FAILED, finished_at=now, error=error, log=JOBS.c.log + f"{error}\n", **_no_lease())
        )


def _no_lease() -> dict[str, Any]:
    return dict(lease_owner=None, lease_expires_at=None)


def _claimed(row: Any, *, takeover: bool) -> ClaimedJob:
    return ClaimedJob(
        id=row["id"],
        trigger=JobTrigger(row["trigger"]),
        tier=row["tier"],
        engine=row["engine"] or "local",
        reason=row["reason"],
        params=dict(row["params"] or {}),
        base_version=row["base_version"],
        attempts=row["attempts"] + 1,
        max_attempts=row["max_attempts"],
        previous_owner=row["lease_owner"] if takeover else None,
    )


# ------------------------------------------------------------------------------------------ submitting, listing


def submit_job(
    session: Session,
    *,
    reason: str,
    tier: int | None = None,
    engine: str = "local",
    params: dict[str, Any] | None = None,
    base_version: str | None = None,
    trigger: JobTrigger = JobTrigger.ADMIN,
) -> RetrainingJob:
    """Queue a job; without a base version the worker retrains the champion of the moment it starts."""
    if tier is not None and tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS} (or none: chosen from the evidence), not {tier}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, not {engine!r}")
    job = RetrainingJob(
        trigger=trigger, reason=reason, tier=tier, engine=engine, params=params or {}, base_version=base_version
    )
    session.add(job)
    session.flush()
    return job


def list_jobs(session: Session, *, status: JobStatus | None = None, limit: int = 50) -> list[RetrainingJob]:
    query = select(RetrainingJob).order_by(RetrainingJob.id.desc()).limit(limit)
    return list(session.scalars(query if status is None else query.where(RetrainingJob.status == status)))


# ------------------------------------------------------------------------------------------ SQLite worker lock


class WorkerLockHeld(RuntimeError):
    """Another worker already serves this SQLite database."""


class SingleWorkerLock:
    """An exclusive `flock` on a file beside the SQLite database, held for the worker's lifetime. The kernel
    drops it when the process dies (kill -9 included), so a successor can start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: TextIO | None = None

    @classmethod
    def for_database(cls, url: str) -> SingleWorkerLock | None:
        """The lock for a file-backed SQLite URL; None for other databases (they lock rows instead)."""
        database = make_url(url).database
        if not is_sqlite(url) or not database or database == ":memory:":
            return None
        return cls(Path(database).with_name(Path(database).name + ".worker.lock"))

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise WorkerLockHeld(f"another worker holds {self.path}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            self._handle.close()
            self._handle = None

    def __enter__(self) -> SingleWorkerLock:
        self.acquire()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.release()
