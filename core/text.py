"""When a turn has text: one rule for the model's input, the prediction log and batch scoring."""

from __future__ import annotations


def is_present(text: str | None) -> bool:
    """A turn has text when it holds anything but whitespace; whitespace alone is no text."""
    return bool(text and text.strip())
