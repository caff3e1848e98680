"""The gate's settings, and how a job's params override settings dataclasses (the gate's, the tiers')."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from model.export import PARITY_TOLERANCE
from retraining.queue import PermanentError

T = TypeVar("T")


@dataclass(frozen=True)
class GateConfig:
    min_macro_f1_gain: float = 0.005
    min_minority_recall_gain: float = 0.02
    max_weighted_f1_drop: float = 0.01
    min_heldout: int = 50  # labelled held-out turns needed to judge at all
    min_feedback_heldout: int = 100  # fewer production turns than this: the base corpora's held-out rows join in
    parity_tolerance: float = PARITY_TOLERANCE

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> GateConfig:
        return config_from(cls, params.get("gate"), "gate settings")


def config_from(cls: type[T], overrides: Mapping[str, Any] | None, what: str) -> T:
    """A settings dataclass with a job's overrides (e.g. params["gate"]); unknown keys fail the job for good."""
    values = dict(overrides or {})
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise PermanentError(f"unknown {what} {sorted(unknown)}")
    return cls(**values)
