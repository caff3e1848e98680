"""Temperature scaling (Guo et al. 2017): one scalar T fitted on dev logits by minimising the NLL."""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
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
