"""The `calls` queue (core/db/calls.py) on SQLite and PostgreSQL: a queued call is claimed by one runner only, even
when many race for it; only the runner holding a call can settle it, once, with its turns stored in the same
transaction; a call whose lease ran out is queued again, and failed after its last attempt."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from core.db import migrate
from core.db.calls import claim_call, fail_call, finish_call, queue_call, renew_leases, requeue_expired
from core.db.crud import CallTurn, PredictionRecord, prediction_row
from core.db.models import Call, CallStatus, ContextMode, ModelStatus, ModelVersion, Prediction, RequestKind, utcnow
from core.db.session import make_engine
from core.redaction import Redaction

VERSION = "queue-test-1"

REDACTION = Redaction(enabled=True, key=b"k" * 32)


@pytest.fixture()
def engine(database_url: str) -> Iterator[Engine]:
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    with Session(engine) as session:
        session.add(ModelVersion(version=VERSION, status=ModelStatus.CHAMPION, artifact_path="/x", artifact_sha256="0"))
        session.commit()
    yield engine
    engine.dispose()


def queue(engine: Engine, count: int) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in range(count)]
    with Session(engine) as session:
        for call_id in ids:
            queue_call(session, call_id, audio_path="/a", audio_bytes=1, roles=["a", "b"], context=ContextMode.CAUSAL)
    return ids


def status(engine: Engine, call_id: uuid.UUID) -> Call:
    with Session(engine) as session:
        call = session.get(Call, call_id)
        assert call is not None
        return call


def row(call_id: uuid.UUID, turn: int) -> dict:
    record = PredictionRecord(
        id=uuid.uuid5(call_id, str(turn)),
        created_at=utcnow(),
        model_version=VERSION,
        request_kind=RequestKind.CALL,
        context_mode=ContextMode.BIDIRECTIONAL,
        conversation_id=str(call_id),
        turn_index=turn,
        speaker="a",
        text="hello",
        has_audio=True,
        audio_seconds=1.0,
        label="neutral",
        label_index=0,
        confidence=0.9,
        probabilities=[0.9, 0.1],
        sentiment="neutral",
        latency_ms=1.0,
        embedding=None,
        call=CallTurn(call_id, 1.0 * turn, 1.0 * turn + 0.5),
    )
    return prediction_row(record, redaction=REDACTION, audio_path=None)


def test_racing_runners_claim_each_call_once(engine: Engine) -> None:
    ids = queue(engine, 12)
    claimed: dict[str, list[uuid.UUID]] = {}

    def runner(name: str) -> None:
        mine = claimed.setdefault(name, [])
        while (call := claim_call(engine, name, lease_s=60)) is not None:
            mine.append(call.id)

    threads = [threading.Thread(target=runner, args=(f"runner-{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [call_id for calls in claimed.values() for call_id in calls]
    assert sorted(everything) == sorted(ids)  # every call, none twice
    first = status(engine, claimed["runner-0"][0] if claimed["runner-0"] else everything[0])
    assert first.status == CallStatus.RUNNING and first.attempts == 1 and first.owner and first.lease_expires_at
    assert claim_call(engine, "late", lease_s=60) is None


def test_only_the_holder_settles_a_call_and_its_turns_are_stored_once(engine: Engine) -> None:
    (call_id,) = queue(engine, 1)
    claimed = claim_call(engine, "me", lease_s=60)
    assert claimed is not None and claimed.roles == ["a", "b"] and claimed.context == ContextMode.CAUSAL
    rows = [row(call_id, turn) for turn in range(3)]
    assert not finish_call(engine, call_id, "someone-else", {"turns": []}, rows)
    assert not fail_call(engine, call_id, "someone-else", {"message": "no"})
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Prediction)) == 0
    assert finish_call(engine, call_id, "me", {"turns": [1, 2, 3]}, rows)
    assert not finish_call(engine, call_id, "me", {"turns": []}, rows)  # done once
    done = status(engine, call_id)
    assert (done.status, done.result, done.owner, done.finished_at is not None) == (
        CallStatus.DONE,
        {"turns": [1, 2, 3]},
        None,
        True,
    )
    with Session(engine) as session:
        stored = session.scalars(select(Prediction).where(Prediction.call_id == call_id)).all()
        assert sorted((p.turn_index, p.start_s, p.end_s) for p in stored) == [
            (0, 0.0, 0.5),
            (1, 1.0, 1.5),
            (2, 2.0, 2.5),
        ]


def test_a_call_whose_lease_ran_out_is_queued_again_then_failed_after_its_last_attempt(engine: Engine) -> None:
    (call_id,) = queue(engine, 1)
    for attempt in (1, 2):
        assert claim_call(engine, f"dead-{attempt}", lease_s=60) is not None
        assert renew_leases(engine, f"dead-{attempt}", [call_id], lease_s=60) == 1
        assert requeue_expired(engine, max_attempts=2) == (0, 0)  # the lease holds
        _expire(engine, call_id)
        assert renew_leases(engine, "someone-else", [call_id], lease_s=60) == 0
        assert requeue_expired(engine, max_attempts=2) == ((1, 0) if attempt == 1 else (0, 1))
    failed = status(engine, call_id)
    assert failed.status == CallStatus.FAILED and failed.attempts == 2 and failed.error["code"] == "call_abandoned"
    # The runner that lost its lease cannot settle the call any more.
    assert not finish_call(engine, call_id, "dead-2", {}, [row(call_id, 0)])


def _expire(engine: Engine, call_id: uuid.UUID) -> None:
    with Session(engine) as session:
        session.execute(update(Call).where(Call.id == call_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
