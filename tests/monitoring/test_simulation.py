"""The simulation's machinery on a synthetic, conversation-clustered model with a calibration record (the real-MELD
runs are tests/monitoring/test_simulation_meld.py and docs/MONITORING.md)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from model.artifact import ClassPrior, DataSource
from monitoring.analysis import ReferenceProfile
from monitoring.collapse import CollapseRules
from monitoring.meld_stream import ScoredMeld
from monitoring.simulation import (
    SimulationSettings,
    false_alarm_rate,
    healthy_stream,
    label_shift_stream,
    logit_bias,
    proportion_interval,
    resampled_stream,
    run_stream,
    summarise,
    with_logits_from,
)
from training.calibration import fit_calibration_record

NAMES = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
PRIOR = np.array([0.47, 0.17, 0.12, 0.11, 0.07, 0.03, 0.03])
MINORITY = ("sadness", "disgust", "fear")
RULES = CollapseRules(min_predictions=300)


def _scored(seed: int, dialogues: int = 700, turns: int = 6) -> ScoredMeld:
    """Dialogues whose turns lean toward one class; a balanced model's logits log p(x | y) on Gaussian inputs."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=1.6, size=(len(NAMES), 4))
    labels = np.concatenate([rng.choice(len(NAMES), size=turns, p=rng.dirichlet(PRIOR * 8)) for _ in range(dialogues)])
    x = means[labels] + rng.normal(size=(len(labels), 4))
    logits = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(axis=2)
    split = np.where(np.arange(len(labels)) < len(labels) // 5, "dev", "train")
    return ScoredMeld(
        names=NAMES,
        logits=logits,
        embeddings=np.zeros((len(labels), 1), np.float32),
        true=labels,
        conversation=np.repeat(np.arange(dialogues), turns),
        split=split,
        speakers=np.zeros(len(labels), np.int64),
    )


def _reference(scored: ScoredMeld) -> ReferenceProfile:
    """The record an artifact would carry, fitted on the synthetic dev dialogues."""
    dev, train = scored.rows("dev"), scored.rows("train")
    source = DataSource("synthetic dev", "text", len(dev), 140)
    training = ClassPrior(tuple(np.bincount(scored.true[train], minlength=7) / len(train)), source)
    fit = fit_calibration_record(
        scored.logits[dev],
        scored.true[dev],
        scored.conversation[dev],
        NAMES,
        dev_source=source,
        training_prior=training,
    )
    served = softmax(scored.logits[dev] / fit.calibration.temperature, axis=1)
    recall = np.mean([(served.argmax(1)[scored.true[dev] == k] == k).mean() for k in (4, 5, 6)])
    return ReferenceProfile(NAMES, fit.reference_distribution, MINORITY, float(recall), calibration=fit.calibration)


@pytest.fixture(scope="module")
def world() -> tuple[ScoredMeld, ReferenceProfile, SimulationSettings]:
    scored = _scored(0)
    reference = _reference(scored)
    settings = SimulationSettings(reference.calibration.temperature, RULES, window=300, replicates=100)
    return scored, reference, settings


def test_a_healthy_stream_is_quiet_and_a_collapse_is_caught(world) -> None:  # noqa: ANN001
    """The machinery on a synthetic model (the acceptance, two windows on MELD, is test_simulation_meld.py's)."""
    scored, reference, settings = world
    healthy = healthy_stream(scored)
    quiet = summarise(run_stream(healthy, reference, settings))
    assert quiet["events"] == [] and quiet["drift_flagged"] <= 1
    collapse = with_logits_from(healthy, logit_bias(healthy.logits, 0, 3.0), 3 * 300, "collapse")
    caught = summarise(run_stream(collapse, reference, settings))
    assert caught["false_alarms"] == [] and caught["windows_to_detect"] is not None
    assert caught["windows_to_detect"] <= 3


def test_pure_label_shift_moves_the_prior_not_the_detector(world) -> None:  # noqa: ANN001
    scored, reference, settings = world
    shifted = label_shift_stream(scored, 0, 0.8, seed=1)
    assert np.mean(shifted.true == 0) == pytest.approx(0.8, abs=0.02)
    assert (np.diff(shifted.conversations) >= 0).all(), "dialogues stay in order"
    records = run_stream(shifted, reference, settings)
    assert summarise(records)["events"] == []
    assert np.mean([r.prior_shifted for r in records]) > 0.8
    estimated = np.mean([r.estimated_majority_prior for r in records])
    assert estimated == pytest.approx(np.mean([r.true_majority_share for r in records]), abs=0.05)


def test_resampled_streams_draw_whole_dialogues_and_false_alarms_come_with_an_interval(world) -> None:  # noqa: ANN001
    scored, reference, settings = world
    stream = resampled_stream(scored, 900, seed=3)
    assert len(stream) >= 900
    for conversation in np.unique(stream.conversations):
        assert len(np.unique(stream.true[stream.conversations == conversation])) >= 1
        assert (
            np.ptp(np.flatnonzero(stream.conversations == conversation))
            == (stream.conversations == conversation).sum() - 1
        )
    rates = false_alarm_rate(scored, reference, settings, streams=3, windows=3)
    assert rates["windows"] == 9 and rates["streams_with_event"] == 0
    assert rates["stream_event_interval"] == pytest.approx(proportion_interval(0, 3))


def test_clopper_pearson_by_hand() -> None:
    assert proportion_interval(0, 10)[1] == pytest.approx(1 - 0.025 ** (1 / 10))
    lower, upper = proportion_interval(5, 10)
    assert lower == pytest.approx(0.187086, abs=1e-5) and upper == pytest.approx(0.812914, abs=1e-5)
