"""JSONL, CSV and Parquet in and out give the same rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.data.turns import Turn, write_turns
from scoring.local import LocalEngine
from scoring.pipeline import run_scoring
from tests.scoring.helpers import assert_same_predictions, config, read_rows

PAIRS = [("jsonl", "csv"), ("csv", "parquet"), ("parquet", "jsonl")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, meld_turns: list[Turn], local_engine: LocalEngine) -> Path:
    work = tmp_path_factory.mktemp("reference")
    write_turns(meld_turns, work / "turns.jsonl")
    run_scoring(config(work, work / "turns.jsonl", summary=work / "summary.jsonl"), local_engine)
    return work


@pytest.mark.parametrize(("source_format", "output_format"), PAIRS)
def test_every_format_in_and_out(
    tmp_path: Path,
    meld_turns: list[Turn],
    local_engine: LocalEngine,
    reference: Path,
    source_format: str,
    output_format: str,
) -> None:
    source = tmp_path / f"turns.{source_format}"
    write_turns(meld_turns, source)
    out, summary = f"out.{output_format}", tmp_path / f"summary.{output_format}"
    run_scoring(config(tmp_path, source, out, summary=summary), local_engine)

    rows = read_rows(tmp_path / out)
    assert list(rows[0]) == list(read_rows(reference / "out.jsonl")[0])  # same columns, same order
    assert_same_predictions(rows, read_rows(reference / "out.jsonl"), atol=1e-12)
    assert read_rows(summary) == read_rows(reference / "summary.jsonl")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([source.name, out, f"{out}.manifest", summary.name])
