"""Imbalanced regression for continuous targets (intensity, valence): label-distribution smoothing (LDS,
Yang et al. 2021) for loss weights, and Balanced MSE (Ren et al. 2022) in its batch Monte-Carlo form."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import convolve1d
from torch import Tensor, nn

from training.common import ArrayLike, to_numpy


def _gaussian_kernel(size: int, sigma: float) -> np.ndarray:
    half = size // 2
    kernel = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    return kernel / kernel.max()


def lds_weights(
    targets: ArrayLike,
    bins: int = 50,
    kernel_size: int = 5,
    sigma: float = 2.0,
    value_range: tuple[float, float] | None = None,
    power: float = 1.0,
) -> np.ndarray:
    """Per-sample weights ∝ (smoothed label density)^-power, mean 1. The density is a histogram of the targets
    convolved with a Gaussian kernel (in bins); power=0.5 is the paper's square-root-inverse variant."""
    y = to_numpy(targets).astype(np.float64).ravel()
    lo, hi = value_range if value_range is not None else (y.min(), y.max())
    histogram, edges = np.histogram(y, bins=bins, range=(lo, hi))
    density = convolve1d(histogram.astype(np.float64), _gaussian_kernel(kernel_size, sigma), mode="constant")
    index = np.clip(np.searchsorted(edges, y, side="right") - 1, 0, bins - 1)
    weights = np.maximum(density[index], 1e-12) ** -power
    return weights / weights.mean()


def balanced_mse(pred: Tensor, target: Tensor, noise_var: Tensor | float) -> Tensor:
    """Batch Monte-Carlo Balanced MSE: cross-entropy of each prediction against all targets in the batch with
    logits −(pred − target_j)² / 2σ², scaled by 2σ² (detached) so its size matches MSE."""
    noise_var = torch.as_tensor(noise_var, dtype=pred.dtype, device=pred.device)
    logits = -(pred.reshape(-1, 1) - target.reshape(1, -1)).pow(2) / (2 * noise_var)
    loss = F.cross_entropy(logits, torch.arange(len(logits), device=pred.device))
    return loss * (2 * noise_var).detach()


class BalancedMSELoss(nn.Module):
    """Balanced MSE with a learnable noise σ (initial `sigma`); put its parameter in the optimiser."""

    def __init__(self, sigma: float = 1.0, learnable: bool = True) -> None:
        super().__init__()
        self.noise_sigma = nn.Parameter(torch.tensor(float(sigma)), requires_grad=learnable)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return balanced_mse(pred, target, self.noise_sigma**2)
