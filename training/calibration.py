"""Calibration fitted on dev: temperature scaling (Guo et al. 2017), one scalar T minimising the NLL; and the
per-class estimation weights of the artifact (model/artifact.py Calibration), which turn served probabilities
into calibrated posteriors for label-free recall estimation."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax

from training.common import ArrayLike, Logits, to_numpy


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(logits / temperature, axis=1)[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: ArrayLike, labels: ArrayLike, bounds: tuple[float, float] = (0.05, 20.0)) -> float:
    """The T in `bounds` minimising dev NLL of softmax(logits / T); a bounded search over log T (the NLL is
    convex in 1/T, so the search finds the global optimum)."""
    z = to_numpy(logits).astype(np.float64)
    y = to_numpy(labels).astype(np.int64)
    result = minimize_scalar(
        lambda log_t: _nll(z, y, float(np.exp(log_t))),
        bounds=(np.log(bounds[0]), np.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(np.exp(result.x))


def apply_temperature(logits: Logits, temperature: float) -> Logits:
    """logits / T (numpy or torch in, same out); T > 1 softens, T < 1 sharpens."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return logits / temperature


def fit_estimation_weights(probs: ArrayLike, labels: ArrayLike) -> tuple[float, ...]:
    """Per-class w minimising dev NLL of normalise(probs * w): a bias on the log-probabilities, convex, so
    L-BFGS finds the optimum; w is scaled so that its geometric mean is 1."""
    log_p = np.log(np.clip(to_numpy(probs).astype(np.float64), 1e-12, None))
    y = to_numpy(labels).astype(np.int64)
    rows = np.arange(len(y))

    def nll_and_grad(bias: np.ndarray) -> tuple[float, np.ndarray]:
        log_q = log_softmax(log_p + bias, axis=1)
        grad = np.exp(log_q).sum(axis=0) - np.bincount(y, minlength=log_p.shape[1])
        return float(-log_q[rows, y].sum() / len(y)), grad / len(y)

    bias = minimize(nll_and_grad, np.zeros(log_p.shape[1]), jac=True, method="L-BFGS-B").x
    return tuple(float(w) for w in np.exp(bias - bias.mean()))
