import numpy as np
import pytest
import torch
from scipy.special import softmax

from tests.training.synthetic import bayes_log_posterior, blobs, class_means
from training.calibration import apply_temperature, fit_temperature
from training.metrics import expected_calibration_error


@pytest.fixture(scope="module")
def calibrated():
    """Exact posteriors (calibrated by construction) on dev and test draws."""
    means = class_means(4, 6, radius=1.5, seed=3)
    prior = np.full(4, 0.25)
    return [(bayes_log_posterior(x, means, prior), y) for x, y in (blobs([500] * 4, means, s) for s in (21, 22))]


def test_temperature_scaling_fixes_overconfident_logits(calibrated):
    (dev_logits, dev_y), (test_logits, test_y) = calibrated
    sharpen = 3.0
    temperature = fit_temperature(sharpen * dev_logits, dev_y)
    assert temperature == pytest.approx(sharpen, rel=0.2)
    before = expected_calibration_error(softmax(sharpen * test_logits, axis=1), test_y)
    after = expected_calibration_error(softmax(apply_temperature(sharpen * test_logits, temperature), axis=1), test_y)
    assert before > 0.1 and after < before / 3


def test_calibrated_logits_keep_temperature_near_one(calibrated):
    (dev_logits, dev_y), _ = calibrated
    assert fit_temperature(dev_logits, dev_y) == pytest.approx(1.0, abs=0.15)


def test_apply_temperature_types_and_validation():
    out = apply_temperature(torch.tensor([[2.0, 4.0]]), 2.0)
    assert isinstance(out, torch.Tensor) and out.tolist() == [[1.0, 2.0]]
    with pytest.raises(ValueError):
        apply_temperature(np.zeros((1, 2)), 0.0)
