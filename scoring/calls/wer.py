"""Word error rate: the word-level edit distance (substitutions, deletions, insertions) from the reference to the
hypothesis, divided by the reference's number of words. Words are compared lower-cased without punctuation."""

from __future__ import annotations

import re

WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower().replace("’", "'"))


def edit_distance(reference: list[str], hypothesis: list[str]) -> int:
    """Levenshtein distance over words (each edit costs 1)."""
    previous = list(range(len(hypothesis) + 1))
    for i, expected in enumerate(reference, start=1):
        current = [i]
        for j, found in enumerate(hypothesis, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (expected != found)))
        previous = current
    return previous[-1]


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Edits per reference word; ValueError for a reference without words (the rate is undefined)."""
    expected = words(reference)
    if not expected:
        raise ValueError("the reference has no words: its word error rate is undefined")
    return edit_distance(expected, words(hypothesis)) / len(expected)
