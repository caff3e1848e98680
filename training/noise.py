"""Label-noise handling as in BalanceMix (Song et al. 2024) / DivideMix: small-loss samples are likely clean.

Per class, the per-sample losses (min-max normalised) are fitted with a two-component Gaussian mixture; the
posterior of the low-mean component is the probability that the label is clean. Samples that are not clean
are relabelled when the model confidently predicts another class, and are otherwise ambiguous. BalanceMix
manages labels one by one (it is a multi-label method); in single-label emotion recognition each sample has one
label, so the label-wise partition becomes a per-sample one. It keeps ambiguous labels in training with a lower
weight rather than discarding them: `NoisePartition.training_labels("downweight")` gives them their clean
probability as loss weight (dropping or keeping them at full weight are the alternatives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import log_softmax
from sklearn.mixture import GaussianMixture

from training.common import ArrayLike, to_numpy


@dataclass(frozen=True)
class NoisePartition:
    clean: np.ndarray  # bool [N]: keep the given label
    relabel: np.ndarray  # bool [N]: replace the label by the model's prediction
    ambiguous: np.ndarray  # bool [N]: neither; the label is not trusted
    clean_prob: np.ndarray  # [N] posterior of the low-loss component
    labels: np.ndarray  # [N] the given labels with the relabelled rows replaced

    def training_labels(self, ambiguous: str, dropped: int = -1) -> tuple[np.ndarray, np.ndarray]:
        """(labels, loss weights) to train on. Clean and relabelled samples weigh 1. Ambiguous ones keep their
        given label with weight P(clean) ("downweight"), weight 1 ("keep"), or are left out: label `dropped`,
        weight 0 ("drop")."""
        if ambiguous not in ("downweight", "drop", "keep"):
            raise ValueError(f"ambiguous must be 'downweight', 'drop' or 'keep', not {ambiguous!r}")
        weight = np.where(self.ambiguous & (ambiguous == "downweight"), self.clean_prob, 1.0)
        if ambiguous == "drop":
            return np.where(self.ambiguous, dropped, self.labels), np.where(self.ambiguous, 0.0, 1.0)
        return self.labels.copy(), weight


def per_sample_loss(logits: ArrayLike, labels: ArrayLike) -> np.ndarray:
    """Cross-entropy of each sample."""
    z = to_numpy(logits).astype(np.float64)
    y = to_numpy(labels).astype(np.int64)
    return -log_softmax(z, axis=1)[np.arange(len(y)), y]


def _low_loss_posterior(losses: np.ndarray, seed: int) -> np.ndarray:
    span = losses.max() - losses.min()
    x = ((losses - losses.min()) / span if span > 0 else np.zeros_like(losses)).reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=50, tol=1e-3, reg_covar=5e-4, random_state=seed).fit(x)
    return gmm.predict_proba(x)[:, int(np.argmin(gmm.means_.ravel()))]


def clean_probability(losses: ArrayLike, labels: ArrayLike, min_class_size: int = 20, seed: int = 0) -> np.ndarray:
    """P(label is clean) per sample from a per-class two-component GMM on the loss; classes with fewer than
    `min_class_size` samples use a mixture fitted on all samples instead."""
    loss = to_numpy(losses).astype(np.float64)
    y = to_numpy(labels).astype(np.int64)
    prob = _low_loss_posterior(loss, seed)
    for c in np.unique(y):
        rows = y == c
        if rows.sum() >= min_class_size:
            prob[rows] = _low_loss_posterior(loss[rows], seed)
    return prob


def partition_noisy_labels(
    losses: ArrayLike,
    labels: ArrayLike,
    probs: ArrayLike,
    clean_threshold: float,
    relabel_confidence: float,
    min_class_size: int = 20,
    seed: int = 0,
) -> NoisePartition:
    """Clean where P(clean) >= `clean_threshold`; else relabel where the model's top probability is at least
    `relabel_confidence` and its class differs from the label; else ambiguous."""
    y = to_numpy(labels).astype(np.int64)
    p = to_numpy(probs).astype(np.float64)
    clean_prob = clean_probability(losses, y, min_class_size, seed)
    clean = clean_prob >= clean_threshold
    predicted = p.argmax(axis=1)
    relabel = ~clean & (predicted != y) & (p.max(axis=1) >= relabel_confidence)
    return NoisePartition(
        clean=clean,
        relabel=relabel,
        ambiguous=~clean & ~relabel,
        clean_prob=clean_prob,
        labels=np.where(relabel, predicted, y),
    )
