"""Load test of a real `equipoise serve` process on loopback: sustained throughput, overload, recovery, log rows.

    python -m benchmarks.load --model /tmp/eqstate/default-model/equipoise-default-1.0.1 \\
        --requests 1500 --seconds 60 --overload-requests 3000 --overload-seconds 30

The service runs as a subprocess on a free 127.0.0.1 port, on a new SQLite file in a temporary directory (or, with
`--database-url postgresql+psycopg://...`, on a new database created on that server and dropped afterwards), with
the batch queue limit lowered (`--queue-limit`, EQUIPOISE_BATCH_QUEUE_LIMIT) so that overload is reachable.
Clients (benchmarks/http_client.py on uvloop, one keep-alive connection each) post real MELD utterances and whole
dialogues (both context modes), in four phases, each bounded by a request count and a duration:

1. warm-up, then sustained: `--clients` closed-loop clients (no more than the queue limit, so no request ought to
   be refused); requests/s, utterances/s, latency p50/p95/p99 of the answered requests, error rate;
2. overload: `--overload-clients` clients (far beyond the queue limit) posting back to back, ignoring
   Retry-After; how many were refused (503 `overloaded`, or 429), how fast the refusals came back, whether
   /healthz kept answering (probed every 0.25 s) and whether the process is still alive;
3. recovery: normal load again, which must all succeed;
4. log: once the prediction log has caught up, the service is stopped gracefully (which flushes the log) and the
   stored prediction ids must be exactly the ids of the utterances answered 200: none lost, none extra.

The report (markdown) goes to stdout, progress bars to stderr; the exit status is 1 when a check fails (a
refusal p99 above `--max-refusal-p99-ms` included). Figures and their reading: docs/RELIABILITY.md, "Load".
`run_phases` and `check_log` are also used by tests/hardening/test_load.py against a server of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import uvloop
from tqdm import tqdm

from benchmarks.http_client import Connection, HttpError, request_bytes
from core.processes import running_service
from core.settings import Settings, available_cores, data_dir_or_exit

OVERLOADED = "overloaded"  # the last segment of the problem type of the service's 503 for a full queue
REFUSAL_STATUSES = (429, 503)
HEALTH_PROBE_INTERVAL_S = 0.25
T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ workload


@dataclass(frozen=True)
class Job:
    """One request to send: the path, its JSON body and how many utterances it asks to score."""

    path: str
    body: dict[str, Any]
    utterances: int

    @functools.cached_property
    def payload(self) -> bytes:
        """The body as sent, encoded once: jobs are sent in rotation, and the client's CPU shares the server's."""
        return json.dumps(self.body).encode()


def meld_jobs(
    data_dir: Path, split: str = "test", dialogue_share: float = 0.2, max_turns: int = 12, seed: int = 0
) -> list[Job]:
    """Every non-empty utterance of a MELD split as an utterance request, and whole dialogues (at most `max_turns`
    turns, alternating causal and bidirectional context) mixed in so that `dialogue_share` of requests are
    dialogues; shuffled with `seed`."""
    from model.data.meld import group_dialogues, read_utterances

    utterances = [u for u in read_utterances(data_dir, split) if u.text.strip()]
    singles = [Job("/v1/predict/utterance", {"text": u.text, "speaker": u.speaker}, 1) for u in utterances]
    dialogues = []
    for number, dialogue in enumerate(group_dialogues(utterances)):
        turns = [{"text": u.text, "speaker": u.speaker} for u in dialogue.utterances[:max_turns]]
        body = {
            "turns": turns,
            "context": "causal" if number % 2 else "bidirectional",
            "conversation_id": f"meld-{split}-{dialogue.dialogue_id}",
        }
        dialogues.append(Job("/v1/predict/dialogue", body, len(turns)))
    return mix(singles, dialogues, dialogue_share, seed)


def mix(singles: list[Job], dialogues: list[Job], dialogue_share: float, seed: int = 0) -> list[Job]:
    """Shuffled singles with dialogues added (repeated if there are too few) to make `dialogue_share` of jobs."""
    if not 0 <= dialogue_share < 1:
        raise ValueError("dialogue_share must be in [0, 1)")
    wanted = round(len(singles) * dialogue_share / (1 - dialogue_share)) if dialogues else 0
    chosen = list(itertools.islice(itertools.cycle(dialogues), wanted))
    jobs = singles + chosen
    random.Random(seed).shuffle(jobs)
    return jobs


# ------------------------------------------------------------------------------------------------ measurements


@dataclass(frozen=True)
class Outcome:
    status: int  # 0: no HTTP answer (connection error, timeout)
    seconds: float
    utterances: int
    prediction_ids: tuple[str, ...]
    problem: str | None  # the problem type's last segment ("overloaded"), or the transport error's class name
    retry_after: bool
    started: float = 0.0  # time.perf_counter() when the request was sent

    @property
    def refused(self) -> bool:
        """The documented overload answer: 503 `overloaded` (with Retry-After), or a 429."""
        return self.status == 429 or (self.status == 503 and self.problem == OVERLOADED)


@dataclass
class Phase:
    name: str
    clients: int
    seconds: float
    outcomes: list[Outcome]
    health_s: list[float] = field(default_factory=list)  # /healthz latencies sampled during the phase
    health_failures: int = 0

    @property
    def accepted(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    @property
    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.refused]

    @property
    def errors(self) -> list[Outcome]:
        """Neither answered nor the documented overload refusal."""
        return [o for o in self.outcomes if o.status != 200 and not o.refused]

    @property
    def server_errors(self) -> list[Outcome]:
        """5xx other than the overload refusal, and requests that got no HTTP answer at all."""
        return [o for o in self.errors if o.status >= 500 or o.status == 0]

    @property
    def accepted_utterances(self) -> int:
        return sum(len(o.prediction_ids) for o in self.accepted)

    @property
    def error_rate(self) -> float:
        """Share of requests not answered 200 (refusals included)."""
        return 1 - len(self.accepted) / len(self.outcomes) if self.outcomes else 0.0

    def statuses(self) -> Counter[str]:
        return Counter(
            f"{o.status} {o.problem}" if o.status != 200 and o.problem else str(o.status) for o in self.outcomes
        )


class PooledPhases:
    """Figures pooled over the phases of one load (one phase per round), for a dataclass with the fields below."""

    phases: list[Phase]
    others_cpu_s: float  # CPU seconds of every other process on the machine during the phases

    @property
    def seconds(self) -> float:
        return sum(p.seconds for p in self.phases)

    @property
    def others_share(self) -> float:
        """Share of the machine's CPUs that other processes used during the phases."""
        return self.others_cpu_s / (self.seconds * available_cores()) if self.seconds else 0.0

    @property
    def requests(self) -> int:
        return sum(len(p.outcomes) for p in self.phases)

    @property
    def errors(self) -> int:
        return sum(len(p.outcomes) - len(p.accepted) for p in self.phases)

    @property
    def throughput(self) -> float:
        return sum(p.accepted_utterances for p in self.phases) / self.seconds if self.seconds else 0.0

    def latency_ms(self, q: float) -> float | None:
        return percentile_ms([o.seconds for p in self.phases for o in p.accepted], q)


