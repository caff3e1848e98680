"""Label-free recall estimation agrees with measured recall when probabilities are calibrated."""

from __future__ import annotations

import numpy as np
import pytest

from monitoring.estimation import (
    class_shares,
    estimate_recall,
    labelled_minority_recall,
    mean_recall,
    measure_recall,
    minority_recall_halfwidth,
)

NAMES = ("a", "b", "c")


def _calibrated_window(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from a Dirichlet, labels drawn from those same probabilities: calibrated by construction."""
    probabilities = rng.dirichlet([0.6, 0.6, 0.6], size=rows)
    labels = np.array([rng.choice(3, p=p) for p in probabilities])
    return probabilities, labels


def test_estimate_tracks_measured_recall_on_calibrated_probabilities() -> None:
    probabilities, labels = _calibrated_window(np.random.default_rng(0), 20_000)
    estimated = estimate_recall(probabilities, NAMES)
    measured = measure_recall(labels, probabilities.argmax(1), NAMES)
    for name in NAMES:
        assert estimated[name] == pytest.approx(measured[name], abs=0.02)


def test_estimate_is_wrong_when_probabilities_are_overconfident() -> None:
    probabilities, labels = _calibrated_window(np.random.default_rng(1), 20_000)
    sharpened = probabilities**4 / (probabilities**4).sum(axis=1, keepdims=True)
    estimated = estimate_recall(sharpened, NAMES)
    measured = measure_recall(labels, sharpened.argmax(1), NAMES)
    assert all(estimated[name] > measured[name] + 0.05 for name in NAMES)


def test_absent_classes_have_no_estimate() -> None:
    probabilities = np.tile([0.9, 0.1, 0.0], (5, 1))
    assert estimate_recall(probabilities, NAMES)["c"] is None
    assert measure_recall([0, 0, 1], [0, 1, 1], NAMES) == {"a": 0.5, "b": 1.0, "c": None}
    assert mean_recall({"a": 0.5, "b": None, "c": 0.25}, ["b", "c", "a"]) == pytest.approx(0.375)
    assert mean_recall({"a": None}, ["a"]) is None


def test_class_shares_sum_to_one_and_count_absent_classes() -> None:
    shares = class_shares([0, 0, 1, 0], NAMES)
    assert shares == {"a": 0.75, "b": 0.25, "c": 0.0}


def test_estimation_weights_undo_a_served_bias_toward_rare_classes() -> None:
    """A model that serves prior-shifted probabilities (as a logit-adjusted one does) mis-estimates recall; the
    weights fitted on labelled dev data restore calibrated posteriors, and recall of the served labels."""
    from monitoring.estimation import posteriors
    from training.calibration import fit_estimation_weights

    rng = np.random.default_rng(2)
    dev_p, dev_y = _calibrated_window(rng, 20_000)
    live_p, live_y = _calibrated_window(rng, 20_000)
    shift = np.array([0.25, 1.0, 4.0])  # served probabilities favour class c
    served_dev, served_live = (p * shift / (p * shift).sum(1, keepdims=True) for p in (dev_p, live_p))
    weights = fit_estimation_weights(served_dev, dev_y)
    assert np.allclose(np.array(weights) / weights[1], 1 / shift, rtol=0.1)

    served_labels = served_live.argmax(1)
    measured = measure_recall(live_y, served_labels, NAMES)
    naive = estimate_recall(served_live, NAMES, served_labels)
    corrected = estimate_recall(posteriors(served_live, weights), NAMES, served_labels)
    assert max(abs(naive[name] - measured[name]) for name in NAMES) > 0.05
    for name in NAMES:
        assert corrected[name] == pytest.approx(measured[name], abs=0.02)


def test_minority_recall_halfwidth_by_hand() -> None:
    """Agresti-Coull per class, (hits + 2) / (support + 4); the mean of two classes halves the summed spread."""
    true, predicted = np.array([0, 0, 1]), np.array([0, 2, 1])
    halfwidth = minority_recall_halfwidth(true, predicted, [0, 1])
    by_hand = [
        1.959964 * np.sqrt(0.6 * 0.4 / 5 + 0.25 / 4) / 2,  # class 0: 1 hit of 1; class 1: unseen
        1.959964 * np.sqrt(0.5 * 0.5 / 6 + 0.25 / 4) / 2,  # class 0: 1 hit of 2
        1.959964 * np.sqrt(0.5 * 0.5 / 6 + 0.6 * 0.4 / 5) / 2,  # class 1: 1 hit of 1
    ]
    np.testing.assert_allclose(halfwidth, by_hand, rtol=1e-6)


def test_labelled_recall_spans_the_fewest_newest_predictions_that_are_precise_enough() -> None:
    probabilities, labels = _calibrated_window(np.random.default_rng(11), 4000)
    minority = ("a", "c")
    result = labelled_minority_recall(probabilities, labels, NAMES, minority, precision=0.05)
    assert result is not None and result.halfwidth <= 0.05
    n = result.labelled
    fewer = labelled_minority_recall(probabilities[: n - 1], labels[: n - 1], NAMES, minority, precision=0.05)
    assert fewer is None, "one prediction fewer is not precise enough"
    expected = mean_recall(measure_recall(labels[:n], probabilities[:n].argmax(1), NAMES), minority)
    assert result.measured == pytest.approx(expected)
    assert result.estimated == pytest.approx(result.measured, abs=result.halfwidth)  # calibrated: the estimate agrees
    assert labelled_minority_recall(probabilities, labels, NAMES, minority, precision=0.001) is None


def test_labelled_recall_needs_every_minority_class_seen() -> None:
    """However loose the precision, a class with no label yet has no measured recall."""
    probabilities = np.full((3, len(NAMES)), 1 / len(NAMES))
    assert labelled_minority_recall(probabilities, np.array([1, 1, 1]), NAMES, ("a", "c"), precision=0.99) is None
