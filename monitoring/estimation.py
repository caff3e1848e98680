"""Per-class recall: measured from feedback labels, and estimated without labels from calibrated probabilities.

The label-free estimate is confidence-based performance estimation. If the model's probabilities are
calibrated, p_k(x) is the chance that x truly belongs to class k, so over a window

    E[true k]              = sum_x p_k(x)
    E[true k and pred k]   = sum_{x : pred(x) = k} p_k(x)

and their ratio estimates the recall of class k. It needs no labels, only calibration; it drifts when the
input shift breaks calibration (concept shift), which is why measured recall is used whenever labels exist.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MIN_EXPECTED_SUPPORT = 1.0


def estimate_recall(
    posteriors: np.ndarray, names: Sequence[str], predicted: np.ndarray | None = None
) -> dict[str, float | None]:
    """Label-free recall per class of the `predicted` labels (default: the argmax of `posteriors`); None where
    the window is expected to hold under one example of the class."""
    probabilities = np.asarray(posteriors, dtype=np.float64)
    predicted = probabilities.argmax(axis=1) if predicted is None else np.asarray(predicted)
    expected_support = probabilities.sum(axis=0)
    estimates: dict[str, float | None] = {}
    for k, name in enumerate(names):
        if expected_support[k] < MIN_EXPECTED_SUPPORT:
            estimates[name] = None
            continue
        expected_hits = probabilities[predicted == k, k].sum()
        estimates[name] = float(expected_hits / expected_support[k])
    return estimates


def posteriors(probabilities: np.ndarray, weights: Sequence[float] | None) -> np.ndarray:
    """Served probabilities -> calibrated posteriors, normalise(p * w); unchanged without weights. The argmax
    (the served label) is not re-derived from them: estimation asks how often the served label is right."""
    if weights is None:
        return np.asarray(probabilities, dtype=np.float64)
    weighted = np.asarray(probabilities, dtype=np.float64) * np.asarray(weights, dtype=np.float64)
    return weighted / weighted.sum(axis=1, keepdims=True)


def measure_recall(true: Sequence[int], predicted: Sequence[int], names: Sequence[str]) -> dict[str, float | None]:
    """Recall per class from labels; None for classes absent from the labelled part of the window."""
    true_array, predicted_array = np.asarray(true), np.asarray(predicted)
    recalls: dict[str, float | None] = {}
    for k, name in enumerate(names):
        support = true_array == k
        recalls[name] = float((predicted_array[support] == k).mean()) if support.any() else None
    return recalls


def mean_recall(recalls: dict[str, float | None], classes: Sequence[str]) -> float | None:
    """Mean recall over `classes`, ignoring classes with no estimate; None if none has one."""
    values = [recalls[name] for name in classes if recalls.get(name) is not None]
    return float(np.mean(values)) if values else None


def class_shares(predicted: Sequence[int], names: Sequence[str]) -> dict[str, float]:
    counts = np.bincount(np.asarray(predicted, dtype=np.int64), minlength=len(names))[: len(names)]
    total = max(int(counts.sum()), 1)
    return {name: float(count / total) for name, count in zip(names, counts, strict=True)}
