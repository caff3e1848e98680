"""Label-free recall estimation agrees with measured recall when probabilities are calibrated; measured recall
reaches back over as many labelled predictions as its precision needs."""

from __future__ import annotations

import numpy as np
import pytest

from model.artifact import Calibration
from monitoring.estimation import (
    class_shares,
    label_free_recall,
    labelled_minority_recall,
    mean_recall,
    measure_recall,
    minority_recall_halfwidth,
    minority_recall_upper,
)
from monitoring.prior import ShiftModel

NAMES = ("a", "b", "c")


def _calibrated_window(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities from a Dirichlet, labels drawn from those same probabilities: calibrated by construction."""
    probabilities = rng.dirichlet([0.6, 0.6, 0.6], size=rows)
    labels = np.array([rng.choice(3, p=p) for p in probabilities])
    return probabilities, labels


def _model() -> ShiftModel:
    """Served probabilities taken as calibrated for the traffic (an artifact without a calibration record)."""
    return ShiftModel.from_calibration(Calibration())


def test_label_free_recall_tracks_measured_recall_on_calibrated_probabilities() -> None:
    probabilities, labels = _calibrated_window(np.random.default_rng(0), 20_000)
    estimated = label_free_recall(probabilities, NAMES, _model())
    measured = measure_recall(labels, probabilities.argmax(1), NAMES)
    for name in NAMES:
        assert estimated[name] == pytest.approx(measured[name], abs=0.02)


def test_label_free_recall_is_wrong_when_probabilities_are_overconfident() -> None:
    probabilities, labels = _calibrated_window(np.random.default_rng(1), 20_000)
    sharpened = probabilities**4 / (probabilities**4).sum(axis=1, keepdims=True)
    estimated = label_free_recall(sharpened, NAMES, _model())
    measured = measure_recall(labels, sharpened.argmax(1), NAMES)
    assert all(estimated[name] > measured[name] + 0.05 for name in NAMES)  # type: ignore[operator]


def test_absent_classes_have_no_estimate() -> None:
    probabilities = np.tile([0.9, 0.1, 0.0], (5, 1))
    assert label_free_recall(probabilities, NAMES, _model())["c"] is None
    assert measure_recall([0, 0, 1], [0, 1, 1], NAMES) == {"a": 0.5, "b": 1.0, "c": None}
    assert mean_recall({"a": 0.5, "b": None, "c": 0.25}, ["b", "c", "a"]) == pytest.approx(0.375)
    assert mean_recall({"a": None}, ["a"]) is None


def test_class_shares_sum_to_one_and_count_absent_classes() -> None:
    shares = class_shares([0, 0, 1, 0], NAMES)
    assert shares == {"a": 0.75, "b": 0.25, "c": 0.0}


def test_estimation_weights_of_older_artifacts_still_undo_a_served_bias() -> None:
    """An artifact from before the calibration record carries per-class estimation weights: its served
    probabilities, multiplied by them, are the posteriors label-free recall is estimated on."""
    from training.calibration import fit_estimation_weights

    rng = np.random.default_rng(2)
    dev_p, dev_y = _calibrated_window(rng, 20_000)
    live_p, live_y = _calibrated_window(rng, 20_000)
    shift = np.array([0.25, 1.0, 4.0])  # served probabilities favour class c
    served_dev, served_live = (p * shift / (p * shift).sum(1, keepdims=True) for p in (dev_p, live_p))
    weights = fit_estimation_weights(served_dev, dev_y)
    assert np.allclose(np.array(weights) / weights[1], 1 / shift, rtol=0.1)
    older = ShiftModel.from_calibration(Calibration(estimation_weights=weights))
    served_labels = served_live.argmax(1)
    measured = measure_recall(live_y, served_labels, NAMES)
    corrected = label_free_recall(served_live, NAMES, older)
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


def test_the_upper_bound_is_centred_on_the_adjusted_recalls() -> None:
    """One missed turn of each of two classes is not a recall decided to be 0: the Agresti-Coull interval is centred
    on (0 + 2) / (1 + 4) = 0.4 for each."""
    true, predicted = np.array([0, 1]), np.array([2, 2])
    halfwidth = minority_recall_halfwidth(true, predicted, [0, 1])[-1]
    assert minority_recall_upper(true, predicted, [0, 1]) == pytest.approx(0.4 + halfwidth)
    assert halfwidth == pytest.approx(1.959964 * np.sqrt(2 * 0.4 * 0.6 / 5) / 2)


def test_labelled_recall_spans_the_fewest_newest_predictions_that_are_precise_enough() -> None:
    probabilities, labels = _calibrated_window(np.random.default_rng(11), 4000)
    minority = ("a", "c")
    model = _model()
    result = labelled_minority_recall(probabilities, labels, NAMES, minority, precision=0.05, model=model)
    assert result is not None and result.halfwidth <= 0.05
    n = result.labelled
    fewer = labelled_minority_recall(
        probabilities[: n - 1], labels[: n - 1], NAMES, minority, precision=0.05, model=model
    )
    assert fewer is None, "one prediction fewer is not precise enough"
    expected = mean_recall(measure_recall(labels[:n], probabilities[:n].argmax(1), NAMES), minority)
    assert result.measured == pytest.approx(expected)
    assert result.estimated == pytest.approx(result.measured, abs=result.halfwidth)  # calibrated: the estimate agrees
    assert labelled_minority_recall(probabilities, labels, NAMES, minority, precision=0.001, model=model) is None


def test_labelled_recall_needs_every_minority_class_seen() -> None:
    """However loose the precision, a class with no label yet has no measured recall."""
    probabilities = np.full((3, len(NAMES)), 1 / len(NAMES))
    found = labelled_minority_recall(
        probabilities, np.array([1, 1, 1]), NAMES, ("a", "c"), precision=0.99, model=_model()
    )
    assert found is None
