"""Serving peers side by side: equipoise beside Triton's dynamic batcher and Ray Serve, same graphs, same cores.

    python -m benchmarks.peers --model /tmp/eqstate/default-model/equipoise-default-1.0.2 --seconds 15 \\
        --json /tmp/peers.json

In one run on one host, each server alone on the machine in turn (started, measured, stopped):

- **equipoise**: `equipoise serve` with prediction logging on (SQLite in a temporary directory) and its production
  defaults otherwise; `--equipoise-variant NAME=VALUE,...` adds settings to compare beside the defaults;
- **triton**: PyTriton serving the same artifact through the same runtime code, batched by Triton's dynamic
  batcher, and **ray**: Ray Serve with `@serve.batch` (benchmarks/peer_servers.py), each over a small grid of
  settings (`--triton-grid`, `--ray-grid`: batch size, batch wait, ONNX Runtime threads per instance, instances
  or replicas), all within the same thread budget: instances x threads <= the host's cores;
- **floor**: the unbatched PyTorch pipeline of benchmarks/pipeline_baseline.py;
- **batch**: `equipoise score` on the same texts, each a one-turn conversation, in a child process, once per round
  before the round's servers, so that the ratio's two sides see the same drift of the host's speed.

Workload: every non-blank MELD utterance (train, dev and test), shuffled, as text-only requests. Each server first
answers `AGREEMENT_TEXTS` of them one at a time; its labels must equal and its probabilities match (within
`AGREEMENT_TOLERANCE`) the runtime's own in this process, or the run fails. Then a warm-up, and at each
`--concurrency` level closed-loop HTTP clients (benchmarks/load.py's `drive` over benchmarks/http_client.py on
uvloop, one keep-alive connection per client, in this process) for `--seconds` or `--requests`: utterances/s,
p50 / p95 / p99 client-side latency, the server's CPU (its whole process tree: Triton's server and stubs, Ray's
raylet, proxy and replicas) and the client's own CPU. Triton is spoken to in its Open Inference Protocol JSON over
the same HTTP client.

The verdict, read on equipoise's defaults: its concurrency-32 throughput above every peer setting's, its
concurrency-1 p50 below every peer setting's, and its concurrency-32 throughput at least `--min-ratio` of batch
scoring's turns/s (pooled over the rounds; each round's ratio is reported beside it). Markdown on stdout (progress
on stderr), JSON with `--json`; exit status 1 when a check fails.
Figures and method: docs/BENCHMARKS.md, "Serving peers".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import random
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from benchmarks.latency import machine, machine_busy_seconds, start_baseline
from benchmarks.load import Job, Phase, PooledPhases, drive, prediction_ids, run_load
from benchmarks.peer_servers import (
    RAY_HEALTH_PATH,
    RAY_PATH,
    SERVICE_BUCKET,
    TRITON_HEALTH_PATH,
    TRITON_INFER_PATH,
    PeerConfig,
    ray_answer,
    score_texts,
    triton_answer,
    triton_body,
)
from core.processes import (
    Process,
    ProcessError,
    Service,
    equipoise_environment,
    free_port,
    running_service,
    wait_for,
)
from core.settings import available_cores, data_dir_or_exit
from model.runtime import InferenceRuntime

REPO_ROOT = Path(__file__).resolve().parents[1]
UTTERANCE_PATH = "/v1/predict/utterance"
EQUIPOISE, TRITON, RAY, FLOOR = "equipoise", "triton", "ray", "floor"
PEERS = (TRITON, RAY)
AGREEMENT_TEXTS = 8
AGREEMENT_TOLERANCE = 1e-4  # the floor is PyTorch: benchmarks/pipeline_baseline.py's parity bound
TIMEOUT_S = 120.0  # per request: the unbatched floor queues 32 clients' requests one after another
START_TIMEOUT_S = 300.0
START_ATTEMPTS = 2


# ------------------------------------------------------------------------------------------------ what is measured


@dataclass(frozen=True)
class Setting:
    """One server configuration: a peer with its PeerConfig, equipoise with settings over its defaults, the floor."""

    peer: str
    config: PeerConfig | None = None
    overrides: tuple[tuple[str, str], ...] = ()  # equipoise: name=value over its defaults

    @property
    def name(self) -> str:
        if self.config is not None:
            c = self.config
            unit = "instances" if self.peer == TRITON else "replicas"
            return (
                f"{self.peer}: batch {c.max_batch_size}, wait {c.wait_ms:g} ms, {c.threads} thr x {c.instances} {unit}"
            )
        if self.peer == EQUIPOISE:
            return "equipoise: " + (", ".join(f"{k}={v}" for k, v in self.overrides) or "defaults")
        return "floor: PyTorch pipeline, unbatched"


@dataclass(frozen=True)
class Protocol:
    """How the shared client speaks to a server: request body, answer -> (label, probabilities), health path."""

    path: str
    health_path: str
    body: Callable[[str], dict[str, Any]]
    answer: Callable[[dict[str, Any], Sequence[str]], tuple[str, list[float]]]
    read_ids: Callable[[dict[str, Any]], tuple[str, ...]]

    def job(self, text: str) -> Job:
        return Job(self.path, self.body(text), 1)


def _v1_answer(body: dict[str, Any], labels: Sequence[str]) -> tuple[str, list[float]]:
    return body["emotion"], [float(body["probabilities"][label]) for label in labels]


def _label_id(answer: Callable[[dict[str, Any], Sequence[str]], tuple[str, list[float]]]) -> Callable[..., Any]:
    """Peers answer no prediction id: the label stands for it (one per utterance answered)."""
    return lambda body: (answer(body, ())[0],)


V1 = Protocol(UTTERANCE_PATH, "/healthz", lambda text: {"text": text}, _v1_answer, prediction_ids)
PROTOCOLS = {
    EQUIPOISE: V1,
    FLOOR: V1,
    TRITON: Protocol(TRITON_INFER_PATH, TRITON_HEALTH_PATH, triton_body, triton_answer, _label_id(triton_answer)),
    RAY: Protocol(RAY_PATH, RAY_HEALTH_PATH, lambda text: {"text": text}, ray_answer, _label_id(ray_answer)),
}


@dataclass
class Level(PooledPhases):
    """One setting at one concurrency: its phases (one per round) and the CPU spent meanwhile."""

    setting: Setting
    clients: int
    phases: list[Phase] = field(default_factory=list)
    server_cpu_s: float = 0.0  # the server's whole process tree
    client_cpu_s: float = 0.0  # this process: the load generator
    others_cpu_s: float = 0.0  # every other process on the machine

    def summary(self) -> dict[str, Any]:
        return {
            "setting": self.setting.name,
            "peer": self.setting.peer,
            "clients": self.clients,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 2),
            "utterances_per_s": round(self.throughput, 2),
            **{f"p{q}_ms": _round(self.latency_ms(q)) for q in (50, 95, 99)},
            "server_cpu_s": round(self.server_cpu_s, 2),
            "client_cpu_s": round(self.client_cpu_s, 2),
            "others_cpu_share": round(self.others_share, 3),
        }


@dataclass(frozen=True)
class BatchResult:
    turns: int
    wall_s: float  # the whole child process: start, model load, scoring, writing
    engine_turns_per_s: float  # what `equipoise score` reports (its run, without the process start)
    cpu_s: float
    labels_agree: bool


@dataclass
class Results:
    levels: dict[tuple[Setting, int], Level] = field(default_factory=dict)
    agreement: dict[Setting, float] = field(default_factory=dict)  # worst probability difference
    batches: list[BatchResult] = field(default_factory=list)  # one per round

    @property
    def batch_turns_per_s(self) -> float | None:
        """Batch scoring's rate pooled over the rounds: all turns over all the engine's seconds."""
        if not self.batches:
            return None
        return sum(b.turns for b in self.batches) / sum(b.turns / b.engine_turns_per_s for b in self.batches)

    def level(self, setting: Setting, clients: int) -> Level:
        return self.levels.setdefault((setting, clients), Level(setting, clients))

    def find(self, setting: Setting, clients: int) -> Level | None:
        return self.levels.get((setting, clients))


@dataclass(frozen=True)
class Plan:
    concurrency: tuple[int, ...] = (1, 32)
    seconds: float = 15.0
    requests: int = 20_000
    warmup_requests: int = 128
    progress: bool = True


# ------------------------------------------------------------------------------------------------ processes and CPU


def _proc_stat(pid: int) -> list[str] | None:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return None


def descendants(root: int) -> list[int]:
    """`root` and every process below it (Linux /proc), parents first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _proc_stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, pending = [], [root]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, []))
    return found


