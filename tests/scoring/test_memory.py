"""Memory stays bounded on large inputs: it does not grow with the number of turns."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from benchmarks.scoring_throughput import replicated
from model.data.turns import Turn, write_turns
from scoring.conversations import iter_items
from tests.scoring.helpers import REPO_ROOT

LARGE, SMALL = 50_000, 5_000
MiB = 1024 * 1024


def _peak_rss_of_scoring(source: Path, out: Path, model: Path, state_dir: Path) -> float:
    """Peak RSS (MiB) of a process that runs `equipoise score`: VmHWM, since getrusage's ru_maxrss survives exec and
    would report the test runner's own size, inherited through fork."""
    code = (
        "import re, sys\n"
        "from equipoise.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "print('PEAK_KIB', re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1))\n"
        "sys.exit(code)\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO_ROOT),
        "EQUIPOISE_STATE_DIR": str(state_dir),
        "EQUIPOISE_INTRA_OP_THREADS": "1",
    }
    args = [
        "score",
        str(source),
        "--out",
        str(out),
        "--summary",
        str(out.with_suffix(".summary.jsonl")),
        "--model",
        str(model),
    ]
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"turns: {source.stem.split('-')[1]}" in result.stdout.replace(",", "")
    return int(result.stdout.split("PEAK_KIB")[1].split()[0]) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_scoring_peak_rss_does_not_grow_with_the_input(
    tmp_path: Path, meld_turns: list[Turn], tiny_artifact: Path
) -> None:
    peaks = {}
    for n in (SMALL, LARGE):
        source = tmp_path / f"turns-{n}.jsonl"
        write_turns(replicated(meld_turns, n), source)
        peaks[n] = _peak_rss_of_scoring(source, tmp_path / f"out-{n}.jsonl", tiny_artifact, tmp_path / "state")
    print(json.dumps({"peak_rss_mib": peaks}))
    assert peaks[LARGE] - peaks[SMALL] < 25, peaks  # 45,000 more turns: ~17 MiB of output rows alone


@pytest.mark.slow
def test_external_sort_holds_one_run_in_memory(tmp_path: Path, meld_turns: list[Turn]) -> None:
    turns = list(replicated(meld_turns, LARGE))
    random.Random(0).shuffle(turns)
    source = tmp_path / "turns.jsonl"
    write_turns(turns, source)
    size = source.stat().st_size
    del turns
    tracemalloc.start()
    try:
        conversations = sum(1 for _ in iter_items(source, grouped=False, spill_dir=tmp_path, run_rows=2_000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(json.dumps({"input_mib": size / MiB, "traced_peak_mib": peak / MiB}))
    assert conversations > LARGE / 20
    assert peak < 12 * MiB and peak < size / 2, (peak / MiB, size / MiB)
