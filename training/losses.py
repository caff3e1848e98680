"""Imbalance-aware classification losses.

Every loss takes logits `[B, C]` and targets that are either class indices `[B]` or distributions `[B, C]`
(mixed samples), and returns the mean over the batch of the per-sample loss. Two optional per-row inputs:
`groups`, the corpus index of each row (the logit-adjusted loss uses its own corpus's prior; -1 means the pooled
prior), and `sample_weight`, a weight on each row's loss (down-weighted ambiguous labels, training/noise.py).
Class weights multiply the per-sample loss and are normalised to mean 1 over classes, so equal counts give
exactly plain cross-entropy. Class counts are `[C]`, or `[G, C]` with one row per training corpus; losses other
than the logit-adjusted one use their sum over corpora. Call `set_epoch` each epoch; only schedule-dependent
losses (LDAM-DRW) use it. `classifier` gives the emotion classifier a loss trains (LDAM: a cosine head).
Parameters have no defaults here: recipes own them (training/recipe.py `LOSS_PARAMS`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.common import ArrayLike, as_soft_targets, class_prior, to_numpy

WEIGHT_SCHEMES = ("inverse", "sqrt_inverse", "effective")
PRIORS = ("per_corpus", "pooled")


def pooled_counts(counts: ArrayLike) -> np.ndarray:
    """Per-class counts `[C]` from `[C]` or per-corpus `[G, C]` counts."""
    n = to_numpy(counts).astype(np.float64)
    if n.ndim not in (1, 2):
        raise ValueError(f"class counts must be [C] or [corpora, C], got shape {n.shape}")
    return n if n.ndim == 1 else n.sum(axis=0)


def class_weights(counts: ArrayLike, scheme: str, beta: float) -> Tensor:
    """Per-class loss weights, mean 1: 1/n, 1/sqrt(n), or Cui et al.'s (1 − β) / (1 − β^n) ("effective number").

    With β close to 1 the effective number tends to n: at MELD's counts (268-4,710 per class) β = 0.9999 is
    nearly inverse frequency, β = 0.999 is much flatter."""
    n = np.maximum(pooled_counts(counts), 1.0)
    if scheme == "inverse":
        w = 1.0 / n
    elif scheme == "sqrt_inverse":
        w = 1.0 / np.sqrt(n)
    elif scheme == "effective":
        w = (1.0 - beta) / (1.0 - np.power(beta, n))
    else:
        raise ValueError(f"unknown weight scheme {scheme!r}; expected one of {WEIGHT_SCHEMES}")
    return torch.as_tensor(w / w.mean(), dtype=torch.float32)


def per_sample_cross_entropy(logits: Tensor, soft: Tensor, weight: Tensor | None = None) -> Tensor:
    """[B] −Σ_c w_c y_c log softmax(logits)_c for soft targets `[B, C]`."""
    per_class = -soft * F.log_softmax(logits.float(), dim=-1)
    if weight is not None:
        per_class = per_class * weight
    return per_class.sum(dim=-1)


def soft_cross_entropy(logits: Tensor, targets: Tensor, weight: Tensor | None = None) -> Tensor:
    """−Σ_c w_c y_c log softmax(logits)_c, averaged over the batch; hard targets are one-hot."""
    return per_sample_cross_entropy(logits, as_soft_targets(targets, logits.shape[-1]), weight).mean()


class ImbalanceLoss(nn.Module):
    """Base: subclasses give the per-sample loss of soft targets; the batch mean (row-weighted) is done here."""

    def set_epoch(self, epoch: int) -> None:
        """Hook for losses whose behaviour follows a schedule; a no-op by default."""

    def classifier(self, linear: nn.Linear) -> nn.Module:
        """The emotion classifier this loss trains, built on `linear`'s weight: `linear` itself by default."""
        return linear

    def per_sample(self, logits: Tensor, soft: Tensor, groups: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(
        self, logits: Tensor, targets: Tensor, groups: Tensor | None = None, sample_weight: Tensor | None = None
    ) -> Tensor:
        loss = self.per_sample(logits.float(), as_soft_targets(targets, logits.shape[-1]), groups)
        if sample_weight is not None:
            loss = loss * sample_weight.to(loss.dtype)
        return loss.mean()


class CrossEntropyLoss(ImbalanceLoss):
    """Plain, soft-label, or class-weighted cross-entropy (pass `class_weights(...)`)."""

    def __init__(self, weight: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)

    def per_sample(self, logits: Tensor, soft: Tensor, groups: Tensor | None) -> Tensor:
        return per_sample_cross_entropy(logits, soft, self.weight)


class FocalLoss(ImbalanceLoss):
    """Lin et al. 2017: −Σ_c α_c y_c (1 − p_c)^γ log p_c; γ=0 and no α is cross-entropy."""

    def __init__(self, gamma: float, alpha: Tensor | None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("alpha", alpha)

    def per_sample(self, logits: Tensor, soft: Tensor, groups: Tensor | None) -> Tensor:
        log_p = F.log_softmax(logits, dim=-1)
        per_class = -soft * (1.0 - log_p.exp()).pow(self.gamma) * log_p
        if self.alpha is not None:
            per_class = per_class * self.alpha
        return per_class.sum(dim=-1)


class NormedLinear(nn.Module):
    """Cosine classifier: logits are `scale` · cos(feature, class weight). It trains the weight it is given (an
    existing linear layer's, so optimiser and checkpoints see the same parameter); `to_linear` folds it back
    into a plain linear layer for export (see there)."""

    def __init__(self, weight: nn.Parameter, scale: float) -> None:
        super().__init__()
        self.weight = weight
        self.scale = scale

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T

    def to_linear(self) -> nn.Linear:
        """A linear layer with weight rows scale · W_j / ||W_j|| and zero bias. Its logits are ||x|| times the
        cosine logits, so it predicts exactly the classes the cosine classifier predicts (a positive factor per
        row); only the sharpness of the softmax varies with the feature norm, which calibration then fits."""
        weight = self.scale * F.normalize(self.weight.detach(), dim=-1)
        linear = nn.Linear(weight.shape[1], weight.shape[0]).to(weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.zero_()
        return linear


class LDAMLoss(ImbalanceLoss):
    """Cao et al. 2019: cosine logits z_j = s · cos(x, W_j) (`classifier` makes the head a `NormedLinear` with
    scale s); the target logit loses s · Δ_y with Δ_j ∝ n_j^(-1/4), the largest margin `max_margin`, then
    cross-entropy. Deferred re-weighting (DRW): effective-number class weights (`beta`) from epoch `drw_epoch`
    on, the epoch of the learning-rate drop (training/recipe.py sets it from the recipe's schedule).
    """

    def __init__(
        self, class_counts: ArrayLike, max_margin: float, s: float, drw_epoch: int | None, beta: float
    ) -> None:
        super().__init__()
        n = np.maximum(pooled_counts(class_counts), 1.0)
        margins = n**-0.25
        self.register_buffer("margins", torch.as_tensor(margins * max_margin / margins.max(), dtype=torch.float32))
        self.register_buffer("drw_weight", class_weights(n, "effective", beta))
        self.register_buffer("weight", None)
        self.s = s
        self.drw_epoch = drw_epoch

    def set_epoch(self, epoch: int) -> None:
        deferred = self.drw_epoch is not None and epoch >= self.drw_epoch
        self.weight = self.drw_weight if deferred else None

    def classifier(self, linear: nn.Linear) -> nn.Module:
        return NormedLinear(linear.weight, self.s)

    def per_sample(self, logits: Tensor, soft: Tensor, groups: Tensor | None) -> Tensor:
        return per_sample_cross_entropy(logits - self.s * soft * self.margins, soft, self.weight)


class LogitAdjustedLoss(ImbalanceLoss):
    """Menon et al. 2021: cross-entropy on logits + τ · log prior; τ=1 is balanced softmax. Predict with raw logits.

    The prior is the training prior of the rows being scored: with per-corpus counts `[G, C]` and
    `prior="per_corpus"`, row i uses the prior of its corpus `groups[i]` (-1: the pooled prior); `"pooled"` uses
    the prior of all corpora together for every row."""

    def __init__(self, class_counts: ArrayLike, tau: float, prior: str) -> None:
        super().__init__()
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; expected one of {PRIORS}")
        counts = to_numpy(class_counts).astype(np.float64)
        per_corpus = counts.reshape(-1, counts.shape[-1]) if prior == "per_corpus" else np.zeros((0, counts.shape[-1]))
        priors = [class_prior(c) for c in per_corpus] + [class_prior(pooled_counts(counts))]
        self.register_buffer("offset", tau * torch.as_tensor(np.log(np.stack(priors)), dtype=torch.float32))

    def per_sample(self, logits: Tensor, soft: Tensor, groups: Tensor | None) -> Tensor:
        if len(self.offset) <= 2:  # one corpus (its prior is the pooled one) or the pooled prior alone
            offset = self.offset[-1]
        elif groups is None:
            raise ValueError("the per-corpus logit adjustment needs the corpus of each row (groups)")
        else:
            offset = self.offset[groups.long()]
        return per_sample_cross_entropy(logits + offset, soft)


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
    return LogitAdjustedLoss(counts, tau=1.0, prior="per_corpus")


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


# ---- terms beside the emotion loss ------------------------------------------------------------------------------


def supervised_contrastive(features: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """SupCon, L_out form (Khosla et al. 2020, eq. 2): every row with at least one same-label row is an anchor,
    and its loss is the mean over those positives p of −log(exp(z·z_p / τ) / Σ_{a ≠ anchor} exp(z·z_a / τ)),
    with z the L2-normalised features. Anchors are averaged; rows alone in their class only serve as negatives,
    and a batch without any anchor gives 0."""
    z = F.normalize(features.float(), dim=1)
    itself = torch.eye(len(z), dtype=torch.bool, device=z.device)
    similarity = (z @ z.T / temperature).masked_fill(itself, float("-inf"))
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~itself
    count = positives.sum(dim=1)
    anchors = count > 0
    if not anchors.any():
        return z.sum() * 0.0
    summed = log_prob.masked_fill(~positives, 0.0).sum(dim=1)
    return -(summed[anchors] / count[anchors]).mean()


def distillation_term(student_logits: Tensor, teacher_probs: Tensor, temperature: float) -> Tensor:
    """Hinton et al. (2015): T² · KL(teacher ‖ student) at temperature T, averaged over rows; `teacher_probs` are
    the teachers' probabilities already softened at T. The T² keeps the gradient's scale independent of T."""
    log_student = F.log_softmax(student_logits.float() / temperature, dim=1)
    kl = (teacher_probs * (torch.log(teacher_probs.clamp(min=1e-12)) - log_student)).sum(dim=1)
    return temperature**2 * kl.mean()
