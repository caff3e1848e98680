"""Augmentation on embeddings: mixup (input and manifold), BalanceMix's minority-augmented mixing, SMOTE, and
cross-modal recombination. Randomness comes from a numpy `Generator` passed in, so runs are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from sklearn.neighbors import NearestNeighbors
from torch import Tensor

from training.common import ArrayLike, as_soft_targets, to_numpy
from training.samplers import FrequencySampler


@dataclass(frozen=True)
class MixedBatch:
    x: Tensor  # λ·x + (1 − λ)·x[partner]
    y: Tensor  # soft labels [B, C], rows sum to 1
    lam: Tensor  # [B], weight of the original sample
    partner: Tensor  # [B], index of each sample's partner (into the batch, or into the pool)


def sample_lambda(size: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """λ ~ Beta(α, α) per sample; α <= 0 means no mixing (λ = 1)."""
    return rng.beta(alpha, alpha, size) if alpha > 0 else np.ones(size)


def mix(x: Tensor, y: Tensor, x_partner: Tensor, y_partner: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    """Convex combination of inputs and of (soft) labels, per-sample λ `[B]`."""
    lam_x = lam.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
    lam_y = lam.to(y.dtype).view(-1, 1)
    return lam_x * x + (1 - lam_x) * x_partner, lam_y * y + (1 - lam_y) * y_partner


def _mix_with(
    x: Tensor, y: Tensor, pool_x: Tensor, pool_y: Tensor, partner: np.ndarray, lam: np.ndarray, num_classes: int
) -> MixedBatch:
    index = torch.as_tensor(partner, device=x.device)
    lam_t = torch.as_tensor(lam, dtype=torch.float32, device=x.device)
    soft, pool_soft = as_soft_targets(y, num_classes), as_soft_targets(pool_y, num_classes)
    mixed_x, mixed_y = mix(x, soft, pool_x[index], pool_soft[index], lam_t)
    return MixedBatch(mixed_x, mixed_y, lam_t, index)


def permute_within(groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random permutation of 0..N-1 that maps every index to one of the same group."""
    groups = np.asarray(groups)
    by_group = np.argsort(groups, kind="stable")
    shuffled = np.lexsort((rng.random(len(groups)), groups))  # same group order, random order inside each
    partner = np.empty(len(groups), dtype=np.int64)
    partner[by_group] = shuffled
    return partner


def mixup(
    x: Tensor, y: Tensor, num_classes: int, rng: np.random.Generator, alpha: float, groups: ArrayLike | None = None
) -> MixedBatch:
    """Zhang et al. 2018: mix each sample with a random other sample of the batch (hard or soft `y`); with
    `groups`, only with a sample of its own group (the loop mixes utterances only within their dialogue)."""
    partner = rng.permutation(len(x)) if groups is None else permute_within(to_numpy(groups), rng)
    return _mix_with(x, y, x, y, partner, sample_lambda(len(x), alpha, rng), num_classes)


def manifold_mixup(
    stages: Sequence[Callable[[Tensor], Tensor]],
    x: Tensor,
    y: Tensor,
    num_classes: int,
    rng: np.random.Generator,
    alpha: float,
    mix_at: Sequence[int] | None = None,
) -> tuple[Tensor, MixedBatch]:
    """Verma et al. 2019: run `x` through `stages`, mixing the hidden state before one stage picked at random
    from `mix_at` (default: any; 0 is input mixup). Returns the last stage's output and the mix (its `y` is the
    training target)."""
    k = int(rng.choice(list(mix_at) if mix_at is not None else range(len(stages))))
    h = x
    for stage in stages[:k]:
        h = stage(h)
    mixed = mixup(h, y, num_classes, rng, alpha)
    h = mixed.x
    for stage in stages[k:]:
        h = stage(h)
    return h, mixed


def minority_weights(labels: ArrayLike) -> np.ndarray:
    """BalanceMix's minority sampling: each labelled sample's probability ∝ 1 / (its label's frequency in
    `labels`), so every class is drawn equally often; unlabelled samples (label < 0) are never drawn."""
    y = to_numpy(labels).astype(np.int64)
    weights = np.zeros(len(y))
    labelled = y >= 0
    if labelled.any():
        weights[labelled] = FrequencySampler(0.0).weights(y[labelled], epoch=0)
    return weights


