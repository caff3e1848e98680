"""Service latency: `equipoise serve` (prediction logging on and off) beside an unbatched PyTorch baseline.

    python -m benchmarks.latency --model /tmp/eqstate/default-model/equipoise-default-1.0.1 \\
        --intra-op-threads 1,0 --seconds 20 --plot docs/img/service_latency.png

In one run, each server alone on the machine in turn (started, measured, stopped), so that none shares the cores
with another:

- `equipoise serve` with prediction logging on (EQUIPOISE_LOG_PREDICTIONS=true, SQLite in a temporary directory),
  and the same with logging off, once per ONNX Runtime intra-op thread count of `--intra-op-threads`;
- the baseline (benchmarks/pipeline_baseline.py): the same model in PyTorch through a transformers pipeline, one
  request at a time, no batching;
- with `--reference-model DIR` (say the previous release), equipoise serving that model too, logging on, once per
  thread count: a new release's speed is read against the old one's in the same run.

Against each: a warm-up, then closed-loop clients (one keep-alive connection each, benchmarks/load.py's
`drive`) at each `--concurrency` level posting MELD test utterances as text-only requests to
POST /v1/predict/utterance, each level bounded by `--requests` and `--seconds`: client-side p50 / p99 latency,
utterances/s, errors, server CPU seconds and the load average. Against equipoise also text + `--audio-seconds`
of real speech (a RAVDESS clip, base64 WAV in the JSON) at each level; `--audio-threads` adds servers (logging
on) with other thread counts for the calls that carry audio. Both servers also answer the first few
texts before the warm-up, and their probabilities must agree (the same model). `--rounds` repeats the whole
sequence, interleaved, and pools the rounds.

The report (markdown: tables, ratios, a PASS/FAIL line per target) goes to stdout, progress to stderr; the exit
status is 1 when a target is missed or a check fails. Figures and their reading: docs/BENCHMARKS.md,
"Service latency".
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import io
import itertools
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import soundfile as sf
from tqdm import tqdm

from benchmarks.load import Job, Phase, PooledPhases, drive, run_load
from core.processes import Process, Service, answers, free_port, running_service, wait_for
from core.settings import Settings, data_dir_or_exit

UTTERANCE_PATH = "/v1/predict/utterance"
BASELINE = "baseline"
AGREEMENT_TEXTS = 8
AGREEMENT_TOLERANCE = 1e-4
TIMEOUT_S = 120.0  # per request: the unbatched baseline queues 32 clients' requests one after another
COLUMNS = (
    "utt/s: utterances answered 200 per wall-clock second; p50 / p99: client-side latency of those answers; "
    "server CPU s: the server process's user + system CPU over the level (utt/CPU s: utterances per server CPU "
    "second); client CPU s: the load generator's; others' CPU: the share of the machine's CPUs that other "
    "processes used meanwhile (other jobs on a shared host); load avg: the 1-minute load average at the end of "
    "the level (the benchmark's own server and clients add about 2 when saturated).",
)


@dataclass(frozen=True)
class Targets:
    c1_p50_ms: float = 15.0
    speedup: float = 2.0  # equipoise c-max throughput / baseline's
    logging_cost: float = 0.10  # 1 - throughput(logging on) / throughput(logging off), at c-max
    audio_p50_ms: float = 40.0
    of_reference: float = 0.60  # c-max throughput / the reference model's (both logging on)


@dataclass(frozen=True)
class Server:
    """One configuration to start: the baseline, or equipoise with logging on or off and a thread count, serving
    `--model` or, where `reference` names it, the reference model."""

    logging: bool | None = None  # None: the baseline
    threads: int = 0
    reference: Path | None = None
    audio_threads: int | None = None  # EQUIPOISE_AUDIO_INTRA_OP_THREADS; None: the service's default

    @property
    def name(self) -> str:
        if self.logging is None:
            return BASELINE
        served = f"reference {self.reference.name}" if self.reference else "equipoise"
        audio = "" if self.audio_threads is None else f", audio threads {self.audio_threads}"
        return f"{served}, logging {'on' if self.logging else 'off'}, ORT threads {self.threads or 'auto'}{audio}"


@dataclass
class Level(PooledPhases):
    """One server, one workload, one concurrency: the pooled phases of every round."""

    server: Server
    workload: str  # "text" or "text+audio"
    clients: int
    phases: list[Phase] = field(default_factory=list)
    cpu_s: float = 0.0
    client_cpu_s: float = 0.0  # the load generator's (this process's) CPU seconds
    others_cpu_s: float = 0.0  # CPU seconds of other processes on the machine during the phases
    load: list[float] = field(default_factory=list)  # 1-minute load average at the end of each phase

    def per_round(self) -> list[float]:
        return [p.accepted_utterances / p.seconds for p in self.phases if p.seconds]


@dataclass(frozen=True)
class Plan:
    concurrency: tuple[int, ...] = (1, 32)
    requests: int = 5000
    seconds: float = 20.0
    warmup_requests: int = 64
    audio_requests: int = 200
    progress: bool = True


# ------------------------------------------------------------------------------------------------ workload


def text_jobs(data_dir: Path, split: str = "test", seed: int = 0) -> list[Job]:
    """Every non-blank MELD utterance of `split` as a text-only utterance request, shuffled."""
    from model.data.meld import read_utterances

    texts = [u.text for u in read_utterances(data_dir, split) if u.text.strip()]
    random.Random(seed).shuffle(texts)
    return [Job(UTTERANCE_PATH, {"text": text}, 1) for text in texts]


def speech_wav(data_dir: Path, seconds: float, corpus: str = "ravdess") -> bytes:
    """The first `seconds` of the first clip of `corpus` that lasts that long, as a 16 kHz mono 16-bit WAV file."""
    from model.audio import SAMPLE_RATE, decode_audio
    from model.data.speech import read_clips

    wanted = round(seconds * SAMPLE_RATE)
    for clip in read_clips(data_dir, corpus):
        wave = decode_audio(clip.path)
        if len(wave) >= wanted:
            out = io.BytesIO()
            sf.write(out, wave[:wanted], SAMPLE_RATE, format="WAV", subtype="PCM_16")
            return out.getvalue()
    raise SystemExit(f"no {corpus} clip lasts {seconds} s")


def audio_jobs(texts: Sequence[Job], wav: bytes) -> list[Job]:
    encoded = base64.b64encode(wav).decode("ascii")
    return [Job(UTTERANCE_PATH, {"text": job.body["text"], "audio": encoded}, 1) for job in texts]


# ------------------------------------------------------------------------------------------------ servers


@contextlib.contextmanager
def start_equipoise(server: Server, model: Path, work: Path, extra: Mapping[str, str]) -> Iterator[Service]:
    state = Path(tempfile.mkdtemp(prefix="state-", dir=work))  # a fresh SQLite database for every start
    settings = {
        "state_dir": str(state),
        "default_model_dir": str(model.resolve()),
        "shipped_default": "false",
        "device": "cpu",
        "intra_op_threads": str(server.threads),
        "log_predictions": str(server.logging).lower(),
        **({} if server.audio_threads is None else {"audio_intra_op_threads": str(server.audio_threads)}),
        **extra,
    }
    with running_service(settings, state / "server.log") as service:
        yield service


@contextlib.contextmanager
def start_baseline(model: Path, data_dir: Path, work: Path, timeout_s: float = 600) -> Iterator[Service]:
    port = free_port()
    args = ["--artifact", str(model), "--data-dir", str(data_dir), "--port", str(port)]
    log_path = work / "baseline.log"
    with log_path.open("wb") as log:
        command = [sys.executable, "-m", "benchmarks.pipeline_baseline", *args]
        popen = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    running = Service(Process(BASELINE, popen, log_path), f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: answers(running, "/healthz"), timeout_s, "the baseline to answer /healthz", 0.5)
        yield running
    finally:
        running.process.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (not idle, not waiting for I/O), all CPUs (Linux /proc)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class CpuSample:
    server: float
    client: float  # this process: the load generator
    machine: float

    @classmethod
    def take(cls, pid: int) -> CpuSample:
        return cls(cpu_seconds(pid), time.process_time(), machine_busy_seconds())

    def others_since(self, before: CpuSample) -> float:
        """CPU seconds spent by processes other than the server and the load generator."""
        mine = (self.server - before.server) + (self.client - before.client)
        return max(0.0, self.machine - before.machine - mine)


# ------------------------------------------------------------------------------------------------ measuring


def probabilities(url: str, jobs: Sequence[Job]) -> np.ndarray:
    """[N, C] emotion probabilities the server at `url` answers for `jobs` (label order of the first answer)."""
    with httpx.Client(base_url=url, timeout=120) as client:
        answers = [client.post(job.path, json=job.body).raise_for_status().json() for job in jobs]
    labels = list(answers[0]["probabilities"])
    return np.array([[answer["probabilities"][label] for label in labels] for answer in answers])


def run_level(level: Level, running: Service, jobs: Iterator[Job], plan: Plan, requests: int) -> None:
    """One phase of `level.clients` closed-loop clients against `running`, added to `level`."""
    before = CpuSample.take(running.process.popen.pid)
    name = f"{'eq' if level.server.logging is not None else 'bl'} {level.workload} c{level.clients}"
    phase = run_load(
        drive(
            running.url,
            jobs,
            name=name,
            clients=level.clients,
            max_requests=requests,
            max_seconds=plan.seconds,
            timeout_s=TIMEOUT_S,
            progress=plan.progress,
        )
    )
    after = CpuSample.take(running.process.popen.pid)
    level.cpu_s += after.server - before.server
    level.client_cpu_s += after.client - before.client
    level.others_cpu_s += after.others_since(before)
    level.phases.append(phase)
    level.load.append(os.getloadavg()[0])


def warm_up(running: Service, jobs: Iterator[Job], plan: Plan) -> None:
    run_load(
        drive(
            running.url,
            jobs,
            name="warm-up",
            clients=4,
            max_requests=plan.warmup_requests,
            max_seconds=60,
            timeout_s=TIMEOUT_S,
            progress=plan.progress,
        )
    )


@dataclass
class Results:
    levels: dict[tuple[Server, str, int], Level] = field(default_factory=dict)
    answers: dict[Server, np.ndarray] = field(default_factory=dict)

    def level(self, server: Server, workload: str, clients: int) -> Level:
        key = (server, workload, clients)
        return self.levels.setdefault(key, Level(server, workload, clients))

    def find(self, server: Server, workload: str, clients: int) -> Level | None:
        return self.levels.get((server, workload, clients))


def measure(running: Service, server: Server, workloads: dict[str, list[Job]], plan: Plan, results: Results) -> None:
    texts = workloads["text"]
    results.answers.setdefault(server, probabilities(running.url, texts[:AGREEMENT_TEXTS]))
    cycle = itertools.cycle(texts)
    warm_up(running, cycle, plan)
    for clients in plan.concurrency:
        run_level(results.level(server, "text", clients), running, cycle, plan, plan.requests)
    if server.logging is not None and "text+audio" in workloads:
        audio = itertools.cycle(workloads["text+audio"])
        warm_up(running, audio, plan)
        for clients in plan.concurrency:
            run_level(results.level(server, "text+audio", clients), running, audio, plan, plan.audio_requests)


def run_all(
    servers: Sequence[Server],
    rounds: int,
    model: Path,
    data_dir: Path,
    workloads: dict[str, list[Job]],
    plan: Plan,
    extra: Mapping[str, str] | None = None,
) -> Results:
    """Every server `rounds` times, interleaved; `extra` settings (name: value) go to every equipoise server."""
    results = Results()
    with tempfile.TemporaryDirectory(prefix="equipoise-latency-") as work:
        for number, server in itertools.product(range(rounds), servers):
            tqdm.write(f"round {number + 1}/{rounds}: starting {server.name}", file=sys.stderr)
            if server.logging is None:
                started = start_baseline(model, data_dir, Path(work))
            else:
                started = start_equipoise(server, server.reference or model, Path(work), extra or {})
            with started as running:
                measure(running, server, workloads, plan, results)
    return results


# ------------------------------------------------------------------------------------------------ report


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def level_row(level: Level) -> str:
    per_cpu = level.throughput * level.seconds / level.cpu_s if level.cpu_s else 0.0
    load = f"{min(level.load):.1f}–{max(level.load):.1f}" if level.load else "–"
    return (
        f"| {level.server.name} | {level.workload} | {level.clients} | {level.requests:,} | {level.errors} | "
        f"{level.seconds:.1f} | {level.throughput:,.1f} | {_ms(level.latency_ms(50))} | {_ms(level.latency_ms(99))} | "
        f"{level.cpu_s:.1f} | {per_cpu:,.1f} | {level.client_cpu_s:.1f} | {level.others_share:.0%} | {load} |"
    )


def table(results: Results) -> list[str]:
    head = (
        "| server | workload | clients | requests | errors | wall s | utt/s | p50 ms | p99 ms | server CPU s | "
        "utt/CPU s | client CPU s | others' CPU | load avg |"
    )
    ordered = sorted(results.levels.values(), key=lambda lv: (lv.workload, lv.server.name, lv.clients))
    return [head, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|", *(level_row(lv) for lv in ordered)]


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    passed: bool | None  # None: not measured


def _ratio(numerator: Level | None, denominator: Level | None) -> float | None:
    if numerator is None or denominator is None or not denominator.throughput:
        return None
    return numerator.throughput / denominator.throughput


def checks_for(results: Results, threads: int, top: int, targets: Targets) -> list[Check]:
    """The targets for equipoise with `threads` ORT threads (logging on: the production default); against the
    reference model's throughput when one was measured."""
    on, off = Server(True, threads), Server(False, threads)
    c1 = results.find(on, "text", 1)
    p50 = c1.latency_ms(50) if c1 else None
    speedup = _ratio(results.find(on, "text", top), results.find(Server(), "text", top))
    kept = _ratio(results.find(on, "text", top), results.find(off, "text", top))
    audio = results.find(on, "text+audio", 1)
    audio_p50 = audio.latency_ms(50) if audio else None
    label = f"ORT threads {threads or 'auto'}"
    reference = next((lv for lv in results.levels.values() if _is_reference_top(lv, threads, top)), None)
    against = [] if reference is None else [
        _check(
            f"{label}: c{top} throughput ≥ {targets.of_reference:.0%} of {reference.server.name}",
            _ratio(results.find(on, "text", top), reference), "{:.0%}", targets.of_reference, True,
        )
    ]  # fmt: skip
    return against + [
        _check(f"{label}: text p50 at concurrency 1 ≤ {targets.c1_p50_ms:g} ms", p50, "{:.1f} ms", targets.c1_p50_ms),
        _check(
            f"{label}: c{top} throughput ≥ {targets.speedup:g}× baseline", speedup, "{:.2f}×", targets.speedup, True
        ),
        _check(
            f"{label}: logging costs ≤ {targets.logging_cost:.0%} of c{top} throughput",
            None if kept is None else 1 - kept,
            "{:.1%}",
            targets.logging_cost,
        ),
        _check(
            f"{label}: text + audio p50 ≤ {targets.audio_p50_ms:g} ms", audio_p50, "{:.1f} ms", targets.audio_p50_ms
        ),
    ]


