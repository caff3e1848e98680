"""The typed queries of the product, one home for each: API keys, the prediction row and its idempotent insert
(with the shadow prediction row of api/shadow.py), feedback (and the newest label of each prediction, by kind),
retraining jobs and the retention purge. The service, batch scoring, the CLI, the monitor and the worker all go
through these."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Connection, Subquery, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from core.db.models import (
    ApiKey,
    Call,
    CallStatus,
    ContextMode,
    Feedback,
    FeedbackKind,
    JobTrigger,
    Prediction,
    RequestKind,
    RetrainingJob,
    Role,
    ShadowPrediction,
)
from core.redaction import Redaction, text_sha256
from core.text import is_present

KEY_PREFIX = "eqp_"

Row = dict[str, Any]


def hash_key(raw_key: str) -> str:
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def create_api_key(session: Session, name: str, role: Role) -> tuple[ApiKey, str]:
    """Store a new key's hash; the raw key is returned once and never stored."""
    raw = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(name=name, prefix=raw[: len(KEY_PREFIX) + 6], key_sha256=hash_key(raw), role=role)
    session.add(key)
    session.flush()
    return key, raw


def list_api_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


def revoke_api_key(session: Session, name: str) -> bool:
    key = session.scalar(select(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)))
    if key is None:
        return False
    key.revoked_at = datetime.now(UTC)
    return True


def find_active_key(session: Session, raw_key: str) -> ApiKey | None:
    """Look a key up by hash, then confirm with a constant-time comparison."""
    digest = hash_key(raw_key)
    key = session.scalar(select(ApiKey).where(ApiKey.key_sha256 == digest, ApiKey.revoked_at.is_(None)))
    if key is None or not hmac.compare_digest(key.key_sha256, digest):
        return None
    return key


@dataclass(frozen=True)
class PredictionRecord:
    """One scored turn as its producer knows it (the original text), whether the service or batch scoring."""

    id: uuid.UUID
    created_at: datetime
    model_version: str
    request_kind: RequestKind
    context_mode: ContextMode | None
    conversation_id: str | None
    turn_index: int | None
    speaker: str | None
    text: str | None
    has_audio: bool
    audio_seconds: float | None
    label: str
    label_index: int
    confidence: float
    probabilities: list[float]
    sentiment: str | None
    latency_ms: float
    embedding: bytes | None
    audio: bytes | None = None  # the encoded file, for the service to store when raw-audio storage is on
    call: CallTurn | None = None  # a turn of a whole call recording (request kind `call`)


@dataclass(frozen=True)
class CallTurn:
    """Where a turn of a whole call lies: its call (a call the service processed; None for batch scoring, whose
    calls are recordings the `calls` table does not hold) and its span in the recording, in seconds."""

    call_id: uuid.UUID | None
    start_s: float
    end_s: float


def prediction_row(record: PredictionRecord, *, redaction: Redaction, audio_path: str | None) -> Row:
    """The `predictions` row of a record, JSON-ready (the service's spool writes rows as they are): the text,
    speaker and conversation id redacted as `redaction` says, the text hashed as received; `has_text` is true when
    the model saw text (`core.text`)."""
    stored_text, redacted = redaction.text(record.text)
    return {
        "id": record.id,
        "created_at": record.created_at,
        "model_version": record.model_version,
        "request_kind": record.request_kind.value,
        "context_mode": record.context_mode.value if record.context_mode else None,
        "conversation_id": redaction.identifier(record.conversation_id),
        "turn_index": record.turn_index,
        "speaker": redaction.identifier(record.speaker),
        "text": stored_text,
        "text_redacted": redacted,
        "text_sha256": text_sha256(record.text) if record.text is not None else None,
        "has_text": is_present(record.text),
        "has_audio": record.has_audio,
        "audio_path": audio_path,
        "audio_seconds": record.audio_seconds,
        "label": record.label,
        "label_index": record.label_index,
        "confidence": record.confidence,
        "probabilities": record.probabilities,
        "sentiment": record.sentiment,
        "latency_ms": record.latency_ms,
        "embedding": record.embedding,
        # Only on call turns: the service's spool holds rows written before these columns existed.
        **(asdict(record.call) if record.call is not None else {}),
    }


def insert_predictions_if_absent(connection: Connection, rows: Sequence[Row]) -> int:
    """Insert the rows whose id is not stored yet, so that replaying a batch twice stores it once; returns how
    many were new."""
    if not rows:
        return 0
    statement = _dialect(connection).insert(Prediction).on_conflict_do_nothing(index_elements=[Prediction.id])
    return len(connection.execute(statement.returning(Prediction.id), list(rows)).all())


@dataclass(frozen=True)
class ShadowRecord:
    """A live turn as a challenger scored it in shadow (api/shadow.py), linked to the live prediction."""

    id: uuid.UUID
    created_at: datetime
    live_prediction_id: uuid.UUID
    model_version: str
    label: str
    label_index: int
    confidence: float
    probabilities: list[float]
    sentiment: str | None
    latency_ms: float


LogRecord = PredictionRecord | ShadowRecord  # what the service's prediction log writes


def shadow_row(record: ShadowRecord) -> Row:
    return asdict(record)


def is_shadow_row(row: Row) -> bool:
    return "live_prediction_id" in row