def percentile_ms(seconds: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(seconds) * 1000, q)) if len(seconds) else None


def prediction_ids(body: dict[str, Any]) -> tuple[str, ...]:
    """The prediction ids of a /v1 answer: one per turn of a dialogue, or the utterance's."""
    return tuple(t["prediction_id"] for t in body["turns"]) if "turns" in body else (body["prediction_id"],)


AnswerIds = Callable[[dict[str, Any]], tuple[str, ...]]  # a 200 answer's body -> one id per utterance answered


async def _send(
    connection: Connection, job: Job, read_ids: AnswerIds = prediction_ids, timeout_s: float = 30.0
) -> Outcome:
    request = request_bytes("POST", connection.host, job.path, job.payload)
    started = time.perf_counter()
    try:
        answer = await connection.send(request, timeout_s)
    except (HttpError, OSError, TimeoutError) as error:
        return Outcome(0, time.perf_counter() - started, job.utterances, (), type(error).__name__, False, started)
    seconds = time.perf_counter() - started
    ids: tuple[str, ...] = ()
    problem = None
    if answer.status == 200:
        ids = read_ids(json.loads(answer.body))
    else:
        with contextlib.suppress(ValueError, AttributeError):
            problem = str(json.loads(answer.body).get("type", "")).rsplit("/", 1)[-1] or None
    retry_after = "retry-after" in answer.headers
    return Outcome(answer.status, seconds, job.utterances, ids, problem, retry_after, started)


async def _get_status(connection: Connection, path: str, timeout_s: float = 10.0) -> int:
    answer = await connection.send(request_bytes("GET", connection.host, path), timeout_s)
    return answer.status


async def _probe_health(url: str, phase: Phase, stop: asyncio.Event, path: str = "/healthz") -> None:
    async with Connection(url) as connection:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                ok = await _get_status(connection, path) == 200
            except (HttpError, OSError, TimeoutError):
                ok = False
            if ok:
                phase.health_s.append(time.perf_counter() - started)
            else:
                phase.health_failures += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), HEALTH_PROBE_INTERVAL_S)


async def drive(
    url: str,
    jobs: Iterator[Job],
    *,
    name: str,
    clients: int,
    max_requests: int,
    max_seconds: float,
    timeout_s: float = 30.0,
    progress: bool = True,
    read_ids: AnswerIds = prediction_ids,
    health_path: str = "/healthz",
) -> Phase:
    """`clients` closed-loop clients sending jobs back to back until `max_requests` are sent or `max_seconds`
    have passed (requests in flight then finish, within `timeout_s`). Other servers than equipoise: `read_ids`
    reads their answers, `health_path` is their health check (probed beside the load, as for equipoise)."""
    phase = Phase(name, clients, 0.0, [])
    async with contextlib.AsyncExitStack() as stack:
        # A connection per simulated caller, kept alive, connected before the clock starts: one pool shared by
        # hundreds of tasks would measure the pool's own queueing, not the service.
        connections = [await stack.enter_async_context(Connection(url)) for _ in range(clients)]
        await asyncio.gather(*(_get_status(connection, health_path) for connection in connections))
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + max_seconds
        sent = 0
        stop = asyncio.Event()

        async def client_loop(connection: Connection) -> None:
            nonlocal sent
            while sent < max_requests and loop.time() < deadline:
                sent += 1
                phase.outcomes.append(await _send(connection, next(jobs), read_ids, timeout_s))
                bar.update()

        with tqdm(total=max_requests, desc=f"{name:>9}", unit="req", disable=not progress, file=sys.stderr) as bar:
            probe = asyncio.create_task(_probe_health(url, phase, stop, health_path))
            try:
                await asyncio.gather(*(client_loop(connection) for connection in connections))
            finally:
                stop.set()
                await probe
    phase.seconds = loop.time() - started
    return phase


def run_load(load: Coroutine[Any, Any, T]) -> T:
    """Runs `load` (a `drive`) on uvloop: the load generator shares the cores it measures, and a cheaper event
    loop leaves more of them to the server."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(load)


def scrape_metrics(url: str) -> dict[str, float]:
    """The service's Prometheus samples, keyed by name with labels as written ('x_total{outcome="a"}')."""
    samples: dict[str, float] = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                samples[key] = float(value)
    return samples


def _logged_rows(metrics: dict[str, float]) -> float:
    outcomes = ("inserted", "spooled", "rejected", "lost")
    return sum(metrics.get(f'equipoise_log_rows_total{{outcome="{outcome}"}}', 0.0) for outcome in outcomes)


def server_latency_bound_ms(metrics: dict[str, float], status: str, q: float) -> float | None:
    """The upper bound of the service's own latency-histogram bucket (POST /v1/predict/*, one status) holding the
    q-th percentile: the time inside the app, without the TCP and event-loop queueing the clients also see."""
    buckets: dict[float, float] = {}
    prefix = "equipoise_http_request_duration_seconds_bucket{"
    for key, value in metrics.items():
        if key.startswith(prefix) and 'route="/v1/predict/' in key and f'status="{status}"' in key:
            bound = key.split('le="', 1)[1].split('"', 1)[0]
            buckets[float(bound)] = buckets.get(float(bound), 0.0) + value
    if not buckets or not buckets.get(float("inf")):
        return None
    total = buckets[float("inf")]
    return next(1000 * bound for bound, count in sorted(buckets.items()) if count >= q / 100 * total)


# ------------------------------------------------------------------------------------------------ the run


@dataclass(frozen=True)
class LoadPlan:
    clients: int = 8
    requests: int = 1500
    seconds: float = 60.0
    warmup_requests: int = 16
    overload_clients: int = 256
    overload_requests: int = 3000
    overload_seconds: float = 30.0
    recovery_clients: int = 4
    recovery_requests: int = 200
    recovery_seconds: float = 30.0
    timeout_s: float = 30.0
    log_timeout_s: float = 60.0
    progress: bool = True


@dataclass
class LoadResult:
    phases: dict[str, Phase]
    alive_after_overload: bool
    health_after_overload: int  # status of /healthz right after the overload phase (0: no answer)
    rejected_by_server: float  # equipoise_batch_rejected_total after the run
    log_catch_up_s: float | None  # from the end of the traffic until the log had handled every row; None: timed out
    metrics: dict[str, float]

    @property
    def accepted_ids(self) -> list[str]:
        return [i for phase in self.phases.values() for o in phase.accepted for i in o.prediction_ids]


def run_phases(url: str, jobs: Sequence[Job], plan: LoadPlan, alive: Callable[[], bool]) -> LoadResult:
    """Warm-up, sustained, overload and recovery against the service at `url`; then waits for its prediction log
    to handle every answered utterance. `alive` tells whether the service process is still running."""
    cycle = itertools.cycle(jobs)

    def phase(name: str, clients: int, requests: int, seconds: float) -> Phase:
        return run_load(
            drive(
                url,
                cycle,
                name=name,
                clients=clients,
                max_requests=requests,
                max_seconds=seconds,
                timeout_s=plan.timeout_s,
                progress=plan.progress,
            )
        )

    phases = {"warm-up": phase("warm-up", min(plan.clients, plan.warmup_requests), plan.warmup_requests, 60)}
    phases["sustained"] = phase("sustained", plan.clients, plan.requests, plan.seconds)
    phases["overload"] = phase("overload", plan.overload_clients, plan.overload_requests, plan.overload_seconds)
    still_alive = alive()
    try:
        health = httpx.get(url + "/healthz", timeout=10).status_code
    except httpx.HTTPError:
        health = 0
    phases["recovery"] = phase("recovery", plan.recovery_clients, plan.recovery_requests, plan.recovery_seconds)

    expected = sum(p.accepted_utterances for p in phases.values())
    started = time.monotonic()
    catch_up: float | None = None
    metrics: dict[str, float] = {}
    while time.monotonic() - started < plan.log_timeout_s:
        metrics = scrape_metrics(url)
        if _logged_rows(metrics) >= expected:
            catch_up = time.monotonic() - started
            break
        time.sleep(0.05)
    return LoadResult(
        phases, still_alive, health, metrics.get("equipoise_batch_rejected_total", 0.0), catch_up, metrics
    )


@dataclass(frozen=True)
class LogCheck:
    accepted: int  # utterances answered 200
    stored: int  # prediction rows written during the run
    missing: int  # answered but not stored
    unexpected: int  # stored but never answered 200
    duplicates: int  # ids answered more than once
    spooled: int  # rows left in the spool (not in the database yet)
    rejected: int  # rows the database refused, set aside in the spool directory

    @property
    def exact(self) -> bool:
        return self.stored == self.accepted and not (self.missing or self.unexpected or self.duplicates)


def stored_prediction_ids(database_url: str) -> list[str]:
    """Every prediction id in the database (none when the table does not exist yet)."""
    from sqlalchemy import inspect, select

    from core.db.models import Prediction
    from core.db.session import make_engine

    engine = make_engine(database_url)
    try:
        if not inspect(engine).has_table(Prediction.__tablename__):
            return []
        with engine.connect() as connection:
            return [str(i) for i in connection.execute(select(Prediction.id)).scalars()]
    finally:
        engine.dispose()


def check_log(database_url: str, accepted_ids: Sequence[str], state_dir: Path, before: Sequence[str] = ()) -> LogCheck:
    """Compare the rows stored since `before` (the ids present before the run) with the answered ids; run it
    after the service has stopped, when its log is flushed."""
    earlier = set(before)
    stored = [i for i in stored_prediction_ids(database_url) if i not in earlier]
    answered = {str(uuid.UUID(i)) for i in accepted_ids}
    spool = state_dir / "spool"
    segments = sorted(spool.glob("segment-*.jsonl")) if spool.is_dir() else []
    rejected = spool / "rejected.jsonl"
    return LogCheck(
        accepted=len(accepted_ids),
        stored=len(stored),
        missing=len(answered - set(stored)),
        unexpected=len(set(stored) - answered),
        duplicates=len(accepted_ids) - len(answered),
        spooled=sum(len(s.read_text().splitlines()) for s in segments),
        rejected=len(rejected.read_text().splitlines()) if rejected.is_file() else 0,
    )


def failed_checks(result: LoadResult, log: LogCheck | None, max_refusal_p99_ms: float) -> list[str]:
    """The checks of the run that failed, in words (empty when all passed)."""
    failures = []
    for phase in result.phases.values():
        if phase.server_errors:
            failures.append(f"{phase.name}: {len(phase.server_errors)} 5xx or unanswered ({dict(phase.statuses())})")
    for name in ("warm-up", "sustained", "recovery"):
        phase = result.phases[name]
        if phase.error_rate > 0:
            failures.append(f"{name}: {len(phase.outcomes) - len(phase.accepted)} requests not answered 200")
    overload = result.phases["overload"]
    refused = overload.refused
    if not refused:
        failures.append("overload: no request was refused, the overload was not reached")
    elif not all(o.retry_after for o in refused if o.status == 503):
        failures.append("overload: a 503 refusal came without Retry-After")
    refusal_p99 = percentile_ms([o.seconds for o in refused], 99)
    if refusal_p99 is not None and refusal_p99 > max_refusal_p99_ms:
        failures.append(f"overload: refusal p99 {refusal_p99:.0f} ms > {max_refusal_p99_ms:.0f} ms")
    if not result.alive_after_overload or result.health_after_overload != 200:
        failures.append("overload: the service died or stopped answering /healthz")
    if result.rejected_by_server != sum(1 for p in result.phases.values() for o in p.refused if o.status == 503):
        failures.append(f"the server counted {result.rejected_by_server:.0f} queue refusals, clients saw others")
    if result.log_catch_up_s is None:
        failures.append("log: the prediction log did not handle every answered row in time")
    if log is not None and not log.exact:
        failures.append(f"log: {log}")
    if log is not None and (log.spooled or log.rejected):
        failures.append(f"log: {log.spooled} rows left in the spool, {log.rejected} rejected")
    return failures


# ------------------------------------------------------------------------------------------------ the service


