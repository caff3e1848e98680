"""The service's throughput on the same machine and model as a batch-scoring benchmark: a real `equipoise serve`
on loopback (SQLite in a temporary directory, prediction logging on as in production, authentication off as it
is on loopback) answering MELD test dialogues on POST /v1/predict/dialogue (bidirectional context) from N
concurrent clients, each a thread with its own keep-alive connection, for a sweep of N.

Each level runs for a bounded time (and optionally a bounded number of requests); requests still in flight at
the deadline are waited for and counted, and the level's wall time runs until the last of them answers.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import groupby
from pathlib import Path
from statistics import quantiles

import httpx

from core import processes
from core.processes import Service, free_port
from model.data.turns import Turn

DIALOGUE_PATH = "/v1/predict/dialogue"


def dialogue_requests(turns: Sequence[Turn]) -> list[dict]:
    """One bidirectional dialogue request per conversation of `turns` (text-only turns; turns without text are
    left out, a dialogue without any is left out)."""
    requests = []
    for conversation_id, group in groupby(turns, key=lambda turn: turn.conversation_id):
        body = [{"text": turn.text, "speaker": turn.speaker} for turn in group if turn.text]
        if body:
            requests.append({"turns": body, "context": "bidirectional", "conversation_id": conversation_id})
    return requests


@dataclass
class Level:
    """The outcome of one concurrency level."""

    concurrency: int
    requests: int = 0
    utterances: int = 0
    failures: int = 0
    seconds: float = 0.0
    cpu_seconds: float | None = None  # the server process's CPU time (user + system) during the level
    load_average: float | None = None  # the machine's 1-minute load average at the end of the level
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def throughput(self) -> float:
        return self.utterances / self.seconds if self.seconds else 0.0

    @property
    def per_cpu_second(self) -> float | None:
        """Utterances per CPU-second of the server: less sensitive than wall time to other load on the machine."""
        return self.utterances / self.cpu_seconds if self.cpu_seconds else None

    def latency_ms(self, quantile: int) -> float:
        """The `quantile`-th percentile of request latency (0 when fewer than two requests answered)."""
        if len(self.latencies_ms) < 2:
            return self.latencies_ms[0] if self.latencies_ms else 0.0
        return quantiles(self.latencies_ms, n=100, method="inclusive")[quantile - 1]


@dataclass
class ServiceResult:
    levels: list[Level]
    model_version: str
    settings: dict[str, str]
    peak_rss_mib: float | None  # the server process's VmHWM at the end of the sweep
    logged_predictions: int | None  # rows in the predictions table after the sweep (logging check)
    answered_utterances: int = 0  # utterances answered, warm-up included: what should have been logged

    @property
    def best(self) -> Level:
        return max(self.levels, key=lambda level: level.throughput)


def server_settings(state_dir: Path, model: Path, port: int, threads: int) -> dict[str, str]:
    """The server's settings: production defaults (logging on, micro-batching, monitor) except the paths, the
    loopback port, the CPU and the model registered as champion on the new database."""
    return {
        "state_dir": str(state_dir),
        "database_url": f"sqlite:///{state_dir / 'equipoise.db'}",
        "default_model_dir": str(model),
        "host": "127.0.0.1",
        "port": str(port),
        "device": "cpu",
        "intra_op_threads": str(threads),
        "log_predictions": "true",
        "log_level": "warning",  # no access log line per request; warnings and errors still reach the log
    }


@contextlib.contextmanager
def running_service(model: Path, threads: int, work_dir: Path | None = None) -> Iterator[tuple[Service, dict]]:
    """`python -m equipoise serve` on a free loopback port with a fresh SQLite database; waits for /readyz."""
    with tempfile.TemporaryDirectory(prefix="equipoise-service-bench-", dir=work_dir) as temp:
        state_dir = Path(temp)
        port = free_port()
        settings = server_settings(state_dir, model.resolve(), port, threads)
        with processes.running_service(settings, state_dir / "server.log", port=port, timeout_s=180) as server:
            yield server, settings


def _process_peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def process_cpu_seconds(pid: int | None = None) -> float | None:
    """User + system CPU time of a process (default: this one), from /proc; None where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid or 'self'}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _count_predictions(database: Path) -> int | None:
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as connection:
            return int(connection.execute("SELECT count(*) FROM predictions").fetchone()[0])
    except sqlite3.Error:
        return None


