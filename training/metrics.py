"""Classification metrics for imbalanced label sets, computed from one confusion matrix.

Everything is derived from counts, so classes missing from `y_true` or `y_pred` give 0 (never a warning or a
NaN): precision 0 when nothing was predicted, recall 0 when nothing was present, F1 0 when both are 0.
Balanced accuracy and minority recall average only over classes that occur in `y_true`, like sklearn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core.resampling import turn_weights
from training.common import ArrayLike, to_numpy

ECE_BINS = 15


@dataclass(frozen=True)
class ClassMetrics:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True, eq=False)
class MetricsReport:
    labels: tuple[str, ...]
    accuracy: float
    weighted_f1: float
    macro_f1: float
    balanced_accuracy: float
    per_class: tuple[ClassMetrics, ...]  # in label order
    confusion: np.ndarray  # [C, C] int counts, rows = true class, columns = predicted class
    minority: tuple[str, ...]
    minority_recall: float | None  # None when no minority class occurs in y_true (or none was named)
    ece: float | None  # None when no probabilities were given

    def _column(self, field: str) -> np.ndarray:
        return np.array([getattr(m, field) for m in self.per_class], dtype=np.float64)

    @property
    def precision(self) -> np.ndarray:
        return self._column("precision")

    @property
    def recall(self) -> np.ndarray:
        return self._column("recall")

    @property
    def f1(self) -> np.ndarray:
        return self._column("f1")

    @property
    def support(self) -> np.ndarray:
        return self._column("support").astype(np.int64)

    def __getitem__(self, name: str) -> ClassMetrics:
        return self.per_class[self.labels.index(name)]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only; `from_dict` inverts it."""
        return {
            "labels": list(self.labels),
            "accuracy": self.accuracy,
            "weighted_f1": self.weighted_f1,
            "macro_f1": self.macro_f1,
            "balanced_accuracy": self.balanced_accuracy,
            "per_class": {name: asdict(m) for name, m in zip(self.labels, self.per_class, strict=True)},
            "confusion": self.confusion.tolist(),
            "minority": list(self.minority),
            "minority_recall": self.minority_recall,
            "ece": self.ece,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetricsReport:
        labels = tuple(data["labels"])
        return cls(
            labels=labels,
            accuracy=data["accuracy"],
            weighted_f1=data["weighted_f1"],
            macro_f1=data["macro_f1"],
            balanced_accuracy=data["balanced_accuracy"],
            per_class=tuple(ClassMetrics(**data["per_class"][name]) for name in labels),
            confusion=np.asarray(data["confusion"], dtype=np.int64),
            minority=tuple(data["minority"]),
            minority_recall=data["minority_recall"],
            ece=data["ece"],
        )


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> np.ndarray:
    """[C, C] counts, rows = true class, columns = predicted class."""
    t = to_numpy(y_true).astype(np.int64).ravel()
    p = to_numpy(y_pred).astype(np.int64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length: {t.size} vs {p.size}")
    for name, y in (("y_true", t), ("y_pred", p)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes})")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, -1)


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros_like(numerator, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def per_class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 per class from a confusion matrix."""
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(axis=1), cm.sum(axis=0)
    return _safe_divide(tp, predicted), _safe_divide(tp, support), _safe_divide(2 * tp, support + predicted)


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 over all `num_classes` classes (the fast path used when tuning)."""
    return float(per_class_scores(confusion_matrix(y_true, y_pred, num_classes))[2].mean())


def resampled_f1(
    y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray, classes: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class F1 and support [R, len(classes)] of every resample: row r of `weights` [R, N] says how often each
    sample was drawn (core/resampling.py), so no rows are copied."""
    is_true = (y_true[:, None] == classes).astype(np.float64)
    is_predicted = (y_pred[:, None] == classes).astype(np.float64)
    support, guessed, hits = weights @ is_true, weights @ is_predicted, weights @ (is_true * is_predicted)
    f1 = np.divide(2 * hits, support + guessed, out=np.zeros_like(hits), where=support + guessed > 0)
    return f1, support


def headline_f1(f1: np.ndarray, support: np.ndarray) -> dict[str, np.ndarray]:
    """[R] weighted and macro F1 (over all classes, as `compute_metrics`) from per-class F1 and support [R, C]."""
    return {"weighted_f1": (f1 * support).sum(axis=1) / support.sum(axis=1), "macro_f1": f1.mean(axis=1)}


def conversation_intervals(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    conversations: Sequence[object] | np.ndarray,
    labels: Sequence[str],
    replicates: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """95% percentile intervals of weighted F1, macro F1 (over all `labels`, as `compute_metrics`) and each class's
    F1, from the bootstrap over conversations (turns of one conversation are not independent)."""
    t, p = to_numpy(y_true).astype(np.int64), to_numpy(y_pred).astype(np.int64)
    f1, support = resampled_f1(t, p, turn_weights(conversations, replicates, seed), np.arange(len(labels)))

    def interval(values: np.ndarray) -> list[float]:
        return [round(float(q), 4) for q in np.quantile(values, [0.025, 0.975])]

    headline = {key: interval(values) for key, values in headline_f1(f1, support).items()}
    return {
        "replicates": replicates,
        "unit": "conversation",
        **headline,
        "f1": {name: interval(f1[:, i]) for i, name in enumerate(labels)},
    }


def expected_calibration_error(probs: ArrayLike, y_true: ArrayLike, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE with `n_bins` equal-width confidence bins (lo, hi]: sum_b |B|/N * |acc(B) - conf(B)|."""
    p = to_numpy(probs).astype(np.float64)
    t = to_numpy(y_true).astype(np.int64).ravel()
    if p.ndim != 2 or p.shape[0] != t.size:
        raise ValueError(f"probs must be [N, C] with N = len(y_true); got {p.shape} for {t.size} labels")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == t).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    gap = np.abs(np.bincount(bins, correct, n_bins) - np.bincount(bins, confidence, n_bins))
    return float(gap.sum() / max(count.sum(), 1))


def minority_classes(counts: ArrayLike, labels: Sequence[str], max_share: float = 0.10) -> tuple[str, ...]:
    """The product's default minority setting: classes with less than `max_share` of the training data."""
    n = to_numpy(counts).astype(np.float64)
    share = n / n.sum()
    return tuple(name for name, s in zip(labels, share, strict=True) if s < max_share)


def compute_metrics(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    labels: Sequence[str],
    probs: ArrayLike | None = None,
    minority: Sequence[str] = (),
) -> MetricsReport:
    """The full report; `labels` names class indices 0..C-1, `minority` is a subset of `labels`."""
    labels = tuple(labels)
    unknown = set(minority) - set(labels)
    if unknown:
        raise ValueError(f"minority classes {sorted(unknown)} are not among the labels {labels}")
    cm = confusion_matrix(y_true, y_pred, len(labels))
    n = int(cm.sum())
    if n == 0:
        raise ValueError("cannot compute metrics on zero samples")
    precision, recall, f1 = per_class_scores(cm)
    support = cm.sum(axis=1)
    present = support > 0
    minority_idx = [labels.index(name) for name in minority if present[labels.index(name)]]
    return MetricsReport(
        labels=labels,
        accuracy=float(np.trace(cm) / n),
        weighted_f1=float((f1 * support).sum() / n),
        macro_f1=float(f1.mean()),
        balanced_accuracy=float(recall[present].mean()),
        per_class=tuple(
            ClassMetrics(float(p), float(r), float(f), int(s))
            for p, r, f, s in zip(precision, recall, f1, support, strict=True)
        ),
        confusion=cm,
        minority=tuple(minority),
        minority_recall=float(recall[minority_idx].mean()) if minority_idx else None,
        ece=None if probs is None else expected_calibration_error(probs, y_true),
    )
