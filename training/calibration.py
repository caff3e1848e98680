"""Calibration fitted on dev: temperature scaling (Guo et al. 2017), one scalar T minimising the NLL; bias-corrected
temperature scaling (Alexandari et al. 2020), the calibrated posteriors monitoring and prior correction work on;
and the whole calibration record of an artifact (model/artifact.py Calibration): the priors, the dev confusion
and the reference class mix with its covariance under a bootstrap over dev conversations. The per-class
estimation weights of older artifacts are fitted here too."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import log_softmax

from core.resampling import turn_weights
from model.artifact import Calibration, ClassPrior, DataSource, DevReference, PosteriorCalibration
from training.common import ArrayLike, Logits, class_prior, to_numpy


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


def fit_bcts(logits: ArrayLike, labels: ArrayLike) -> tuple[float, np.ndarray]:
    """Bias-corrected temperature scaling (Alexandari et al. 2020): the T and per-class biases b minimising the NLL
    of softmax(logits / T + b). The NLL is convex in (1 / T, b), so L-BFGS finds the optimum. At the optimum the
    mean posterior equals the labels' class shares (the bias gradient is their difference), so the posteriors
    assume the prior of the data they were fitted on. Returns T and b (centred: a common shift changes nothing)."""
    z = to_numpy(logits).astype(np.float64)
    y = to_numpy(labels).astype(np.int64)
    n, c = z.shape
    rows = np.arange(n)
    target = np.bincount(y, minlength=c)

    def nll_and_grad(params: np.ndarray) -> tuple[float, np.ndarray]:
        inverse_t, bias = params[0], params[1:]
        log_q = log_softmax(inverse_t * z + bias, axis=1)
        q = np.exp(log_q)
        grad_inverse_t = float((q * z).sum() - z[rows, y].sum())
        grad_bias = q.sum(axis=0) - target
        return float(-log_q[rows, y].sum() / n), np.r_[grad_inverse_t, grad_bias] / n

    start = np.r_[1.0 / fit_temperature(z, y), np.zeros(c)]
    bounds = [(1.0 / 20.0, 1.0 / 0.05)] + [(None, None)] * c
    params = minimize(nll_and_grad, start, jac=True, method="L-BFGS-B", bounds=bounds).x
    return float(1.0 / params[0]), params[1:] - params[1:].mean()


def share_covariance(
    predicted: np.ndarray, conversations: np.ndarray, num_classes: int, replicates: int = 2000, seed: int = 0
) -> np.ndarray:
    """[C, C] covariance of the predicted-class shares under the bootstrap over conversations."""
    weights = turn_weights(conversations, replicates, seed)
    one_hot = np.eye(num_classes)[np.asarray(predicted)]
    shares = (weights @ one_hot) / weights.sum(axis=1, keepdims=True)
    return np.cov(shares, rowvar=False)


@dataclass(frozen=True)
class CalibrationFit:
    """What a model's dev scores give its artifact: the calibration record and the reference class mix."""

    calibration: Calibration
    reference_distribution: dict[str, float]


def fit_calibration_record(
    logits: ArrayLike,
    labels: ArrayLike,
    conversations: np.ndarray,
    emotions: Sequence[str],
    *,
    dev_source: DataSource,
    training_prior: ClassPrior,
    sentiment_temperature: float = 1.0,
) -> CalibrationFit:
    """Everything the artifact records about calibration, fitted on one clean dev set of the modality mix the model
    serves (raw emotion `logits` [N, C], gold `labels`, each turn's conversation): the serving temperature, the
    BCTS posteriors re-expressed for `training_prior` (Saerens et al. 2002: b + log(train / dev) moves posteriors
    fitted under the dev prior to the training one), the dev prior, the dev confusion and the predicted-class mix
    with its covariance under the bootstrap over dev conversations."""
    z, y = to_numpy(logits).astype(np.float64), to_numpy(labels).astype(np.int64)
    c = len(emotions)
    counts = np.bincount(y, minlength=c)
    dev_prior = class_prior(counts)
    bcts_temperature, biases = fit_bcts(z, y)
    # a class absent from dev has no calibrated bias to move: it keeps the one fitted
    shift = np.log(np.asarray(training_prior.shares).clip(1e-6)) - np.log(dev_prior)
    biases = biases + np.where(counts > 0, shift, 0.0)
    predicted = z.argmax(axis=1)
    confusion = np.zeros((c, c), dtype=np.int64)
    np.add.at(confusion, (y, predicted), 1)
    shares = np.bincount(predicted, minlength=c) / len(predicted)
    calibration = Calibration(
        temperature=fit_temperature(z, y),
        sentiment_temperature=sentiment_temperature,
        temperature_source=dev_source,
        training_prior=training_prior,
        dev_prior=ClassPrior(tuple(dev_prior), dev_source),
        posterior=PosteriorCalibration(bcts_temperature, tuple(biases - biases.mean()), dev_source),
        dev_reference=DevReference(
            tuple(map(tuple, confusion)), tuple(map(tuple, share_covariance(predicted, conversations, c))), dev_source
        ),
    )
    return CalibrationFit(calibration, dict(zip(emotions, shares.round(6).tolist(), strict=True)))
