"""Synthetic imbalanced problems for the training tests: Gaussian blobs with known class means."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import logsumexp

MELD_TRAIN_COUNTS = (4710, 1743, 1205, 1109, 683, 271, 268)  # neutral joy surprise anger sadness disgust fear


def class_means(num_classes: int, dim: int, radius: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(num_classes, dim))
    return radius * directions / np.linalg.norm(directions, axis=1, keepdims=True)


def blobs(counts: Sequence[int], means: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`counts[c]` unit-variance Gaussian samples around `means[c]`, shuffled."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts)
    x = means[y] + rng.normal(size=(len(y), means.shape[1]))
    order = rng.permutation(len(y))
    return x[order], y[order]


def bayes_log_posterior(x: np.ndarray, means: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """Exact log p(c | x) for unit-variance blobs under `prior` (the logits of an ideal calibrated model)."""
    log_joint = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1) + np.log(prior)
    return log_joint - logsumexp(log_joint, axis=1, keepdims=True)