def _started_at(pid: int) -> str | None:
    """The process's start time in clock ticks since boot: with the pid, it names one process."""
    fields = _proc_stat(pid)
    return None if fields is None else fields[19]


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of `root` and its live descendants so far."""
    ticks = 0
    for pid in descendants(root):
        if (fields := _proc_stat(pid)) is not None:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def scores(running: Service, protocol: Protocol) -> bool:
    """Whether the server answers a prediction 200 now (a peer's health check can pass before its model is up)."""
    running.process.check_alive()
    job = protocol.job("Hello.")
    with contextlib.suppress(httpx.HTTPError):
        return httpx.post(running.url + job.path, json=job.body, timeout=10).status_code == 200
    return False


@contextlib.contextmanager
def peer_server(setting: Setting, model: Path, work: Path) -> Iterator[Service]:
    """benchmarks/peer_servers.py for `setting` on a free loopback port, started again once if its start fails
    (PyTriton's model load has failed on its handshake socket now and then); every process it started is ended
    after."""
    for attempt in range(1, START_ATTEMPTS + 1):
        with _peer_process(setting, model, work) as running:
            try:
                wait_for(lambda: scores(running, PROTOCOLS[setting.peer]), START_TIMEOUT_S, f"{setting.name} to score")
            except ProcessError as error:
                if attempt == START_ATTEMPTS:
                    raise
                print(f"{setting.name}: start {attempt} failed, starting again: {error}", file=sys.stderr)
                continue
            yield running
            return


@contextlib.contextmanager
def _peer_process(setting: Setting, model: Path, work: Path) -> Iterator[Service]:
    assert setting.config is not None
    port = free_port()
    command = [sys.executable, "-m", "benchmarks.peer_servers", setting.peer, "--artifact", str(model.resolve())]
    command += ["--port", str(port), *setting.config.args(), "--cpus", str(available_cores())]
    command += ["--side-ports", str(free_port()), str(free_port())]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    log_path = work / f"{setting.peer}-{port}.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    running = Service(Process(setting.peer, popen, log_path), f"http://127.0.0.1:{port}")
    try:
        yield running
    finally:
        children = {pid: _started_at(pid) for pid in descendants(popen.pid)[1:]}
        running.process.stop()
        for pid, started_at in children.items():  # what it left behind (a Triton stub, a Ray worker), by id
            if started_at is not None and _started_at(pid) == started_at:  # not a new process under a reused id
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def start(setting: Setting, model: Path, data_dir: Path, work: Path) -> Iterator[Service]:
    if setting.peer == EQUIPOISE:
        state = Path(tempfile.mkdtemp(prefix="state-", dir=work))  # a fresh SQLite database for every start
        settings = {
            "state_dir": str(state),
            "default_model_dir": str(model.resolve()),
            "shipped_default": "false",
            "log_predictions": "true",
            **dict(setting.overrides),
        }
        with running_service(settings, state / "server.log") as service:
            yield service
    elif setting.peer == FLOOR:
        with start_baseline(model, data_dir, work) as service:
            yield service
    else:
        with peer_server(setting, model, work) as service:
            yield service


# ------------------------------------------------------------------------------------------------ measuring


def meld_texts(data_dir: Path, seed: int) -> list[str]:
    """Every non-blank MELD utterance text of every split, shuffled with `seed`."""
    from model.data import meld

    texts = meld.texts(data_dir)
    random.Random(seed).shuffle(texts)
    return texts


@dataclass(frozen=True)
class Reference:
    """The runtime's own answers, in this process, to the agreement texts."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]  # the model's emotion names
    emotions: tuple[str, ...]
    probabilities: np.ndarray  # [N, C]

    @classmethod
    def of(cls, model: Path, texts: Sequence[str]) -> Reference:
        runtime = InferenceRuntime.load(model, device="cpu", intra_op_threads=1)
        turns = score_texts(runtime, texts)
        names = tuple(runtime.emotions.names)
        probabilities = np.stack([turn.emotion_probs for turn in turns])
        return cls(tuple(texts), names, tuple(turn.emotion for turn in turns), probabilities)


def agreement(url: str, protocol: Protocol, reference: Reference) -> float:
    """The largest probability difference between the server's answers and the reference; inf if a label differs."""
    worst = 0.0
    with httpx.Client(base_url=url, timeout=TIMEOUT_S) as client:
        for text, emotion, expected in zip(reference.texts, reference.emotions, reference.probabilities, strict=True):
            job = protocol.job(text)
            label, probabilities = protocol.answer(
                client.post(job.path, json=job.body).raise_for_status().json(), reference.labels
            )
            if label != emotion:
                return float("inf")
            worst = max(worst, float(np.abs(np.asarray(probabilities) - expected).max()))
    return worst


def run_phase(
    running: Service,
    protocol: Protocol,
    jobs: Iterator[Job],
    clients: int,
    requests: int,
    seconds: float,
    name: str,
    progress: bool,
) -> Phase:
    return run_load(
        drive(
            running.url,
            jobs,
            name=name,
            clients=clients,
            max_requests=requests,
            max_seconds=seconds,
            timeout_s=TIMEOUT_S,
            progress=progress,
            read_ids=protocol.read_ids,
            health_path=protocol.health_path,
        )
    )


def measure(
    setting: Setting, running: Service, jobs: Iterator[Job], reference: Reference, plan: Plan, results: Results
) -> None:
    protocol = PROTOCOLS[setting.peer]
    worst = agreement(running.url, protocol, reference)
    results.agreement[setting] = max(worst, results.agreement.get(setting, 0.0))
    top = max(plan.concurrency)
    run_phase(running, protocol, jobs, top, plan.warmup_requests, 60, "warm-up", plan.progress)
    pid = running.process.popen.pid
    for clients in plan.concurrency:
        level = results.level(setting, clients)
        server, client, busy = tree_cpu_seconds(pid), time.process_time(), machine_busy_seconds()
        phase = run_phase(running, protocol, jobs, clients, plan.requests, plan.seconds, f"c{clients}", plan.progress)
        server_used, client_used = tree_cpu_seconds(pid) - server, time.process_time() - client
        level.phases.append(phase)
        level.server_cpu_s += server_used
        level.client_cpu_s += client_used
        level.others_cpu_s += max(0.0, machine_busy_seconds() - busy - server_used - client_used)


def batch_scoring(model: Path, texts: Sequence[str], reference: Reference, work: Path) -> BatchResult:
    """`equipoise score` on `texts`, each a one-turn conversation, in a child process with its defaults."""
    work = Path(tempfile.mkdtemp(prefix="batch-", dir=work))  # once per round: its own files and state
    source, scored = work / "batch-input.jsonl", work / "batch-output.jsonl"
    with source.open("w", encoding="utf-8") as file:
        for number, text in enumerate(texts):
            file.write(json.dumps({"conversation_id": f"t{number}", "turn": 0, "speaker": "caller", "text": text}))
            file.write("\n")
    settings = {"state_dir": str(work / "batch-state"), "shipped_default": "false"}
    command = [sys.executable, "-m", "equipoise", "score", str(source), "--out", str(scored), "--model", str(model)]
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, env=equipoise_environment(settings), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"equipoise score exited with {done.returncode}:\n{done.stderr[-4000:]}")
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    found = re.search(r"throughput: ([\d,.]+) turns/s", done.stdout)
    if found is None:
        raise SystemExit(f"equipoise score printed no throughput:\n{done.stdout}\n{done.stderr}")
    labels = {}
    with scored.open(encoding="utf-8") as file:
        for line in file:
            row = json.loads(line)
            labels[row["conversation_id"]] = row["label"]
    agree = all(labels[f"t{i}"] == emotion for i, emotion in enumerate(reference.emotions))
    return BatchResult(len(texts), wall, float(found.group(1).replace(",", "")), cpu, agree)


