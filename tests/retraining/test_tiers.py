"""Tier selection, data assembly, and tiers 1 and 2 end to end: a queued job through the worker, the candidate
through the gate, the registry's champion afterwards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine

from core.db.models import JobStatus, ModelStatus
from core.db.session import session_scope
from model.artifact import (
    ENCODER_FILE,
    Calibration,
    ClassPrior,
    DataSource,
    DevReference,
    ModelArtifact,
    PosteriorCalibration,
    derive_artifact,
    load_artifact,
)
from model.labels import EMOTIONS
from model.registry import ModelRegistry
from retraining.dataset import BASE, base_dialogues, feedback_dialogues, is_heldout
from retraining.gate_config import GateConfig
from retraining.graphs import EMOTION_OUTPUT, read_head, run_context, session
from retraining.queue import PermanentError
from retraining.tier1_priors import correction as tier1_correction
from retraining.tier2_head import HeadTraining, denoised
from retraining.tiers import Evidence, NotEnoughEvidence, TierInputs, TierRules, choose_tier
from tests.retraining.conftest import Turn, log_turns, run_job
from tests.retraining.synthetic import MINORITY, labelled_turns, prior_shifted_stream, single_turns

RULES = TierRules(min_labels=200, min_per_minority=10, min_unlabelled=100)


def _evidence(labelled: int, minority_each: int, recent: int = 500) -> Evidence:
    per_class = {"neutral": labelled} | dict.fromkeys(MINORITY, minority_each)
    return Evidence(labelled=labelled, per_class=per_class, recent_predictions=recent)


def test_tier_choice_follows_the_labels_available() -> None:
    assert choose_tier(None, _evidence(500, 30), RULES, MINORITY).tier == 2
    few_minority = choose_tier(None, _evidence(500, 3), RULES, MINORITY)
    assert few_minority.tier == 1 and "too few minority labels" in few_minority.reason
    assert choose_tier(None, _evidence(20, 10), RULES, MINORITY).tier == 1
    assert choose_tier(3, _evidence(0, 0), RULES, MINORITY).tier == 3  # an admin's choice wins
    with pytest.raises(NotEnoughEvidence):
        choose_tier(None, _evidence(20, 10, recent=5), RULES, MINORITY)
    with pytest.raises(PermanentError):
        choose_tier(4, _evidence(500, 30), RULES, MINORITY)


def test_feedback_is_deduplicated_by_text_and_split_by_conversation(sqlite_engine: Engine, champion_dir: Path) -> None:
    registry = ModelRegistry(sqlite_engine, champion_dir.parent / "registry-dedup")
    artifact = registry.verify(registry.register(champion_dir).version)
    rng = np.random.default_rng(0)
    vector = rng.normal(size=16).astype(np.float32)
    same = [Turn(vector, "joy", "same words"), Turn(vector, "anger", "same words")]  # the newer label wins
    log_turns(sqlite_engine, artifact.version, [*same, Turn(vector, None, "context only", "c1", 0, "a")], EMOTIONS)
    log_turns(sqlite_engine, artifact.version, [Turn(vector, "fear", "labelled", "c1", 1, "b")], EMOTIONS)
    with session_scope(sqlite_engine) as session:
        data, stats = feedback_dialogues(session, artifact)
    assert (stats.labelled, stats.duplicates) == (2, 1)
    labels = {key: label for key, label in zip(data.keys, data.labels.tolist(), strict=True) if label >= 0}
    assert sorted(labels.values()) == sorted([EMOTIONS.index("anger"), EMOTIONS.index("fear")])
    assert data.lengths.tolist().count(2) == 1  # the conversation, in turn order, with its unlabelled turn
    assert data.texts[data.keys.index(next(k for k in labels if labels[k] == EMOTIONS.index("fear")))] == "labelled"
    assert data.heldout.tolist() == [is_heldout(c) for c in data.conversations]  # a function of the conversation
    assert data.conversations.count("conversation:c1") == 2  # its turns share it; a single turn is its own


def test_tier2_retrains_the_head_and_the_gate_promotes_it(
    engine: Engine, registry: ModelRegistry, tmp_path: Path
) -> None:
    base = registry.verify("tiny-1")
    log_turns(engine, base.version, labelled_turns(1200, base.embed_dim, seed=1), EMOTIONS)
    job = run_job(engine, registry, tmp_path, trigger="collapse", reason="collapse toward neutral")

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.tier == 2 and job.result["tier"] == 2 and job.result["promoted"], job.result["reasons"]
    champion, candidate = job.result["champion"], job.result["candidate"]
    assert candidate["minority_recall"] > champion["minority_recall"] + 0.3
    assert candidate["macro_f1"] > champion["macro_f1"] and job.result["heldout"]["feedback"] >= 100
    assert job.result["parity_max_abs_diff"] <= 1e-4
    promoted = registry.champion()
    assert promoted is not None and promoted.version == job.candidate_version == "tiny-1-retrain1"
    assert promoted.parent_version == "tiny-1" and registry.get("tiny-1").status == ModelStatus.RETIRED
    served = load_artifact(promoted.artifact_path)
    assert served.files[ENCODER_FILE].sha256 == base.files[ENCODER_FILE].sha256  # the encoder is reused as is
    assert served.calibration.temperature != base.calibration.temperature  # refitted on the held-out split
    assert served.metrics["heldout"]["minority_recall"] == pytest.approx(candidate["minority_recall"])
    # a whole calibration record, so the monitor tests the new champion's class mix against its own confusion
    record = served.calibration
    assert record.has_record and record.dev_reference is not None and record.posterior is not None
    assert sum(map(sum, record.dev_reference.confusion)) == job.result["heldout"]["feedback"]
    assert record.training_prior is not None and record.training_prior.shares == pytest.approx([1 / 7] * 7)
    assert record.temperature_source is not None and record.temperature_source.data == "the gate's held-out feedback"


def _with_calibration_record(registry: ModelRegistry, base: ModelArtifact, seed: int, out: Path) -> ModelArtifact:
    """`base` as a new champion whose artifact records its calibration: its served probabilities are its calibrated
    posteriors (the synthetic labels are drawn from them), the training prior is their mean on unshifted traffic,
    and the dev confusion is measured there."""
    _, labels, posteriors, prior = prior_shifted_stream(base, 3000, np.ones(len(EMOTIONS)), seed=seed)
    source = DataSource("synthetic unshifted traffic", "text", len(labels), None)
    confusion = np.zeros((len(EMOTIONS), len(EMOTIONS)), dtype=int)
    np.add.at(confusion, (labels, posteriors.argmax(axis=1)), 1)
    calibration = Calibration(
        temperature=base.calibration.temperature,
        temperature_source=source,
        training_prior=ClassPrior(tuple(prior), source),
        dev_prior=ClassPrior(tuple(prior), source),
        posterior=PosteriorCalibration(base.calibration.temperature, (0.0,) * len(EMOTIONS), source),
        dev_reference=DevReference(confusion, np.zeros(confusion.shape), source),
    )
    derived = derive_artifact(base, out / "tiny-2", version="tiny-2", calibration=calibration)
    registry.promote(registry.register(derived.path).version)
    return registry.verify("tiny-2")


def _log_stream(engine: Engine, base: ModelArtifact, weights: np.ndarray, seed: int) -> tuple[np.ndarray, ...]:
    embeddings, labels, probabilities, train_prior = prior_shifted_stream(base, 1500, weights, seed=seed)
    turns = [
        Turn(
            e.astype(np.float32), EMOTIONS[y] if i % 4 == 0 else None, f"turn {i}", f"c{i // 5}", i % 5, probabilities=p
        )
        for i, (e, y, p) in enumerate(zip(embeddings, labels, probabilities, strict=True))
    ]
    log_turns(engine, base.version, turns, EMOTIONS)
    return embeddings, train_prior


TIER1_PARAMS = {
    "tiers": {"min_labels": 1000},  # ~375 labels are "few" here: tier 1 is chosen
    "gate": {"macro_f1_tolerance": 1.0, "max_weighted_f1_drop": 1.0, "min_heldout_turns": 30},
}


def test_tier1_corrects_the_priors_from_unlabelled_predictions(
    engine: Engine, registry: ModelRegistry, tmp_path: Path
) -> None:
    base = _with_calibration_record(registry, registry.verify("tiny-1"), 2, tmp_path)
    weights = np.array([0.3, 1, 1, 1, 3, 3, 3])  # production: fewer neutral, many more minority turns
    embeddings, train_prior = _log_stream(engine, base, weights, seed=3)
    new_prior = train_prior * weights / (train_prior * weights).sum()
    job = run_job(engine, registry, tmp_path, reason="prior shift", params=TIER1_PARAMS)

    assert job.status == JobStatus.SUCCEEDED, job.error
    assert job.tier == 1 and "prior correction" in job.result["tier_reason"]
    recipe = registry.get(job.candidate_version).recipe
    assert recipe["significant"] and np.abs(np.array(recipe["new_prior"]) - new_prior).max() < 0.03
    assert all(lo <= p <= hi for lo, p, hi in zip(recipe["lower"], new_prior, recipe["upper"], strict=True))
    # The correction is a bias change inside the served context graph: T_bcts * (1 - beta) * log(new / train),
    # centred; this record's BCTS biases are zero, so beta is 0 (a Bayes rule: the whole ratio).
    candidate = load_artifact(registry.get(job.candidate_version).artifact_path)
    offset = read_head(candidate.context_path).bias - read_head(base.context_path).bias
    assert base.calibration.posterior is not None and base.calibration.training_prior is not None
    recorded = np.array(base.calibration.training_prior.shares)
    assert recipe["prior_exponent"] == 0.0
    expected = base.calibration.posterior.temperature * np.log(np.array(recipe["new_prior"]) / recorded)
    assert offset == pytest.approx(expected - expected.mean(), abs=0.02)
    probe = [(embeddings[:5].astype(np.float32), np.zeros(5, np.int64), True)]
    after, before = (run_context(session(a.context_path), probe, [EMOTION_OUTPUT])[0] for a in (candidate, base))
    assert after - before == pytest.approx(np.broadcast_to(offset, after.shape), abs=1e-4)
    # its posteriors now assume the estimated prior; its confusion is its own, re-measured on the held-out turns
    assert candidate.calibration.training_prior is not None
    assert candidate.calibration.training_prior.shares == pytest.approx(recipe["new_prior"])
    reference = candidate.calibration.dev_reference
    assert reference is not None and reference.source.data == "the gate's held-out feedback"
    assert sum(map(sum, reference.confusion)) == reference.source.turns > 0
    assert job.result["promoted"], job.result["reasons"]


def test_tier1_refuses_unshifted_traffic_and_an_artifact_without_a_record(
    engine: Engine, registry: ModelRegistry, tmp_path: Path
) -> None:
    base = _with_calibration_record(registry, registry.verify("tiny-1"), 4, tmp_path)
    _log_stream(engine, base, np.ones(len(EMOTIONS)), seed=5)
    job = run_job(engine, registry, tmp_path / "unshifted", reason="no shift", params=TIER1_PARAMS)
    assert job.status == JobStatus.FAILED and "no significant label shift" in (job.error or "")
    assert job.candidate_version is None

    older = registry.verify("tiny-1")
    found = np.full((10, len(EMOTIONS)), 1 / len(EMOTIONS))
    with pytest.raises(PermanentError, match="records no training prior"):
        tier1_correction(found, np.arange(10), older.calibration, older.emotions.names)


@pytest.mark.data
def test_base_corpora_are_encoded_by_the_base_encoder_once_and_cached(
    data_dir: Path, champion_dir: Path, tmp_path: Path
) -> None:
    artifact = load_artifact(champion_dir)
    data = base_dialogues(data_dir, artifact, tmp_path / "cache", max_dialogues=3)
    assert data is not None and set(data.sources) == {BASE}
    assert data.causal.tolist().count(True) == data.causal.tolist().count(False)  # each dialogue in both modes
    train, dev = data.labelled(heldout=False), data.labelled(heldout=True)  # MELD train trains, dev is held out
    assert train.any() and dev.any() and all(key.startswith("meld:dev:") for key in np.array(data.keys)[dev])
    cached = sorted(path.name for path in (tmp_path / "cache").iterdir())
    assert len(cached) == 2 and all(artifact.files[ENCODER_FILE].sha256[:16] in name for name in cached)
    again = base_dialogues(data_dir, artifact, tmp_path / "cache", max_dialogues=3)
    assert again is not None and np.array_equal(again.embeddings, data.embeddings)


def test_noise_filtering_drops_or_fixes_most_flipped_feedback_labels(champion_dir: Path, tmp_path: Path) -> None:
    turns = labelled_turns(800, 16, seed=9, noise=0.3)
    data = single_turns(turns, heldout=False)
    truth = data.labels.copy()
    rng = np.random.default_rng(0)
    flipped = rng.random(len(truth)) < 0.15
    data.labels = np.where(flipped, (truth + rng.integers(1, len(EMOTIONS), len(truth))) % len(EMOTIONS), truth)
    inputs = TierInputs(
        base=load_artifact(champion_dir),
        data=data,
        data_dir=tmp_path,
        version="x",
        params={},
        minority=MINORITY,
        engine="local",
        device="cpu",
        gate=GateConfig(),
    )
    cleaned = denoised(data.embeddings, data.labels, inputs, HeadTraining(epochs=20, noise_filter=True))
    kept = cleaned >= 0
    assert (cleaned[kept] != truth[kept]).mean() < 0.02  # from 15% wrong
    assert kept[~flipped].mean() > 0.8  # most clean labels survive