def _is_reference_top(level: Level, threads: int, top: int) -> bool:
    server = level.server
    return bool(server.reference) and server.threads == threads and level.workload == "text" and level.clients == top


def _check(name: str, value: float | None, shape: str, bound: float, at_least: bool = False) -> Check:
    if value is None:
        return Check(name, "not measured", None)
    return Check(name, shape.format(value), value >= bound if at_least else value <= bound)


def agreement(results: Results) -> float | None:
    """The largest probability difference between any equipoise server of `--model` and the baseline (the same
    model); the reference model's answers are its own."""
    reference = results.answers.get(Server())
    others = [a for s, a in results.answers.items() if s.logging is not None and s.reference is None]
    if reference is None or not others:
        return None
    return max(float(np.abs(answers - reference).max()) for answers in others)


def ratio_lines(results: Results, threads: Sequence[int], top: int) -> list[str]:
    lines = []
    for count in threads:
        on, off = Server(True, count), Server(False, count)
        for clients in sorted({lv.clients for lv in results.levels.values() if lv.workload == "text"}):
            speedup = _ratio(results.find(on, "text", clients), results.find(Server(), "text", clients))
            kept = _ratio(results.find(on, "text", clients), results.find(off, "text", clients))
            rounds = results.find(on, "text", clients), results.find(off, "text", clients)
            per_round = " / ".join(", ".join(f"{t:,.1f}" for t in lv.per_round()) if lv else "–" for lv in rounds)
            lines.append(
                f"- ORT threads {count or 'auto'}, concurrency {clients}: equipoise (logging on) / baseline = "
                f"{'–' if speedup is None else f'{speedup:.2f}×'}; logging on / off = "
                f"{'–' if kept is None else f'{kept:.3f}'} (utt/s per round, on / off: {per_round})"
            )
    return lines + [f"- (targets are read at concurrency {top})"]


