"""Helpers of the scoring tests: configurations, readers of outputs in any format, comparisons, the CLI."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from scoring.pipeline import ScoreConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path: Path, source: Path, out: str = "out.jsonl", **options: Any) -> ScoreConfig:
    options.setdefault("progress", False)
    return ScoreConfig(input=source, output=tmp_path / out, **options)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a scoring output (JSONL, CSV or Parquet) with the types of the JSONL form."""
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    with path.open(encoding="utf-8", newline="") as file:
        return [{key: _csv_value(key, value) for key, value in row.items()} for row in csv.DictReader(file)]


def _csv_value(key: str, value: str) -> Any:
    if value == "":
        return None
    if key in {"turn", "turns", "errors", "channel"}:
        return int(value)
    if key.startswith("p_") or key in {"confidence", "negative_share"}:
        return float(value)
    if key in {"timeline", "escalation_points"}:
        return json.loads(value)
    return value


def by_turn(rows: list[dict[str, Any]]) -> dict[tuple[str | None, int | None], dict[str, Any]]:
    keyed = {(row["conversation_id"], row["turn"]): row for row in rows}
    assert len(keyed) == len(rows), "duplicate (conversation_id, turn) rows"
    return keyed


def assert_same_predictions(rows: list[dict[str, Any]], expected: list[dict[str, Any]], atol: float = 1e-5) -> None:
    """Same turns, same labels and sentiments, probabilities within `atol`."""
    got, want = by_turn(rows), by_turn(expected)
    assert got.keys() == want.keys()
    for key, row in want.items():
        other = got[key]
        fields = ("label", "sentiment", "error")
        assert [other[f] for f in fields] == [row[f] for f in fields], key
        for column in (c for c in row if c.startswith("p_") or c == "confidence"):
            if row[column] is None:
                assert other[column] is None
            else:
                assert abs(other[column] - row[column]) <= atol, (key, column, other[column], row[column])


def score_command(
    *args: str | Path, state_dir: Path, shipped_default: bool = True, **popen: Any
) -> subprocess.Popen[str]:
    """`python -m equipoise score ...` in a subprocess with isolated settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EQUIPOISE_")}
    env.update(EQUIPOISE_STATE_DIR=str(state_dir), PYTHONPATH=str(REPO_ROOT), EQUIPOISE_INTRA_OP_THREADS="1")
    env.update(EQUIPOISE_SHIPPED_DEFAULT=str(shipped_default).lower())
    command = [sys.executable, "-m", "equipoise", "score", *map(str, args)]
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(command, env=env, text=True, **popen)


def run_score(
    *args: str | Path, state_dir: Path, timeout: float = 300, shipped_default: bool = True
) -> subprocess.CompletedProcess[str]:
    process = score_command(*args, state_dir=state_dir, shipped_default=shipped_default)
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
