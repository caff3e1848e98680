"""Batch-scoring throughput: MELD test replicated (new conversation ids) to N turns, written as JSONL and
Parquet, scored end to end with the local engine (reading, grouping, inference, writing, commits).

    python -m scoring.benchmarks.throughput --model ARTIFACT_DIR [--turns 1000000] [--formats jsonl,parquet]

Reported per input format: turns, wall time, turns/s and peak RSS of the scoring (the peak is reset before each
run where Linux allows it, /proc/self/clear_refs; otherwise it is the process's peak so far), as Markdown.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count, islice
from pathlib import Path

import onnxruntime as ort

from model.data.meld import group_dialogues, read_utterances
from model.data.turns import Turn, meld_to_turns, write_turns
from scoring.engine import RuntimeSpec
from scoring.local import LocalEngine
from scoring.pipeline import RunReport, ScoreConfig, run_scoring


def replicated(turns: Sequence[Turn], n: int) -> Iterator[Turn]:
    """The first `n` turns of `turns` repeated, each repetition under new conversation ids (`<id>-r<k>`)."""
    if not turns:
        return
    copies = ((k, turn) for k in count() for turn in turns)
    for k, turn in islice(copies, n):
        yield turn.model_copy(update={"conversation_id": f"{turn.conversation_id}-r{k}"})


@dataclass(frozen=True)
class Measurement:
    source: str
    report: RunReport
    peak_rss_mib: float
    peak_reset: bool


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="artifact directory")
    parser.add_argument("--turns", type=int, default=1_000_000, help="turns to score (default 1,000,000)")
    parser.add_argument("--formats", default="jsonl,parquet", help="input formats, comma-separated")
    parser.add_argument("--data-dir", type=Path, default=None, help="corpora directory (default: settings)")
    parser.add_argument("--batch-size", type=int, default=64, help="turns per model call (default 64)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where inputs and outputs go (default: temp)")
    return parser.parse_args(argv)


def meld_test_turns(data_dir: Path | None) -> list[Turn]:
    if data_dir is None:
        from equipoise.settings import load_settings

        data_dir = load_settings().data_dir
    if data_dir is None:
        raise SystemExit("no data directory: pass --data-dir or set EQUIPOISE_DATA_DIR")
    return list(meld_to_turns(group_dialogues(read_utterances(data_dir, "test"))))


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """VmHWM where /proc has it (reset by reset_peak_rss), else getrusage's lifetime peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(engine: LocalEngine, source: Path, work: Path, batch_size: int) -> Measurement:
    out = work / f"scored-{source.suffix.lstrip('.')}.jsonl"
    config = ScoreConfig(
        input=source, output=out, summary=out.with_suffix(".summary.jsonl"), batch_turns=batch_size, restart=True
    )
    reset = reset_peak_rss()
    report = run_scoring(config, engine)
    return Measurement(source.suffix.lstrip("."), report, peak_rss_mib(), reset)


def markdown(measurements: Iterable[Measurement]) -> str:
    lines = ["| input | turns | conversations | errors | wall s | turns/s | peak RSS MiB |", "|" + "---|" * 7]
    for m in measurements:
        r = m.report
        lines.append(
            f"| {m.source} | {r.rows:,} | {r.conversations:,} | {sum(r.errors.values()):,} | "
            f"{r.seconds:,.1f} | {r.throughput:,.0f} | {m.peak_rss_mib:,.0f}{'' if m.peak_reset else ' *'} |"
        )
    return "\n".join(lines)


def describe(engine: LocalEngine, args: argparse.Namespace, write_seconds: dict[str, float]) -> str:
    written = ", ".join(f"{kind} {seconds:.1f} s" for kind, seconds in write_seconds.items())
    model = engine.model
    return "\n".join(
        [
            f"- model: {model.version} ({model.precision}), artifact sha256 {(model.sha256 or '?')[:12]}",
            f"- input: MELD test replicated to {args.turns:,} turns (text only); writing the inputs took {written}",
            f"- scoring: local engine, bidirectional context, batch {args.batch_size} turns, per-utterance JSONL "
            "output "
            "and JSONL summary; wall time includes the counting pass, reading, inference, writing and commits",
            f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; ONNX Runtime "
            f"{ort.__version__} intra-op threads {args.threads or 'default'}; python {platform.python_version()}",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    turns = meld_test_turns(args.data_dir)
    engine = LocalEngine.load(RuntimeSpec(args.model, device="cpu", intra_op_threads=args.threads))
    with tempfile.TemporaryDirectory(prefix="equipoise-score-bench-", dir=args.work_dir) as work:
        sources, write_seconds = [], {}
        for kind in args.formats.split(","):
            start = time.perf_counter()
            source = Path(work) / f"turns.{kind}"
            write_turns(replicated(turns, args.turns), source)
            write_seconds[kind] = time.perf_counter() - start
            sources.append(source)
        measurements = [measure(engine, source, Path(work), args.batch_size) for source in sources]
    print(describe(engine, args, write_seconds))
    print()
    print(markdown(measurements))
    if not all(m.peak_reset for m in measurements):
        print("\n\\* peak RSS of the whole process so far (the peak could not be reset)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