def render(results: Results, checks: Sequence[Check], context: dict[str, str], threads: Sequence[int]) -> str:
    top = max(lv.clients for lv in results.levels.values() if lv.workload == "text")
    worst = agreement(results)
    lines = ["# Equipoise service latency", "", *(f"- {key}: {value}" for key, value in context.items()), ""]
    lines += [*table(results), "", *COLUMNS, "", "## Ratios", "", *ratio_lines(results, threads, top), ""]
    lines.append(
        "- same model: "
        + ("not checked" if worst is None else f"answers to the first {AGREEMENT_TEXTS} texts differ by ≤ {worst:.1e}")
    )
    lines += ["", "## Verdict", ""]
    for check in checks:
        verdict = {True: "PASS", False: "FAIL", None: "NOT MEASURED"}[check.passed]
        lines.append(f"- {verdict}: {check.name}: {check.value}")
    return "\n".join(lines) + "\n"


def plot(results: Results, path: Path) -> Path:
    """Bars: utterances/s and p50 / p99 latency of every server and text concurrency level."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    levels = sorted(
        (lv for lv in results.levels.values() if lv.workload == "text"), key=lambda lv: (lv.clients, lv.server.name)
    )
    names = [f"{lv.server.name.replace(', ', chr(10))}\nc{lv.clients}" for lv in levels]
    fig = Figure(figsize=(max(8.0, 1.6 * len(levels)), 7), layout="constrained")
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1)
    top.bar(names, [lv.throughput for lv in levels], color="tab:blue")
    top.set_ylabel("utterances/s")
    x = np.arange(len(levels))
    bottom.bar(x - 0.2, [lv.latency_ms(50) or 0 for lv in levels], 0.4, label="p50")
    bottom.bar(x + 0.2, [lv.latency_ms(99) or 0 for lv in levels], 0.4, label="p99")
    bottom.set_xticks(x, names, fontsize=7)
    bottom.set_yscale("log")
    bottom.set_ylabel("latency ms (client-side, log scale)")
    bottom.legend()
    top.tick_params(axis="x", labelsize=7)
    top.set_title("Text-only utterances: equipoise serve vs unbatched PyTorch baseline")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------------------------ command line


def _counts(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the assembled default artifact directory")
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--concurrency", type=_counts, default=Plan.concurrency, help="client levels (1,32)")
    parser.add_argument("--intra-op-threads", type=_counts, default=(1, 0), help="ORT threads to compare (1,0)")
    parser.add_argument("--seconds", type=float, default=Plan.seconds, help="duration of a level at most")
    parser.add_argument("--requests", type=int, default=Plan.requests, help="requests of a text level at most")
    parser.add_argument("--audio-requests", type=int, default=Plan.audio_requests, help="text+audio requests")
    parser.add_argument("--audio-seconds", type=float, default=3.0, help="audio per text+audio request (0: none)")
    parser.add_argument(
        "--audio-threads",
        type=_counts,
        default=(),
        help="also serve with these EQUIPOISE_AUDIO_INTRA_OP_THREADS (logging on), beside the service's default",
    )
    parser.add_argument("--warmup-requests", type=int, default=Plan.warmup_requests)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the sequence of servers, interleaved")
    parser.add_argument("--no-baseline", action="store_true", help="equipoise only")
    parser.add_argument("--reference-model", type=Path, default=None, help="also serve this artifact (logging on)")
    parser.add_argument("--batch-max-wait-ms", type=float, default=None, help="EQUIPOISE_BATCH_MAX_WAIT_MS (3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG of throughput and latency here")
    parser.add_argument("--output", type=Path, default=None, help="also write the report to this file")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def servers_of(args: argparse.Namespace) -> list[Server]:
    equipoise = [Server(logging, threads) for threads in args.intra_op_threads for logging in (True, False)]
    counts = itertools.product(args.intra_op_threads, args.audio_threads)
    equipoise += [Server(True, threads, audio_threads=audio) for threads, audio in counts]
    reference = [Server(True, threads, args.reference_model) for threads in args.intra_op_threads]
    return equipoise + (reference if args.reference_model else []) + ([] if args.no_baseline else [Server()])


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return f"{platform.machine()}, {os.cpu_count()} logical CPUs ({model}), Python {platform.python_version()}"


def versions() -> str:
    import onnxruntime
    import torch
    import transformers

    return (
        f"ONNX Runtime {onnxruntime.__version__}, PyTorch {torch.__version__}, transformers {transformers.__version__}"
    )


def context_of(
    args: argparse.Namespace, argv: Sequence[str] | None, load_before: float, workloads: dict[str, list[Job]]
) -> dict[str, str]:
    wait = (
        Settings.model_fields["batch_max_wait_ms"].default if args.batch_max_wait_ms is None else args.batch_max_wait_ms
    )
    return {
        "command": "python -m benchmarks.latency " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "software": versions(),
        "load average (1 min)": f"{load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after; per level below",
        "model": f"{args.model.name}, fp32, CPU"
        + (f"; reference {args.reference_model.name}, fp32, CPU" if args.reference_model else ""),
        "equipoise": f"production defaults otherwise: micro-batching (max 32, wait {wait:g} ms), access log (info), "
        "SQLite log in a temporary directory when logging is on, auth off on loopback",
        "baseline": "transformers.Pipeline over the PyTorch EmotionModel, torch's default threads, one request at a "
        "time on one worker thread, uvicorn access log (info)",
        "workload": f"MELD test, {len(workloads['text']):,} text-only utterances in a shuffled rotation"
        + (f"; text + {args.audio_seconds:g} s RAVDESS speech (base64 WAV) at each level" if args.audio_seconds else "")
        + f"; {args.rounds} round(s), each level ≤ {args.seconds:g} s and ≤ {args.requests:,} requests after a warm-up",
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()[0]
    data_dir = data_dir_or_exit(args.data_dir)
    workloads = {"text": text_jobs(data_dir, seed=args.seed)}
    if args.audio_seconds:
        workloads["text+audio"] = audio_jobs(workloads["text"], speech_wav(data_dir, args.audio_seconds))
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Plan) if hasattr(args, f.name)}
    plan = Plan(**given, progress=not args.no_progress)
    extra = {} if args.batch_max_wait_ms is None else {"batch_max_wait_ms": str(args.batch_max_wait_ms)}
    results = run_all(servers_of(args), args.rounds, args.model, data_dir, workloads, plan, extra)
    top = max(args.concurrency)
    checks = [c for threads in args.intra_op_threads for c in checks_for(results, threads, top, Targets())]
    worst = agreement(results)
    if worst is not None and worst > AGREEMENT_TOLERANCE:
        checks.append(Check("same model", f"answers differ by {worst:.1e}", False))
    report = render(results, checks, context_of(args, argv, load_before, workloads), args.intra_op_threads)
    print(report)
    if args.output is not None:
        args.output.write_text(report, encoding="utf-8")
    if args.plot is not None:
        plot(results, args.plot)
    return 1 if any(check.passed is False for check in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
