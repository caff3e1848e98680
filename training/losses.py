"""Imbalance-aware classification losses.

Every loss takes logits `[B, C]` and targets that are either class indices `[B]` or distributions `[B, C]`
(mixed samples), and returns the mean over the batch of the per-sample loss. Class weights multiply the
per-sample loss and are normalised to mean 1 over classes, so equal counts give exactly plain cross-entropy.
Call `set_epoch` each epoch; only schedule-dependent losses (LDAM-DRW) use it. Parameters have no defaults here:
recipes own them (training/recipe.py `LOSS_PARAMS`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.common import ArrayLike, as_soft_targets, class_prior, to_numpy

WEIGHT_SCHEMES = ("inverse", "sqrt_inverse", "effective")


def class_weights(counts: ArrayLike, scheme: str, beta: float) -> Tensor:
    """Per-class loss weights, mean 1: 1/n, 1/sqrt(n), or Cui et al.'s (1 − β) / (1 − β^n) ("effective number")."""
    n = np.maximum(to_numpy(counts).astype(np.float64), 1.0)
    if scheme == "inverse":
        w = 1.0 / n
    elif scheme == "sqrt_inverse":
        w = 1.0 / np.sqrt(n)
    elif scheme == "effective":
        w = (1.0 - beta) / (1.0 - np.power(beta, n))
    else:
        raise ValueError(f"unknown weight scheme {scheme!r}; expected one of {WEIGHT_SCHEMES}")
    return torch.as_tensor(w / w.mean(), dtype=torch.float32)


def soft_cross_entropy(logits: Tensor, targets: Tensor, weight: Tensor | None = None) -> Tensor:
    """−Σ_c w_c y_c log softmax(logits)_c, averaged over the batch; hard targets are one-hot."""
    soft = as_soft_targets(targets, logits.shape[-1])
    per_class = -soft * F.log_softmax(logits.float(), dim=-1)
    if weight is not None:
        per_class = per_class * weight
    return per_class.sum(dim=-1).mean()


class ImbalanceLoss(nn.Module):
    def set_epoch(self, epoch: int) -> None:
        """Hook for losses whose behaviour follows a schedule; a no-op by default."""


class CrossEntropyLoss(ImbalanceLoss):
    """Plain, soft-label, or class-weighted cross-entropy (pass `class_weights(...)`)."""

    def __init__(self, weight: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return soft_cross_entropy(logits, targets, self.weight)


class FocalLoss(ImbalanceLoss):
    """Lin et al. 2017: −Σ_c α_c y_c (1 − p_c)^γ log p_c; γ=0 and no α is cross-entropy."""

    def __init__(self, gamma: float, alpha: Tensor | None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("alpha", alpha)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        soft = as_soft_targets(targets, logits.shape[-1])
        log_p = F.log_softmax(logits.float(), dim=-1)
        per_class = -soft * (1.0 - log_p.exp()).pow(self.gamma) * log_p
        if self.alpha is not None:
            per_class = per_class * self.alpha
        return per_class.sum(dim=-1).mean()


class LDAMLoss(ImbalanceLoss):
    """Cao et al. 2019: subtract a margin ∝ n_c^(-1/4) from the target logit, scale by s, then cross-entropy.

    The largest margin is `max_margin`. With deferred re-weighting (DRW), class weights (effective number,
    `beta`) switch on from epoch `drw_epoch`. The paper's s=30 assumes cosine logits in [-1, 1] (use
    `NormedLinear` as the head); with an ordinary linear head use s=1.
    """

    def __init__(
        self, class_counts: ArrayLike, max_margin: float, s: float, drw_epoch: int | None, beta: float
    ) -> None:
        super().__init__()
        n = np.maximum(to_numpy(class_counts).astype(np.float64), 1.0)
        margins = n**-0.25
        self.register_buffer("margins", torch.as_tensor(margins * max_margin / margins.max(), dtype=torch.float32))
        self.register_buffer("drw_weight", class_weights(n, "effective", beta))
        self.register_buffer("weight", None)
        self.s = s
        self.drw_epoch = drw_epoch

    def set_epoch(self, epoch: int) -> None:
        deferred = self.drw_epoch is not None and epoch >= self.drw_epoch
        self.weight = self.drw_weight if deferred else None

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        soft = as_soft_targets(targets, logits.shape[-1])
        return soft_cross_entropy(self.s * (logits.float() - soft * self.margins), soft, self.weight)


class NormedLinear(nn.Module):
    """Cosine classifier head: logits are cosines between normalised features and class weights."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features).uniform_(-1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T


class LogitAdjustedLoss(ImbalanceLoss):
    """Menon et al. 2021: cross-entropy on logits + τ · log prior; τ=1 is balanced softmax. Predict with raw logits."""

    def __init__(self, class_counts: ArrayLike, tau: float) -> None:
        super().__init__()
        self.register_buffer("offset", tau * torch.as_tensor(np.log(class_prior(class_counts)), dtype=torch.float32))

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        return soft_cross_entropy(logits.float() + self.offset, targets)


def _weighted_ce(counts: ArrayLike, scheme: str, beta: float) -> ImbalanceLoss:
    return CrossEntropyLoss(class_weights(counts, scheme, beta))


def _focal(counts: ArrayLike, gamma: float, alpha: str | ArrayLike | None, beta: float) -> ImbalanceLoss:
    """`alpha` is None, a weight scheme name (see `class_weights`) or explicit per-class weights."""
    if isinstance(alpha, str):
        weights = class_weights(counts, alpha, beta)
    else:
        weights = None if alpha is None else torch.as_tensor(to_numpy(alpha), dtype=torch.float32)
    return FocalLoss(gamma, weights)


def _plain_ce(counts: ArrayLike) -> ImbalanceLoss:
    return CrossEntropyLoss()


def _balanced_softmax(counts: ArrayLike) -> ImbalanceLoss:
    return LogitAdjustedLoss(counts, tau=1.0)


_BUILDERS: dict[str, Callable[..., ImbalanceLoss]] = {
    "ce": _plain_ce,
    "soft_ce": _plain_ce,  # every loss here accepts soft targets; the name exists for recipes
    "weighted_ce": _weighted_ce,
    "focal": _focal,
    "ldam": LDAMLoss,
    "logit_adjusted": LogitAdjustedLoss,
    "balanced_softmax": _balanced_softmax,
}


LOSS_NAMES = tuple(_BUILDERS)


def build_loss(name: str, class_counts: ArrayLike, **params: object) -> ImbalanceLoss:
    """A loss by recipe name with all its keyword parameters (training/recipe.py `make_loss` fills in a recipe's
    defaults); unknown names, unknown or missing parameters raise."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(_BUILDERS)}")
    return _BUILDERS[name](class_counts, **params)
