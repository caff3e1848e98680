"""The service latency benchmark (benchmarks/latency.py) and its baseline (benchmarks/pipeline_baseline.py): the
PyTorch pipeline computes what the ONNX runtime serves, and the report's percentiles, ratios and verdicts follow
from the measured latencies. No timing is asserted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.latency import Level, Results, Server, Targets, checks_for, render
from benchmarks.load import Outcome, Phase
from benchmarks.pipeline_baseline import (
    BaselineError,
    EmotionPipeline,
    TextEmotionModule,
    check_parity,
    load_pipeline,
    meld_texts,
    onnx_probabilities,
)
from model.artifact import export_artifact, load_artifact
from model.default_model import SHIPPED_DIR
from model.network import EmotionModel, ModelConfig

TEMPERATURE = 1.7  # not 1, so that the pipeline must apply the artifact's calibration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[EmotionModel, Path]:
    """A tiny random model (two context layers, so that the one-turn context path matters) and its artifact."""
    torch.manual_seed(3)
    model = EmotionModel(ModelConfig.tiny(context_layers=2)).eval()
    path = tmp_path_factory.mktemp("latency") / "tiny-latency"
    export_artifact(model, path, version="tiny-latency", calibration_temperature=TEMPERATURE, int8=False)
    return model, path


def _pipeline(model: EmotionModel, artifact_dir: Path) -> EmotionPipeline:
    from transformers import PreTrainedTokenizerFast

    artifact = load_artifact(artifact_dir)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(artifact.tokenizer_path))
    return EmotionPipeline(TextEmotionModule(model), tokenizer, artifact)


@pytest.mark.data
def test_the_baseline_pipeline_answers_what_the_onnx_runtime_serves(tiny, data_dir: Path) -> None:  # noqa: ANN001
    model, artifact_dir = tiny
    pipeline = _pipeline(model, artifact_dir)
    texts = meld_texts(data_dir, 3)
    assert len(texts) == 3
    assert check_parity(pipeline, artifact_dir, texts) <= 1e-4
    answer = pipeline(texts[0])
    probabilities = np.array(list(answer["probabilities"].values()))
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert answer["emotion"] == max(answer["probabilities"], key=answer["probabilities"].get)
    expected = onnx_probabilities(artifact_dir, texts[:1])[0]
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)


@pytest.mark.data
def test_a_different_model_fails_the_parity_check(tiny, data_dir: Path) -> None:  # noqa: ANN001
    model, artifact_dir = tiny
    other = EmotionModel(ModelConfig.tiny(context_layers=2)).eval()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.head.emotion_head.bias[0] += 0.5
    with pytest.raises(BaselineError, match="differ"):
        check_parity(_pipeline(other, artifact_dir), artifact_dir, meld_texts(data_dir, 2))


def test_the_baseline_refuses_a_delta_of_another_release(tiny) -> None:  # noqa: ANN001
    with pytest.raises(BaselineError, match="tiny-latency"):
        load_pipeline(tiny[1], SHIPPED_DIR)


# ------------------------------------------------------------------------------------------------ the report


def _phase(latencies_ms: list[float], seconds: float, clients: int, failed: int = 0) -> Phase:
    answered = [Outcome(200, ms / 1000, 1, (f"id{i}",), None, False) for i, ms in enumerate(latencies_ms)]
    errors = [Outcome(0, 30.0, 1, (), "ReadTimeout", False)] * failed
    return Phase("test", clients, seconds, answered + errors)


def _level(server: Server, workload: str, clients: int, *phases: Phase) -> Level:
    return Level(server, workload, clients, list(phases), cpu_s=1.0, load=[0.5])


def _results() -> Results:
    on, off, baseline = Server(True, 1), Server(False, 1), Server()
    levels = [
        _level(on, "text", 1, _phase([10, 12, 14, 16, 100], seconds=0.5, clients=1)),  # p50 14 ms
        _level(on, "text", 32, _phase([50.0] * 90, seconds=1.0, clients=32), _phase([60.0] * 90, 1.0, 32)),
        _level(off, "text", 32, _phase([40.0] * 100, seconds=1.0, clients=32, failed=2)),
        _level(baseline, "text", 1, _phase([20.0] * 40, seconds=1.0, clients=1)),
        _level(baseline, "text", 32, _phase([700.0] * 50, seconds=1.0, clients=32)),
        _level(on, "text+audio", 1, _phase([30, 45, 50], seconds=0.2, clients=1)),  # p50 45 ms
    ]
    results = Results({(lv.server, lv.workload, lv.clients): lv for lv in levels})
    results.answers = {on: np.full((2, 7), 1 / 7), baseline: np.full((2, 7), 1 / 7) + 3e-5}
    return results


def test_levels_pool_their_rounds() -> None:
    results = _results()
    on32 = results.find(Server(True, 1), "text", 32)
    assert on32 is not None
    assert on32.requests == 180 and on32.errors == 0 and on32.seconds == 2.0
    assert on32.throughput == pytest.approx(90.0)
    assert on32.per_round() == [90.0, 90.0]
    assert on32.latency_ms(50) == pytest.approx(55.0)
    c1 = results.find(Server(True, 1), "text", 1)
    assert c1 is not None and c1.latency_ms(50) == pytest.approx(14.0)
    assert c1.latency_ms(99) == pytest.approx(np.percentile([10, 12, 14, 16, 100], 99))
    off = results.find(Server(False, 1), "text", 32)
    assert off is not None and off.errors == 2 and off.throughput == pytest.approx(100.0)  # errors do not count


def test_verdicts_follow_the_targets() -> None:
    checks = {c.name.split(": ", 1)[1]: c for c in checks_for(_results(), 1, 32, Targets())}
    assert checks["text p50 at concurrency 1 ≤ 15 ms"].passed is True
    assert checks["c32 throughput ≥ 2× baseline"].value == "1.80×"
    assert checks["c32 throughput ≥ 2× baseline"].passed is False
    assert checks["logging costs ≤ 10% of c32 throughput"].value == "10.0%"
    assert checks["logging costs ≤ 10% of c32 throughput"].passed is True
    assert checks["text + audio p50 ≤ 40 ms"].value == "45.0 ms"
    assert checks["text + audio p50 ≤ 40 ms"].passed is False
    unmeasured = checks_for(_results(), 0, 32, Targets())  # no level with auto threads
    assert {c.passed for c in unmeasured} == {None}


def test_the_report_shows_the_figures_and_one_line_per_target() -> None:
    results = _results()
    report = render(results, checks_for(results, 1, 32, Targets()), {"machine": "test"}, [1])
    assert "| baseline | text | 32 | 50 | 0 | 1.0 | 50.0 | 700 | 700 |" in report
    assert "| equipoise, logging on, ORT threads 1 | text | 1 | 5 | 0 | 0.5 | 10.0 | 14.0 |" in report
    assert "equipoise (logging on) / baseline = 1.80×; logging on / off = 0.900" in report
    assert "differ by ≤ 3.0e-05" in report
    verdicts = [line for line in report.splitlines() if line.startswith(("- PASS", "- FAIL"))]
    assert len(verdicts) == 4
    assert sum(line.startswith("- FAIL") for line in verdicts) == 2


def test_a_reference_model_is_read_against_at_the_top_level_and_kept_out_of_the_agreement() -> None:
    """`--reference-model`: the new release's c32 throughput as a share of the old one's; the old model answers
    differently, so it is not held to the baseline's probabilities."""
    results = _results()
    old = Server(True, 1, Path("/models/equipoise-default-1.0.1"))
    results.levels[(old, "text", 32)] = _level(old, "text", 32, _phase([40.0] * 120, seconds=1.0, clients=32))
    results.answers[old] = np.full((2, 7), 0.5)
    checks = {c.name.split(": ", 1)[1]: c for c in checks_for(results, 1, 32, Targets())}
    share = checks["c32 throughput ≥ 60% of reference equipoise-default-1.0.1, logging on, ORT threads 1"]
    assert share.value == "75%" and share.passed is True  # 90 / 120 utt/s
    report = render(results, list(checks.values()), {"machine": "test"}, [1])
    assert "differ by ≤ 3.0e-05" in report
    slower = Targets(of_reference=0.8)
    assert not next(c for c in checks_for(results, 1, 32, slower) if "reference" in c.name).passed
    assert all("reference" not in c.name for c in checks_for(_results(), 1, 32, Targets()))
