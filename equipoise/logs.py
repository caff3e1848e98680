"""Logging of the long-running commands (`serve`, `worker`): one format for everything, the product's own loggers
(and uvicorn's, which carry the access log) at the chosen level, every other library at WARNING unless the level
is debug. So `info` shows what the service does, not the INFO chatter of ONNX Runtime's quantiser (it logs on
the root logger), the ONNX optimisers or Alembic.

Records are written to stderr by a thread of their own: the thread that logs (the service's event loop, which
writes the access log) only queues them, so a stderr that stalls (a full pipe to a container runtime that has
stopped reading) delays log lines instead of every request. While the writer is `QUEUE_RECORDS` behind, further
records are dropped and counted, and the writer says how many once it catches up.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import signal
import warnings
from collections.abc import Iterator
from logging.handlers import QueueHandler, QueueListener
from types import FrameType
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OWN_LOGGERS = (
    "api",
    "core",
    "equipoise",
    "migrations",
    "model",
    "monitoring",
    "retraining",
    "scoring",
    "training",
    "uvicorn",
)
LIBRARY_LEVEL = logging.WARNING
QUEUE_RECORDS = 10_000  # records waiting for the writer thread; beyond them a record is dropped, not waited for

_listener: QueueListener | None = None


def configure_logging(level: str, stream: TextIO | None = None) -> None:
    """One handler on the root logger, writing to `stream` (default: stderr); own loggers at `level`, libraries at
    WARNING (or `level` when quieter or when it is debug). Replaces any earlier configuration, so calling it twice
    is harmless."""
    chosen = logging.getLevelName(level.upper())
    if not isinstance(chosen, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_start_writer(stream))
    root.setLevel(chosen if chosen == logging.DEBUG else max(chosen, LIBRARY_LEVEL))
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(chosen)


def flush_logs() -> None:
    """Returns once every record queued so far is written."""
    if _listener is not None:
        _listener.queue.join()  # type: ignore[attr-defined]


class DroppingQueueHandler(QueueHandler):
    """Queues a record for the writer thread without waiting: with the queue full, the record is counted instead."""

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _LogWriter(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes queued records to its stream, first saying how many were dropped since it last wrote."""

    def __init__(self, queued: DroppingQueueHandler, stream: TextIO | None) -> None:
        super().__init__(stream)
        self.setFormatter(logging.Formatter(FORMAT))
        self._queued = queued
        self._reported = 0

    def emit(self, record: logging.LogRecord) -> None:
        dropped = self._queued.dropped
        if dropped > self._reported:
            message = f"{dropped - self._reported} log records dropped: stderr was not read fast enough"
            super().emit(
                logging.makeLogRecord(
                    {"name": __name__, "levelno": logging.WARNING, "levelname": "WARNING", "msg": message}
                )
            )
            self._reported = dropped
        super().emit(record)


def write_logs_before_dying_of(*signals: signal.Signals) -> None:
    """A process that dies of a signal skips `atexit`, and with it the records still queued. uvicorn raises SIGTERM
    again once it has shut down gracefully, after the handler that was there before it (this one): it writes what
    is queued, then lets the signal end the process as it would have."""
    for number in signals:
        signal.signal(number, _write_then_die)


def _write_then_die(number: int, frame: FrameType | None) -> None:
    _stop_writer()
    signal.signal(number, signal.SIG_DFL)
    signal.raise_signal(number)


class _Listener(QueueListener):
    def enqueue_sentinel(self) -> None:
        self.queue.put(self._sentinel)  # type: ignore[attr-defined]  # waits for room: the queue may be full


def _start_writer(stream: TextIO | None) -> DroppingQueueHandler:
    """A new writer thread and its handler; the previous writer, if any, stops once its records are written."""
    global _listener
    _stop_writer()
    queued = DroppingQueueHandler(queue.Queue(QUEUE_RECORDS))
    _listener = _Listener(queued.queue, _LogWriter(queued, stream))
    _listener.start()
    return queued


@atexit.register
def _stop_writer() -> None:
    """Writes what is queued, then ends the writer thread (also at exit)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Around the export and quantisation of a model, outside debug: what the libraries warn about there is not
    the user's to act on (the torch exporter's optional torchvision and its dynamic-axis naming, torch's own
    FutureWarnings, the quantiser's advice to pre-process, logged on the root logger); a real problem raises.
    torch resets its loggers' levels when it is imported, so this imports it first."""
    if logging.getLogger("equipoise").getEffectiveLevel() <= logging.DEBUG:
        yield
        return
    import torch  # noqa: F401

    exporter, root = logging.getLogger("torch.onnx"), logging.getLogger()
    previous = exporter.level
    exporter.setLevel(logging.ERROR)
    root.addFilter(_errors_only)  # a logger's filters see only records logged on it: ours use named loggers
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
            yield
    finally:
        root.removeFilter(_errors_only)
        exporter.setLevel(previous)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR
