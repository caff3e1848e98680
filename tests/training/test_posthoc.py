import numpy as np
import pytest
import torch
from scipy.special import softmax

from tests.training.synthetic import bayes_log_posterior, blobs, class_means
from training.metrics import macro_f1
from training.posthoc import (
    apply_offset,
    estimate_priors_em,
    logit_adjustment,
    prior_shift,
    tune_class_biases,
    tune_logit_adjustment,
)

C, DIM = 5, 8
TRAIN_COUNTS = np.array([2000, 800, 300, 100, 40])
TRAIN_PRIOR = TRAIN_COUNTS / TRAIN_COUNTS.sum()


@pytest.fixture(scope="module")
def problem():
    """Logits of the ideal model fitted to an imbalanced training prior, on balanced dev and test sets."""
    means = class_means(C, DIM, radius=2.5, seed=1)
    splits = [blobs([200] * C, means, seed) for seed in (11, 12)]
    return [(bayes_log_posterior(x, means, TRAIN_PRIOR), y) for x, y in splits], means


def test_logit_adjustment_raises_macro_f1(problem):
    ((dev_logits, dev_y), (test_logits, test_y)), _ = problem
    search = tune_logit_adjustment(dev_logits, dev_y, TRAIN_COUNTS)
    assert 0.5 <= search.value <= 1.5  # the Bayes-optimal correction for a balanced target is τ = 1
    before = macro_f1(test_y, test_logits.argmax(1), C)
    after = macro_f1(test_y, (test_logits + logit_adjustment(TRAIN_COUNTS, search.value)).argmax(1), C)
    assert after > before + 0.05


def test_bias_tuning_raises_macro_f1(problem):
    ((dev_logits, dev_y), (test_logits, test_y)), _ = problem
    search = tune_class_biases(dev_logits, dev_y)
    assert search.macro_f1 >= macro_f1(dev_y, dev_logits.argmax(1), C)
    assert search.offset.mean() == pytest.approx(0.0)
    assert search.offset[-1] > search.offset[0]  # the rare class is pushed up
    before = macro_f1(test_y, test_logits.argmax(1), C)
    assert macro_f1(test_y, apply_offset(test_logits, search.offset).argmax(1), C) > before + 0.05


def test_em_recovers_a_shifted_prior(problem):
    _, means = problem
    new_prior = np.array([0.1, 0.15, 0.2, 0.25, 0.3])
    x, _ = blobs((new_prior * 20_000).astype(int), means, seed=13)
    probs = softmax(bayes_log_posterior(x, means, TRAIN_PRIOR), axis=1)
    estimate = estimate_priors_em(probs, TRAIN_PRIOR)
    assert estimate.converged
    np.testing.assert_allclose(estimate.prior, new_prior, atol=0.03)
    assert np.abs(probs.mean(0) - new_prior).max() > 0.05  # the naive average of posteriors is off
    # the matching correction turns the posteriors into those under the new prior
    corrected = apply_offset(np.log(probs), prior_shift(TRAIN_PRIOR, estimate.prior))
    np.testing.assert_allclose(
        softmax(corrected, axis=1), softmax(bayes_log_posterior(x, means, estimate.prior), axis=1), atol=1e-9
    )


def test_em_is_a_fixed_point_without_shift(problem):
    ((dev_logits, _), _), means = problem
    x, _ = blobs((TRAIN_PRIOR * 20_000).astype(int), means, seed=14)
    estimate = estimate_priors_em(softmax(bayes_log_posterior(x, means, TRAIN_PRIOR), axis=1), TRAIN_PRIOR)
    np.testing.assert_allclose(estimate.prior, TRAIN_PRIOR, atol=0.01)


def test_apply_offset_keeps_the_array_type():
    offset = np.array([1.0, -1.0])
    out = apply_offset(torch.zeros(3, 2), offset)
    assert isinstance(out, torch.Tensor) and out[0].tolist() == [1.0, -1.0]
    assert isinstance(apply_offset(np.zeros((3, 2)), offset), np.ndarray)
