"""The champion/challenger gate: one for every tier.

1. The candidate artifact is registered (a verified copy under the registry); everything after judges that copy,
   i.e. exactly the files the service would load.
2. ONNX parity: the candidate's graphs under ONNX Runtime must match its PyTorch reference within
   `PARITY_TOLERANCE` on probe inputs. A candidate whose graphs fail to load or run fails here.
3. Metrics: champion (the job's base version) and candidate are scored on the same labelled held-out turns;
   the candidate must raise macro F1 and minority recall by the configured margins without losing more than
   the tolerated weighted F1.
4. Promotion only when every check passed and the champion is still the base version; otherwise the candidate is
   rejected with the reasons (model_versions.rejection_reason). A rejected candidate is never the champion.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.db.models import ModelStatus
from model.artifact import ModelArtifact
from model.registry import ModelRegistry, RegistryError
from retraining.dataset import BASE, FEEDBACK, DialogueSet
from retraining.gate_config import GateConfig
from retraining.heldout import heldout_logits, heldout_rows, needs_reencoding, report
from retraining.parity import ParityReference, parity
from training.metrics import MetricsReport


def compare(champion: MetricsReport, candidate: MetricsReport, config: GateConfig) -> list[str]:
    """Why the candidate is not better enough (empty: it is)."""
    reasons = []
    gain = candidate.macro_f1 - champion.macro_f1
    if gain < config.min_macro_f1_gain:
        reasons.append(
            f"macro F1 {candidate.macro_f1:.4f} vs champion {champion.macro_f1:.4f}: "
            f"gain {gain:+.4f} below the required {config.min_macro_f1_gain:+.4f}"
        )
    if candidate.minority_recall is None or champion.minority_recall is None:
        reasons.append("no minority-class turn among the held-out data: minority recall cannot be judged")
    elif (gain := candidate.minority_recall - champion.minority_recall) < config.min_minority_recall_gain:
        reasons.append(
            f"minority recall {candidate.minority_recall:.4f} vs champion {champion.minority_recall:.4f}: "
            f"gain {gain:+.4f} below the required {config.min_minority_recall_gain:+.4f}"
        )
    drop = champion.weighted_f1 - candidate.weighted_f1
    if drop > config.max_weighted_f1_drop:
        reasons.append(
            f"weighted F1 {candidate.weighted_f1:.4f} vs champion {champion.weighted_f1:.4f}: "
            f"drop {drop:.4f} beyond the tolerated {config.max_weighted_f1_drop:.4f}"
        )
    return reasons


@dataclass
class GateDecision:
    version: str | None
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    parity_max_abs_diff: float | None = None
    heldout: dict[str, Any] = field(default_factory=dict)
    champion: dict[str, Any] | None = None  # MetricsReport.to_dict() of the base version
    candidate: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if data["parity_max_abs_diff"] is not None and not math.isfinite(data["parity_max_abs_diff"]):
            data["parity_max_abs_diff"] = None  # JSON has no infinity; the reason says it failed
        return data


def run_gate(
    registry: ModelRegistry,
    base: ModelArtifact,
    candidate_dir: Path,
    reference: ParityReference,
    data: DialogueSet,
    *,
    minority: Sequence[str],
    config: GateConfig,
    recipe: dict[str, Any],
    log: Callable[[str], None] = lambda _message: None,
) -> GateDecision:
    try:
        row = registry.register(candidate_dir, parent_version=base.version, recipe=recipe)
        candidate = registry.verify(row.version)
    except RegistryError as error:
        return GateDecision(None, False, [f"candidate not registrable: {error}"])
    decision = GateDecision(row.version, False)
    decision.parity_max_abs_diff = parity(candidate, reference, base)
    log(f"gate {row.version}: parity max |torch - onnxruntime| = {decision.parity_max_abs_diff:.3g}")
    if not decision.parity_max_abs_diff <= config.parity_tolerance:
        decision.reasons.append(
            f"ONNX parity failed: max |torch - onnxruntime| = {decision.parity_max_abs_diff:.3g} "
            f"> {config.parity_tolerance:g} (or a graph could not run)"
        )
    else:
        _judge_metrics(decision, base, candidate, data, minority, config)
    _check_champion(decision, registry, base.version)
    _apply(decision, registry)
    log(f"gate {row.version}: {'promoted' if decision.promoted else 'rejected: ' + '; '.join(decision.reasons)}")
    return decision


def _judge_metrics(
    decision: GateDecision,
    base: ModelArtifact,
    candidate: ModelArtifact,
    data: DialogueSet,
    minority: Sequence[str],
    config: GateConfig,
) -> None:
    reencode = needs_reencoding(candidate, base)
    rows = heldout_rows(data, config, reencode)
    labels = data.labels[rows]
    decision.heldout = {
        "turns": int(rows.sum()),
        "feedback": int((rows & data.labelled(heldout=True, source=FEEDBACK)).sum()),
        "base": int((rows & data.labelled(heldout=True, source=BASE)).sum()),
        "reencoded_from_text": reencode,
    }
    if rows.sum() < config.min_heldout:
        decision.reasons.append(f"only {int(rows.sum())} labelled held-out turns; the gate needs {config.min_heldout}")
        return
    champion = report(base, heldout_logits(base, data, rows, reencode), labels, minority)
    challenger = report(candidate, heldout_logits(candidate, data, rows, reencode), labels, minority)
    decision.champion, decision.candidate = champion.to_dict(), challenger.to_dict()
    decision.reasons += compare(champion, challenger, config)


def _check_champion(decision: GateDecision, registry: ModelRegistry, base_version: str) -> None:
    current = registry.champion()
    if current is None or current.version not in (base_version, decision.version):
        now = current.version if current else "none"
        decision.reasons.append(f"the champion changed during the job (base {base_version}, now {now})")


def _apply(decision: GateDecision, registry: ModelRegistry) -> None:
    assert decision.version is not None
    if decision.reasons:
        if registry.get(decision.version).status != ModelStatus.CHAMPION:
            registry.reject(decision.version, "; ".join(decision.reasons))
        return
    registry.promote(decision.version)
    decision.promoted = True
