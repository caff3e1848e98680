"""The gate's statistics: a paired bootstrap over conversations of the metric gains, candidate - champion.

Both models are scored on the same held-out turns, so their errors are paired; turns of one conversation are
correlated (same speakers, same topic, a shared dialogue context), so the resampling unit is the conversation,
not the turn (the cluster bootstrap of core/resampling.py: Davison & Hinkley 1997, section 3.8; Field & Welsh
2007). Each replicate draws as many conversations as there are, with replacement, keeps every turn of each drawn
conversation, and recomputes both models' metrics on that same resample; the percentile interval of the
replicate differences is the gain's confidence interval.

Every metric comes from per-conversation counts (support, predictions and hits per class), so a replicate is one
matrix product of conversation multiplicities and counts. The metrics are those of training/metrics.py: macro F1
over every class (0 for a class neither present nor predicted), weighted F1, and minority recall as the mean
recall of the minority classes present (a replicate holding no minority turn has none: it is left out of that
interval and counted as `undefined`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from core.resampling import conversation_units

MACRO_F1, MINORITY_RECALL, WEIGHTED_F1 = "macro_f1", "minority_recall", "weighted_f1"
GAINS = (MINORITY_RECALL, MACRO_F1, WEIGHTED_F1)
_REPLICATES_PER_CHUNK = 250  # bounds the [replicates, conversations] multiplicity matrix held at once


@dataclass(frozen=True)
class Interval:
    """A gain (candidate - champion) with its percentile confidence interval."""

    estimate: float
    lower: float
    upper: float

    def __str__(self) -> str:
        return f"{self.estimate:+.4f} (CI {self.lower:+.4f} to {self.upper:+.4f})"


@dataclass(frozen=True)
class PairedComparison:
    gains: dict[str, Interval | None]  # GAINS -> interval; None where the metric is undefined (no minority turn)
    turns: int
    conversations: int
    replicates: int
    seed: int
    confidence: float
    undefined: int  # replicates without a minority-class turn, left out of minority recall's interval

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"unit": "conversation", "method": "paired percentile bootstrap"}


@dataclass(frozen=True)
class _Counts:
    """Per-class counts [..., C]: true turns, predicted turns and hits of one model."""

    support: np.ndarray
    predicted: np.ndarray
    hits: np.ndarray

    def scores(self, minority: Sequence[int]) -> dict[str, np.ndarray]:
        support, predicted, hits = self.support, self.predicted, self.hits
        f1 = np.divide(2 * hits, support + predicted, out=np.zeros_like(hits), where=support + predicted > 0)
        recall = np.divide(hits, support, out=np.full_like(hits, np.nan), where=support > 0)
        present = ~np.isnan(recall[..., list(minority)])
        total = np.where(present, recall[..., list(minority)], 0.0).sum(axis=-1)
        count = present.sum(axis=-1)
        return {
            MACRO_F1: f1.mean(axis=-1),
            WEIGHTED_F1: (f1 * support).sum(axis=-1) / support.sum(axis=-1),
            MINORITY_RECALL: np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0),
        }

    def resampled(self, multiplicity: np.ndarray) -> _Counts:
        """Totals [B, C] of the replicates whose conversation multiplicities are `multiplicity` [B, K]."""
        return _Counts(multiplicity @ self.support, multiplicity @ self.predicted, multiplicity @ self.hits)

    def total(self) -> _Counts:
        return _Counts(self.support.sum(axis=0), self.predicted.sum(axis=0), self.hits.sum(axis=0))


def _per_conversation(labels: np.ndarray, predicted: np.ndarray, unit: np.ndarray, k: int, c: int) -> _Counts:
    def counts(values: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
        cells = unit * c + values
        return np.bincount(cells if where is None else cells[where], minlength=k * c).reshape(k, c).astype(float)

    return _Counts(counts(labels), counts(predicted), counts(labels, predicted == labels))


def paired_bootstrap(
    labels: np.ndarray,
    champion: np.ndarray,
    candidate: np.ndarray,
    conversations: Sequence[str],
    *,
    num_classes: int,
    minority: Sequence[int],
    replicates: int,
    seed: int,
    confidence: float,
) -> PairedComparison:
    """The gains of `candidate` over `champion` (predicted class indices [n]) on the turns `labels` [n], with
    `confidence` percentile intervals from `replicates` resamples of `conversations` [n] (each turn's key)."""
    if not len(labels) == len(champion) == len(candidate) == len(conversations):
        raise ValueError("labels, predictions and conversations differ in length")
    if len(labels) == 0:
        raise ValueError("no turns to compare")
    unit, k = conversation_units(conversations)
    before, after = (_per_conversation(labels, p, unit, k, num_classes) for p in (champion, candidate))
    point_before, point_after = before.total().scores(minority), after.total().scores(minority)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[np.ndarray]] = {name: [] for name in GAINS}
    for start in range(0, replicates, _REPLICATES_PER_CHUNK):
        size = min(_REPLICATES_PER_CHUNK, replicates - start)
        multiplicity = rng.multinomial(k, np.full(k, 1.0 / k), size=size).astype(float)
        scored_before = before.resampled(multiplicity).scores(minority)
        scored_after = after.resampled(multiplicity).scores(minority)
        for name in GAINS:
            draws[name].append(scored_after[name] - scored_before[name])
    tail = (1.0 - confidence) / 2.0
    gains: dict[str, Interval | None] = {}
    undefined = 0
    for name in GAINS:
        values = np.concatenate(draws[name])
        defined = values[~np.isnan(values)]
        estimate = float(point_after[name] - point_before[name])
        if name == MINORITY_RECALL:
            undefined = int(len(values) - len(defined))
        if np.isnan(estimate) or not len(defined):
            gains[name] = None
            continue
        lower, upper = np.quantile(defined, [tail, 1.0 - tail])
        gains[name] = Interval(estimate, float(lower), float(upper))
    return PairedComparison(gains, len(labels), k, replicates, seed, confidence, undefined)