def run_level(
    url: str, requests: Sequence[dict], concurrency: int, seconds: float, max_requests: int | None = None
) -> Level:
    """`concurrency` client threads, each sending dialogues (client k starts at dialogue k * len / concurrency
    and walks on) one after another on its own connection until `seconds` have passed or `max_requests` have
    been started in all."""
    level = Level(concurrency)
    lock = threading.Lock()
    started = [0]
    deadline = time.perf_counter() + seconds

    def take() -> bool:
        with lock:
            if time.perf_counter() >= deadline or (max_requests is not None and started[0] >= max_requests):
                return False
            started[0] += 1
            return True

    def client(index: int) -> None:
        position = index * len(requests) // concurrency
        with httpx.Client(base_url=url, timeout=120) as http:
            while take():
                body = requests[position % len(requests)]
                position += 1
                sent = time.perf_counter()
                try:
                    response = http.post(DIALOGUE_PATH, json=body)
                    ok = response.status_code == 200 and len(response.json()["turns"]) == len(body["turns"])
                except (httpx.HTTPError, ValueError, KeyError):
                    ok = False
                elapsed_ms = (time.perf_counter() - sent) * 1000
                with lock:
                    level.requests += 1
                    if ok:
                        level.utterances += len(body["turns"])
                        level.latencies_ms.append(elapsed_ms)
                    else:
                        level.failures += 1

    begin = time.perf_counter()
    threads = [threading.Thread(target=client, args=(index,), daemon=True) for index in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level.seconds = time.perf_counter() - begin
    return level


def measure_service(
    model: Path,
    turns: Sequence[Turn],
    concurrency: Sequence[int],
    seconds: float,
    *,
    threads: int = 0,
    max_requests: int | None = None,
    warmup_requests: int = 8,
    work_dir: Path | None = None,
    echo: bool = True,
) -> ServiceResult:
    """Start the service, warm it up, run every concurrency level in turn, stop it."""
    requests = dialogue_requests(turns)
    if not requests:
        raise ValueError("no dialogue to send")
    with running_service(model, threads, work_dir) as (server, settings):
        version = httpx.get(server.url + "/readyz", timeout=10).json().get("model_version", "?")
        warmup = run_level(server.url, requests, 1, seconds=float("inf"), max_requests=warmup_requests)
        levels = []
        for level_concurrency in concurrency:
            cpu_before = process_cpu_seconds(server.process.popen.pid)
            level = run_level(server.url, requests, level_concurrency, seconds, max_requests)
            cpu_after = process_cpu_seconds(server.process.popen.pid)
            if cpu_before is not None and cpu_after is not None:
                level.cpu_seconds = cpu_after - cpu_before
            level.load_average = load_average()
            if echo:
                print(
                    f"service: {level_concurrency} client(s): {level.throughput:,.1f} utterances/s "
                    f"({level.requests:,} requests, {level.failures:,} failed, {level.seconds:.1f} s, "
                    f"load average {_figure(level.load_average, '.1f')})",
                    file=sys.stderr,
                )
            levels.append(level)
        peak = _process_peak_rss_mib(server.process.popen.pid)
        time.sleep(2.0)  # the logger flushes every 0.5 s by default: let the last predictions reach the database
        logged = _count_predictions(Path(settings["state_dir"]) / "equipoise.db")
    answered = warmup.utterances + sum(level.utterances for level in levels)
    return ServiceResult(levels, version, settings, peak, logged, answered)


def _figure(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(result: ServiceResult) -> str:
    lines = [
        "| clients | requests | failed | utterances | wall s | utterances/s | p50 ms | p95 ms | server CPU s | "
        "utterances/CPU s | load avg |",
        "|" + "---|" * 11,
    ]
    best = result.best
    for level in result.levels:
        mark = " **(best)**" if level is best else ""
        lines.append(
            f"| {level.concurrency}{mark} | {level.requests:,} | {level.failures:,} | {level.utterances:,} | "
            f"{level.seconds:,.1f} | {level.throughput:,.1f} | {level.latency_ms(50):,.0f} | "
            f"{level.latency_ms(95):,.0f} | {_figure(level.cpu_seconds, ',.1f')} | "
            f"{_figure(level.per_cpu_second, ',.1f')} | {_figure(level.load_average, '.1f')} |"
        )
    return "\n".join(lines)
