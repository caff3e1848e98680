"""A run killed with SIGKILL and resumed ends with exactly one row per input turn and the results of an
uninterrupted run."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from benchmarks.scoring_throughput import replicated
from model.data.meld import group_dialogues, read_utterances
from model.data.turns import Turn, meld_to_turns, write_turns
from scoring.local import LocalEngine
from scoring.manifest import manifest_path
from scoring.pipeline import run_scoring
from tests.scoring.helpers import assert_same_predictions, config, read_rows, run_score, score_command

TURNS = 12_000
COMMIT_ROWS = 300


def _commits(output: Path) -> int:
    path = manifest_path(output)
    return max(0, len(path.read_bytes().splitlines()) - 1) if path.exists() else 0


def _kill_after_first_commits(output: Path, *args: str | Path, state_dir: Path) -> None:
    log = output.with_name("killed-run.log")
    with log.open("w") as sink:  # a file, not a pipe that nobody reads while the run goes on
        process = score_command(*args, state_dir=state_dir, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while _commits(output) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        running = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert running, f"the run ended before it could be killed: {log.read_text()[-2000:]}"
    assert process.returncode == -signal.SIGKILL


@pytest.fixture(scope="module")
def meld_test_turns(data_dir: Path) -> list[Turn]:
    return list(replicated(list(meld_to_turns(group_dialogues(read_utterances(data_dir, "test")))), TURNS))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("source_name", "out_name", "summary_name"),
    [
        ("turns.jsonl", "out.jsonl", "summary.csv"),  # grouped input: streamed
        ("turns.parquet", "out.parquet", "summary.parquet"),  # interleaved input: sorted through spilled runs
    ],
)
def test_killed_run_resumes_to_the_uninterrupted_result(
    tmp_path: Path,
    meld_test_turns: list[Turn],
    local_engine: LocalEngine,
    tiny_artifact: Path,
    source_name: str,
    out_name: str,
    summary_name: str,
) -> None:
    turns = list(meld_test_turns)
    if source_name.endswith(".parquet"):
        random.Random(0).shuffle(turns)
    source, output, summary = tmp_path / source_name, tmp_path / out_name, tmp_path / summary_name
    write_turns(turns, source)
    args = (
        source,
        "--out",
        output,
        "--summary",
        summary,
        "--model",
        tiny_artifact,
        "--commit-rows",
        str(COMMIT_ROWS),
        "--batch-size",
        "32",
    )

    _kill_after_first_commits(output, *args, state_dir=tmp_path / "state")
    assert _commits(output) > 0 and "complete" not in manifest_path(output).read_text()
    resumed = run_score(*args, state_dir=tmp_path / "state")
    assert resumed.returncode == 0, resumed.stderr
    assert f"turns: {len(turns):,}" in resumed.stdout
    carried_over = re.search(r"([\d,]+) resumed from earlier runs", resumed.stdout)
    assert carried_over is not None and int(carried_over.group(1).replace(",", "")) >= COMMIT_ROWS

    reference = tmp_path / "reference"
    reference.mkdir()
    run_scoring(config(reference, source, out_name, summary=reference / summary_name), local_engine)
    rows = read_rows(output)
    assert len(rows) == len(turns)
    assert_same_predictions(rows, read_rows(reference / out_name))
    summaries = read_rows(summary)
    assert sorted(s["conversation_id"] for s in summaries) == sorted({t.conversation_id for t in turns})
    expected = {s["conversation_id"]: s["timeline"] for s in read_rows(reference / summary_name)}
    assert {s["conversation_id"]: s["timeline"] for s in summaries} == expected


def test_a_finished_run_is_not_scored_again(tmp_path: Path, meld_turns: list[Turn], local_engine: LocalEngine) -> None:
    source = tmp_path / "turns.csv"
    write_turns(meld_turns, source)
    first = run_scoring(config(tmp_path, source, "out.parquet"), local_engine)
    again = run_scoring(config(tmp_path, source, "out.parquet"), local_engine)
    assert (again.rows, again.resumed_rows, again.scored_rows) == (first.rows, first.rows, 0)
    assert len(read_rows(tmp_path / "out.parquet")) == len(meld_turns)
