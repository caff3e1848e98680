"""Whole calls off the request path: POST /v1/calls stores the recording and queues the call (core/db/calls.py);
`CallRunner`'s threads claim queued calls, run scoring.calls.process_call with the served model, and store the
turns as predictions (request kind `call`) with the result, in one transaction.

Pool size: `call_workers` (default 1). Speech to text (CTranslate2) and the model (ONNX Runtime) each use every core
for one call, so on two cores a second concurrent call would only slow the first; more workers pay off with more
cores or a GPU. A running call holds a lease that a thread renews; a call whose process died is queued again when
its lease runs out, at start-up and every renewal, by any process on the database.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from api.metrics import Metrics
from api.reload import ModelHolder
from core.db.calls import ClaimedCall, claim_call, count_calls, fail_call, finish_call, renew_leases, requeue_expired
from core.db.crud import prediction_row
from core.db.models import CallStatus, ContextMode
from core.redaction import Redaction
from core.settings import Settings
from model.audio import AudioError
from model.channels import ChannelNamesMismatch
from model.preprocess import PreprocessError
from model.speech_to_text import SpeechToText
from scoring.calls import CallEmotions, CallOptions, CallResult, process_call
from scoring.calls.mute import mute_spans
from scoring.calls.records import call_document, call_records

log = logging.getLogger(__name__)
IDLE_POLL_S = 1.0  # a worker with nothing to do looks again after this, or when a call is queued here
CALLS_PATH = "/v1/calls"
FORM_OVERHEAD_BYTES = 64 * 1024  # multipart boundaries, headers and the short fields around the recording


def call_body_limit(settings: Settings) -> int:
    """The body limit of POST /v1/calls: the largest recording, in its form."""
    return settings.max_call_bytes + FORM_OVERHEAD_BYTES


def calls_dir(settings: Settings) -> Path:
    """Where the service keeps uploaded call recordings and their timeline pictures."""
    return settings.state_dir / "calls"


def timeline_path(settings: Settings, call_id: uuid.UUID) -> Path:
    return calls_dir(settings) / f"{call_id}.png"


class CallFailed(Exception):
    """A call that cannot be processed, with what the client is told (`error` of GET /v1/calls/{id})."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error["message"])
        self.error = error


