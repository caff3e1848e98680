"""The gate's paired bootstrap over conversations (retraining/paired.py): its point estimates are the metrics'
own differences, it resamples whole conversations, and on exchangeable models with conversation-clustered errors
its lower bound clears 0 in at most 5% of held-out sets, while a real gain clears it in most."""

from __future__ import annotations

import numpy as np
import pytest

from retraining.paired import MACRO_F1, MINORITY_RECALL, WEIGHTED_F1, paired_bootstrap
from training.metrics import compute_metrics

NAMES = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
SHARES = np.array([0.40, 0.15, 0.12, 0.11, 0.10, 0.06, 0.06])
MINORITY = [4, 5, 6]


def _heldout(
    rng: np.random.Generator, conversations: int, *, gain: float = 0.0, luck: float = 2.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Labels, champion and candidate predictions, conversation keys. A turn is right with probability
    sigmoid(difficulty of its conversation + the model's luck in that conversation (+ `gain` for the candidate)):
    errors cluster by conversation, and with gain 0 the two models are exchangeable."""
    sizes = rng.integers(4, 13, conversations)
    unit = np.repeat(np.arange(conversations), sizes)
    labels = rng.choice(len(NAMES), len(unit), p=SHARES)
    difficulty = rng.normal(size=conversations)[unit]
    predictions = []
    for boost in (0.0, gain):
        right = rng.random(len(unit)) < 1 / (
            1 + np.exp(-(difficulty + luck * rng.normal(size=conversations)[unit] + boost))
        )
        predictions.append(np.where(right, labels, (labels + rng.integers(1, len(NAMES), len(unit))) % len(NAMES)))
    return labels, predictions[0], predictions[1], [f"c{k}" for k in unit]


def _test(labels: np.ndarray, before: np.ndarray, after: np.ndarray, keys: list[str], seed: int = 0, b: int = 400):
    return paired_bootstrap(
        labels, before, after, keys, num_classes=len(NAMES), minority=MINORITY, replicates=b, seed=seed, confidence=0.95
    )


def test_the_estimates_are_the_metrics_differences() -> None:
    labels, before, after, keys = _heldout(np.random.default_rng(0), 40)
    gains = _test(labels, before, after, keys).gains
    champion, candidate = (
        compute_metrics(labels, p, NAMES, minority=["sadness", "disgust", "fear"]) for p in (before, after)
    )
    assert gains[MACRO_F1].estimate == pytest.approx(candidate.macro_f1 - champion.macro_f1)
    assert gains[WEIGHTED_F1].estimate == pytest.approx(candidate.weighted_f1 - champion.weighted_f1)
    assert gains[MINORITY_RECALL].estimate == pytest.approx(candidate.minority_recall - champion.minority_recall)
    for interval in gains.values():
        assert interval is not None and interval.lower <= interval.estimate <= interval.upper


def test_identical_predictions_gain_exactly_nothing() -> None:
    labels, before, _, keys = _heldout(np.random.default_rng(1), 30)
    for interval in _test(labels, before, before.copy(), keys).gains.values():
        assert interval is not None and (interval.estimate, interval.lower, interval.upper) == (0.0, 0.0, 0.0)


def test_the_resampling_unit_is_the_conversation() -> None:
    """Repeating every turn three times inside its conversation adds no evidence: the interval is unchanged. The
    same turns as independent units would give a narrower interval."""
    labels, before, after, keys = _heldout(np.random.default_rng(2), 40)
    once = _test(labels, before, after, keys).gains[MACRO_F1]
    tripled = _test(np.repeat(labels, 3), np.repeat(before, 3), np.repeat(after, 3), list(np.repeat(keys, 3)))
    assert tripled.gains[MACRO_F1] == once
    as_turns = _test(labels, before, after, [f"t{i}" for i in range(len(labels))]).gains[MACRO_F1]
    assert as_turns is not None and once is not None and as_turns.upper - as_turns.lower < once.upper - once.lower


def test_a_heldout_set_without_minority_turns_leaves_the_minority_gain_undefined() -> None:
    labels = np.array([0, 1, 2, 3] * 5)
    result = _test(labels, labels, labels, [f"c{i // 4}" for i in range(20)])
    assert result.gains[MINORITY_RECALL] is None and result.undefined == result.replicates


@pytest.mark.slow
def test_exchangeable_models_clear_the_bound_in_at_most_5_percent_of_heldout_sets() -> None:
    """400 held-out sets of 60 conversations, candidate and champion exchangeable: the conversation bootstrap's
    lower bound (nominally 2.5% one-sided) is above 0 in at most 5% of them; resampling turns instead, as if they
    were independent, is overconfident on the same sets. A real gain clears the bound in most sets."""
    rng = np.random.default_rng(3)
    by_conversation = by_turn = 0
    for seed in range(400):
        labels, before, after, keys = _heldout(rng, 60)
        by_conversation += _test(labels, before, after, keys, seed).gains[MINORITY_RECALL].lower > 0
        turns = [f"t{i}" for i in range(len(labels))]
        by_turn += _test(labels, before, after, turns, seed).gains[MINORITY_RECALL].lower > 0
    assert by_conversation / 400 <= 0.05 < by_turn / 400, (by_conversation, by_turn)
    detected = sum(_test(*_heldout(rng, 60, gain=2.0), seed).gains[MINORITY_RECALL].lower > 0 for seed in range(100))
    assert detected >= 60, detected
