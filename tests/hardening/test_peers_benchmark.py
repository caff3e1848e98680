"""The serving-peers benchmark (benchmarks/peers.py): its command line keeps every peer within the thread budget, its
verdict follows from the measured levels, and the peer servers (benchmarks/peer_servers.py: PyTriton, Ray Serve)
answer the labels and probabilities that `equipoise serve` answers on /v1 for the same MELD texts. The servers'
test needs the `peers` extra (`make peers`) and skips with the reason otherwise. No timing is asserted."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks import peers
from benchmarks.load import Outcome, Phase
from benchmarks.peer_servers import TRITON_STUB_ENV, PeerConfig
from benchmarks.peers import (
    AGREEMENT_TOLERANCE,
    EQUIPOISE,
    PROTOCOLS,
    RAY,
    TRITON,
    BatchResult,
    Reference,
    Results,
    Setting,
    agreement,
    checks,
    meld_texts,
    parse_args,
    settings_of,
    start,
)
from benchmarks.peers import Plan as PeersPlan
from core.processes import ProcessError


def test_the_default_grid_keeps_every_peer_within_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("benchmarks.peers.available_cores", lambda: 2)
    args = parse_args(["--model", "m"])
    grid = {(c.threads, c.instances) for c in (*args.triton_grid, *args.ray_grid)}
    assert grid == {(1, 1), (1, 2), (2, 1)}
    assert {c.wait_ms for c in args.triton_grid} == {0.5, 3.0}
    names = [s.name for s in settings_of(args)]
    assert names[0] == "equipoise: defaults" and names[-1].startswith("floor")
    assert len(names) == 1 + 6 + 6 + 1


def test_the_command_line_reads_grids_and_variants_and_refuses_a_larger_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("benchmarks.peers.available_cores", lambda: 2)
    args = parse_args(
        ["--model", "m", "--triton-grid", "16:1:1:2", "--peers", "equipoise,triton"]
        + ["--equipoise-variant", "batch_max_wait_ms=0,intra_op_threads=2"]
    )
    assert args.triton_grid == (PeerConfig(16, 1.0, 1, 2),)
    assert [s.name for s in settings_of(args)] == [
        "equipoise: defaults",
        "equipoise: batch_max_wait_ms=0, intra_op_threads=2",
        "triton: batch 16, wait 1 ms, 1 thr x 2 instances",
    ]
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--ray-grid", "32:1:2:2"])  # 4 threads on 2 cores
    with pytest.raises(SystemExit):
        parse_args(["--model", "m", "--peers", "equipoise,torchserve"])


def _phase(clients: int, latencies_ms: list[float], seconds: float) -> Phase:
    outcomes = [Outcome(200, ms / 1000, 1, (f"id{i}",), None, False) for i, ms in enumerate(latencies_ms)]
    return Phase(f"c{clients}", clients, seconds, outcomes)


def _results(ours_c32: float, triton_c32: float, ours_p50: float, triton_p50: float, batch: float) -> Results:
    results = Results()
    ours, triton = Setting(EQUIPOISE), Setting(TRITON, PeerConfig())
    for setting, c32, p50 in ((ours, ours_c32, ours_p50), (triton, triton_c32, triton_p50)):
        results.level(setting, 1).phases.append(_phase(1, [p50] * 11, 1.0))
        results.level(setting, 32).phases.append(_phase(32, [200.0] * round(c32), 1.0))
        results.agreement[setting] = 1e-7
    results.batches.append(BatchResult(1000, 3.0, batch, 5.0, True))
    return results


def test_the_verdict_compares_equipoise_with_the_best_peer_and_batch_scoring() -> None:
    plan = PeersPlan(concurrency=(1, 32))
    passed = checks(_results(200, 150, 9.0, 12.0, 250), Setting(EQUIPOISE), plan, 0.7)
    assert [c.passed for c in passed] == [True, True, True, True]
    assert "200.0 vs 150.0 utt/s" in passed[0].value and "80.0%" in passed[2].value
    failed = checks(_results(150, 200, 12.0, 9.0, 250), Setting(EQUIPOISE), plan, 0.7)
    assert [c.passed for c in failed] == [False, False, False, True]


def test_batch_scoring_is_pooled_over_the_rounds_and_each_round_compared_with_its_own() -> None:
    results = _results(200, 150, 9.0, 12.0, 250)  # round 1: 200 / 250
    results.level(Setting(EQUIPOISE), 32).phases.append(_phase(32, [200.0] * 300, 1.0))  # round 2: 300 / 500
    results.batches.append(BatchResult(1000, 3.0, 500, 5.0, True))
    assert results.batch_turns_per_s == pytest.approx(2000 / (1000 / 250 + 1000 / 500))
    plan = PeersPlan(concurrency=(1, 32))
    ratio = checks(results, Setting(EQUIPOISE), plan, 0.7)[2]  # 250 utt/s over the pooled 333.3: 75.0 %
    assert ratio.passed is True
    assert "75.0% (250.0 / 333.3; by round 80.0%, 60.0%)" in ratio.value
    assert checks(results, Setting(EQUIPOISE), plan, 0.8)[2].passed is False


def test_a_server_with_another_label_fails_the_agreement_check() -> None:
    results = _results(200, 150, 9.0, 12.0, 250)
    results.agreement[Setting(TRITON, PeerConfig())] = float("inf")
    assert checks(results, Setting(EQUIPOISE), PeersPlan(), 0.7)[-1].passed is False


def _peers_missing() -> str | None:
    for module in ("pytriton", "ray.serve"):
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return f"{module} is not installed: `make peers` installs the peers extra"
    if not (TRITON_STUB_ENV / "bin" / "python3").exists():
        return f"{TRITON_STUB_ENV} is missing: `make peers` builds the Triton stub's environment"
    return None


@pytest.mark.slow
@pytest.mark.ray
def test_the_peers_answer_what_equipoise_answers_on_v1(tiny_artifact: Path, data_dir: Path, tmp_path: Path) -> None:
    if (reason := _peers_missing()) is not None:
        pytest.skip(reason)
    reference = Reference.of(tiny_artifact, meld_texts(data_dir, seed=1)[:4])
    config = PeerConfig(max_batch_size=8, wait_ms=1, threads=1, instances=1)
    answered = {}
    for setting in (Setting(EQUIPOISE), Setting(TRITON, config), Setting(RAY, config)):
        with start(setting, tiny_artifact, data_dir, tmp_path) as running:
            answered[setting.peer] = agreement(running.url, PROTOCOLS[setting.peer], reference)
    assert all(worst <= AGREEMENT_TOLERANCE for worst in answered.values()), answered


def _starts(monkeypatch: pytest.MonkeyPatch, failures: int) -> list[str]:
    """Stands in for the peer process and its first scoring: the first `failures` starts die before they score."""
    started: list[str] = []

    @contextlib.contextmanager
    def process(setting: Setting, model: Path, work: Path) -> Iterator[str]:
        started.append(f"start {len(started) + 1}")
        yield started[-1]

    def scores(running: str, protocol: object) -> bool:
        if int(running.split()[1]) <= failures:
            raise ProcessError(f"the triton exited with 1 ({running})")
        return True

    monkeypatch.setattr(peers, "_peer_process", process)
    monkeypatch.setattr(peers, "scores", scores)
    return started


def test_a_peer_whose_start_fails_is_started_once_more(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started = _starts(monkeypatch, failures=1)
    with peers.peer_server(Setting(TRITON, PeerConfig()), tmp_path, tmp_path) as running:
        assert running == "start 2"
    assert started == ["start 1", "start 2"]


def test_a_peer_that_fails_to_start_twice_fails_the_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    started = _starts(monkeypatch, failures=2)
    setting = Setting(TRITON, PeerConfig())
    with pytest.raises(ProcessError, match="start 2"), peers.peer_server(setting, tmp_path, tmp_path):
        pass
    assert len(started) == peers.START_ATTEMPTS