def run_all(settings: Sequence[Setting], args: argparse.Namespace, data_dir: Path, plan: Plan) -> Results:
    texts = meld_texts(data_dir, args.seed)
    reference = Reference.of(args.model, texts[:AGREEMENT_TEXTS])
    results = Results()
    jobs = {peer: itertools.cycle([protocol.job(text) for text in texts]) for peer, protocol in PROTOCOLS.items()}
    per_round = len(settings) + (0 if args.no_batch else 1)
    with (
        tempfile.TemporaryDirectory(prefix="equipoise-peers-") as work,
        tqdm(total=args.rounds * per_round, desc="servers", unit="srv", disable=not plan.progress) as bar,
    ):
        for number in range(1, args.rounds + 1):
            if not args.no_batch:
                bar.set_postfix_str(f"round {number}: batch scoring")
                results.batches.append(batch_scoring(args.model, texts, reference, Path(work)))
                bar.update()
            for setting in settings:
                bar.set_postfix_str(f"round {number}: {setting.name}")
                with start(setting, args.model, data_dir, Path(work)) as running:
                    measure(setting, running, jobs[setting.peer], reference, plan, results)
                bar.update()
    return results


# ------------------------------------------------------------------------------------------------ verdict and report


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    passed: bool | None  # None: not measured


def best(results: Results, peer: str, clients: int, key: Callable[[Level], float | None], lowest: bool) -> Level | None:
    """The level of `peer`'s setting with the highest (or lowest) `key` at `clients`."""
    levels = [lv for (s, c), lv in results.levels.items() if s.peer == peer and c == clients and key(lv) is not None]
    if not levels:
        return None
    return (min if lowest else max)(levels, key=lambda lv: key(lv) or 0.0)


def checks(results: Results, subject: Setting, plan: Plan, min_ratio: float) -> list[Check]:
    top, low = max(plan.concurrency), min(plan.concurrency)
    found = []
    ours = results.find(subject, top)
    rivals = [lv for peer in PEERS if (lv := best(results, peer, top, lambda lv: lv.throughput, False))]
    if ours is None or not rivals:
        found.append(Check(f"c{top} throughput above the best peer's", "not measured", None))
    else:
        rival = max(rivals, key=lambda lv: lv.throughput)
        found.append(
            Check(
                f"c{top} throughput above the best peer's",
                f"{ours.throughput:,.1f} vs {rival.throughput:,.1f} utt/s ({rival.setting.name})",
                ours.throughput > rival.throughput,
            )
        )
    ours_low = results.find(subject, low)
    rivals = [lv for peer in PEERS if (lv := best(results, peer, low, lambda lv: lv.latency_ms(50), True))]
    if ours_low is None or ours_low.latency_ms(50) is None or not rivals:
        found.append(Check(f"c{low} p50 below the best peer's", "not measured", None))
    else:
        rival = min(rivals, key=lambda lv: lv.latency_ms(50) or 0.0)
        mine, theirs = ours_low.latency_ms(50) or 0.0, rival.latency_ms(50) or 0.0
        found.append(
            Check(
                f"c{low} p50 below the best peer's",
                f"{mine:.1f} vs {theirs:.1f} ms ({rival.setting.name})",
                mine < theirs,
            )
        )
    batch = results.batch_turns_per_s
    if ours is None or batch is None:
        found.append(Check(f"c{top} throughput ≥ {min_ratio:.0%} of batch scoring's", "not measured", None))
    else:
        ratio = ours.throughput / batch
        found.append(
            Check(
                f"c{top} throughput ≥ {min_ratio:.0%} of batch scoring's",
                f"{ratio:.1%} ({ours.throughput:,.1f} / {batch:,.1f}; by round {_round_ratios(ours, results.batches)})",
                ratio >= min_ratio,
            )
        )
    worst = max(results.agreement.values(), default=0.0)
    found.append(
        Check(
            f"every server answers the runtime's labels and probabilities (within {AGREEMENT_TOLERANCE:g})",
            f"largest difference {worst:.1e}",
            worst <= AGREEMENT_TOLERANCE and all(b.labels_agree for b in results.batches),
        )
    )
    return found


