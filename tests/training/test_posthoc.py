import numpy as np
import pytest
import torch

from tests.training.synthetic import bayes_log_posterior, blobs, class_means
from training.metrics import macro_f1
from training.posthoc import (
    apply_offset,
    logit_adjustment,
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


def test_apply_offset_keeps_the_array_type():
    offset = np.array([1.0, -1.0])
    out = apply_offset(torch.zeros(3, 2), offset)
    assert isinstance(out, torch.Tensor) and out[0].tolist() == [1.0, -1.0]
    assert isinstance(apply_offset(np.zeros((3, 2)), offset), np.ndarray)
