"""Batch-scoring throughput against the service's best, same model, same machine, one run.

1. The service (benchmarks/scoring_service.py): a real `equipoise serve` on loopback (SQLite in a temporary
   directory, prediction logging on, authentication off as on loopback) answers MELD test dialogues on
   POST /v1/predict/dialogue (bidirectional) from N concurrent clients, for each N of --concurrency, each level
   for --service-seconds; the best level's utterances/s is the service's best throughput.
2. The batch engine: MELD test replicated (new conversation ids) to N turns, written as each of --formats,
   scored end to end with the local engine (reading, grouping, inference, writing, commits), with the peak RSS
   and an RSS trace sampled every --sample-interval seconds by a background thread (plotted to --plot).

    python -m benchmarks.scoring_throughput --model ARTIFACT_DIR [--turns 1000000] [--formats jsonl,parquet]
        [--concurrency 1,2,4,8] [--service-seconds 60] [--plot docs/img/scoring_memory.png]

Printed as Markdown: the service sweep, per input format turns, wall time, turns/s, peak RSS (reset before each
run where Linux allows it, /proc/self/clear_refs; otherwise the process's peak so far) and RSS growth, then the
ratio batch/service and the acceptance verdict (ratio >= --min-ratio, peak < --memory-limit-mib).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count, islice
from pathlib import Path

import onnxruntime as ort
from tqdm import tqdm

from benchmarks.scoring_service import ServiceResult, load_average, measure_service, process_cpu_seconds
from benchmarks.scoring_service import markdown as service_markdown
from core.settings import available_cores
from model.data.meld import group_dialogues, read_utterances
from model.data.turns import Turn, meld_to_turns, write_turns
from scoring.engine import RuntimeSpec
from scoring.local import LocalEngine
from scoring.pipeline import RunReport, ScoreConfig, run_scoring

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PLOT = REPO_ROOT / "docs" / "img" / "scoring_memory.png"
MEMORY_LIMIT_MIB = 2e9 / 2**20  # 2 GB, read as 2·10⁹ bytes (the stricter reading): 1,907 MiB


def replicated(turns: Sequence[Turn], n: int) -> Iterator[Turn]:
    """The first `n` turns of `turns` repeated, each repetition under new conversation ids (`<id>-r<k>`)."""
    if not turns:
        return
    copies = ((k, turn) for k in count() for turn in turns)
    for k, turn in islice(copies, n):
        yield turn.model_copy(update={"conversation_id": f"{turn.conversation_id}-r{k}"})


class RssSampler:
    """A daemon thread reading this process's resident set size (VmRSS) every `interval_s` seconds; use as a
    context manager. `samples` holds (seconds since start, MiB), the first at start and the last at exit."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._start = 0.0

    def __enter__(self) -> RssSampler:
        self._start = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        rss = current_rss_mib()
        if rss is not None:
            self.samples.append((time.perf_counter() - self._start, rss))


@dataclass(frozen=True)
class Measurement:
    source: str
    report: RunReport
    peak_rss_mib: float
    peak_reset: bool
    trace: list[tuple[float, float]] = field(default_factory=list)
    cpu_seconds: float | None = None  # this process's CPU time (user + system) during the scoring
    load_average: float | None = None  # the machine's 1-minute load average at the end

    @property
    def per_cpu_second(self) -> float | None:
        return self.report.scored_rows / self.cpu_seconds if self.cpu_seconds else None

    @property
    def growth_mib(self) -> float | None:
        """How far the RSS of the second half of the run rose above the first half's maximum (negative: it
        stayed below it), leaving out the first 10 % (model warm-up, first buffers); None without a trace."""
        samples = [rss for seconds, rss in self.trace if seconds >= 0.1 * self.report.seconds]
        if len(samples) < 4:
            return None
        half = len(samples) // 2
        return max(samples[half:]) - max(samples[:half])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="artifact directory")
    parser.add_argument("--turns", type=int, default=1_000_000, help="turns to score (default 1,000,000)")
    parser.add_argument("--formats", default="jsonl,parquet", help="input formats, comma-separated")
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--batch-size", type=int, default=256, help="turns per model call (default 256)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads, batch and service (0: each side's default: the service's pool spans "
        "all cores, each batch worker gets 1)",
    )
    parser.add_argument("--workers", type=int, default=None, help="batch: local engine threads (default: one per core)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where inputs and outputs go (default: temp)")
    parser.add_argument(
        "--concurrency", default="1,2,4,8", help="service sweep: concurrent clients per level, comma-separated"
    )
    parser.add_argument("--service-seconds", type=float, default=60.0, help="service sweep: seconds per level")
    parser.add_argument(
        "--service-requests", type=int, default=None, help="service sweep: at most this many requests per level"
    )
    parser.add_argument("--no-service", action="store_true", help="skip the service sweep (batch figures only)")
    parser.add_argument("--sample-interval", type=float, default=1.0, help="RSS sampling interval in seconds")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="RSS-over-time plot (PNG) to write")
    parser.add_argument("--no-plot", action="store_true", help="write no plot")
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars on stderr"
    )
    parser.add_argument("--min-ratio", type=float, default=0.8, help="acceptance: batch/service best (0.8)")
    parser.add_argument(
        "--memory-limit-mib", type=float, default=MEMORY_LIMIT_MIB, help="acceptance: peak RSS below (2 GB: 1907)"
    )
    args = parser.parse_args(argv)
    args.formats = [kind.strip() for kind in args.formats.split(",") if kind.strip()]
    args.concurrency = [int(level) for level in args.concurrency.split(",") if level.strip()]
    if args.turns < 1 or not args.formats or not args.concurrency or min(args.concurrency) < 1:
        parser.error("--turns, --formats and --concurrency need at least one positive value")
    return args


