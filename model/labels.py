"""Label sets are data carried by the model artifact; these are MELD's defaults."""

from __future__ import annotations

from dataclasses import dataclass

EMOTIONS: tuple[str, ...] = ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear")
SENTIMENTS: tuple[str, ...] = ("neutral", "positive", "negative")
DEFAULT_MINORITY: tuple[str, ...] = ("sadness", "disgust", "fear")


@dataclass(frozen=True)
class LabelSet:
    """An ordered set of class names; the position of a name is its class index."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(set(self.names)) != len(self.names) or not self.names:
            raise ValueError(f"label names must be unique and non-empty: {self.names}")

    def __len__(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown label {name!r}; expected one of {', '.join(self.names)}") from None

    def name(self, index: int) -> str:
        return self.names[index]


DEFAULT_EMOTIONS = LabelSet(EMOTIONS)
DEFAULT_SENTIMENTS = LabelSet(SENTIMENTS)
