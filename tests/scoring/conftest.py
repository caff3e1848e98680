"""Fixtures of the scoring tests: a few MELD test conversations, the tiny model, a local Ray cluster."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from model.data.meld import group_dialogues, read_utterances
from model.data.turns import Turn, meld_to_turns
from model.runtime import InferenceRuntime
from scoring.engine import RuntimeSpec
from scoring.local import LocalEngine
from tests.conftest import one_worker_at_a_time

CONVERSATIONS = 8


@pytest.fixture(scope="session")
def meld_turns(data_dir: Path) -> list[Turn]:
    """The turns of the first MELD test conversations, in file order."""
    dialogues = group_dialogues(read_utterances(data_dir, "test"))[:CONVERSATIONS]
    return list(meld_to_turns(dialogues))


@pytest.fixture(scope="session")
def spec(tiny_artifact: Path) -> RuntimeSpec:
    return RuntimeSpec(tiny_artifact, device="cpu", intra_op_threads=1)


@pytest.fixture(scope="session")
def runtime(spec: RuntimeSpec) -> InferenceRuntime:
    return spec.load()


@pytest.fixture(scope="session")
def local_engine(runtime: InferenceRuntime) -> LocalEngine:
    return LocalEngine(runtime)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    ray = pytest.importorskip("ray")
    with one_worker_at_a_time("ray", tmp_path_factory):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()
