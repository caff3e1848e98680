"""The kind of a feedback label on SQLite and PostgreSQL: revision 0003 adds it (labels stored before it are
corrections) and removes it again, and the queries the monitor reads audit labels with."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine, inspect, text
from sqlalchemy.orm import Session

from core.db import crud, migrate
from core.db.models import FeedbackKind, ModelStatus, ModelVersion, Prediction, RequestKind
from core.db.session import make_engine, session_scope

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _feedback_columns(engine: Engine) -> set[str]:
    return {column["name"] for column in inspect(engine).get_columns("feedback")}


def _insert_labelled_prediction_at_0002(engine: Engine, prediction_id: uuid.UUID) -> None:
    """Raw SQL, as the ORM models already have the new column; SQLite stores a UUID as 32 hex digits."""
    stored_id = prediction_id if engine.dialect.name == "postgresql" else prediction_id.hex
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO model_versions (version, created_at, status, artifact_path, artifact_sha256, labels, "
                "recipe, metrics) VALUES ('v1', :t, 'champion', '-', :sha, '[]', '{}', '{}')"
            ),
            {"t": T0, "sha": "0" * 64},
        )
        connection.execute(
            text(
                "INSERT INTO predictions (id, created_at, model_version, request_kind, has_text, has_audio, "
                "text_redacted, label, label_index, confidence, probabilities, latency_ms) "
                "VALUES (:id, :t, 'v1', 'utterance', true, false, false, 'joy', 1, 0.9, '[0.1, 0.9]', 1.0)"
            ),
            {"id": stored_id, "t": T0},
        )
        connection.execute(
            text("INSERT INTO feedback (prediction_id, created_at, label) VALUES (:id, :t, 'anger')"),
            {"id": stored_id, "t": T0},
        )


def test_0003_marks_earlier_labels_as_corrections_and_goes_down_and_up(database_url: str) -> None:
    migrate.upgrade(database_url, "0002")
    engine = make_engine(database_url)
    try:
        assert "kind" not in _feedback_columns(engine)
        prediction_id = uuid.uuid4()
        _insert_labelled_prediction_at_0002(engine, prediction_id)

        migrate.upgrade(database_url, "0003")
        with session_scope(engine) as session:
            assert crud.newest_labels(session, [prediction_id], FeedbackKind.CORRECTION) == {prediction_id: "anger"}
            assert crud.newest_labels(session, [prediction_id], FeedbackKind.AUDIT) == {}

        migrate.downgrade(database_url, "0002")
        assert "kind" not in _feedback_columns(engine)
        with engine.connect() as connection:
            assert connection.execute(text("SELECT label FROM feedback")).scalars().all() == ["anger"]
        migrate.upgrade(database_url)
        assert "kind" in _feedback_columns(engine)
    finally:
        engine.dispose()


def _prediction(session: Session, version: str, minutes: int) -> Prediction:
    row = Prediction(
        id=uuid.uuid4(),
        created_at=T0 + timedelta(minutes=minutes),
        model_version=version,
        request_kind=RequestKind.UTTERANCE,
        has_text=True,
        has_audio=False,
        label="joy",
        label_index=1,
        confidence=0.9,
        probabilities=[0.1, 0.9],
        latency_ms=1.0,
    )
    session.add(row)
    return row


def test_newest_label_of_each_kind_and_counts_by_kind(database_url: str) -> None:
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    try:
        with session_scope(engine) as session:
            for version in ("v1", "v2"):
                session.add(
                    ModelVersion(version=version, status=ModelStatus.CANDIDATE, artifact_path="-", artifact_sha256="0")
                )
            session.flush()
            early, late, other = (
                _prediction(session, "v1", 0),
                _prediction(session, "v1", 10),
                _prediction(session, "v2", 0),
            )
            session.flush()
            crud.add_feedback(session, early, "sadness", None, "labeller-7", FeedbackKind.AUDIT)
            crud.add_feedback(session, early, "anger", None, "app", FeedbackKind.CORRECTION)  # newer, of another kind
            crud.add_feedback(session, late, "fear", None, None, FeedbackKind.AUDIT)
            crud.add_feedback(session, late, "disgust", None, None, FeedbackKind.AUDIT)  # the newest audit label
            crud.add_feedback(session, other, "joy", None, None)  # a correction unless told otherwise
            ids = [early.id, late.id, other.id]

        with session_scope(engine) as session:
            assert crud.newest_labels(session, ids) == {early.id: "anger", late.id: "disgust", other.id: "joy"}
            assert crud.newest_labels(session, ids, FeedbackKind.AUDIT) == {early.id: "sadness", late.id: "disgust"}
            assert crud.newest_labels(session, ids, FeedbackKind.CORRECTION) == {early.id: "anger", other.id: "joy"}
            audit, correction = FeedbackKind.AUDIT, FeedbackKind.CORRECTION
            assert crud.labelled_counts(session, "v1") == {audit: 2, correction: 1}
            assert crud.labelled_counts(session, "v1", until=T0 + timedelta(minutes=5)) == {audit: 1, correction: 1}
            assert crud.labelled_counts(session, "v2") == {audit: 0, correction: 1}
    finally:
        engine.dispose()
