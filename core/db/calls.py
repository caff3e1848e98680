"""The `calls` queue: queue a call, claim one, renew its lease, finish or fail it, and queue again the calls whose
runner died. The service's call runner (api/calls.py) goes through these; batch scoring can too.

Claims are guarded updates (`UPDATE ... WHERE id = :id AND status = 'queued'`): on SQLite and on PostgreSQL two
runners that pick the same call both run the update, and only one of them changes a row. Finishing is guarded the
same way (the call is still this runner's, under its lease), and the turns' predictions are inserted in the same
transaction, so a call ends `done` once and its turns are stored once.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from core.db.crud import Row, insert_predictions_if_absent
from core.db.models import Call, CallStatus, ContextMode, utcnow

CLAIM_CANDIDATES = 8  # queued calls tried per claim, oldest first, before giving up to the next poll


@dataclass(frozen=True)
class ClaimedCall:
    id: uuid.UUID
    roles: list[str] | None
    context: ContextMode
    audio_path: str
    attempts: int


def queue_call(
    session: Session,
    call_id: uuid.UUID,
    *,
    audio_path: str,
    audio_bytes: int,
    roles: Sequence[str] | None,
    context: ContextMode,
) -> Call:
    call = Call(
        id=call_id,
        status=CallStatus.QUEUED,
        roles=list(roles) if roles is not None else None,
        context=context,
        audio_path=audio_path,
        audio_bytes=audio_bytes,
        attempts=0,
    )
    session.add(call)
    session.commit()
    return call


def get_call(session: Session, call_id: uuid.UUID) -> Call | None:
    return session.get(Call, call_id)


def count_calls(session: Session, status: CallStatus) -> int:
    return session.scalar(select(func.count()).select_from(Call).where(Call.status == status)) or 0


def claim_call(engine: Engine, owner: str, lease_s: float) -> ClaimedCall | None:
    """The oldest queued call, now `running` under `owner`'s lease; None when there is none to take."""
    with Session(engine) as session:
        candidates = session.scalars(
            select(Call.id)
            .where(Call.status == CallStatus.QUEUED)
            .order_by(Call.created_at, Call.id)
            .limit(CLAIM_CANDIDATES)
        ).all()
        for call_id in candidates:
            now = utcnow()
            claimed = session.execute(
                update(Call)
                .where(Call.id == call_id, Call.status == CallStatus.QUEUED)
                .values(
                    status=CallStatus.RUNNING,
                    owner=owner,
                    started_at=now,
                    lease_expires_at=now + timedelta(seconds=lease_s),
                    attempts=Call.attempts + 1,
                )
                .execution_options(synchronize_session=False)
            )
            session.commit()
            if claimed.rowcount == 1:
                call = session.get(Call, call_id, populate_existing=True)
                assert call is not None
                return ClaimedCall(call.id, call.roles, call.context, call.audio_path, call.attempts)
    return None


def renew_leases(engine: Engine, owner: str, call_ids: Sequence[uuid.UUID], lease_s: float) -> int:
    """Extend the lease of `owner`'s running calls among `call_ids`; how many it still holds."""
    if not call_ids:
        return 0
    with Session(engine) as session:
        renewed = session.execute(
            update(Call)
            .where(Call.id.in_(list(call_ids)), Call.owner == owner, Call.status == CallStatus.RUNNING)
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return renewed.rowcount


def finish_call(engine: Engine, call_id: uuid.UUID, owner: str, result: dict[str, Any], rows: Sequence[Row]) -> bool:
    """Mark `owner`'s running call done with `result` and insert its turns' prediction `rows`, in one transaction;
    False (and nothing stored) when the call is no longer `owner`'s (its lease ran out and it was queued again)."""
    with Session(engine) as session:
        done = session.execute(_settle(call_id, owner).values(status=CallStatus.DONE, result=result, error=None))
        if done.rowcount != 1:
            session.rollback()
            return False
        insert_predictions_if_absent(session.connection(), rows)
        session.commit()
        return True


def fail_call(engine: Engine, call_id: uuid.UUID, owner: str, error: dict[str, Any]) -> bool:
    """Mark `owner`'s running call failed with `error` (field, code, message, limit); False when it is not its."""
    with Session(engine) as session:
        failed = session.execute(_settle(call_id, owner).values(status=CallStatus.FAILED, error=error))
        session.commit()
        return failed.rowcount == 1


def _settle(call_id: uuid.UUID, owner: str) -> Any:
    return (
        update(Call)
        .where(Call.id == call_id, Call.owner == owner, Call.status == CallStatus.RUNNING)
        .values(finished_at=utcnow(), owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )


def requeue_expired(engine: Engine, max_attempts: int, now: datetime | None = None) -> tuple[int, int]:
    """Running calls whose lease ran out (their runner died): queued again, or failed once they have had
    `max_attempts` attempts (a recording that kills its runner must not kill every runner in turn). Returns
    (queued again, failed)."""
    now = now or utcnow()
    expired = (Call.status == CallStatus.RUNNING, Call.lease_expires_at < now)
    error = {"field": None, "code": "call_abandoned", "message": f"the call was abandoned {max_attempts} times"}
    with Session(engine) as session:
        failed = session.execute(
            update(Call)
            .where(*expired, Call.attempts >= max_attempts)
            .values(status=CallStatus.FAILED, error=error, finished_at=now, owner=None, lease_expires_at=None)
            .execution_options(synchronize_session=False)
        )
        queued = session.execute(
            update(Call)
            .where(*expired, Call.attempts < max_attempts)
            .values(status=CallStatus.QUEUED, owner=None, lease_expires_at=None)
            .execution_options(synchronize_session=False)
        )
        session.commit()
        return queued.rowcount, failed.rowcount
