"""Prediction logging: batched, redacted, spooled through a database outage and replayed once, in order."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import OperationalError

from api.metrics import Metrics
from api.prediction_log import PredictionLogger, RowPreparer, Spool
from core.db import crud, migrate
from core.db.crud import PredictionRecord, ShadowRecord
from core.db.models import Prediction, RequestKind, ShadowPrediction
from core.db.session import make_engine, session_scope
from core.redaction import OFF, Redaction, pseudonym
from tests.api.conftest import FAKE_VERSION, add_version, count_rows, wait_for

REDACTION = Redaction(enabled=True, key=b"k" * 32)


def record(
    text: str | None = "hello",
    *,
    version: str = FAKE_VERSION,
    audio: bytes | None = None,
    conversation_id: str | None = None,
    speaker: str = "customer",
) -> PredictionRecord:
    return PredictionRecord(
        id=uuid.uuid4(),
        created_at=datetime.now(UTC),
        model_version=version,
        request_kind=RequestKind.UTTERANCE,
        context_mode=None,
        conversation_id=conversation_id,
        turn_index=None,
        speaker=speaker,
        text=text,
        has_audio=audio is not None,
        audio=audio,
        audio_seconds=1.0 if audio else None,
        label="joy",
        label_index=1,
        confidence=0.5,
        probabilities=[0.1, 0.5, 0.1, 0.1, 0.1, 0.05, 0.05],
        sentiment="positive",
        latency_ms=3.0,
        embedding=b"\0\0\x80?" * 4,
    )


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    add_version(engine)
    yield engine
    engine.dispose()


class Outage:
    """Makes the prediction insert fail like an unreachable database while `down`; records inserted ids."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.down = False
        self.inserted: list[uuid.UUID] = []
        real = crud.insert_predictions_if_absent

        def insert(connection: Connection, rows: list[dict[str, Any]]) -> None:
            if self.down:
                raise OperationalError("INSERT", {}, Exception("connection refused"))
            real(connection, rows)
            self.inserted.extend(row["id"] for row in rows)

        monkeypatch.setattr(crud, "insert_predictions_if_absent", insert)


def make_logger(engine: Engine, tmp_path: Path, **options: Any) -> tuple[PredictionLogger, Metrics]:
    metrics = Metrics()
    redaction = REDACTION if options.pop("redact_text", True) else OFF
    preparer = RowPreparer(redaction=redaction, audio_dir=options.pop("audio_dir", None))
    settings = {"flush_rows": 8, "flush_interval_s": 0.05} | options
    logger = PredictionLogger(engine, Spool(tmp_path / "spool"), preparer, metrics, **settings)
    logger.RETRY_FIRST_S = 0.05
    return logger, metrics


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    assert value is not None
    return value


def test_rows_are_written_once_with_redacted_text_and_the_hash_of_the_original(engine: Engine, tmp_path: Path) -> None:
    logger, _ = make_logger(engine, tmp_path)
    logger.start()
    original = "call me on +1 415 555 0100 or write to ann@example.com"
    records = [record(original), record(None), *(record(f"turn {i}") for i in range(20))]
    logger.submit(records)
    assert logger.flush(timeout_s=5)
    logger.close()
    with session_scope(engine) as session:
        rows = {row.id: row for row in session.scalars(select(Prediction))}
    assert set(rows) == {r.id for r in records}
    first = rows[records[0].id]
    assert first.text == "call me on [PHONE] or write to [EMAIL]" and first.text_redacted
    assert first.text_sha256 == hashlib.sha256(original.encode()).hexdigest()
    assert rows[records[1].id].text is None and not rows[records[1].id].has_text
    assert first.embedding == records[0].embedding and first.probabilities == records[0].probabilities


class CountingQueue:
    """The logger's queue, counting the waits of its thread (each a wake-up when a request's records arrive)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.waits = inner, 0

    def put(self, item: Any) -> None:
        self.inner.put(item)

    def get(self, timeout: float | None = None) -> Any:
        self.waits += 1
        return self.inner.get(timeout=timeout)

    def get_nowait(self) -> Any:
        return self.inner.get_nowait()


def test_the_thread_gathers_a_batch_without_waking_for_every_request(engine: Engine, tmp_path: Path) -> None:
    logger, _ = make_logger(engine, tmp_path, flush_rows=1000, flush_interval_s=1.0)
    counting = logger._queue = CountingQueue(logger._queue)  # type: ignore[assignment]
    logger.start()
    records = [record(f"request {i}") for i in range(40)]
    for one in records:
        logger.submit([one])
        time.sleep(0.002)
    assert logger.flush(timeout_s=5)
    logger.close()
    assert count_rows(engine) == 40
    assert counting.waits <= 3  # one wait for the first request's records, one for the flush, maybe one between


def test_speakers_and_conversation_ids_holding_personal_data_are_stored_as_keyed_pseudonyms(
    engine: Engine, tmp_path: Path
) -> None:
    logger, _ = make_logger(engine, tmp_path)
    logger.start()
    by_phone = [record(f"turn {i}", conversation_id="+1 415 555 0100", speaker="ann@example.com") for i in range(2)]
    plain = record("hello", conversation_id="ticket-81", speaker="agent")
    logger.submit([*by_phone, plain])
    logger.close()
    with session_scope(engine) as session:
        rows = {row.id: row for row in session.scalars(select(Prediction))}
    stored = [(rows[r.id].conversation_id, rows[r.id].speaker) for r in by_phone]
    expected = (pseudonym("+1 415 555 0100", REDACTION.key), pseudonym("ann@example.com", REDACTION.key))
    assert stored == [expected, expected]  # the same caller's turns stay one conversation and one speaker
    assert (rows[plain.id].conversation_id, rows[plain.id].speaker) == ("ticket-81", "agent")


def test_without_redaction_the_text_is_stored_as_sent(engine: Engine, tmp_path: Path) -> None:
    logger, _ = make_logger(engine, tmp_path, redact_text=False)
    logger.start()
    logger.submit([record("ann@example.com", conversation_id="ann@example.com")])
    logger.close()
    with session_scope(engine) as session:
        row = session.scalars(select(Prediction)).one()
    assert row.text == row.conversation_id == "ann@example.com"


def test_raw_audio_is_stored_only_when_enabled(engine: Engine, tmp_path: Path) -> None:
    logger, _ = make_logger(engine, tmp_path, audio_dir=tmp_path / "audio")
    logger.start()
    stored, text_only = record(audio=b"RIFF....WAVEfmt "), record()
    logger.submit([stored, text_only])
    logger.close()
    with session_scope(engine) as session:
        paths = dict(session.execute(select(Prediction.id, Prediction.audio_path)).all())
    assert paths[text_only.id] is None
    assert Path(paths[stored.id]).suffix == ".wav" and Path(paths[stored.id]).read_bytes() == stored.audio


def test_an_outage_spools_then_replays_every_row_once_in_order(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outage = Outage(monkeypatch)
    logger, metrics = make_logger(engine, tmp_path)
    logger.start()
    before = [record(f"before {i}") for i in range(5)]
    logger.submit(before)
    assert logger.flush(5)
    outage.down = True
    during = [record(f"during {i}") for i in range(30)]
    for start in range(0, 30, 3):
        logger.submit(during[start : start + 3])
    assert logger.flush(5)
    assert logger.spooled_rows == 30 and sample(metrics, "equipoise_log_spooled_rows") == 30
    assert list((tmp_path / "spool").glob("segment-*.jsonl")) and count_rows(engine) == 5
    outage.down = False
    after = [record(f"after {i}") for i in range(4)]
    logger.submit(after)
    wait_for(lambda: count_rows(engine) == 39)
    logger.close()
    assert outage.inserted == [r.id for r in before + during + after]
    assert logger.spooled_rows == 0 and not list((tmp_path / "spool").glob("segment-*.jsonl"))
    assert sample(metrics, "equipoise_log_spooled_rows") == 0
    assert sample(metrics, "equipoise_log_rows_total", outcome="replayed") >= 30  # `after` may queue behind


def test_replay_is_idempotent_when_rows_are_already_stored(engine: Engine, tmp_path: Path) -> None:
    logger, _ = make_logger(engine, tmp_path)
    logger.start()
    records = [record(f"r{i}") for i in range(6)]
    logger.submit(records)
    logger.close()
    # A crash after the insert committed but before the segment was deleted leaves stored rows in the spool.
    preparer = RowPreparer(redaction=REDACTION, audio_dir=None)
    Spool(tmp_path / "spool").append([preparer(r) for r in records[:4]] + [preparer(record("only in spool"))])
    restarted, _ = make_logger(engine, tmp_path)
    assert restarted.spooled_rows == 5
    restarted.start()
    wait_for(lambda: restarted.spooled_rows == 0)
    restarted.close()
    assert count_rows(engine) == 7


def test_a_torn_last_spool_line_is_skipped(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    preparer = RowPreparer(redaction=REDACTION, audio_dir=None)
    spool.append([preparer(record("kept"))])
    (segment,) = spool.segments()
    with segment.open("a") as handle:
        handle.write('{"id": "torn')
    reopened = Spool(tmp_path / "spool")
    assert reopened.rows == 1 and [row["text"] for row in reopened.read(segment)] == ["kept"]
    reopened.append([preparer(record("next"))])
    assert len(reopened.segments()) == 2  # a new process never appends behind a torn line


def test_a_row_the_database_refuses_is_set_aside_without_blocking_the_others(engine: Engine, tmp_path: Path) -> None:
    logger, metrics = make_logger(engine, tmp_path)
    logger.start()
    good, orphan = record("good"), record("orphan", version="no-such-version")
    logger.submit([good, orphan, record("good too")])
    logger.close()
    assert count_rows(engine) == 2
    (line,) = (tmp_path / "spool" / "rejected.jsonl").read_text().splitlines()
    assert json.loads(line)["row"]["id"] == str(orphan.id)
    assert sample(metrics, "equipoise_log_rows_total", outcome="rejected") == 1


def test_close_writes_what_is_still_in_memory_to_the_spool_when_the_database_is_down(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outage = Outage(monkeypatch)
    logger, _ = make_logger(engine, tmp_path, flush_interval_s=60.0, flush_rows=1000)
    logger.start()
    outage.down = True
    records = [record(f"last words {i}") for i in range(7)]
    logger.submit(records)
    logger.close()
    assert Spool(tmp_path / "spool").rows == 7
    outage.down = False
    restarted, _ = make_logger(engine, tmp_path)
    restarted.start()
    wait_for(lambda: count_rows(engine) == 7)
    restarted.close()


def test_shadow_rows_follow_their_live_rows_through_an_outage(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outage = Outage(monkeypatch)
    logger, _ = make_logger(engine, tmp_path)
    logger.start()
    outage.down = True
    live = [record(f"live {i}") for i in range(3)]
    logger.submit(live)
    shadows = [
        ShadowRecord(uuid.uuid4(), datetime.now(UTC), r.id, FAKE_VERSION, "joy", 1, 0.5, r.probabilities, None, 2.0)
        for r in live
    ]
    logger.submit(shadows)
    assert logger.flush(5) and logger.spooled_rows == 6
    outage.down = False
    wait_for(lambda: count_rows(engine, "shadow_predictions") == 3)
    logger.close()
    with session_scope(engine) as session:
        stored = {row.id: row.live_prediction_id for row in session.scalars(select(ShadowPrediction))}
    assert stored == {shadow.id: shadow.live_prediction_id for shadow in shadows} and count_rows(engine) == 3
