"""Logging of the long-running commands (`serve`, `worker`): one format for everything, the product's own loggers
(and uvicorn's, which carry the access log) at the chosen level, every other library at WARNING unless the level
is debug. So `info` shows what the service does, not the INFO chatter of ONNX Runtime's quantiser (it logs on
the root logger), the ONNX optimisers or Alembic.

Records are written to stderr by a thread of their own: the thread that logs (the service's event loop, which
writes the access log) only queues them, so a stderr that stalls (a full pipe to a container runtime that has
stopped reading) delays log lines instead of every request. While the writer is `QUEUE_RECORDS` behind, further
records are dropped and counted, and the writer says how many once it catches up.
The writer lets a burst of records gather for `LINGER_S` after the first wakes it and writes the burst with one
flush: woken for every access-log line, it took the interpreter's lock from the event loop once per request (with
the prediction log's thread, which did the same, 4 % of the service's throughput at 32 concurrent clients;
docs/BENCHMARKS.md "The access log and the prediction log").
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import signal
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Iterator
from logging.handlers import QueueHandler
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
LINGER_S = 0.05  # how long the writer lets a burst of records gather before writing it

_writer: _Writer | None = None


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
    if _writer is not None:
        _writer.records.join()


class DroppingQueueHandler(QueueHandler):
    """Queues a record for the writer thread without waiting: with the queue full, the record is counted instead."""

    def __init__(self, records: queue.Queue[logging.LogRecord | None]) -> None:
        super().__init__(records)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """The message is fixed now (its arguments may change later); the writer formats the rest."""
        record.msg, record.args = record.getMessage(), None
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


class _Writer:
    """The thread that writes queued records to `stream`, a burst at a time, first saying how many records were
    dropped since it last wrote. A None in the queue stops it once what came before is written."""

    def __init__(self, queued: DroppingQueueHandler, stream: TextIO | None) -> None:
        self.records: queue.Queue[logging.LogRecord | None] = queued.queue  # type: ignore[assignment]
        self._queued = queued
        self._format = logging.Formatter(FORMAT)
        self._stream = stream
        self._reported = 0
        self._thread = threading.Thread(target=self._run, name="equipoise-log-writer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.records.put(None)  # waits for room: the queue may be full
        self._thread.join()

    def _run(self) -> None:
        while True:
            burst = [self.records.get()]
            if burst[0] is not None:
                time.sleep(LINGER_S)
                burst += self._waiting()
            self._write([record for record in burst if record is not None])
            for _ in burst:
                self.records.task_done()
            if None in burst:
                return

    def _waiting(self) -> list[logging.LogRecord | None]:
        waiting = []
        with contextlib.suppress(queue.Empty):
            while True:
                waiting.append(self.records.get_nowait())
        return waiting

    def _write(self, records: list[logging.LogRecord]) -> None:
        lines = [self._line(record) for record in records]
        dropped = self._queued.dropped
        if dropped > self._reported:
            notice = f"{dropped - self._reported} log records dropped: stderr was not read fast enough"
            notice_record = logging.makeLogRecord(
                {"name": __name__, "levelno": logging.WARNING, "levelname": "WARNING", "msg": notice}
            )
            lines.insert(0, self._line(notice_record))
            self._reported = dropped
        stream = self._stream or sys.stderr
        try:
            stream.write("".join(lines))
            stream.flush()
        except Exception:  # as logging.Handler.handleError: a broken stream must not end the writer
            traceback.print_exc(file=sys.__stderr__)

    def _line(self, record: logging.LogRecord) -> str:
        try:
            return self._format.format(record) + "\n"
        except Exception as error:  # one record that cannot be formatted must not end the writer
            return f"{record.levelname} {record.name}: a log record could not be formatted: {error!r}\n"


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


def _start_writer(stream: TextIO | None) -> DroppingQueueHandler:
    """A new writer thread and its handler; the previous writer, if any, stops once its records are written."""
    global _writer
    _stop_writer()
    queued = DroppingQueueHandler(queue.Queue(QUEUE_RECORDS))
    _writer = _Writer(queued, stream)
    return queued


@atexit.register
def _stop_writer() -> None:
    """Writes what is queued, then ends the writer thread (also at exit)."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None


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