def _round_ratios(level: Level, batches: Sequence[BatchResult]) -> str:
    """Each round's throughput over the same round's batch scoring."""
    ratios = [
        phase.accepted_utterances / phase.seconds / batch.engine_turns_per_s
        for phase, batch in zip(level.phases, batches, strict=False)
    ]
    return ", ".join(f"{ratio:.1%}" for ratio in ratios)


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def level_table(results: Results) -> list[str]:
    lines = [
        "| setting | clients | requests | errors | utt/s | p50 ms | p95 ms | p99 ms | server CPU s | utt/server CPU s "
        "| client CPU s | others' CPU |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for level in sorted(results.levels.values(), key=lambda lv: (lv.clients, lv.setting.peer != EQUIPOISE)):
        per_cpu = level.throughput * level.seconds / level.server_cpu_s if level.server_cpu_s else 0.0
        lines.append(
            f"| {level.setting.name} | {level.clients} | {level.requests:,} | {level.errors} | "
            f"{level.throughput:,.1f} | {_ms(level.latency_ms(50))} | {_ms(level.latency_ms(95))} | "
            f"{_ms(level.latency_ms(99))} | {level.server_cpu_s:.1f} | {per_cpu:,.1f} | {level.client_cpu_s:.1f} | "
            f"{level.others_share:.0%} |"
        )
    return lines


def best_table(results: Results, subject: Setting, plan: Plan) -> list[str]:
    top, low = max(plan.concurrency), min(plan.concurrency)
    lines = [
        f"| server | best at c{top} | c{top} utt/s | c{top} p50 / p95 / p99 ms | best c{low} p50 ms (setting) |",
        "|---|---|--:|--:|---|",
    ]
    for peer in (EQUIPOISE, *PEERS, FLOOR):
        if peer == EQUIPOISE:
            top_level, low_level = results.find(subject, top), results.find(subject, low)
        else:
            top_level = best(results, peer, top, lambda lv: lv.throughput, False)
            low_level = best(results, peer, low, lambda lv: lv.latency_ms(50), True)
        if top_level is None:
            continue
        spread = " / ".join(_ms(top_level.latency_ms(q)) for q in (50, 95, 99))
        low_text = "–" if low_level is None else f"{_ms(low_level.latency_ms(50))} ({low_level.setting.name})"
        lines.append(f"| {peer} | {top_level.setting.name} | {top_level.throughput:,.1f} | {spread} | {low_text} |")
    return lines


def batch_lines(results: Results) -> list[str]:
    if results.batch_turns_per_s is None:
        return ["- batch scoring: not run (--no-batch)"]
    lines = [f"- `equipoise score`, local engine, its defaults, pooled: **{results.batch_turns_per_s:,.1f} turns/s**"]
    for number, batch in enumerate(results.batches, start=1):
        lines.append(
            f"- round {number}: {batch.turns:,} one-turn conversations, {batch.engine_turns_per_s:,.1f} turns/s as it "
            f"reports its run; the child process took {batch.wall_s:.1f} s wall ({batch.turns / batch.wall_s:,.1f} "
            f"turns/s with start-up and model load) and {batch.cpu_s:.1f} CPU s; labels of the agreement texts "
            + ("equal the runtime's" if batch.labels_agree else "**differ** from the runtime's")
        )
    return lines


def render(results: Results, found: Sequence[Check], context: dict[str, str], subject: Setting, plan: Plan) -> str:
    lines = ["# Serving peers", "", *(f"- {key}: {value}" for key, value in context.items()), ""]
    lines += ["## Every setting", "", *level_table(results), ""]
    lines += ["## Best of each", "", *best_table(results, subject, plan), "", "## Batch scoring", ""]
    lines += [*batch_lines(results), "", "## Verdict", ""]
    for check in found:
        verdict = {True: "PASS", False: "FAIL", None: "NOT MEASURED"}[check.passed]
        lines.append(f"- {verdict}: {check.name}: {check.value}")
    return "\n".join(lines) + "\n"


def as_json(results: Results, found: Sequence[Check], context: dict[str, str]) -> dict[str, Any]:
    return {
        "context": context,
        "levels": [level.summary() for level in results.levels.values()],
        "agreement": {setting.name: worst for setting, worst in results.agreement.items()},
        "batch": [dataclasses.asdict(batch) for batch in results.batches],
        "checks": [dataclasses.asdict(check) for check in found],
    }


# ------------------------------------------------------------------------------------------------ command line


def _counts(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def _grid(text: str) -> tuple[PeerConfig, ...]:
    """'BATCH:WAIT_MS:THREADS:INSTANCES,...' -> PeerConfigs."""
    configs = []
    for part in text.split(","):
        batch, wait, threads, instances = part.split(":")
        configs.append(PeerConfig(int(batch), float(wait), int(threads), int(instances)))
    return tuple(configs)


def _variant(text: str) -> tuple[tuple[str, str], ...]:
    """'NAME=VALUE,...' (equipoise settings, as in core.settings.Settings) -> pairs."""
    pairs = tuple(tuple(part.split("=", 1)) for part in text.split(","))
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE[,NAME=VALUE], got {text!r}")
    return pairs  # type: ignore[return-value]


def default_grid(cores: int) -> str:
    """Batch wait 0.5 or 3 ms x every (threads, instances) whose product fits the cores; batch 32, as equipoise."""
    shapes = [(t, i) for t in (1, 2) for i in (1, 2) if t * i <= cores]
    return ",".join(f"32:{wait:g}:{t}:{i}" for wait in (0.5, 3) for t, i in shapes)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    grid = default_grid(available_cores())
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the artifact directory every server serves")
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--concurrency", type=_counts, default=Plan.concurrency, help="client levels (1,32)")
    parser.add_argument("--seconds", type=float, default=Plan.seconds, help="duration of a level at most")
    parser.add_argument("--requests", type=int, default=Plan.requests, help="requests of a level at most")
    parser.add_argument("--warmup-requests", type=int, default=Plan.warmup_requests)
    parser.add_argument(
        "--triton-grid", type=_grid, default=_grid(grid), help=f"BATCH:WAIT_MS:THREADS:INSTANCES,... ({grid})"
    )
    parser.add_argument("--ray-grid", type=_grid, default=_grid(grid), help="as --triton-grid, replicas for instances")
    parser.add_argument(
        "--equipoise-variant", type=_variant, action="append", default=[], help="NAME=VALUE,... beside the defaults"
    )
    parser.add_argument(
        "--peers", type=lambda s: tuple(s.split(",")), default=(EQUIPOISE, *PEERS, FLOOR), help="servers to run"
    )
    parser.add_argument(
        "--peer-bucket", type=int, default=SERVICE_BUCKET, help="peers' most utterances per ONNX Runtime call"
    )
    parser.add_argument("--rounds", type=int, default=1, help="repeat the sequence of servers, interleaved, pooled")
    parser.add_argument("--no-batch", action="store_true", help="skip batch scoring (otherwise run once per round)")
    parser.add_argument("--min-ratio", type=float, default=0.7, help="service c-max throughput / batch turns/s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--output", type=Path, default=None, help="also write the markdown report here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    unknown = set(args.peers) - {EQUIPOISE, *PEERS, FLOOR}
    if unknown:
        parser.error(f"unknown --peers {', '.join(sorted(unknown))}")
    args.triton_grid, args.ray_grid = (
        tuple(dataclasses.replace(c, bucket=args.peer_bucket) for c in grid)
        for grid in (args.triton_grid, args.ray_grid)
    )
    for config in (*args.triton_grid, *args.ray_grid):
        if config.threads * config.instances > available_cores():
            parser.error(
                f"{config}: threads x instances exceeds the {available_cores()} cores (the same budget for all)"
            )
    return args


def settings_of(args: argparse.Namespace) -> list[Setting]:
    chosen: list[Setting] = []
    if EQUIPOISE in args.peers:
        chosen += [Setting(EQUIPOISE), *(Setting(EQUIPOISE, overrides=v) for v in args.equipoise_variant)]
    if TRITON in args.peers:
        chosen += [Setting(TRITON, config) for config in args.triton_grid]
    if RAY in args.peers:
        chosen += [Setting(RAY, config) for config in args.ray_grid]
    if FLOOR in args.peers:
        chosen.append(Setting(FLOOR))
    return chosen


def versions() -> str:
    names = ("onnxruntime", "nvidia-pytriton", "ray", "torch", "transformers", "uvloop")
    found = []
    for name in names:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{name} {metadata.version(name)}")
    return ", ".join(found)


def context_of(args: argparse.Namespace, argv: Sequence[str] | None, load_before: float, plan: Plan) -> dict[str, str]:
    return {
        "command": "python -m benchmarks.peers " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "software": versions(),
        "load average (1 min)": f"{load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after",
        "model": f"{args.model.name}, fp32, CPU, the same artifact for every server",
        "workload": "every non-blank MELD utterance (train, dev, test) as a text-only request, shuffled, in rotation; "
        f"per level ≤ {plan.seconds:g} s and ≤ {plan.requests:,} requests after a {plan.warmup_requests}-request "
        f"warm-up at c{max(plan.concurrency)}; {args.rounds} round(s)",
        "client": "this process: benchmarks/http_client.py on uvloop, closed loop, one keep-alive connection per "
        "client (Triton in its Open Inference Protocol JSON)",
        "thread budget": f"{available_cores()} cores: instances x ONNX Runtime threads ≤ {available_cores()} for the "
        "peers; equipoise with its defaults (on 2-4 cores a model thread per core and one more, one intra-op thread "
        "each)",
        "runtime": "the same `InferenceRuntime.classify` everywhere (tokenizer, encoder graph, context graph over "
        f"one-turn dialogues); peers score their batches length-sorted and cut by cost into calls of at most "
        f"{args.peer_bucket} utterances (equipoise: EQUIPOISE_BATCH_BUCKET_SIZE)",
        "peers' extras off": "Triton without metrics, Ray Serve without access log and dashboard; equipoise keeps "
        "its access log, Prometheus metrics and prediction log",
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    data_dir = data_dir_or_exit(args.data_dir)
    plan = Plan(args.concurrency, args.seconds, args.requests, args.warmup_requests, not args.no_progress)
    results = run_all(settings_of(args), args, data_dir, plan)
    subject = Setting(EQUIPOISE)
    found = checks(results, subject, plan, args.min_ratio)
    context = context_of(args, argv, load_before, plan)
    report = render(results, found, context, subject, plan)
    print(report)
    if args.output is not None:
        args.output.write_text(report, encoding="utf-8")
    if args.json is not None:
        args.json.write_text(json.dumps(as_json(results, found, context), indent=2) + "\n", encoding="utf-8")
    return 1 if any(check.passed is False for check in found) else 0


if __name__ == "__main__":
    sys.exit(main())