@contextlib.contextmanager
def database(url: str | None, root: Path) -> Iterator[str]:
    """A new SQLite file under `root`; or, for a PostgreSQL URL, a new database on that server (dropped
    afterwards); any other URL as given."""
    if url is None:
        yield f"sqlite:///{root / 'equipoise.db'}"
        return
    from sqlalchemy import create_engine, make_url, text

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        yield url
        return
    admin = create_engine(parsed.set(drivername="postgresql+psycopg"), isolation_level="AUTOCOMMIT")
    name = f"equipoise_load_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield parsed.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# ------------------------------------------------------------------------------------------------ report


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def render(
    result: LoadResult,
    log: LogCheck | None,
    exit_status: int | None,
    failures: list[str],
    context: dict[str, str],
) -> str:
    lines = ["# Equipoise load test", ""]
    lines += [f"- {key}: {value}" for key, value in context.items()]
    lines += [
        "",
        "| phase | clients | requests | wall s | req/s | utt/s | 200 | refused (503/429) | other errors | "
        "error rate | p50 ms | p95 ms | p99 ms | refusal p50 ms | refusal p99 ms |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for phase in result.phases.values():
        accepted = [o.seconds for o in phase.accepted]
        refused = [o.seconds for o in phase.refused]
        lines.append(
            f"| {phase.name} | {phase.clients} | {len(phase.outcomes)} | {phase.seconds:.1f} | "
            f"{len(phase.accepted) / phase.seconds:,.1f} | {phase.accepted_utterances / phase.seconds:,.1f} | "
            f"{len(phase.accepted)} | {len(phase.refused)} | {len(phase.errors)} | {phase.error_rate:.2%} | "
            f"{_ms(percentile_ms(accepted, 50))} | {_ms(percentile_ms(accepted, 95))} | "
            f"{_ms(percentile_ms(accepted, 99))} | {_ms(percentile_ms(refused, 50))} | "
            f"{_ms(percentile_ms(refused, 99))} |"
        )
    overload = result.phases["overload"]
    lines += [
        "",
        "req/s and utt/s count answered (200) requests and their utterances; latencies are client-side, of the 200 "
        "answers (p50/p95/p99) and of the refusals.",
        "",
        "## Overload",
        "",
        f"- answers: {dict(sorted(overload.statuses().items()))}",
        f"- refused by the server's queue (equipoise_batch_rejected_total): {result.rejected_by_server:.0f}",
        f"- refusal p99 inside the app (the service's latency histogram, bucket bound): "
        f"≤ {_ms(server_latency_bound_ms(result.metrics, '503', 99))} ms; the client-side figure adds the TCP and "
        "event-loop queueing of all the concurrent connections",
        f"- /healthz during overload: {len(overload.health_s)} probes answered, {overload.health_failures} failed, "
        f"p99 {_ms(percentile_ms(overload.health_s, 99))} ms, max {_ms(percentile_ms(overload.health_s, 100))} ms",
        f"- process alive after overload: {result.alive_after_overload}; /healthz then: {result.health_after_overload}",
        "",
        "## Prediction log",
        "",
        f"- log caught up {result.log_catch_up_s:.2f} s after the last answer"
        if result.log_catch_up_s is not None
        else "- the log did NOT catch up in time",
    ]
    if log is not None:
        lines += [
            f"- utterances answered 200: {log.accepted}; rows stored: {log.stored}; missing: {log.missing}; "
            f"unexpected: {log.unexpected}; duplicate ids: {log.duplicates}; left in spool: {log.spooled}; "
            f"rejected: {log.rejected}",
        ]
    if exit_status is not None:
        lines.append(f"- service exit status after SIGTERM: {exit_status} (0 or -15: clean)")
    lines += ["", "## Verdict", ""]
    lines += [f"- FAIL: {failure}" for failure in failures] or ["- PASS: every check held"]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ command line


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model artifact directory to serve")
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--split", default="test", help="MELD split to post (default test)")
    parser.add_argument("--dialogue-share", type=float, default=0.2, help="share of dialogue requests (default 0.2)")
    parser.add_argument("--max-turns", type=int, default=12, help="turns per posted dialogue at most (default 12)")
    parser.add_argument("--database-url", default=None, help="PostgreSQL server to create a database on")
    plan = LoadPlan()
    parser.add_argument("--clients", type=int, default=plan.clients, help="sustained clients")
    parser.add_argument("--requests", type=int, default=plan.requests, help="sustained requests at most")
    parser.add_argument("--seconds", type=float, default=plan.seconds, help="sustained duration at most")
    parser.add_argument("--overload-clients", type=int, default=plan.overload_clients)
    parser.add_argument("--overload-requests", type=int, default=plan.overload_requests)
    parser.add_argument("--overload-seconds", type=float, default=plan.overload_seconds)
    parser.add_argument("--recovery-clients", type=int, default=plan.recovery_clients)
    parser.add_argument("--recovery-requests", type=int, default=plan.recovery_requests)
    parser.add_argument("--recovery-seconds", type=float, default=plan.recovery_seconds)
    parser.add_argument("--queue-limit", type=int, default=32, help="EQUIPOISE_BATCH_QUEUE_LIMIT for the run")
    parser.add_argument("--batch-max-size", type=int, default=None, help="EQUIPOISE_BATCH_MAX_SIZE (default: its)")
    parser.add_argument("--batch-max-wait-ms", type=float, default=None, help="EQUIPOISE_BATCH_MAX_WAIT_MS")
    parser.add_argument("--intra-op-threads", type=int, default=0, help="ONNX Runtime threads (0: its default)")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32")
    parser.add_argument("--log-level", default="info", help="service log level (info keeps the access log)")
    parser.add_argument("--max-refusal-p99-ms", type=float, default=2000.0, help="a slower refusal p99 fails")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--output", type=Path, default=None, help="also write the report to this file")
    args = parser.parse_args(argv)
    if args.clients > args.queue_limit or args.recovery_clients > args.queue_limit:
        parser.error("--clients and --recovery-clients must not exceed --queue-limit (those phases must not overload)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    jobs = meld_jobs(data_dir_or_exit(args.data_dir), args.split, args.dialogue_share, args.max_turns, args.seed)
    plan = LoadPlan(
        clients=args.clients,
        requests=args.requests,
        seconds=args.seconds,
        overload_clients=args.overload_clients,
        overload_requests=args.overload_requests,
        overload_seconds=args.overload_seconds,
        recovery_clients=args.recovery_clients,
        recovery_requests=args.recovery_requests,
        recovery_seconds=args.recovery_seconds,
        progress=not args.no_progress,
    )
    settings = {
        "default_model_dir": str(args.model.resolve()),
        "shipped_default": "false",
        "device": "cpu",
        "intra_op_threads": str(args.intra_op_threads),
        "precision": args.precision,
        "batch_queue_limit": str(args.queue_limit),
        "log_level": args.log_level,
    }
    if args.batch_max_size is not None:
        settings["batch_max_size"] = str(args.batch_max_size)
    if args.batch_max_wait_ms is not None:
        settings["batch_max_wait_ms"] = str(args.batch_max_wait_ms)
    with tempfile.TemporaryDirectory(prefix="equipoise-load-") as work, database(args.database_url, Path(work)) as url:
        state_dir = Path(work) / "state"
        before = stored_prediction_ids(url)
        service_settings = settings | {"database_url": url, "state_dir": str(state_dir)}
        with running_service(service_settings, state_dir / "server.log") as server:
            result = run_phases(server.url, jobs, plan, server.process.alive)
            exit_status = server.process.stop()  # graceful: the prediction log is flushed
        log = check_log(url, result.accepted_ids, state_dir, before)
        database_kind = url.split(":", 1)[0].split("+", 1)[0]
    failures = failed_checks(result, log, args.max_refusal_p99_ms)
    if exit_status not in (0, -signal.SIGTERM):
        failures.append(f"the service exited with {exit_status} after SIGTERM")
    dialogues = sum(1 for job in jobs if job.path.endswith("dialogue"))
    defaults = Settings.model_fields
    batch_size = args.batch_max_size or defaults["batch_max_size"].default
    batch_wait_ms = (
        args.batch_max_wait_ms if args.batch_max_wait_ms is not None else defaults["batch_max_wait_ms"].default
    )
    context = {
        "command": "python -m benchmarks.load " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, load average (1 min) {load_before:.1f} "
        f"before the run, {os.getloadavg()[0]:.1f} after",
        "model": f"{args.model.name} ({args.precision}, CPU, intra-op threads {args.intra_op_threads or 'auto'})",
        "service": f"queue limit {args.queue_limit}, batch max size {batch_size}, batch max wait {batch_wait_ms} ms, "
        f"{database_kind}, log level {args.log_level}",
        "workload": f"MELD {args.split}: {len(jobs) - dialogues} utterance requests and {dialogues} dialogue requests "
        f"(≤ {args.max_turns} turns, causal and bidirectional) in rotation",
    }
    report = render(result, log, exit_status, failures, context)
    print(report)
    if args.output is not None:
        args.output.write_text(report, encoding="utf-8")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
