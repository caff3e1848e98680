"""The gate and shadow predictions: when the candidate scored the labelled held-out turns in shadow, the gate compares
the predictions both models served instead of scoring them again, and the decision says which it compared; with
too few shadowed turns, or when the job turns it off, it re-scores and reports how many it had. Through the
running service: the shadow rows `equipoise serve` logs are the ones the gate judges on."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, select

from core.db import crud
from core.db.crud import ShadowRecord
from core.db.models import ModelStatus, Prediction, ShadowPrediction
from core.db.session import session_scope
from model.artifact import ModelArtifact
from model.labels import EMOTIONS
from model.registry import ModelRegistry
from retraining.dataset import conversation_key, feedback_dialogues, is_heldout
from retraining.gate import RESCORED, SHADOW, GateDecision, run_gate
from retraining.gate_config import GateConfig
from retraining.graphs import EmotionHead, read_head, write_head
from retraining.parity import HeadReference
from tests.api.conftest import running_server, wait_for
from tests.retraining.conftest import Turn, log_turns
from tests.retraining.synthetic import MINORITY, class_means
from tests.retraining.test_gate import _candidate
from training.metrics import compute_metrics

TURNS = 4  # per conversation


def heldout_conversations(count: int, prefix: str = "call") -> list[str]:
    """Conversation ids on the held-out side of the split."""
    found: list[str] = []
    i = 0
    while len(found) < count:
        name = f"{prefix}-{i}"
        if is_heldout(conversation_key(name, "")):
            found.append(name)
        i += 1
    return found


def labelled_turns(conversations: list[str], dim: int) -> list[Turn]:
    rng = np.random.default_rng(11)
    turns = []
    for c, conversation in enumerate(conversations):
        for t in range(TURNS):
            label = (c * TURNS + t) % len(EMOTIONS)
            vector = class_means(dim)[label] + 0.6 * rng.normal(size=dim)
            text = f"turn {t} of {conversation}"
            speaker = ("agent", "customer")[t % 2]
            turns.append(Turn(vector.astype(np.float32), EMOTIONS[label], text, conversation, t, speaker))
    return turns


def shadow(engine: Engine, live: list[uuid.UUID], version: str, labels: list[int]) -> None:
    """Shadow rows of `version` for the live predictions, sure of `labels` (what no re-scoring would give)."""
    rows = []
    for prediction_id, label in zip(live, labels, strict=True):
        probabilities = np.full(len(EMOTIONS), 0.01)
        probabilities[label] = 1 - 0.01 * (len(EMOTIONS) - 1)
        record = ShadowRecord(
            uuid.uuid4(),
            datetime.now(UTC),
            prediction_id,
            version,
            EMOTIONS[label],
            label,
            float(probabilities[label]),
            probabilities.tolist(),
            None,
            5.0,
        )
        rows.append(crud.shadow_row(record))
    with engine.begin() as connection:
        crud.insert_logged_rows(connection, rows)
        crud.insert_logged_rows(connection, rows)  # a replayed batch stores nothing twice


def same_head(registry: ModelRegistry, tmp_path: Path, version: str) -> tuple[ModelArtifact, Path, HeadReference]:
    """The champion, and a registered candidate with the same head: re-scored, it gains exactly nothing."""
    base = registry.verify("tiny-1")
    candidate = _candidate(base, tmp_path, version, base.context_path)
    registry.register(candidate, parent_version=base.version)
    return base, candidate, HeadReference(base, read_head(base.context_path))


def gate(
    registry: ModelRegistry, base: ModelArtifact, candidate: Path, reference: HeadReference, **config: object
) -> GateDecision:
    with session_scope(registry.engine) as session:
        data, _ = feedback_dialogues(session, base)
    settings = GateConfig(bootstrap_replicates=200, **config)  # type: ignore[arg-type]
    return run_gate(
        registry, base, candidate, reference, data, minority=MINORITY, config=settings, recipe={"test": True}
    )


@pytest.mark.parametrize("shadow_pairs", [True, False])
def test_the_gate_compares_the_shadow_predictions_unless_the_job_turns_it_off(
    registry: ModelRegistry, engine: Engine, tmp_path: Path, shadow_pairs: bool
) -> None:
    base, candidate, reference = same_head(registry, tmp_path, "shadowed")
    turns = labelled_turns(heldout_conversations(30), base.embed_dim)
    live = log_turns(engine, base.version, turns, EMOTIONS)  # the champion served uniform probabilities
    shadow(engine, live, "shadowed", [EMOTIONS.index(t.label or "") for t in turns])
    decision = gate(registry, base, candidate, reference, shadow_pairs=shadow_pairs)
    assert decision.heldout["shadow_pairs"] == len(turns) and decision.heldout["turns"] == len(turns)
    assert decision.paired is not None and decision.candidate is not None
    if shadow_pairs:  # as served in shadow: sure and right, over a champion that answered "neutral" to everything
        assert decision.paired["predictions"] == SHADOW and not decision.heldout["reencoded"]
        assert decision.heldout["note"].startswith("served by both models (the candidate in shadow)")
        assert decision.candidate["macro_f1"] == 1.0 and decision.paired["gains"]["minority_recall"]["lower"] > 0
        assert decision.promoted and registry.get("shadowed").status == ModelStatus.CHAMPION
    else:  # scored again: the very same head as the champion
        assert decision.paired["predictions"] == RESCORED
        assert decision.paired["gains"]["minority_recall"] == {"estimate": 0.0, "lower": 0.0, "upper": 0.0}
        assert not decision.promoted and registry.get("shadowed").status == ModelStatus.REJECTED


def test_too_few_shadowed_turns_are_rescored(registry: ModelRegistry, engine: Engine, tmp_path: Path) -> None:
    base, candidate, reference = same_head(registry, tmp_path, "partly-shadowed")
    turns = labelled_turns(heldout_conversations(30), base.embed_dim)
    live = log_turns(engine, base.version, turns, EMOTIONS)
    shadow(engine, live[:12], "partly-shadowed", [EMOTIONS.index(t.label or "") for t in turns[:12]])
    decision = gate(registry, base, candidate, reference)  # 12 turns in 3 conversations: fewer than 50 in 20
    assert decision.paired is not None and decision.paired["predictions"] == RESCORED
    assert (decision.heldout["shadow_pairs"], decision.heldout["turns"]) == (12, len(turns))


def test_the_gate_judges_on_the_rows_the_service_logged_in_shadow(
    registry: ModelRegistry, engine: Engine, database_url: str, tmp_path: Path
) -> None:
    base = registry.verify("tiny-1")
    head = read_head(base.context_path)
    lean = np.zeros_like(head.bias)
    lean[EMOTIONS.index("neutral")] = 3.0
    other = EmotionHead(head.weight, head.bias - lean)  # leans less toward neutral: its answers differ
    candidate = _candidate(base, tmp_path, "challenger", write_head(base.context_path, tmp_path / "other.onnx", other))
    registry.register(candidate, parent_version=base.version)
    conversations = heldout_conversations(8)
    settings = {"registry_dir": str(registry.registry_dir), "shadow_share": "1", "audit_share": "1"}
    with running_server(tmp_path / "state", database_url, **settings) as server, server.client() as client:
        answers = []
        for c, conversation in enumerate(conversations):
            texts = [f"I am {word} about order {c}" for word in ("furious", "sad", "glad", "scared")]
            body = {"conversation_id": conversation, "turns": [{"text": text} for text in texts]}
            response = client.post("/v1/predict/dialogue", json=body)
            assert response.status_code == 200, response.text
            answers += response.json()["turns"]
        wait_for(lambda: _count(engine, ShadowPrediction) == len(answers), timeout_s=30)
        for i, answer in enumerate(answers):
            assert answer["model_version"] == "tiny-1" and answer["audit"]
            body = {"prediction_id": answer["prediction_id"], "label": EMOTIONS[i % len(EMOTIONS)], "kind": "audit"}
            assert client.post("/v1/feedback", json=body).status_code == 201
        metrics = client.get("/metrics").text
    assert 'equipoise_shadow_predictions_total{outcome="scored"} 32.0' in metrics
    assert 'equipoise_shadow_agreement_ratio{challenger="challenger"}' in metrics
    assert _count(engine, Prediction) == len(answers)

    decision = gate(
        registry,
        base,
        candidate,
        HeadReference(base, other),
        min_heldout_turns=32,
        min_heldout_conversations=8,
    )
    assert decision.paired is not None and decision.candidate is not None and decision.champion is not None
    assert decision.paired["predictions"] == SHADOW and decision.heldout["shadow_pairs"] == len(answers)
    assert decision.heldout["labels"] == {"audit": len(answers)}
    served = _served_labels(engine, [uuid.UUID(answer["prediction_id"]) for answer in answers])
    labels = [i % len(EMOTIONS) for i in range(len(answers))]
    for role, predicted in (("champion", served[0]), ("candidate", served[1])):
        expected = compute_metrics(np.array(labels), np.array(predicted), EMOTIONS, minority=list(MINORITY))
        assert decision.to_dict()[role]["macro_f1"] == pytest.approx(expected.macro_f1)


def _count(engine: Engine, table: type[Prediction] | type[ShadowPrediction]) -> int:
    with session_scope(engine) as session:
        return len(session.scalars(select(table.id)).all())


def _served_labels(engine: Engine, live: list[uuid.UUID]) -> tuple[list[int], list[int]]:
    """The champion's and the challenger's emotion indices as logged, in the order of `live`."""
    with session_scope(engine) as session:
        rows = session.execute(
            select(Prediction.id, Prediction.label_index, ShadowPrediction.label_index).join(
                ShadowPrediction, ShadowPrediction.live_prediction_id == Prediction.id
            )
        ).all()
    by_id = {row[0]: (row[1], row[2]) for row in rows}
    return [by_id[i][0] for i in live], [by_id[i][1] for i in live]
