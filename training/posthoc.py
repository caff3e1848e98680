"""Post-hoc corrections of a trained classifier's logits, each expressed as one additive per-class offset
(so a serving model stores a single vector): logit adjustment and per-class bias tuning on dev for macro F1.
The prior-shift correction of retraining tier 1 estimates its priors with monitoring/prior.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from training.common import TAU_GRID, ArrayLike, GridSearch, Logits, class_prior, grid_search, to_numpy
from training.metrics import macro_f1

BIAS_STEPS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(-20, 21) if i)


def apply_offset(logits: Logits, offset: ArrayLike) -> Logits:
    """logits + offset, broadcast over the last (class) axis; keeps numpy or torch."""
    if isinstance(logits, torch.Tensor):
        return logits + torch.as_tensor(to_numpy(offset), dtype=logits.dtype, device=logits.device)
    return logits + to_numpy(offset)


def _dev_macro_f1(logits: np.ndarray, labels: np.ndarray, offset: np.ndarray) -> float:
    return macro_f1(labels, (logits + offset).argmax(axis=1), logits.shape[1])


def logit_adjustment(prior: ArrayLike, tau: float) -> np.ndarray:
    """Menon et al. 2021 post-hoc: offset −τ · log prior (prior from counts or frequencies)."""
    return -tau * np.log(class_prior(prior))


def tune_logit_adjustment(
    dev_logits: ArrayLike, dev_labels: ArrayLike, prior: ArrayLike, taus: Sequence[float] = TAU_GRID
) -> GridSearch:
    """The τ whose logit adjustment gives the best dev macro F1."""
    logits, labels = to_numpy(dev_logits), to_numpy(dev_labels)
    return grid_search(taus, lambda tau: _dev_macro_f1(logits, labels, logit_adjustment(prior, tau)))


@dataclass(frozen=True)
class BiasSearch:
    offset: np.ndarray  # per-class additive bias
    macro_f1: float  # on dev, with the offset
    rounds: int


def tune_class_biases(
    dev_logits: ArrayLike,
    dev_labels: ArrayLike,
    steps: Sequence[float] = BIAS_STEPS,
    max_rounds: int = 5,
    init: ArrayLike | None = None,
) -> BiasSearch:
    """Coordinate ascent on per-class additive biases for dev macro F1: each round moves each class's bias by
    every step in `steps` in turn and keeps strict improvements; stops after a round without one. The result is
    centred (mean 0; a common shift changes nothing). It fits dev, so judge it on held-out data (MELD dev has
    only ~40 fear samples)."""
    logits, labels = to_numpy(dev_logits).astype(np.float64), to_numpy(dev_labels)
    offset = np.zeros(logits.shape[1]) if init is None else to_numpy(init).astype(np.float64).copy()
    best = _dev_macro_f1(logits, labels, offset)
    rounds = 0
    while rounds < max_rounds:
        rounds += 1
        offset, score = _coordinate_pass(logits, labels, offset, best, steps)
        if score <= best:
            break
        best = score
    return BiasSearch(offset - offset.mean(), best, rounds)


def _coordinate_pass(
    logits: np.ndarray, labels: np.ndarray, offset: np.ndarray, best: float, steps: Sequence[float]
) -> tuple[np.ndarray, float]:
    """One sweep over the classes, keeping each strictly better bias."""
    for c in range(len(offset)):
        start = offset[c]
        for step in steps:
            trial = offset.copy()
            trial[c] = start + step
            score = _dev_macro_f1(logits, labels, trial)
            if score > best + 1e-12:
                best, offset = score, trial
    return offset, best
