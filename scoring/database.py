"""`--log-to-db`: scored turns as Prediction rows (request_kind batch, with embeddings), written in batches.

Prediction ids are derived from the run (input, model, context), the turn and its audio channel, so a resumed run
that scores a conversation again never logs it twice. Rows are built and inserted by `core.db.crud`, as the service
does it.

The monitor watches the champion's predictions only (its collapse events queue retraining of the served model), so
the scoring model is registered the way `serve` registers its default: on a database without a champion it becomes
the champion, and its predictions are monitored; beside a champion, a different model stays a candidate and its
logged predictions wait, under its own version, until it is promoted.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import inspect

from core.db import crud
from core.db.models import ContextMode, ModelStatus, ModelVersion, Prediction, RequestKind
from core.db.session import make_engine, session_scope
from core.redaction import redaction_from_settings
from core.settings import Settings
from scoring.engine import LoggedTurn

_NAMESPACE = uuid.UUID("0b6f5c9e-35c4-4f7e-9a59-5d0b3f1e2a71")
BATCH_ROWS = 500


class DatabaseNotReady(LookupError):
    pass


class PredictionLog:
    def __init__(self, settings: Settings, run_key: str, model_version: str, causal: bool) -> None:
        self._settings = settings
        self._redaction = redaction_from_settings(settings)
        self._engine = make_engine(str(settings.database_url))
        self._run_key = run_key
        self._version = model_version
        self._context = ContextMode.CAUSAL if causal else ContextMode.BIDIRECTIONAL
        self.written = 0
        if not inspect(self._engine).has_table(Prediction.__tablename__):
            raise DatabaseNotReady("the database has no predictions table; run `equipoise db upgrade` first")

    def ensure_model_version(self, artifact_dir: Path) -> ModelStatus:
        """Register the artifact unless its version is known, and crown it when there is no champion; returns the
        version's status."""
        from model.registry import ModelRegistry

        registry = ModelRegistry(self._engine, Path(self._settings.registry_dir))
        with session_scope(self._engine) as session:
            known = session.get(ModelVersion, self._version) is not None
        if not known:
            registry.register(artifact_dir)
        registry.promote_if_vacant(self._version)
        return registry.get(self._version).status

    def write(self, turns: Sequence[LoggedTurn]) -> None:
        for start in range(0, len(turns), BATCH_ROWS):
            rows = [self._row(turn) for turn in turns[start : start + BATCH_ROWS]]
            with self._engine.begin() as connection:
                self.written += crud.insert_predictions_if_absent(connection, rows)

    def close(self) -> None:
        self._engine.dispose()

    def prediction_id(self, turn: LoggedTurn) -> uuid.UUID:
        channel = f"\x1f{turn.channel}" if turn.channel is not None else ""
        conversation = self._redaction.identifier(turn.conversation_id)  # the id as stored, not what it hides
        return uuid.uuid5(_NAMESPACE, f"{self._run_key}\x1f{conversation}\x1f{turn.turn}{channel}")

    def _row(self, turn: LoggedTurn) -> crud.Row:
        record = crud.PredictionRecord(
            id=self.prediction_id(turn),
            created_at=datetime.now(UTC),
            model_version=self._version,
            request_kind=RequestKind.BATCH,
            context_mode=self._context,
            conversation_id=turn.conversation_id,
            turn_index=turn.turn,
            speaker=turn.speaker,
            text=turn.text,
            has_audio=turn.audio_path is not None,
            audio_seconds=turn.audio_seconds,
            label=turn.label,
            label_index=turn.label_index,
            confidence=turn.confidence,
            probabilities=turn.probabilities,
            sentiment=turn.sentiment,
            latency_ms=turn.latency_ms,
            embedding=turn.embedding,
            call=crud.CallTurn(None, *turn.span_s) if turn.span_s is not None else None,
        )
        # A channel's audio is not a file of its own: the whole recording would be read back as one voice.
        audio_path = turn.audio_path if self._settings.store_audio and turn.channel is None else None
        return crud.prediction_row(record, redaction=self._redaction, audio_path=audio_path)