class CallRunner:
    def __init__(
        self,
        engine: Engine,
        holder: ModelHolder,
        metrics: Metrics,
        settings: Settings,
        redaction: Redaction,
        speech_to_text: Callable[[], SpeechToText] | None = None,
    ) -> None:
        self._engine, self._holder, self._metrics, self._settings = engine, holder, metrics, settings
        self._redaction = redaction
        self._load_stt = speech_to_text or (lambda: SpeechToText(settings.device, settings.intra_op_threads))
        self._stt: SpeechToText | None = None
        self._stt_lock = threading.Lock()
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._held: set[uuid.UUID] = set()
        self._held_lock = threading.Lock()
        self._stop, self._wake = threading.Event(), threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if self._settings.call_workers == 0:
            return
        self._requeue_expired()
        workers = [
            threading.Thread(target=self._work, name=f"call-worker-{i}", daemon=True)
            for i in range(self._settings.call_workers)
        ]
        self._threads = [*workers, threading.Thread(target=self._keep_leases, name="call-leases", daemon=True)]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop claiming calls. A call still being processed after `timeout_s` is left to its lease: once it runs
        out, the call is queued again."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout_s)

    def wake(self) -> None:
        """A call was queued: an idle worker looks now instead of at its next poll."""
        self._wake.set()

    def queued(self) -> int:
        with Session(self._engine) as session:
            return count_calls(session, CallStatus.QUEUED)

    def queued_for_metrics(self) -> float:
        """The queued gauge's value at a scrape; NaN while the database cannot be reached."""
        try:
            return float(self.queued())
        except SQLAlchemyError:
            return float("nan")

    def _work(self) -> None:
        while not self._stop.is_set():
            claimed = self._claim() if self._holder.current is not None else None
            if claimed is None:
                self._wake.wait(IDLE_POLL_S)
                self._wake.clear()
                continue
            self._run(claimed)

    def _claim(self) -> ClaimedCall | None:
        try:
            return claim_call(self._engine, self.owner, self._settings.call_lease_s)
        except SQLAlchemyError:  # the database is down: look again at the next poll
            log.exception("claiming a call failed")
            return None

    def _run(self, claimed: ClaimedCall) -> None:
        with self._held_lock:
            self._held.add(claimed.id)
        self._metrics.calls_running.inc()
        try:
            self._process(claimed)
        except CallFailed as failure:
            self._fail(claimed, failure.error)
        except Exception as error:  # a bug or a broken dependency: the call fails, the worker goes on
            log.exception("call %s failed", claimed.id)
            self._fail(claimed, {"field": None, "code": "internal_error", "message": f"processing failed: {error}"})
        finally:
            self._metrics.calls_running.dec()
            with self._held_lock:
                self._held.discard(claimed.id)

    def _process(self, claimed: ClaimedCall) -> None:
        model = self._holder.current
        if model is None:
            raise CallFailed({"field": None, "code": "model_unavailable", "message": "no model is loaded"})
        scorer = CallEmotions(model.runtime, causal=claimed.context == ContextMode.CAUSAL)
        started = time.perf_counter()
        result = _processed(claimed, self._speech_to_text(), scorer, CallOptions.from_settings(self._settings))
        processing_s = time.perf_counter() - started
        records = call_records(
            claimed.id,
            result,
            scorer.predictions,
            model_version=model.version,
            context=claimed.context,
            created_at=datetime.now(UTC),
            latency_ms=round(processing_s * 1000, 3),
        )
        rows = [prediction_row(r, redaction=self._redaction, audio_path=None) for r in records]
        timeline_path(self._settings, claimed.id).write_bytes(result.timeline_png())
        document = call_document(claimed.id, result, model.version)
        if self._redaction.enabled and self._settings.call_mute_redacted:
            document["recording"] = _muted(Path(claimed.audio_path), result.redacted_spans())
        started_logging = time.perf_counter()
        finished = finish_call(self._engine, claimed.id, self.owner, document, rows)
        logging_s = time.perf_counter() - started_logging
        if finished:
            self._observe(result, processing_s + logging_s, logging_s, len(records), model.version)
        else:
            log.warning("call %s: its lease ran out while it was processed; another attempt owns it", claimed.id)

    def _speech_to_text(self) -> SpeechToText:
        with self._stt_lock:
            if self._stt is None:
                self._stt = self._load_stt()
            return self._stt

    def _observe(self, result: CallResult, total_s: float, logging_s: float, turns: int, version: str) -> None:
        for stage, seconds in {**result.timings, "logging": logging_s, "total": total_s}.items():
            self._metrics.call_seconds.labels(stage).observe(seconds)
        self._metrics.call_real_time_factor.observe(total_s / max(result.duration_s, 1e-9))
        self._metrics.calls.labels("done").inc()
        for turn in result.turns:
            if turn.emotion is not None:
                self._metrics.predictions.labels(turn.emotion.label, version).inc()
        log.info("call processed: %d turns, %.1f s of audio in %.1f s", turns, result.duration_s, total_s)

    def _fail(self, claimed: ClaimedCall, error: dict[str, Any]) -> None:
        try:
            failed = fail_call(self._engine, claimed.id, self.owner, error)
        except SQLAlchemyError:  # the call stays running until its lease runs out, then is queued again
            log.exception("call %s: recording its failure failed", claimed.id)
            return
        if failed:
            self._metrics.calls.labels("failed").inc()

    def _keep_leases(self) -> None:
        every = self._settings.call_lease_s / 3
        while not self._stop.wait(every):
            with self._held_lock:
                held = list(self._held)
            try:
                renew_leases(self._engine, self.owner, held, self._settings.call_lease_s)
            except SQLAlchemyError as exc:  # the database is down or locked: try again at the next tick
                log.warning("renewing call leases failed, retried at the next tick: %s", _first_line(exc))
            self._requeue_expired()

    def _requeue_expired(self) -> None:
        try:
            queued, failed = requeue_expired(self._engine, self._settings.call_max_attempts)
        except SQLAlchemyError as exc:  # the database is down or locked (SQLite under load): at the next renewal
            log.warning("queueing abandoned calls again failed, retried at the next renewal: %s", _first_line(exc))
            return
        if queued or failed:
            log.warning("calls whose runner died: %d queued again, %d failed", queued, failed)
            self._wake.set()


def _first_line(exc: BaseException) -> str:
    """An anticipated, retried database error in one log line (SQLAlchemy's message also holds the statement)."""
    message = str(exc)
    return message.splitlines()[0] if message else type(exc).__name__


def _muted(path: Path, spans: list[tuple[float, float]]) -> dict[str, Any]:
    """Silence the redacted spans in the stored recording; one that cannot be rewritten is deleted instead, so
    that what redaction took out of the transcript is not kept in the audio."""
    try:
        return {"stored": True, "muted_s": round(mute_spans(path, spans), 3)}
    except FileNotFoundError:
        return {"stored": False, "muted_s": 0.0}
    except (OSError, RuntimeError) as error:  # soundfile's errors are RuntimeErrors
        log.error("muting the recording %s failed (%s); it is deleted", path, error)
        path.unlink(missing_ok=True)
        return {"stored": False, "muted_s": 0.0}


def _processed(claimed: ClaimedCall, stt: SpeechToText, scorer: CallEmotions, options: CallOptions) -> CallResult:
    """process_call, with a refused recording or roles turned into the error the client is told."""
    try:
        return process_call(Path(claimed.audio_path), claimed.roles, stt=stt, options=options, emotions=scorer)
    except AudioError as error:
        limit = {"limit": error.limit, "unit": error.unit} if error.limit is not None else {}
        raise CallFailed({"field": "audio", "code": error.code, "message": error.message, **limit}) from None
    except ChannelNamesMismatch as error:
        raise CallFailed({"field": "roles", "code": "roles_mismatch", "message": str(error)}) from None
    except PreprocessError as error:
        raise CallFailed({"field": None, "code": "model_input", "message": str(error)}) from None
    except FileNotFoundError:
        raise CallFailed(
            {"field": "audio", "code": "audio_missing", "message": "the stored recording is gone"}
        ) from None
