"""The log writer thread: a stalled stderr delays log lines, never the code that logs."""

from __future__ import annotations

import io
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from equipoise import logs
from equipoise.logs import configure_logging, flush_logs
from tests.conftest import REPO_ROOT

LOGGER = logging.getLogger("api.test_logs")


class StalledStderr(io.StringIO):
    """A stderr whose writes wait until `release` is set, as a pipe nobody reads does once it is full."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.writing = threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
        self.release.wait()
        return super().write(text)


@pytest.fixture()
def stalled(restored_logging: None) -> Iterator[StalledStderr]:
    stderr = StalledStderr()
    yield stderr
    stderr.release.set()
    flush_logs()


def _log_in_thread(lines: int) -> threading.Thread:
    thread = threading.Thread(target=lambda: [LOGGER.info("line %d", i) for i in range(lines)], daemon=True)
    thread.start()
    return thread


def test_logging_returns_while_stderr_is_stalled_and_every_line_follows(stalled: StalledStderr) -> None:
    configure_logging("info", stalled)
    LOGGER.info("first")
    assert stalled.writing.wait(10)  # the writer thread is now stuck inside a write
    caller = _log_in_thread(100)
    caller.join(10)
    assert not caller.is_alive(), "logging waited for the stalled stderr"
    stalled.release.set()
    flush_logs()
    written = stalled.getvalue().splitlines()
    assert [line.split(": ", 1)[1] for line in written] == ["first", *(f"line {i}" for i in range(100))]


def test_records_beyond_the_queue_are_dropped_and_counted(
    stalled: StalledStderr, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "QUEUE_RECORDS", 10)
    configure_logging("info", stalled)
    LOGGER.info("first")
    assert stalled.writing.wait(10)
    caller = _log_in_thread(25)  # 10 wait in the queue, 15 find it full
    caller.join(10)
    assert not caller.is_alive()
    stalled.release.set()
    flush_logs()
    LOGGER.info("after")
    flush_logs()
    messages = [line.split(": ", 1)[1] for line in stalled.getvalue().splitlines()]
    notice = "15 log records dropped: stderr was not read fast enough"
    assert messages == ["first", notice, *(f"line {i}" for i in range(10)), "after"]


DYING = """
import logging, os, signal
from equipoise.logs import configure_logging, write_logs_before_dying_of
configure_logging("info")
write_logs_before_dying_of(signal.SIGTERM)
for i in range(3000):
    logging.getLogger("api.dying").info("line %d", i)
os.kill(os.getpid(), signal.SIGTERM)
"""


def test_a_process_dying_of_sigterm_writes_its_queued_lines_first() -> None:
    result = subprocess.run([sys.executable, "-c", DYING], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    status, lines = result.returncode, [line for line in result.stderr.splitlines() if " api.dying: " in line]
    assert status == -signal.SIGTERM  # it still dies of the signal, as a process manager expects
    assert len(lines) == 3000 and lines[-1].endswith("line 2999")


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_a_burst_of_records_is_written_at_once_after_the_first_wakes_the_writer(
    restored_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "LINGER_S", 1.0)  # far longer than logging the burst takes
    stream = CountingStream()
    configure_logging("info", stream)
    for i in range(50):
        LOGGER.info("line %d", i)
    flush_logs()
    assert stream.writes == 1
    assert [line.split(": ", 1)[1] for line in stream.getvalue().splitlines()] == [f"line {i}" for i in range(50)]


def test_a_record_says_what_its_arguments_were_when_it_was_logged(restored_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("info", stream)
    seen = ["before"]
    LOGGER.info("seen %s", seen)
    seen[0] = "after"  # the writer formats the line later, in its own thread
    flush_logs()
    assert stream.getvalue().rstrip().endswith("seen ['before']")


class NotAnException:
    pass


def test_a_record_that_cannot_be_formatted_leaves_the_writer_running(restored_logging: None) -> None:
    stream = io.StringIO()
    configure_logging("info", stream)
    record = logging.makeLogRecord({"name": LOGGER.name, "levelno": logging.ERROR, "levelname": "ERROR", "msg": "x"})
    record.exc_info = (RuntimeError, NotAnException(), None)  # type: ignore[assignment]  # formatting it raises
    LOGGER.handle(record)
    LOGGER.info("after")
    flush_logs()
    lines = stream.getvalue().splitlines()
    assert "could not be formatted" in lines[0] and lines[-1].endswith("api.test_logs: after")
