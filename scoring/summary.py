"""Per-conversation summary: emotion timeline, share of negative turns, escalation points."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import pyarrow as pa

from core.settings import CUSTOMER_SPEAKER, ESCALATION_THRESHOLD

SUMMARY_SCHEMA = pa.schema(
    [
        ("conversation_id", pa.string()),
        ("turns", pa.int64()),
        ("errors", pa.int64()),
        ("timeline", pa.list_(pa.string())),  # the label of each turn in turn order; null for an error turn
        ("negative_share", pa.float64()),  # of the scored turns; null when none was scored
        ("escalation_points", pa.list_(pa.int64())),  # turn indices
        ("model_version", pa.string()),
    ]
)


@dataclass(frozen=True)
class SummaryOptions:
    customer: str = CUSTOMER_SPEAKER
    escalation_threshold: float = ESCALATION_THRESHOLD
    anger: str = "anger"
    negative_emotions: tuple[str, ...] = ("anger", "sadness", "disgust", "fear")
    negative_sentiment: str = "negative"

    def __post_init__(self) -> None:
        if not 0 <= self.escalation_threshold <= 1:
            raise ValueError(f"escalation_threshold must be between 0 and 1, not {self.escalation_threshold}")


Row = Mapping[str, Any]


def summarize(conversation_id: str, rows: Sequence[Row], model_version: str, options: SummaryOptions) -> dict[str, Any]:
    """The summary of one conversation from its output rows (in turn order)."""
    scored = [row for row in rows if row["error"] is None]
    negative = sum(is_negative(row, options) for row in scored)
    return {
        "conversation_id": conversation_id,
        "turns": len(rows),
        "errors": len(rows) - len(scored),
        "timeline": [row["label"] for row in rows],
        "negative_share": negative / len(scored) if scored else None,
        "escalation_points": escalation_points(scored, options),
        "model_version": model_version,
    }


def is_negative(row: Row, options: SummaryOptions) -> bool:
    return row["sentiment"] == options.negative_sentiment or row["label"] in options.negative_emotions


def escalation_points(scored: Sequence[Row], options: SummaryOptions) -> list[int]:
    """Turns where the customer's anger probability rises by more than the threshold over their previous scored
    turn, or where their label becomes anger after a turn that was not."""
    probability = f"p_{options.anger}"
    customer = [row for row in scored if row["speaker"].casefold() == options.customer.casefold()]
    if not customer or probability not in customer[0]:
        return []
    return [
        current["turn"]
        for previous, current in pairwise(customer)
        if current[probability] - previous[probability] > options.escalation_threshold
        or (current["label"] == options.anger != previous["label"])
    ]
