"""Per-class recall: measured from feedback labels, and estimated without labels from calibrated posteriors.

The label-free estimate is confidence-based performance estimation on posteriors calibrated by BCTS and corrected
to the class prior estimated for the same turns (monitoring/prior.py): if p_k(x) is the chance that x truly
belongs to class k, then over a set of turns

    E[true k]              = sum_x p_k(x)
    E[true k and pred k]   = sum_{x : pred(x) = k} p_k(x)

and their ratio estimates the recall of class k. It needs no labels, only calibration under the traffic's class
mix; it drifts when the input shift breaks calibration (concept shift), which is why measured recall is used
whenever labels decide it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.db.models import FeedbackKind
from monitoring.prior import ShiftModel, corrected_recall


def label_free_recall(served: np.ndarray, names: Sequence[str], model: ShiftModel) -> dict[str, float | None]:
    """Recall per class of the served labels (the argmax of `served`) on the turns' posteriors corrected to their
    MLLS prior (uncorrected for an artifact stating no training prior); None where the turns are expected to hold
    under one example of the class."""
    posteriors = model.posteriors(served)
    recall = corrected_recall(
        model.corrected(posteriors, model.fit_prior(posteriors).prior), np.asarray(served).argmax(1)
    )
    return {name: None if np.isnan(r) else float(r) for name, r in zip(names, recall, strict=True)}


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


def _agresti_coull(true: np.ndarray, predicted: np.ndarray, class_indices: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Per class, over the first n labelled rows for every n: the adjusted recall (hits + 2) / (support + 4) and
    its variance [K, N]."""
    adjusted, variance = [], []
    for k in class_indices:
        support = np.cumsum(true == k)
        hits = np.cumsum((true == k) & (predicted == k))
        adjusted.append((hits + 2) / (support + 4))
        variance.append(adjusted[-1] * (1 - adjusted[-1]) / (support + 4))
    shape = (len(adjusted), len(true))
    return np.array(adjusted, dtype=np.float64).reshape(shape), np.array(variance, dtype=np.float64).reshape(shape)


def minority_recall_halfwidth(true: np.ndarray, predicted: np.ndarray, class_indices: Sequence[int]) -> np.ndarray:
    """95% confidence half-width of the measured minority recall (the mean of per-class recalls) over the first
    n labelled rows, for every n = 1..len(true). Per class, the Agresti-Coull interval: it stays honest with few
    labels or a recall of 0 or 1, where the plain binomial one claims certainty."""
    _, variance = _agresti_coull(true, predicted, class_indices)
    return Z_95 * np.sqrt(variance.sum(axis=0)) / max(len(class_indices), 1)


def minority_recall_upper(true: np.ndarray, predicted: np.ndarray, class_indices: Sequence[int]) -> float:
    """Upper end of the 95% Agresti-Coull interval of the minority recall over all `true` rows: the interval is
    centred on the adjusted recalls, so a few misses (0 of 1) do not read as a recall decided to be 0."""
    adjusted, _ = _agresti_coull(true, predicted, class_indices)
    halfwidth = minority_recall_halfwidth(true, predicted, class_indices)
    return float(adjusted[:, -1].mean() + halfwidth[-1])


@dataclass(frozen=True)
class LabelledRecall:
    """Minority recall over the newest labelled predictions: measured from their labels, and estimated without
    them on the very same predictions, so the two can be compared."""

    labelled: int  # predictions used
    measured: float
    estimated: float | None
    halfwidth: float  # of the measured value's 95% confidence interval
    source: FeedbackKind | None = None  # the kind of feedback measured: AUDIT, or CORRECTION (biased)


def labelled_minority_recall(
    probabilities: np.ndarray,
    true: np.ndarray,
    names: Sequence[str],
    minority: Sequence[str],
    *,
    precision: float,
    model: ShiftModel,
) -> LabelledRecall | None:
    """Over labelled predictions given newest first (served `probabilities`, `true` class indices), the fewest
    newest ones whose measured minority recall has a 95% half-width within `precision`, with the label-free
    estimate on the same predictions (through the champion's calibration `model`); None when all of them
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
    estimated = mean_recall(label_free_recall(probabilities[:n], names, model), minority)
    return None if measured is None else LabelledRecall(n, measured, estimated, float(halfwidth[n - 1]))
