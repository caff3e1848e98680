"""Small helpers shared by the training modules: array conversion and class statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor | Sequence[int] | Sequence[float]
Logits = TypeVar("Logits", np.ndarray, torch.Tensor)  # functions that keep the caller's array type

# τ candidates shared by τ-normalisation and post-hoc logit adjustment: 0 (no change) to 2 in steps of 0.1.
TAU_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(21))


def to_numpy(values: ArrayLike) -> np.ndarray:
    """A numpy view/copy of a tensor, array or sequence (detached, on the CPU)."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def class_counts(labels: ArrayLike, num_classes: int) -> np.ndarray:
    """Samples per class, length `num_classes` (classes absent from `labels` count 0)."""
    y = to_numpy(labels).astype(np.int64).ravel()
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}); got range [{y.min()}, {y.max()}]")
    return np.bincount(y, minlength=num_classes)


def class_prior(counts_or_freqs: ArrayLike, floor: float = 1e-6) -> np.ndarray:
    """Class frequencies from counts (or frequencies); each is at least `floor` so that log(prior) stays finite."""
    v = to_numpy(counts_or_freqs).astype(np.float64)
    if v.ndim != 1 or v.sum() <= 0 or (v < 0).any():
        raise ValueError(f"expected non-negative per-class counts with a positive sum, got {v}")
    p = np.maximum(v / v.sum(), floor)
    return p / p.sum()


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot rows for integer labels."""
    return torch.nn.functional.one_hot(labels.long(), num_classes).float()


def as_soft_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard labels `[B]` become one-hot `[B, C]`; soft targets `[B, C]` pass through."""
    if targets.dim() == 1:
        return one_hot(targets, num_classes)
    if targets.shape[-1] != num_classes:
        raise ValueError(f"soft targets have {targets.shape[-1]} classes, expected {num_classes}")
    return targets.float()


@dataclass(frozen=True)
class GridSearch:
    value: float  # the best candidate
    score: float
    scores: dict[float, float]  # score of every candidate tried


def grid_search(candidates: Sequence[float], score: Callable[[float], float]) -> GridSearch:
    """Maximise `score` over `candidates`; ties go to the candidate closest to 0 (the smallest change)."""
    scores = {float(c): float(score(float(c))) for c in candidates}
    best = max(scores, key=lambda c: (scores[c], -abs(c)))
    return GridSearch(best, scores[best], scores)
