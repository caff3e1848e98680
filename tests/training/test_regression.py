import numpy as np
import pytest
import torch

from training.regression import BalancedMSELoss, balanced_mse, lds_weights


def _imbalanced_targets(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0.0, 0.5, 1800), rng.normal(3.0, 0.3, 200)])


def test_lds_weights_favour_rare_targets():
    y = _imbalanced_targets()
    w = lds_weights(y, bins=30)
    assert w.mean() == pytest.approx(1.0)
    assert np.median(w[y > 2]) > 3 * np.median(w[np.abs(y) < 0.5])
    w_sqrt = lds_weights(y, bins=30, power=0.5)
    i, j = int(np.argmax(y)), int(np.argmin(np.abs(y)))
    assert w_sqrt[i] / w_sqrt[j] == pytest.approx(np.sqrt(w[i] / w[j]))


def test_lds_smoothing_lends_density_from_neighbouring_bins():
    y = np.array([0.05] * 50 + [0.15])  # 10 bins over [0, 1]: 50 samples in bin 0, one in bin 1
    unsmoothed = lds_weights(y, bins=10, kernel_size=1, value_range=(0.0, 1.0))
    smoothed = lds_weights(y, bins=10, kernel_size=5, sigma=2.0, value_range=(0.0, 1.0))
    assert unsmoothed[-1] / unsmoothed[0] == pytest.approx(50.0)
    assert smoothed[-1] / smoothed[0] < 2.0  # the lone sample borrows most of bin 0's density
    np.testing.assert_allclose(lds_weights(np.linspace(0, 1, 100), bins=10, kernel_size=1), 1.0)


def _fit_linear(loss_fn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    w = torch.zeros(2, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=0.08)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, len(x), (256,), generator=g)
        optimizer.zero_grad()
        loss_fn(w[0] * x[idx] + w[1], y[idx]).backward()
        optimizer.step()
    return (w[0] * x + w[1]).detach()


def test_balanced_mse_removes_the_shrinkage_on_rare_targets():
    # x = y + noise: MSE regresses the rare high targets toward the frequent ones; Balanced MSE undoes the
    # label prior and leaves them almost unbiased.
    y = _imbalanced_targets()
    x = y + np.random.default_rng(1).normal(0, 1, len(y))
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    rare = y > 2
    mse_bias = (_fit_linear(lambda p, t: (p - t).pow(2).mean(), xt, yt).numpy() - y)[rare].mean()
    bmc_bias = (_fit_linear(lambda p, t: balanced_mse(p, t, 1.0), xt, yt).numpy() - y)[rare].mean()
    assert mse_bias < -0.8 and abs(bmc_bias) < 0.3


def test_balanced_mse_module_learns_sigma_and_has_finite_gradients():
    loss = BalancedMSELoss(sigma=0.5)
    pred = torch.randn(64, requires_grad=True)
    value = loss(pred, torch.randn(64))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(pred.grad).all()
    assert loss.noise_sigma.grad is not None and torch.isfinite(loss.noise_sigma.grad)
    assert not BalancedMSELoss(learnable=False).noise_sigma.requires_grad
