"""The local engine, the Ray engine and a direct InferenceRuntime.classify call give the same predictions."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from model.data.turns import Turn, write_turns
from model.runtime import InferenceRuntime, UtteranceInput
from scoring.engine import ModelInfo, RuntimeSpec, output_row
from scoring.local import LocalEngine
from scoring.pipeline import run_scoring
from scoring.ray_engine import RayEngine
from tests.scoring.helpers import assert_same_predictions, config, read_rows


def direct_rows(runtime: InferenceRuntime, turns: list[Turn], causal: bool) -> list[dict[str, Any]]:
    """What the API would answer for each conversation: one classify call over the dialogues."""
    dialogues: dict[str, list[Turn]] = defaultdict(list)
    for turn in turns:
        dialogues[turn.conversation_id].append(turn)
    ordered = [sorted(d, key=lambda t: t.turn) for d in dialogues.values()]
    inputs = [[UtteranceInput(t.text, None, t.speaker) for t in dialogue] for dialogue in ordered]
    predictions = runtime.classify(inputs, causal)
    model = ModelInfo.of(runtime)
    return [
        output_row(model, turn.conversation_id, turn.turn, turn.speaker, prediction)
        for dialogue, scored in zip(ordered, predictions, strict=True)
        for turn, prediction in zip(dialogue, scored, strict=True)
    ]


@pytest.mark.parametrize("workers", [1, 3], ids=["serial", "3-workers"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_local_engine_matches_direct_classify(
    tmp_path: Path, meld_turns: list[Turn], runtime: InferenceRuntime, causal: bool, workers: int
) -> None:
    source = tmp_path / "turns.jsonl"
    write_turns(meld_turns, source)
    engine = LocalEngine(runtime, workers)  # 3 threads and chunks of ~16 turns: chunks finish out of order
    report = run_scoring(config(tmp_path, source, causal=causal, batch_turns=16), engine)
    rows = read_rows(tmp_path / "out.jsonl")
    assert report.rows == len(rows) == len(meld_turns)
    assert_same_predictions(rows, direct_rows(runtime, meld_turns, causal))
    assert [(r["conversation_id"], r["turn"]) for r in rows] == [(t.conversation_id, t.turn) for t in meld_turns]


def test_causal_and_bidirectional_context_differ(
    tmp_path: Path, meld_turns: list[Turn], runtime: InferenceRuntime
) -> None:
    causal, bidirectional = (direct_rows(runtime, meld_turns, c) for c in (True, False))
    assert any(abs(a["p_neutral"] - b["p_neutral"]) > 1e-4 for a, b in zip(causal, bidirectional, strict=True))


@pytest.mark.ray
@pytest.mark.slow
def test_ray_engine_matches_local_engine_and_direct_classify(
    tmp_path: Path,
    meld_turns: list[Turn],
    runtime: InferenceRuntime,
    local_engine: LocalEngine,
    spec: RuntimeSpec,
    ray_cluster: None,
) -> None:
    source = tmp_path / "turns.parquet"
    write_turns(reversed(meld_turns), source)  # not grouped: the Ray read task sorts through spilled runs
    run_scoring(config(tmp_path, source, "local.jsonl", summary=tmp_path / "local.csv", batch_turns=8), local_engine)
    engine = RayEngine.from_spec(spec, actors=2)
    report = run_scoring(config(tmp_path, source, "ray.jsonl", summary=tmp_path / "ray.csv", batch_turns=8), engine)

    local, ray_rows = read_rows(tmp_path / "local.jsonl"), read_rows(tmp_path / "ray.jsonl")
    assert report.rows == len(ray_rows) == len(meld_turns)
    assert_same_predictions(ray_rows, local)
    assert_same_predictions(ray_rows, direct_rows(runtime, meld_turns, causal=False))
    assert [(r["conversation_id"], r["turn"]) for r in ray_rows] == [(r["conversation_id"], r["turn"]) for r in local]
    assert read_rows(tmp_path / "ray.csv") == read_rows(tmp_path / "local.csv")


class FailingRuntime:
    """The real runtime, failing on its `fail_on`-th classify call."""

    def __init__(self, runtime: InferenceRuntime, fail_on: int) -> None:
        self.version, self.emotions, self.sentiments = runtime.version, runtime.emotions, runtime.sentiments
        self.artifact = runtime.artifact
        self._runtime, self._fail_on, self.calls = runtime, fail_on, 0

    def classify(self, dialogues: Any, causal: bool) -> list[Any]:
        self.calls += 1
        if self.calls == self._fail_on:
            raise RuntimeError("session failed")
        return self._runtime.classify(dialogues, causal)


def test_a_failing_worker_stops_the_run_and_leaves_it_resumable(
    tmp_path: Path, meld_turns: list[Turn], runtime: InferenceRuntime
) -> None:
    source = tmp_path / "turns.jsonl"
    write_turns(meld_turns, source)
    failing = LocalEngine(FailingRuntime(runtime, fail_on=3), workers=2)
    with pytest.raises(RuntimeError, match="session failed"):
        run_scoring(config(tmp_path, source, batch_turns=16, commit_rows=1), failing)
    report = run_scoring(config(tmp_path, source, batch_turns=16), LocalEngine(runtime, workers=2))
    rows = read_rows(tmp_path / "out.jsonl")
    assert 0 < report.resumed_rows < len(meld_turns)
    assert [(r["conversation_id"], r["turn"]) for r in rows] == [(t.conversation_id, t.turn) for t in meld_turns]
    assert_same_predictions(rows, direct_rows(runtime, meld_turns, causal=False))
