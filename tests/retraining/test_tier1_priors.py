"""Tier 1's prior correction against the theory it cites: the candidate's posteriors are the base's times
r = pi_new / pi_train (Saerens et al. 2002), and its decision rule keeps the base's prior exponent beta, read off
the BCTS biases (beta = tau / T for logit adjustment, Menon et al. 2021), on traffic whose exact posteriors are
known (three Gaussian classes)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import log_softmax, softmax
from scipy.stats import norm

from model.artifact import Calibration, ClassPrior, DataSource, PosteriorCalibration
from retraining.tier1_priors import corrected_calibration, correction, prior_exponent

NAMES = ("neutral", "joy", "fear")
TRAIN_PRIOR = np.array([0.6, 0.3, 0.1])
NEW_PRIOR = np.array([0.3, 0.3, 0.4])
MEANS = np.array([0.0, 1.5, 3.0])
BCTS_T, SERVING_T = 1.5, 1.2
SOURCE = DataSource("synthetic", "text", 1000, None)


def _calibration(beta: float, residual: np.ndarray | None = None) -> Calibration:
    biases = beta * np.log(TRAIN_PRIOR) + (0.0 if residual is None else residual)
    return Calibration(
        temperature=SERVING_T,
        training_prior=ClassPrior(tuple(TRAIN_PRIOR), SOURCE),
        posterior=PosteriorCalibration(BCTS_T, tuple(biases - biases.mean()), SOURCE),
    )


def _train_log_posteriors(x: np.ndarray) -> np.ndarray:
    """log p_train(y | x), exact: Gaussian class densities under the training prior."""
    return log_softmax(norm.logpdf(x[:, None], MEANS) + np.log(TRAIN_PRIOR), axis=1)


def _raw_logits(log_posteriors: np.ndarray, calibration: Calibration) -> np.ndarray:
    """The raw logits z whose BCTS posteriors softmax(z / T + b) are `log_posteriors`."""
    assert calibration.posterior is not None
    return BCTS_T * (log_posteriors - np.asarray(calibration.posterior.biases))


def _shifted_traffic(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(NAMES), size=n, p=NEW_PRIOR)
    return rng.normal(MEANS[labels], 1.0)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_the_prior_exponent_is_the_slope_of_the_biases_on_the_log_prior(beta: float) -> None:
    assert prior_exponent(_calibration(beta)) == pytest.approx(beta, abs=1e-9)
    # a per-class residual orthogonal to the log prior (bias tuning, per-class miscalibration) leaves it alone
    log_prior = np.log(TRAIN_PRIOR) - np.log(TRAIN_PRIOR).mean()
    residual = np.cross(log_prior, np.ones(3))
    assert prior_exponent(_calibration(beta, residual)) == pytest.approx(beta, abs=1e-9)


def test_the_prior_exponent_is_clipped_and_zero_without_a_prior_to_follow() -> None:
    assert prior_exponent(_calibration(1.6)) == 1.0
    assert prior_exponent(_calibration(-0.4)) == 0.0
    uniform = Calibration(
        training_prior=ClassPrior((1 / 3,) * 3, SOURCE), posterior=PosteriorCalibration(1.0, (0.2, 0.0, -0.2), SOURCE)
    )
    assert prior_exponent(uniform) == 0.0


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_the_candidate_keeps_the_rule_and_its_posteriors_follow_the_new_prior(beta: float) -> None:
    base = _calibration(beta)
    x = _shifted_traffic(4000, seed=1)
    log_p = _train_log_posteriors(x)
    z = _raw_logits(log_p, base)
    found = correction(softmax(z / SERVING_T, axis=1), np.arange(len(x)), base, NAMES, replicates=50)

    assert found.significant and found.prior_exponent == pytest.approx(beta, abs=1e-9)
    assert found.new_prior == pytest.approx(NEW_PRIOR, abs=0.03)
    log_r = np.asarray(found.log_ratio)
    assert log_r == pytest.approx(np.log(np.asarray(found.new_prior) / TRAIN_PRIOR))
    expected = BCTS_T * (1 - beta) * log_r
    assert found.offset == pytest.approx(expected - expected.mean())

    # Saerens et al. 2002: the candidate's posteriors are the base's times r, renormalised
    candidate = corrected_calibration(base, found, "base", "candidate")
    assert candidate.posterior is not None
    served = softmax((z + np.asarray(found.offset)) / SERVING_T, axis=1)
    assert candidate.posterior.posteriors(served, SERVING_T) == pytest.approx(softmax(log_p + log_r, axis=1))
    # the decision keeps its prior exponent: argmax log p_new(y | x) - beta * log pi_new, pi_new = pi_train * r
    new_log_prior = np.log(TRAIN_PRIOR) + log_r
    kept = np.argmax(log_p + log_r - beta * new_log_prior, axis=1)
    assert np.array_equal(np.argmax(z + np.asarray(found.offset), axis=1), kept)
    if beta == 1.0:  # the balanced rule is invariant to label shift: nothing moves
        assert found.offset == pytest.approx(np.zeros(3), abs=1e-12)