def draw_minority_dialogues(
    dialogue_of: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """`k` dialogues drawn with replacement, each with probability ∝ the summed minority weights of its turns.
    Picking one of the k uniformly and then a turn of it ∝ its weight (`minority_partner_probs`) draws every turn
    of the data set with probability ∝ its weight: the partner of BalanceMix comes from the whole data set, with
    its dialogue around it for context."""
    per_dialogue = np.bincount(dialogue_of, weights=weights)
    return rng.choice(len(per_dialogue), size=k, p=per_dialogue / per_dialogue.sum())


def minority_partner_probs(weights: np.ndarray, slot: np.ndarray) -> np.ndarray:
    """Probability of each row of the drawn dialogues (`slot`: which of the k drawn dialogues a row belongs to)
    being a partner: 1/k · weight / (its dialogue's summed weight)."""
    per_slot = np.bincount(slot, weights=weights)
    return weights / per_slot[slot] / len(per_slot)


def minority_mix(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    rng: np.random.Generator,
    alpha: float,
    pool_x: Tensor,
    pool_y: Tensor,
    pool_p: ArrayLike,
) -> MixedBatch:
    """BalanceMix (Song et al., ICML 2024), its minority-augmented mixing: each sample of the instance-sampled
    (random) batch is the base and is mixed with a partner drawn from `pool` with probabilities `pool_p`
    (`minority_weights`: ∝ 1 / label frequency over the data set). The random sample gets the larger share,
    λ = max(λ', 1 − λ') with λ' ~ Beta(α, α), so the mix stays close to the data distribution while adding
    minority signal. BalanceMix is a multi-label method; here each sample has one label, label frequency is class
    frequency, and the mixed target is λ · y + (1 − λ) · y_partner as in mixup."""
    p = to_numpy(pool_p).astype(np.float64)
    partner = rng.choice(len(p), size=len(x), p=p / p.sum())
    lam = sample_lambda(len(x), alpha, rng)
    return _mix_with(x, y, pool_x, pool_y, partner, np.maximum(lam, 1 - lam), num_classes)


def _smote_class(xc: np.ndarray, n_new: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """`n_new` points on segments between a random sample of the class and one of its k nearest class-mates."""
    base = rng.integers(0, len(xc), n_new)
    if len(xc) == 1:
        return xc[base].copy()
    k = min(k, len(xc) - 1)
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(xc).kneighbors(xc, return_distance=False)[:, 1:]
    chosen = neighbours[base, rng.integers(0, k, n_new)]
    gap = rng.random((n_new, 1))
    return xc[base] + gap * (xc[chosen] - xc[base])


def smote(
    x: np.ndarray,
    y: np.ndarray,
    rng: np.random.Generator,
    k: int,
    target: int | Mapping[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Chawla et al. 2002 on embeddings: oversample each class up to `target` samples (an int for every class,
    a per-class mapping, or None for the largest class's count). Returns originals followed by new points."""
    y = np.asarray(y, dtype=np.int64)
    counts = np.bincount(y)
    if target is None:
        target = int(counts.max())
    goal = target if isinstance(target, Mapping) else dict.fromkeys(range(len(counts)), target)
    new_x, new_y = [x], [y]
    for c, want in goal.items():
        have = int(counts[c]) if c < len(counts) else 0
        if have == 0 or want <= have:
            continue
        new_x.append(_smote_class(x[y == c], want - have, k, rng))
        new_y.append(np.full(want - have, c, dtype=np.int64))
    return np.concatenate(new_x), np.concatenate(new_y)


class Recombined(NamedTuple):
    text: Tensor
    audio: Tensor
    labels: Tensor
    source: Tensor  # [B], row whose audio embedding each row now carries


def recombine_modalities(
    text: Tensor,
    audio: Tensor,
    labels: Tensor,
    rng: np.random.Generator,
    has_text: Tensor | None = None,
    has_audio: Tensor | None = None,
    p: float = 1.0,
) -> Recombined:
    """Cross-modal recombination: rows that have both modalities swap audio embeddings with rows of the same
    class (a random permutation within each class); each eligible row takes part with probability `p`.
    The result pairs text i with audio source[i] under label i: new samples, same label distribution."""
    y = to_numpy(labels).astype(np.int64)
    eligible = np.ones(len(y), dtype=bool)
    for mask in (has_text, has_audio):
        if mask is not None:
            eligible &= to_numpy(mask).astype(bool)
    eligible &= rng.random(len(y)) < p
    source = np.arange(len(y))
    for c in np.unique(y[eligible]):
        rows = np.flatnonzero(eligible & (y == c))
        source[rows] = rng.permutation(rows)
    index = torch.as_tensor(source, device=audio.device)
    return Recombined(text, audio[index], labels, index)