def meld_test_turns(data_dir: Path | None) -> list[Turn]:
    from core.settings import data_dir_or_exit

    return list(meld_to_turns(group_dialogues(read_utterances(data_dir_or_exit(data_dir), "test"))))


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _status_mib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def current_rss_mib() -> float | None:
    """VmRSS where /proc has it, else None."""
    return _status_mib("VmRSS:")


def peak_rss_mib() -> float:
    """VmHWM where /proc has it (reset by reset_peak_rss), else getrusage's lifetime peak."""
    peak = _status_mib("VmHWM:")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(
    engine: LocalEngine, source: Path, work: Path, batch_size: int, *, interval_s: float = 1.0, progress: bool = True
) -> Measurement:
    out = work / f"scored-{source.suffix.lstrip('.')}.jsonl"
    config = ScoreConfig(
        input=source,
        output=out,
        summary=out.with_suffix(".summary.jsonl"),
        batch_turns=batch_size,
        restart=True,
        progress=progress,
    )
    reset = reset_peak_rss()
    cpu_before = process_cpu_seconds()
    with RssSampler(interval_s) as sampler:
        report = run_scoring(config, engine)
    cpu_after = process_cpu_seconds()
    cpu = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    return Measurement(source.suffix.lstrip("."), report, peak_rss_mib(), reset, sampler.samples, cpu, load_average())


def write_inputs(turns: Sequence[Turn], n: int, path: Path, progress: bool) -> float:
    start = time.perf_counter()
    rows = tqdm(replicated(turns, n), total=n, unit=" turns", desc=f"writing {path.name}", disable=not progress)
    write_turns(rows, path)
    return time.perf_counter() - start


def markdown(measurements: Iterable[Measurement]) -> str:
    lines = [
        "| input | turns | conversations | errors | wall s | turns/s | peak RSS MiB | RSS growth MiB | CPU s | "
        "turns/CPU s | load avg |",
        "|" + "---|" * 11,
    ]
    for m in measurements:
        r = m.report
        growth = "n/a" if m.growth_mib is None else f"{m.growth_mib:+,.0f}"
        lines.append(
            f"| {m.source} | {r.rows:,} | {r.conversations:,} | {sum(r.errors.values()):,} | "
            f"{r.seconds:,.1f} | {r.throughput:,.1f} | {m.peak_rss_mib:,.0f}{'' if m.peak_reset else ' *'} | "
            f"{growth} | {_figure(m.cpu_seconds, ',.1f')} | {_figure(m.per_cpu_second, ',.1f')} | "
            f"{_figure(m.load_average, '.1f')} |"
        )
    return "\n".join(lines)


