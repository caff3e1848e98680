"""Tier 3 end to end on the CPU with a tiny configuration: fine-tuning, export, parity, the gate from text."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine

from core.db.models import JobStatus, ModelStatus
from model.labels import EMOTIONS
from model.registry import ModelRegistry
from tests.retraining.conftest import log_turns, run_job
from tests.retraining.synthetic import labelled_turns

pytestmark = pytest.mark.slow

FINE_TUNING = {"epochs": 3, "batch_dialogues": 16, "lr": 1e-3, "head_lr": 3e-3}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_tier3_fine_tunes_exports_and_gates_the_model(engine: Engine, registry: ModelRegistry, tmp_path: Path) -> None:
    base = registry.verify("tiny-1")
    log_turns(engine, base.version, labelled_turns(400, base.embed_dim, seed=11), EMOTIONS)
    job = run_job(engine, registry, tmp_path, tier=3, reason="admin", params={"fine_tuning": FINE_TUNING})

    assert job.status == JobStatus.SUCCEEDED, job.error
    result = job.result
    assert result["tier"] == 3 and result["heldout"]["reencoded_from_text"]
    assert result["parity_max_abs_diff"] <= 1e-4  # the re-exported graphs match the fine-tuned network
    assert result["candidate"]["macro_f1"] > result["champion"]["macro_f1"]
    row = registry.get(job.candidate_version)
    expected = ModelStatus.CHAMPION if result["promoted"] else ModelStatus.REJECTED
    assert row.status == expected and row.recipe["tier"] == 3
