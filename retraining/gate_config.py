"""The gate's settings, and how a job's params override settings dataclasses (the gate's, the tiers')."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from core.settings import GATE_MACRO_F1_TOLERANCE
from model.export import PARITY_TOLERANCE
from retraining.queue import PermanentError

T = TypeVar("T")


@dataclass(frozen=True)
class GateConfig:
    """What a candidate must show on the held-out feedback (docs/MONITORING.md, "The gate")."""

    # Promote only when the lower bound of the macro F1 gain is above -tolerance (EQUIPOISE_GATE_MACRO_F1_TOLERANCE).
    macro_f1_tolerance: float = GATE_MACRO_F1_TOLERANCE
    max_weighted_f1_drop: float = 0.01  # a guard on the point estimates: weighted F1 may not fall by more
    confidence: float = 0.95  # two-sided percentile interval; its lower end is the bound each rule reads
    bootstrap_replicates: int = 2_000
    bootstrap_seed: int = 0
    min_heldout_turns: int = 50  # labelled held-out turns needed to decide at all
    min_heldout_conversations: int = 20  # ... in at least this many conversations (the resampling unit)
    # Too little held-out feedback: judge on the base corpora's held-out split (MELD dev, the shipped model's
    # selection set) instead of refusing to decide; the decision says so.
    base_fallback: bool = False
    # Compare the predictions both models served (the candidate in shadow, api/shadow.py) when enough held-out
    # feedback turns have them, instead of scoring both again; the decision says which were compared.
    shadow_pairs: bool = True
    parity_tolerance: float = PARITY_TOLERANCE

    def __post_init__(self) -> None:
        if not 0.5 <= self.confidence < 1:
            raise PermanentError(f"gate confidence {self.confidence} must lie in [0.5, 1)")
        if self.bootstrap_replicates < 100:
            raise PermanentError(f"gate bootstrap_replicates {self.bootstrap_replicates} must be at least 100")
        if self.min_heldout_conversations < 2 or self.min_heldout_turns < 1:
            raise PermanentError("the gate needs at least 2 held-out conversations and 1 turn")

    @classmethod
    def from_params(cls, params: Mapping[str, Any], defaults: GateConfig | None = None) -> GateConfig:
        """`defaults` (the service's settings) with a job's params["gate"] overrides."""
        return config_from(cls, params.get("gate"), "gate settings", defaults)


def config_from(cls: type[T], overrides: Mapping[str, Any] | None, what: str, defaults: T | None = None) -> T:
    """A settings dataclass (`defaults`, else its own defaults) with a job's overrides (e.g. params["gate"]);
    unknown keys or values of the wrong type fail the job for good."""
    values = dict(overrides or {})
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    if unknown:
        raise PermanentError(f"unknown {what} {sorted(unknown)}")
    try:
        return dataclasses.replace(defaults, **values) if defaults is not None else cls(**values)  # type: ignore[type-var]
    except TypeError as error:
        raise PermanentError(f"invalid {what}: {error}") from error
