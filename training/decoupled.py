"""Decoupled classifier learning (Kang et al. 2020) on frozen features: classifier re-training (cRT) with
class-balanced sampling, and τ-normalisation of the classifier weights with τ chosen on dev for macro F1."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from training.common import TAU_GRID, GridSearch, grid_search
from training.losses import CrossEntropyLoss, ImbalanceLoss
from training.metrics import macro_f1
from training.samplers import FrequencySampler, Sampler, epoch_indices


def _new_linear(in_features: int, num_classes: int, seed: int) -> nn.Linear:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Linear(in_features, num_classes)


def retrain_classifier(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    head: nn.Module | None = None,
    sampler: Sampler | None = None,
    loss: ImbalanceLoss | None = None,
    *,
    epochs: int,
    lr: float,
    batch_size: int = 256,
    weight_decay: float = 5e-4,
    seed: int = 0,
) -> nn.Module:
    """cRT: train `head` (default: a fresh linear layer) on frozen `features` with class-balanced sampling
    (or `sampler`) and cross-entropy (or `loss`), AdamW with a cosine schedule. Returns the head in eval mode;
    a given head is trained in place."""
    head = _new_linear(features.shape[1], num_classes, seed) if head is None else head
    head = head.to(features.device).train()
    sampler = FrequencySampler(0.0) if sampler is None else sampler
    loss = CrossEntropyLoss() if loss is None else loss.to(features.device)
    y = labels.long().to(features.device)
    steps_per_epoch = -(-len(y) // batch_size)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    labels_np = y.cpu().numpy()
    for epoch in range(epochs):
        loss.set_epoch(epoch)
        order = torch.as_tensor(epoch_indices(sampler, labels_np, epoch, seed), device=features.device)
        for batch in order.split(batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss(head(features[batch]), y[batch]).backward()
            optimizer.step()
            schedule.step()
    return head.eval()


@torch.no_grad()
def predict_logits(head: nn.Module, features: Tensor, batch_size: int = 4096) -> Tensor:
    return torch.cat([head(chunk) for chunk in features.split(batch_size)])


def tau_normalize(head: nn.Linear, tau: float) -> nn.Linear:
    """Kang et al. 2020: a copy of `head` that scores W_j · x / ||W_j||^τ with no bias (τ=0: the weights
    unchanged, τ=1: unit rows). The bias is dropped at every τ: the method re-balances the classifier through its
    weight norms alone, and a bias learnt on the imbalanced data would carry the prior back in."""
    normalised = copy.deepcopy(head)
    with torch.no_grad():
        norms = head.weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
        normalised.weight.copy_(head.weight / norms.pow(tau))
        if normalised.bias is not None:
            normalised.bias.zero_()
    return normalised


def select_tau(
    head: nn.Linear, dev_features: Tensor, dev_labels: Tensor, taus: Sequence[float] = TAU_GRID
) -> GridSearch:
    """The τ with the best dev macro F1 (ties go to the smallest τ, i.e. the least change)."""

    def score(tau: float) -> float:
        pred = predict_logits(tau_normalize(head, tau), dev_features).argmax(dim=1)
        return macro_f1(dev_labels, pred, head.out_features)

    return grid_search(taus, score)
