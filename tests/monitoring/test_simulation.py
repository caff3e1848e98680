"""The collapse simulation's machinery on a calibrated synthetic model (the real-MELD run is in docs/MONITORING.md)."""

from __future__ import annotations

import numpy as np

from monitoring.collapse import CollapseRules
from monitoring.simulation import (
    ScoredSplit,
    degrade,
    reference_profile,
    run_stream,
    summarise,
    tracking_by_window_size,
)

NAMES = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
PRIOR = np.array([0.47, 0.17, 0.12, 0.11, 0.07, 0.03, 0.03])


def _split(seed: int, rows: int = 3000) -> ScoredSplit:
    """A calibrated model: each row's label is drawn from its own predicted distribution."""
    rng = np.random.default_rng(seed)
    probabilities = rng.dirichlet(PRIOR * 4, size=rows)
    true = np.array([rng.choice(len(NAMES), p=p) for p in probabilities])
    return ScoredSplit(NAMES, probabilities, rng.normal(size=(rows, 8)).astype(np.float32), true)


def test_degrade_pushes_predictions_to_the_majority_class() -> None:
    split = _split(0)
    degraded = degrade(split.probabilities, NAMES, "neutral", bias=2.0)
    assert np.allclose(degraded.sum(axis=1), 1)
    assert (degraded.argmax(1) == 0).mean() > (split.probabilities.argmax(1) == 0).mean() + 0.2


def test_stationary_stream_is_quiet_and_collapse_is_caught_within_three_windows() -> None:
    reference = reference_profile(_split(1), ("sadness", "disgust", "fear"))
    test = _split(2)
    rules = CollapseRules(min_predictions=300, recall_precision=0.06)
    common = {"window_size": 300, "bias": 2.0, "rules": rules, "label_horizon": 20_000}
    stationary = summarise(run_stream(test, reference, windows=12, degrade_from=None, seed=3, **common))
    collapse = summarise(run_stream(test, reference, windows=10, degrade_from=5, seed=4, **common))
    assert stationary["events"] == []
    assert collapse["false_alarms"] == [] and collapse["windows_to_detect"] is not None
    assert collapse["windows_to_detect"] <= 3
    assert 0 < stationary["windows_with_labels"] < 12, "the first windows hold too few labels to measure"
    assert stationary["tracking"]["windows"] == stationary["windows_with_labels"]
    assert stationary["tracking"]["max_abs"] <= 0.1


def test_the_estimate_of_a_calibrated_model_tracks_measured_recall_as_closely_as_the_population_recall() -> None:
    reference = reference_profile(_split(5), ("sadness", "disgust", "fear"))
    table = tracking_by_window_size(_split(6), reference, sizes=[300, 2000], windows=60)
    small, large = table[300], table[2000]
    assert large["noise_floor"]["mean_abs"] < small["noise_floor"]["mean_abs"]  # sampling noise shrinks
    for row in (small, large):  # calibrated probabilities: the estimate is no worse than the noise floor allows
        assert row["estimated"]["mean_abs"] < 1.25 * row["noise_floor"]["mean_abs"] + 0.01


def test_records_carry_the_population_recall_of_the_model_serving_the_window() -> None:
    reference = reference_profile(_split(7), ("sadness", "disgust", "fear"))
    records = run_stream(
        _split(8),
        reference,
        windows=4,
        window_size=300,
        degrade_from=2,
        bias=2.0,
        rules=CollapseRules(recall_precision=0.2),
        seed=9,
        label_horizon=20_000,
    )
    healthy, degraded = records[0].minority_recall_population, records[-1].minority_recall_population
    assert healthy is not None and degraded is not None and degraded < healthy
    assert summarise(records)["noise_floor"]["mean_abs"] > 0