def _figure(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def trace_text(measurement: Measurement, points: int = 12) -> str:
    """The RSS trace thinned to about `points` samples: `t s: MiB` pairs."""
    trace = measurement.trace
    if not trace:
        return f"- {measurement.source}: no RSS trace (no /proc)"
    step = max(1, len(trace) // points)
    thinned = trace[::step] + ([trace[-1]] if (len(trace) - 1) % step else [])
    pairs = ", ".join(f"{seconds:,.0f} s: {rss:,.0f}" for seconds, rss in thinned)
    return f"- {measurement.source} ({len(trace):,} samples): {pairs}"


def verdict(
    measurements: Sequence[Measurement], service: ServiceResult | None, min_ratio: float, limit_mib: float
) -> list[str]:
    lines = []
    best = service.best.throughput if service else None
    per_cpu = [level.per_cpu_second for level in service.levels if level.per_cpu_second] if service else []
    for m in measurements:
        memory_ok = m.peak_rss_mib < limit_mib
        parts = [f"peak RSS {m.peak_rss_mib:,.0f} MiB {'<' if memory_ok else '>='} {limit_mib:,.0f} MiB"]
        ok = memory_ok
        if best:
            ratio = m.report.throughput / best
            ratio_ok = ratio >= min_ratio
            ok = ok and ratio_ok
            parts.insert(
                0,
                f"batch/service = {m.report.throughput:,.1f} / {best:,.1f} = {ratio:.2f} "
                f"({'>=' if ratio_ok else '<'} {min_ratio:.2f})",
            )
        else:
            parts.insert(0, "no service figure (ratio not checked)")
        lines.append(f"- {m.source}: {'; '.join(parts)}: **{'PASS' if ok else 'FAIL'}**")
        if per_cpu and m.per_cpu_second:
            lines.append(
                f"  - per CPU-second (informative, less sensitive to other load on the machine): "
                f"{m.per_cpu_second:,.1f} / {max(per_cpu):,.1f} = {m.per_cpu_second / max(per_cpu):.2f}"
            )
    return lines


def plot(measurements: Sequence[Measurement], path: Path, title: str, limit_mib: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    longest = max((m.trace[-1][0] for m in measurements if m.trace), default=0.0)
    scale, unit = (60.0, "minutes") if longest > 600 else (1.0, "seconds")
    figure, axes = plt.subplots(figsize=(8, 4))
    for m in measurements:
        if m.trace:
            axes.plot([s / scale for s, _ in m.trace], [rss for _, rss in m.trace], label=f"{m.source} input")
    axes.axhline(limit_mib, color="tab:red", linestyle="--", linewidth=1, label=f"limit {limit_mib:,.0f} MiB")
    axes.set_xlabel(f"{unit} since the start of scoring")
    axes.set_ylabel("resident set size (MiB)")
    axes.set_ylim(0, max(limit_mib * 1.1, max((rss for m in measurements for _, rss in m.trace), default=0) * 1.1))
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="center right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def describe(engine: LocalEngine, threads: int, args: argparse.Namespace, write_seconds: dict[str, float]) -> str:
    written = ", ".join(f"{kind} {seconds:.1f} s" for kind, seconds in write_seconds.items())
    model = engine.model
    return "\n".join(
        [
            f"- model: {model.version} ({model.precision}), artifact sha256 {(model.sha256 or '?')[:12]}",
            f"- input: MELD test replicated to {args.turns:,} turns (text only); writing the inputs took {written}",
            f"- scoring: local engine with {engine.workers} worker thread(s), intra-op threads "
            f"{threads or 'default'}, bidirectional context, batch {args.batch_size} turns, per-utterance JSONL "
            "output and JSONL summary; wall time includes the counting pass, reading, inference, writing and "
            f"commits; RSS sampled every {args.sample_interval:g} s",
            f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; ONNX Runtime "
            f"{ort.__version__}; python {platform.python_version()}",
        ]
    )


def describe_service(service: ServiceResult, args: argparse.Namespace, meld_dialogues: int) -> str:
    settings = service.settings
    bounded = f", at most {args.service_requests:,} requests" if args.service_requests else ""
    return "\n".join(
        [
            f"- service: `equipoise serve` on loopback, model {service.model_version}, SQLite, prediction logging "
            f"on (production defaults otherwise: micro-batching, redaction, monitor), intra-op threads "
            f"{settings['intra_op_threads'] if settings['intra_op_threads'] != '0' else 'default'}",
            f"- load: the {meld_dialogues:,} MELD test dialogues, POST /v1/predict/dialogue (bidirectional), one "
            f"keep-alive connection per client thread, {args.service_seconds:g} s per level{bounded}, "
            "after a warm-up",
            f"- server peak RSS {service.peak_rss_mib or 0:,.0f} MiB; predictions logged to the database: "
            f"{'?' if service.logged_predictions is None else f'{service.logged_predictions:,}'} of "
            f"{service.answered_utterances:,} utterances answered (warm-up included)",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    turns = meld_test_turns(args.data_dir)
    service = None
    if not args.no_service:
        service = measure_service(
            args.model,
            turns,
            args.concurrency,
            args.service_seconds,
            threads=args.threads,
            max_requests=args.service_requests,
            work_dir=args.work_dir,
        )
    workers = args.workers or available_cores()
    batch_threads = args.threads or (1 if workers > 1 else 0)
    engine = LocalEngine.load(RuntimeSpec(args.model, device="cpu", intra_op_threads=batch_threads), workers)
    with tempfile.TemporaryDirectory(prefix="equipoise-score-bench-", dir=args.work_dir) as work:
        sources, write_seconds = [], {}
        for kind in args.formats:
            source = Path(work) / f"turns.{kind}"
            write_seconds[kind] = write_inputs(turns, args.turns, source, args.progress)
            sources.append(source)
        measurements = [
            measure(
                engine, source, Path(work), args.batch_size, interval_s=args.sample_interval, progress=args.progress
            )
            for source in sources
        ]
    if service is not None:
        print("### Service (best of the sweep)\n")
        print(describe_service(service, args, len({turn.conversation_id for turn in turns})))
        print()
        print(service_markdown(service))
        print()
    print("### Batch scoring\n")
    print(describe(engine, batch_threads, args, write_seconds))
    print()
    print(markdown(measurements))
    if not all(m.peak_reset for m in measurements):
        print("\n\\* peak RSS of the whole process so far (the peak could not be reset)")
    print("\nRSS over time (MiB):\n")
    print("\n".join(trace_text(m) for m in measurements))
    print("\n### Verdict\n")
    print("\n".join(verdict(measurements, service, args.min_ratio, args.memory_limit_mib)))
    if not args.no_plot:
        title = f"Batch scoring memory, {args.turns:,} turns, {engine.model.version}"
        plot(measurements, args.plot, title, args.memory_limit_mib)
        print(f"\nRSS plot: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
