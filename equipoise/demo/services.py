"""The demo's processes: `equipoise serve`, `equipoise worker` and one-shot CLI commands, all on the demo's own
state directory and database, on the loopback interface, each logging to a file under OUT/logs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from core import processes
from core.processes import Process, equipoise_environment, spawn


class DemoError(RuntimeError):
    """The demo cannot go on; the message says which phase failed and where its log is."""


@dataclass(frozen=True)
class Deployment:
    """Settings shared by every process of the demo (as EQUIPOISE_* variables); nothing else leaks in."""

    state_dir: Path
    database_url: str
    logs_dir: Path
    settings: Mapping[str, str] = field(default_factory=dict)

    def values(self) -> dict[str, str]:
        return {"state_dir": str(self.state_dir), "database_url": self.database_url, **self.settings}

    def command(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """`python -m equipoise ARGS` to completion; a non-zero exit is a DemoError with its output."""
        done = subprocess.run(
            [sys.executable, "-m", "equipoise", *args],
            env=equipoise_environment(self.values()),
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


@dataclass
class Service(processes.Service):
    def serving(self) -> str | None:
        response = httpx.get(f"{self.url}/v1/models", timeout=10)
        response.raise_for_status()
        return response.json()["serving"]


@contextlib.contextmanager
def running_service(deployment: Deployment, start_timeout_s: float = 300) -> Iterator[Service]:
    """`equipoise serve` on a free loopback port, ready (a model loaded) before the block runs; stopped after;
    its output in OUT/logs/service.log."""
    log_path = deployment.logs_dir / "service.log"
    with processes.running_service(deployment.values(), log_path, timeout_s=start_timeout_s) as service:
        yield Service(service.process, service.url)


@contextlib.contextmanager
def running_worker(deployment: Deployment, poll_s: float = 1.0) -> Iterator[Process]:
    """`equipoise worker`, polling the queue the whole time, as it would in a deployment; output in
    OUT/logs/worker.log."""
    worker = spawn("worker", ["worker", "--poll", str(poll_s)], deployment.values(), deployment.logs_dir / "worker.log")
    try:
        yield worker
    finally:
        worker.stop()


RETRIES_ON_503 = 5  # a 503 with Retry-After (a prediction still being written, a full queue) is tried again
RETRY_AFTER_CAP_S = 5.0


def post_json(client: httpx.Client, path: str, body: Any, what: str) -> Any:
    """POST `body`; a 503 is retried after its Retry-After, as the API asks of its clients; any other error ends
    the demo."""
    for _ in range(RETRIES_ON_503):
        response = client.post(path, json=body)
        retry_after = response.headers.get("retry-after", "")
        if response.status_code != 503 or not retry_after.isdigit():
            break
        time.sleep(min(float(retry_after), RETRY_AFTER_CAP_S))
    if response.is_error:
        raise DemoError(f"{what}: HTTP {response.status_code}: {response.text[:500]}")
    return response.json()
