"""The gate: a candidate failing ONNX parity (a corrupted graph) or the metric margins is registered, rejected
with its reasons, and never becomes the champion."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.db.models import ModelStatus
from model.artifact import CONTEXT_FILE, ModelArtifact, write_artifact
from model.registry import ModelRegistry
from retraining.dataset import DialogueSet
from retraining.gate import run_gate
from retraining.gate_config import GateConfig
from retraining.graphs import EmotionHead, read_head, write_head
from retraining.parity import HeadReference
from retraining.queue import PermanentError
from retraining.tiers import head_graphs
from tests.retraining.synthetic import MINORITY, labelled_turns, single_turns


def _heldout(dim: int, n: int = 300) -> DialogueSet:
    return single_turns(labelled_turns(n, dim, seed=5), heldout=True)


def _candidate(base: ModelArtifact, out: Path, version: str, context: Path) -> Path:
    write_artifact(
        out / version,
        version=version,
        graphs=head_graphs(base, context),
        tokenizer=base.tokenizer_path,
        model_config=base.config,
        preprocessing=base.preprocessing,
    )
    return out / version


def _gate(registry: ModelRegistry, base: ModelArtifact, candidate: Path, head: EmotionHead) -> list[str]:
    decision = run_gate(
        registry,
        base,
        candidate,
        HeadReference(base.context_path, head),
        _heldout(base.embed_dim),
        minority=MINORITY,
        config=GateConfig(),
        recipe={"test": True},
    )
    assert not decision.promoted and decision.version is not None
    row = registry.get(decision.version)
    assert row.status == ModelStatus.REJECTED and row.rejection_reason == "; ".join(decision.reasons)
    champion = registry.champion()
    assert champion is not None and champion.version == base.version  # never served
    return decision.reasons


def test_a_graph_that_differs_from_its_reference_fails_parity(registry: ModelRegistry, tmp_path: Path) -> None:
    base = registry.verify("tiny-1")
    head = read_head(base.context_path)
    tampered = write_head(base.context_path, tmp_path / "tampered.onnx", EmotionHead(head.weight, head.bias + 0.01))
    reasons = _gate(registry, base, _candidate(base, tmp_path, "tampered", tampered), head)
    assert len(reasons) == 1 and reasons[0].startswith("ONNX parity failed")


def test_a_corrupted_graph_fails_parity(registry: ModelRegistry, tmp_path: Path) -> None:
    base = registry.verify("tiny-1")
    corrupted = tmp_path / CONTEXT_FILE
    corrupted.write_bytes(base.context_path.read_bytes()[:-200] + b"\0" * 200)
    reasons = _gate(registry, base, _candidate(base, tmp_path, "corrupted", corrupted), read_head(base.context_path))
    assert reasons[0].startswith("ONNX parity failed")


def test_a_candidate_no_better_than_the_champion_is_rejected(registry: ModelRegistry, tmp_path: Path) -> None:
    base = registry.verify("tiny-1")
    same = _candidate(base, tmp_path, "same", base.context_path)
    reasons = _gate(registry, base, same, read_head(base.context_path))
    assert any(reason.startswith("macro F1") and "below the required" in reason for reason in reasons)
    assert any(reason.startswith("minority recall") for reason in reasons)


def test_the_margins_are_configurable() -> None:
    config = GateConfig.from_params({"gate": {"min_macro_f1_gain": 0.05}})
    assert config.min_macro_f1_gain == 0.05 and config.max_weighted_f1_drop == GateConfig().max_weighted_f1_drop
    with pytest.raises(PermanentError, match="unknown gate settings"):
        GateConfig.from_params({"gate": {"min_gain": 1}})