def insert_logged_rows(connection: Connection, rows: Sequence[Row]) -> None:
    """The prediction log's rows, insert-if-absent: predictions first, then the shadow predictions that point at
    them (their live rows come earlier in the log, possibly in this same batch). A second shadow row for the same
    live prediction and challenger is not stored either."""
    live = [row for row in rows if not is_shadow_row(row)]
    shadow = [row for row in rows if is_shadow_row(row)]
    if live:
        insert_predictions_if_absent(connection, live)
    if shadow:
        connection.execute(_dialect(connection).insert(ShadowPrediction).on_conflict_do_nothing(), shadow)


def _dialect(connection: Connection) -> Any:
    return postgresql if connection.dialect.name == "postgresql" else sqlite


def get_prediction(session: Session, prediction_id: uuid.UUID) -> Prediction | None:
    return session.get(Prediction, prediction_id)


def add_feedback(
    session: Session,
    prediction: Prediction,
    label: str,
    sentiment: str | None,
    source: str | None,
    kind: FeedbackKind = FeedbackKind.CORRECTION,
) -> Feedback:
    feedback = Feedback(prediction=prediction, label=label, sentiment=sentiment, source=source, kind=kind)
    session.add(feedback)
    session.flush()
    return feedback


def newest_feedback_ids(*where: ColumnElement[bool], kind: FeedbackKind | None = None) -> Subquery:
    """(prediction_id, feedback_id): the newest feedback of each prediction matching `where` (a prediction's
    label is the last one sent for it), counting only labels of `kind` when given: with AUDIT, the labels that
    form a random sample of the traffic."""
    if kind is not None:
        where = (*where, Feedback.kind == kind)
    return (
        select(Feedback.prediction_id, func.max(Feedback.id).label("feedback_id"))
        .join(Prediction, Prediction.id == Feedback.prediction_id)
        .where(*where)
        .group_by(Feedback.prediction_id)
        .subquery()
    )


def newest_labels(
    session: Session, prediction_ids: Sequence[uuid.UUID], kind: FeedbackKind | None = None
) -> dict[uuid.UUID, str]:
    """The newest label (of `kind` when given) of each of `prediction_ids` that has one."""
    newest = newest_feedback_ids(Prediction.id.in_(prediction_ids), kind=kind)
    rows = session.execute(
        select(Feedback.prediction_id, Feedback.label).join(newest, Feedback.id == newest.c.feedback_id)
    )
    return {prediction_id: label for prediction_id, label in rows}


def labelled_counts(session: Session, model_version: str, *, until: datetime | None = None) -> dict[FeedbackKind, int]:
    """How many predictions of `model_version` (logged up to `until`, when given) carry at least one label of
    each kind; a prediction labelled both ways counts under both."""
    query = (
        select(Feedback.kind, func.count(func.distinct(Feedback.prediction_id)))
        .join(Prediction, Prediction.id == Feedback.prediction_id)
        .where(Prediction.model_version == model_version)
        .group_by(Feedback.kind)
    )
    if until is not None:
        query = query.where(Prediction.created_at <= until)
    found = {FeedbackKind(kind): int(count) for kind, count in session.execute(query)}
    return {kind: found.get(kind, 0) for kind in FeedbackKind}


def create_job(
    session: Session, *, reason: str, tier: int | None, params: dict[str, Any], base_version: str | None
) -> RetrainingJob:
    job = RetrainingJob(trigger=JobTrigger.ADMIN, reason=reason, tier=tier, params=params, base_version=base_version)
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: int) -> RetrainingJob | None:
    return session.get(RetrainingJob, job_id)


def purge_calls_before(session: Session, cutoff: datetime, limit: int) -> tuple[int, list[str]]:
    """Delete up to `limit` calls that ended (done or failed) before `cutoff` and whose turns' predictions are
    gone; returns the number deleted and their stored recordings (to be removed once the transaction commits)."""
    turns = select(Prediction.call_id).where(Prediction.call_id.is_not(None))
    ended = Call.status.in_([CallStatus.DONE, CallStatus.FAILED]) & (Call.finished_at < cutoff)
    chosen = session.execute(select(Call.id, Call.audio_path).where(ended, Call.id.not_in(turns)).limit(limit)).all()
    if chosen:
        session.execute(delete(Call).where(Call.id.in_([row.id for row in chosen])))
    return len(chosen), [row.audio_path for row in chosen]


def purge_predictions_before(session: Session, cutoff: datetime, limit: int) -> tuple[int, list[str]]:
    """Delete up to `limit` predictions created before `cutoff`, their feedback and their shadow predictions;
    returns the number of predictions deleted and the audio files they referenced (to be removed once the
    transaction commits)."""
    chosen = session.execute(
        select(Prediction.id, Prediction.audio_path).where(Prediction.created_at < cutoff).limit(limit)
    ).all()
    if not chosen:
        return 0, []
    ids = [row.id for row in chosen]
    session.execute(delete(Feedback).where(Feedback.prediction_id.in_(ids)))
    session.execute(delete(ShadowPrediction).where(ShadowPrediction.live_prediction_id.in_(ids)))
    session.execute(delete(Prediction).where(Prediction.id.in_(ids)))
    return len(ids), [row.audio_path for row in chosen if row.audio_path]
