"""benchmarks/release_compare.py: the gain between two releases and its interval come from the same dialogue
resamples for both, so a release compared with itself gains exactly nothing."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.release_compare import compare, table
from training.evaluate import Scored
from training.metrics import compute_metrics

LABELS = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")


def _scored(labels: np.ndarray, predicted: np.ndarray, conversations: np.ndarray) -> Scored:
    probs = np.eye(len(LABELS))[predicted]
    return Scored(labels, probs, np.zeros(len(labels), dtype=bool), conversations)


def test_the_gain_is_the_difference_of_the_two_releases_with_its_own_interval() -> None:
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 7, 600)
    conversations = np.arange(600) // 10
    worse = np.where(rng.random(600) < 0.4, truth, rng.integers(0, 7, 600))
    better = np.where(rng.random(600) < 0.3, truth, worse)  # corrects some of the worse model's errors
    result = compare(_scored(truth, worse, conversations), _scored(truth, better, conversations), LABELS, 500, 0)
    for side, predicted in (("baseline", worse), ("candidate", better)):
        expected = compute_metrics(truth, predicted, LABELS)
        assert result[side]["macro_f1"]["estimate"] == pytest.approx(expected.macro_f1)
        assert result[side]["weighted_f1"]["estimate"] == pytest.approx(expected.weighted_f1)
    gain = result["gain"]["macro_f1"]
    assert gain["estimate"] == pytest.approx(
        result["candidate"]["macro_f1"]["estimate"] - result["baseline"]["macro_f1"]["estimate"]
    )
    low, high = gain["interval"]
    assert 0 < low < gain["estimate"] < high
    assert result["dialogues"] == 60 and result["turns"] == 600
    same = compare(_scored(truth, worse, conversations), _scored(truth, worse, conversations), LABELS, 200, 0)
    assert same["gain"]["macro_f1"] == {"estimate": 0.0, "interval": [0.0, 0.0]}
    assert "| macro F1 |" in "\n".join(table(result, ("old", "new")))


def test_releases_scored_on_different_turns_are_refused() -> None:
    truth = np.zeros(4, dtype=int)
    with pytest.raises(ValueError, match="different turns"):
        compare(_scored(truth, truth, np.arange(4)), _scored(truth + 1, truth, np.arange(4)), LABELS, 10, 0)
