"""`python -m equipoise COMMAND` as a child process, for the demo, the benchmarks and the tests: exactly the
settings it is given (no EQUIPOISE_* variable of the caller leaks in), its output in a log file, stopped the way a
process manager stops it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from core.settings import ENV_PREFIX

T = TypeVar("T")
HOST = "127.0.0.1"


class ProcessError(RuntimeError):
    """A child process exited before its time, or what was waited for did not happen in time."""


def equipoise_environment(settings: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without its EQUIPOISE_* variables, plus `settings` (`name: value`, as in
    core.settings.Settings) as EQUIPOISE_NAME=value."""
    inherited = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
    return inherited | {f"{ENV_PREFIX}{name.upper()}": value for name, value in settings.items()}


def free_port() -> int:
    """A loopback port free now (another process could still take it before the child binds it)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def error(self, message: str) -> ProcessError:
        """`message` with the end of the log, which usually says why."""
        return ProcessError(f"{message}; {self.log_path} ends with:\n{self.log_tail()}")

    def check_alive(self) -> None:
        if not self.alive():
            raise self.error(f"the {self.name} exited with {self.popen.returncode}")

    def stop(self, timeout_s: float = 60) -> int:
        """SIGTERM, as a process manager sends it (the service and the worker stop gracefully on it), then SIGKILL
        after `timeout_s`; the exit status. uvicorn re-raises the signal after its graceful shutdown, so -SIGTERM
        is a clean exit too."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


def spawn(name: str, args: Sequence[str], settings: Mapping[str, str], log_path: Path) -> Process:
    """`python -m equipoise ARGS` in the background with exactly `settings`, stdout and stderr to `log_path`."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "equipoise", *args],
            env=equipoise_environment(settings),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Process(name, popen, log_path)


@dataclass
class Service:
    process: Process
    url: str

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, **{"timeout": 60.0} | kwargs)


@contextlib.contextmanager
def running_service(
    settings: Mapping[str, str],
    log_path: Path,
    *,
    port: int | None = None,
    ready_path: str = "/readyz",
    timeout_s: float = 300,
) -> Iterator[Service]:
    """`equipoise serve` on `port` (default: a free one) of the loopback interface, up once `ready_path` answers
    200 (/readyz: a model is loaded), stopped when the block ends."""
    port = port or free_port()
    process = spawn("service", ["serve"], {**settings, "host": HOST, "port": str(port)}, log_path)
    service = Service(process, f"http://{HOST}:{port}")
    try:
        try:
            wait_for(lambda: answers(service, ready_path), timeout_s, f"the service to answer {ready_path}", 0.2)
        except ProcessError as error:
            if process.alive():  # timed out (when it exited, check_alive's message has the log already)
                raise process.error(str(error)) from None
            raise
        yield service
    finally:
        process.stop()


def answers(service: Service, path: str) -> bool:
    """Whether `path` answers 200 now; a ProcessError if the process has exited."""
    service.process.check_alive()
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(service.url + path, timeout=5).status_code == 200
    return False


def wait_for(condition: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.5) -> T:
    """The first truthy result of `condition`, called every `interval_s`; a ProcessError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise ProcessError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
    return result
