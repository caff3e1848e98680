"""`--engine ray` on a small local Ray cluster: tier 2's training as a Ray task in a real job, and tier 3's
fine-tuning data-parallel on Ray Train (two CPU workers, gloo)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import Engine

from core.db.models import JobStatus
from model.labels import EMOTIONS
from model.network import EmotionModel, ModelConfig
from model.registry import ModelRegistry
from model.text_encoder import pretrained_dir
from retraining.ray_engine import fit_torch, run_task
from retraining.tier2_head import HeadTraining, train_head
from retraining.tier3_finetune import (
    SELECTION_FILE,
    FineTuner,
    FineTuning,
    conversation_dialogues,
    start_model,
    tier3_recipe,
)
from tests.conftest import one_worker_at_a_time
from tests.retraining.conftest import log_turns, run_job
from tests.retraining.synthetic import labelled_turns, single_turns
from training.recipe import load_recipe

pytestmark = [pytest.mark.ray, pytest.mark.slow]
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    ray = pytest.importorskip("ray")
    # Ray's workers import the project from the checkout, like the test process.
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
    with one_worker_at_a_time("ray", tmp_path_factory):
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=runtime_env)
        try:
            yield
        finally:
            ray.shutdown()


def test_head_training_as_a_ray_task_matches_local_training(ray_cluster: None) -> None:
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(300, 8)).astype(np.float32), rng.integers(0, 3, 300)
    config = HeadTraining(epochs=3)
    remote = run_task(train_head, (features, labels, 3, config))
    local = train_head(features, labels, 3, config)
    np.testing.assert_allclose(remote.weight, local.weight, atol=1e-5)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_tier2_job_on_the_ray_engine_is_gated_and_promoted(
    ray_cluster: None, engine: Engine, registry: ModelRegistry, tmp_path: Path
) -> None:
    log_turns(engine, "tiny-1", labelled_turns(1200, registry.verify("tiny-1").embed_dim, seed=2), EMOTIONS)
    job = run_job(engine, registry, tmp_path, tier=2, engine="ray", reason="collapse")
    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.result["engine"] == "ray" and job.result["promoted"], job.result["reasons"]


def test_tier3_fine_tuning_runs_data_parallel_on_ray_train(ray_cluster: None, tmp_path: Path) -> None:
    data = single_turns(labelled_turns(64, 16, seed=4), heldout=False)
    train, dev = conversation_dialogues(data, meld=True, dev_fraction=0.25)
    shipped = dataclasses.replace(load_recipe("default"), model=ModelConfig.tiny())
    recipe = tier3_recipe(shipped, FineTuning(epochs=1, batch_dialogues=8, lr=1e-3))
    torch.manual_seed(0)
    initial = EmotionModel(ModelConfig.tiny()).state_dict()
    state = fit_torch(
        functools.partial(start_model, ModelConfig.tiny().to_dict(), initial, False),
        FineTuner(train, dev, recipe, pretrained_dir() / "tokenizer.json", report_dir=tmp_path),
        num_workers=2,
        use_gpu=False,
        storage=tmp_path / "ray",
        name="tier3-test",
    )
    assert state.keys() == initial.keys()
    assert not torch.equal(state["head.emotion_head.weight"], initial["head.emotion_head.weight"])
    assert torch.equal(state["encoder.audio_proj.weight"], initial["encoder.audio_proj.weight"])  # no audio: frozen
    assert (tmp_path / SELECTION_FILE).is_file()  # rank 0's dev selection record
