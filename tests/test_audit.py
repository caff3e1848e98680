"""Audit sampling (core/audit.py): the share is respected within a binomial interval whatever the ids look like,
and the choice is a fixed function of the id, so the service and the feedback check always agree."""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Callable

import pytest

from core.audit import audit_point, selected_for_audit

N_IDS = 100_000
Z = 4.0  # a 4-sigma binomial band: a correct selection leaves it about once in 16,000 checks


def _random_ids(seed: int) -> list[uuid.UUID]:
    """uuid4 ids as the service draws them, from a seeded generator so the test is reproducible."""
    rng = random.Random(seed)
    return [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(N_IDS)]


def _batch_ids(seed: int) -> list[uuid.UUID]:
    """uuid5 ids as batch scoring derives them: one run, consecutive turns of consecutive conversations."""
    namespace = uuid.UUID(int=seed)
    return [uuid.uuid5(namespace, f"run\x1fcall-{i // 20}\x1f{i % 20}") for i in range(N_IDS)]


def _sequential_ids(seed: int) -> list[uuid.UUID]:
    """The most structured ids there are: consecutive integers."""
    return [uuid.UUID(int=seed * N_IDS + i) for i in range(N_IDS)]


@pytest.mark.parametrize("make_ids", [_random_ids, _batch_ids, _sequential_ids])
@pytest.mark.parametrize("share", [0.02, 0.1, 0.5])
def test_the_share_is_respected_within_a_binomial_interval(
    make_ids: Callable[[int], list[uuid.UUID]], share: float
) -> None:
    selected = sum(selected_for_audit(prediction_id, share) for prediction_id in make_ids(7))
    expected, sigma = N_IDS * share, math.sqrt(N_IDS * share * (1 - share))
    assert abs(selected - expected) <= Z * sigma, (selected, expected, sigma)


def test_the_choice_is_a_fixed_function_of_the_id() -> None:
    ids = _random_ids(3)[:2_000]
    first = [selected_for_audit(prediction_id, 0.1) for prediction_id in ids]
    assert first == [selected_for_audit(uuid.UUID(str(prediction_id)), 0.1) for prediction_id in ids]
    # Pinned: a changed hash would silently withdraw every offer already made and refuse their audit labels.
    assert audit_point(uuid.UUID("00000000-0000-4000-8000-000000000000")) == 9243345494398449736
    assert audit_point(uuid.UUID("12345678-1234-5678-1234-567812345678")) == 2026490618476281299


def test_raising_the_share_keeps_every_earlier_selection_and_the_bounds_are_exact() -> None:
    ids = _random_ids(5)[:20_000]
    low = {i for i in ids if selected_for_audit(i, 0.02)}
    high = {i for i in ids if selected_for_audit(i, 0.05)}
    assert low < high
    assert not any(selected_for_audit(i, 0.0) for i in ids)
    assert all(selected_for_audit(i, 1.0) for i in ids)


def test_neighbouring_ids_are_chosen_independently() -> None:
    """Consecutive ids (turns of one conversation in batch scoring) are not selected together: the share of
    selected successors of selected ids is the share itself, not more."""
    share, ids = 0.1, _batch_ids(11)
    flags = [selected_for_audit(prediction_id, share) for prediction_id in ids]
    pairs = sum(1 for a, b in zip(flags, flags[1:], strict=False) if a)
    both = sum(1 for a, b in zip(flags, flags[1:], strict=False) if a and b)
    sigma = math.sqrt(pairs * share * (1 - share))
    assert abs(both - pairs * share) <= Z * sigma, (both, pairs)
