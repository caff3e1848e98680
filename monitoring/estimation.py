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
from dataclasses import dataclass

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


Z_95 = 1.959964


def minority_recall_halfwidth(true: np.ndarray, predicted: np.ndarray, class_indices: Sequence[int]) -> np.ndarray:
    """95% confidence half-width of the measured minority recall (the mean of per-class recalls) over the first
    n labelled rows, for every n = 1..len(true). Per class, the Agresti-Coull interval: it stays honest with few
    labels or a recall of 0 or 1, where the plain binomial one claims certainty."""
    variance = np.zeros(len(true))
    for k in class_indices:
        support = np.cumsum(true == k)
        hits = np.cumsum((true == k) & (predicted == k))
        adjusted = (hits + 2) / (support + 4)
        variance += adjusted * (1 - adjusted) / (support + 4)
    return Z_95 * np.sqrt(variance) / max(len(class_indices), 1)


@dataclass(frozen=True)
class LabelledRecall:
    """Minority recall over the newest labelled predictions: measured from their labels, and estimated without
    them on the very same predictions, so the two can be compared."""

    labelled: int  # predictions used
    measured: float
    estimated: float | None
    halfwidth: float  # of the measured value's 95% confidence interval


def labelled_minority_recall(
    probabilities: np.ndarray,
    true: np.ndarray,
    names: Sequence[str],
    minority: Sequence[str],
    *,
    precision: float,
    weights: Sequence[float] | None = None,
) -> LabelledRecall | None:
    """Over labelled predictions given newest first (served `probabilities`, `true` class indices), the fewest
    newest ones whose measured minority recall has a 95% half-width within `precision`, with the label-free
    estimate on the same predictions (through the champion's estimation `weights`); None when all of them
    together are not that precise."""
    served = np.asarray(probabilities).argmax(axis=1)
    classes = [names.index(name) for name in minority if name in names]
    if not classes or not len(true):
        return None
    true = np.asarray(true)
    halfwidth = minority_recall_halfwidth(true, served, classes)
    every_class_seen = np.all([np.cumsum(true == k) > 0 for k in classes], axis=0)
    precise = np.flatnonzero((halfwidth <= precision) & every_class_seen)
    if not len(precise):
        return None
    n = int(precise[0]) + 1
    measured = mean_recall(measure_recall(true[:n], served[:n], names), minority)
    estimated = mean_recall(estimate_recall(posteriors(probabilities[:n], weights), names, served[:n]), minority)
    return None if measured is None else LabelledRecall(n, measured, estimated, float(halfwidth[n - 1]))
