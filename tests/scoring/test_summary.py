"""Per-conversation summary: timeline, negative share, escalation points."""

from __future__ import annotations

from typing import Any

import pytest

from scoring.summary import SummaryOptions, summarize


def _row(turn: int, speaker: str, label: str | None, anger: float = 0.0, sentiment: str = "neutral") -> dict[str, Any]:
    error = None if label is not None else "audio_undecodable: bad file"
    return {
        "turn": turn,
        "speaker": speaker,
        "label": label,
        "p_anger": anger if label else None,
        "sentiment": sentiment if label else None,
        "error": error,
    }


def test_summary_of_a_conversation() -> None:
    rows = [
        _row(0, "Customer", "neutral", 0.10),
        _row(1, "agent", "joy", 0.00, "positive"),
        _row(2, "customer", "neutral", 0.25),  # +0.15: below the threshold
        _row(3, "customer", "sadness", 0.50),  # +0.25: escalation
        _row(4, "agent", None),  # an error turn: in the timeline as null, not in the share
        _row(5, "customer", "anger", 0.45),  # turns to anger: escalation although the probability fell
        _row(6, "customer", "anger", 0.50),  # still anger: no escalation
        _row(7, "customer", "neutral", 0.2, "negative"),
    ]
    summary = summarize("c1", rows, "v1", SummaryOptions())
    assert summary == {
        "conversation_id": "c1",
        "turns": 8,
        "errors": 1,
        "timeline": ["neutral", "joy", "neutral", "sadness", None, "anger", "anger", "neutral"],
        "negative_share": pytest.approx(4 / 7),  # sadness, anger, anger, negative sentiment
        "escalation_points": [3, 5],
        "model_version": "v1",
    }


def test_escalations_follow_the_configured_speaker_and_threshold() -> None:
    rows = [_row(0, "caller", "neutral", 0.1), _row(1, "caller", "neutral", 0.2), _row(2, "customer", "anger", 0.9)]
    summary = summarize("c", rows, "v", SummaryOptions(customer="CALLER", escalation_threshold=0.05))
    assert summary["escalation_points"] == [1]


def test_a_conversation_without_scored_turns_has_no_share() -> None:
    summary = summarize("c", [_row(0, "customer", None)], "v", SummaryOptions())
    assert (summary["negative_share"], summary["escalation_points"], summary["errors"]) == (None, [], 1)
