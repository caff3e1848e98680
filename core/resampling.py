"""The cluster bootstrap over conversations (Davison & Hinkley 1997, section 3.8; Field & Welsh 2007).

Turns of one conversation are correlated (same speakers, same topic, shared dialogue context), so a statistic of
conversation-clustered traffic is resampled by conversation: each replicate draws as many conversations as there
are, with replacement, and keeps every turn of each drawn one. A replicate is then a vector of per-turn weights
(how many times the turn's conversation was drawn), which any weighted statistic can use without copying rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def conversation_units(conversations: Sequence[object] | np.ndarray) -> tuple[np.ndarray, int]:
    """Each turn's conversation as an index 0..K-1, and K."""
    keys, unit = np.unique(np.asarray(conversations, dtype=object).astype(str), return_inverse=True)
    return unit.astype(np.int64), len(keys)


def turn_weights(conversations: Sequence[object] | np.ndarray, replicates: int, seed: int) -> np.ndarray:
    """[replicates, N] per-turn multiplicities of `replicates` conversation bootstrap resamples."""
    unit, k = conversation_units(conversations)
    draws = np.random.default_rng(seed).multinomial(k, np.full(k, 1.0 / k), size=replicates)
    return draws[:, unit].astype(np.float64)
