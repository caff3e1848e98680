"""Class-aware sampling schedules.

Every sampler answers one question, `weights(labels, epoch)`: the probability of drawing each training sample
in that epoch. The built-in ones decide a share per class, p(c), and spread it evenly over the class's
samples, so p(c) ∝ n_c^q covers instance (q=1), square-root (q=0.5) and class-balanced (q=0) sampling
(Kang et al. 2020, "Decoupling representation and classifier"). `epoch_sampler` turns weights into a
seeded torch `WeightedRandomSampler`; the same (seed, epoch) always gives the same draws.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler

from training.common import ArrayLike, to_numpy
from training.metrics import MetricsReport


@runtime_checkable
class Sampler(Protocol):
    def weights(self, labels: np.ndarray, epoch: int) -> np.ndarray:
        """Per-sample draw probabilities for this epoch (non-negative, summing to 1)."""
        ...


class ClassShareSampler(ABC):
    """Base for samplers defined by a share per class, spread evenly over that class's samples."""

    @abstractmethod
    def class_probs(self, counts: np.ndarray, epoch: int) -> np.ndarray:
        """Unnormalised share of each class for this epoch; `counts` has one entry per class."""

    def class_shares(self, labels: ArrayLike, epoch: int) -> np.ndarray:
        """The expected share of each class among the draws (0 for classes without samples)."""
        counts = np.bincount(to_numpy(labels).astype(np.int64).ravel())
        probs = np.where(counts > 0, self.class_probs(counts, epoch), 0.0)
        return probs / probs.sum()

    def weights(self, labels: ArrayLike, epoch: int) -> np.ndarray:
        y = to_numpy(labels).astype(np.int64).ravel()
        counts = np.bincount(y)
        return (self.class_shares(y, epoch) / np.maximum(counts, 1))[y]


@dataclass(frozen=True)
class FrequencySampler(ClassShareSampler):
    """p(c) ∝ n_c^q: q=1 instance (uniform over samples), q=0.5 square root, q=0 class-balanced."""

    q: float

    def class_probs(self, counts: np.ndarray, epoch: int) -> np.ndarray:
        return counts.astype(np.float64) ** self.q


@dataclass(frozen=True)
class ProgressiveSampler(ClassShareSampler):
    """Progressively balanced: linear from instance (epoch 0) to class-balanced (epoch total_epochs - 1).

    Kang et al. interpolate with t/T, which never reaches balanced; ending exactly balanced makes the last
    epoch match the cRT schedule.
    """

    total_epochs: int

    def class_probs(self, counts: np.ndarray, epoch: int) -> np.ndarray:
        t = min(max(epoch, 0) / max(self.total_epochs - 1, 1), 1.0)
        instance = counts / counts.sum()
        balanced = (counts > 0) / (counts > 0).sum()
        return (1.0 - t) * instance + t * balanced


@dataclass
class DevF1Sampler(ClassShareSampler):
    """Re-weighting by validation F1: p(c) ∝ n_c^q · (1 − F1_c + floor)^power, F1 from the last dev report.

    Call `update` after each dev evaluation. Before the first update every F1 counts as 0, so the sampler
    starts as `FrequencySampler(q)`. `momentum` smooths the noisy F1 of tiny dev classes (EMA).
    """

    q: float
    power: float
    floor: float
    momentum: float
    f1: np.ndarray | None = field(default=None, init=False)

    def update(self, dev: MetricsReport | ArrayLike) -> None:
        f1 = dev.f1 if isinstance(dev, MetricsReport) else to_numpy(dev).astype(np.float64)
        self.f1 = f1 if self.f1 is None else self.momentum * self.f1 + (1.0 - self.momentum) * f1

    def class_probs(self, counts: np.ndarray, epoch: int) -> np.ndarray:
        f1 = np.zeros(len(counts)) if self.f1 is None else self.f1
        if len(f1) < len(counts):
            raise ValueError(f"dev F1 covers {len(f1)} classes but labels reach class {len(counts) - 1}")
        return counts.astype(np.float64) ** self.q * (1.0 - f1[: len(counts)] + self.floor) ** self.power


def build_sampler(name: str, **params: float) -> ClassShareSampler:
    """By recipe name: instance, sqrt, class_balanced, progressive (total_epochs), dev_f1 (q, power, floor,
    momentum); every parameter given (training/recipe.py `make_sampler` fills in a recipe's defaults)."""
    if name == "instance":
        return FrequencySampler(1.0)
    if name == "sqrt":
        return FrequencySampler(0.5)
    if name == "class_balanced":
        return FrequencySampler(0.0)
    if name == "progressive":
        return ProgressiveSampler(int(params["total_epochs"]))
    if name == "dev_f1":
        return DevF1Sampler(**params)
    raise ValueError(f"unknown sampler {name!r}")


def _generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def epoch_sampler(
    sampler: Sampler, labels: ArrayLike, epoch: int, seed: int = 0, num_samples: int | None = None
) -> WeightedRandomSampler:
    """A with-replacement torch sampler for one epoch (`num_samples` defaults to the dataset size)."""
    y = to_numpy(labels)
    weights = torch.as_tensor(sampler.weights(y, epoch), dtype=torch.float64)
    n = len(y) if num_samples is None else num_samples
    return WeightedRandomSampler(weights, n, replacement=True, generator=_generator(seed, epoch))


def epoch_indices(
    sampler: Sampler, labels: ArrayLike, epoch: int, seed: int = 0, num_samples: int | None = None
) -> np.ndarray:
    """The dataset indices `epoch_sampler` would yield, as an array."""
    return np.fromiter(epoch_sampler(sampler, labels, epoch, seed, num_samples), dtype=np.int64)
