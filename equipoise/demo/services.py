"""The demo's processes: `equipoise serve`, `equipoise worker` and one-shot CLI commands, all on the demo's own
state directory and database, on the loopback interface, each logging to a file under OUT/logs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from equipoise.settings import ENV_PREFIX

T = TypeVar("T")
STOP_TIMEOUT_S = 60.0


class DemoError(RuntimeError):
    """The demo cannot go on; the message says which phase failed and where its log is."""


@dataclass(frozen=True)
class Deployment:
    """Settings shared by every process of the demo (as EQUIPOISE_* variables); nothing else leaks in."""

    state_dir: Path
    database_url: str
    logs_dir: Path
    settings: Mapping[str, str] = field(default_factory=dict)

    def environment(self, **extra: str) -> dict[str, str]:
        inherited = {key: value for key, value in os.environ.items() if not key.startswith(ENV_PREFIX)}
        chosen = {"state_dir": str(self.state_dir), "database_url": self.database_url, **self.settings, **extra}
        return inherited | {f"{ENV_PREFIX}{name.upper()}": value for name, value in chosen.items()}

    def command(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """`python -m equipoise ARGS` to completion; a non-zero exit is a DemoError with its output."""
        done = subprocess.run(
            [sys.executable, "-m", "equipoise", *args],
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        with (self.logs_dir / "commands.log").open("a", encoding="utf-8") as log:
            log.write(f"$ equipoise {' '.join(args)}\n{done.stdout}{done.stderr}(exit {done.returncode})\n")
        if done.returncode != 0:
            raise DemoError(f"`equipoise {' '.join(args)}` exited with {done.returncode}:\n{done.stderr[-2000:]}")
        return done

    def spawn(self, name: str, *args: str, **extra: str) -> Process:
        """`python -m equipoise ARGS` in the background, its output in OUT/logs/NAME.log."""
        log_path = self.logs_dir / f"{name}.log"
        with log_path.open("ab") as log:
            popen = subprocess.Popen(
                [sys.executable, "-m", "equipoise", *args],
                env=self.environment(**extra),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return Process(name, popen, log_path)


@dataclass
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise DemoError(f"the {self.name} exited with {self.popen.returncode}; {self.log_path} ends with:\n{tail}")

    def stop(self) -> int | None:
        """SIGTERM (a graceful stop for both the service and the worker), then SIGKILL if it hangs."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.popen.kill()
        return self.popen.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Service:
    process: Process
    url: str

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60)

    def serving(self) -> str | None:
        response = httpx.get(f"{self.url}/v1/models", timeout=10)
        response.raise_for_status()
        return response.json()["serving"]


@contextlib.contextmanager
def running_service(deployment: Deployment, start_timeout_s: float = 300) -> Iterator[Service]:
    """`equipoise serve` on a free loopback port, ready (a model loaded) before the block runs; stopped after."""
    port = free_port()
    service = Service(
        deployment.spawn("service", "serve", host="127.0.0.1", port=str(port)), f"http://127.0.0.1:{port}"
    )
    try:
        wait_for(lambda: _ready(service), start_timeout_s, "the service to become ready")
        yield service
    finally:
        service.process.stop()


def _ready(service: Service) -> bool:
    service.process.check_alive()
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{service.url}/readyz", timeout=5).status_code == 200
    return False


@contextlib.contextmanager
def running_worker(deployment: Deployment, poll_s: float = 1.0) -> Iterator[Process]:
    """`equipoise worker`, polling the queue the whole time, as it would in a deployment."""
    worker = deployment.spawn("worker", "worker", "--poll", str(poll_s))
    try:
        yield worker
    finally:
        worker.stop()


def wait_for(condition: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.5) -> T:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
    return result


def json_or_fail(response: httpx.Response, what: str) -> Any:
    if response.is_error:
        raise DemoError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    return response.json()
