"""The champion/challenger gate: one for every tier.

1. The candidate artifact is registered (a verified copy under the registry); everything after judges that copy,
   i.e. exactly the files the service would load.
2. ONNX parity: the candidate's graphs under ONNX Runtime must match its PyTorch reference within
   `PARITY_TOLERANCE` on probe inputs. A candidate whose graphs fail to load or run fails here.
3. Metrics: champion (the job's base version) and candidate are scored on the same labelled held-out turns
   (retraining/heldout.py: the held-out conversations of the feedback, every modality they were served with).
   When the candidate scored live traffic in shadow and enough of those turns were served by both
   (retraining/shadow.py), the predictions they served are compared instead, nothing scored again; the decision's
   `paired.predictions` says which ("shadow" or "rescored") and `heldout.shadow_pairs` how many turns had both.
   A paired bootstrap over conversations (retraining/paired.py) gives each gain, candidate - champion, a 95%
   interval; the candidate must show a minority-recall gain whose lower bound is above 0, a macro F1 gain whose
   lower bound is above -`macro_f1_tolerance`, and no weighted F1 drop beyond `max_weighted_f1_drop`.
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

import numpy as np

from core.db.models import ModelStatus
from model.artifact import ModelArtifact
from model.registry import ModelRegistry, RegistryError
from retraining.dataset import FEEDBACK, DialogueSet
from retraining.gate_config import GateConfig
from retraining.heldout import heldout_logits, needs_reencoding, report, select_heldout, select_shadowed
from retraining.paired import MACRO_F1, MINORITY_RECALL, PairedComparison, paired_bootstrap
from retraining.parity import ParityReference, parity
from retraining.shadow import ServedPairs, served_pairs
from training.metrics import MetricsReport

SHADOW, RESCORED = "shadow", "rescored"  # which predictions the paired comparison used
_FLOOR = 1e-12  # served probabilities are compared as logarithms: a zero stays finite


def compare(
    champion: MetricsReport, candidate: MetricsReport, paired: PairedComparison, config: GateConfig
) -> list[str]:
    """Why the candidate is not shown better (empty: it is)."""
    reasons = []
    unit = f"{config.confidence:.0%} paired bootstrap over {paired.conversations} conversations"
    required = required_lower_bounds(config)
    recall = paired.gains[MINORITY_RECALL]
    if recall is None:
        reasons.append("no minority-class turn among the held-out data: minority recall cannot be judged")
    elif not recall.lower > required[MINORITY_RECALL]:
        reasons.append(f"minority recall gain {recall} ({unit}): its lower bound is not above 0")
    f1 = paired.gains[MACRO_F1]
    if f1 is None or not f1.lower > required[MACRO_F1]:
        reasons.append(
            f"macro F1 gain {f1} ({unit}): its lower bound is not above the tolerated {required[MACRO_F1]:+.4f}"
        )
    drop = champion.weighted_f1 - candidate.weighted_f1
    if drop > config.max_weighted_f1_drop:
        reasons.append(
            f"weighted F1 {candidate.weighted_f1:.4f} vs champion {champion.weighted_f1:.4f}: "
            f"drop {drop:.4f} beyond the tolerated {config.max_weighted_f1_drop:.4f}"
        )
    return reasons


def required_lower_bounds(config: GateConfig) -> dict[str, float]:
    """What each rule requires the gain's lower bound to exceed."""
    return {MINORITY_RECALL: 0.0, MACRO_F1: -config.macro_f1_tolerance}


def paired_comparison(
    labels: np.ndarray,
    champion: np.ndarray,
    candidate: np.ndarray,
    conversations: Sequence[str],
    names: Sequence[str],
    minority: Sequence[str],
    config: GateConfig,
) -> PairedComparison:
    """The gate's paired bootstrap of predicted classes `champion` and `candidate` on the same labelled turns."""
    return paired_bootstrap(
        labels,
        champion,
        candidate,
        conversations,
        num_classes=len(names),
        minority=[names.index(name) for name in minority if name in names],
        replicates=config.bootstrap_replicates,
        seed=config.bootstrap_seed,
        confidence=config.confidence,
    )


@dataclass
class GateDecision:
    version: str | None
    promoted: bool
    reasons: list[str] = field(default_factory=list)
    parity_max_abs_diff: float | None = None
    heldout: dict[str, Any] = field(default_factory=dict)  # HeldoutSelection.describe(): set, why, sizes
    champion: dict[str, Any] | None = None  # MetricsReport.to_dict() of the base version
    candidate: dict[str, Any] | None = None
    paired: dict[str, Any] | None = None  # PairedComparison.to_dict(): gains with their bounds, replicates, seed
    by_modality: dict[str, Any] = field(default_factory=dict)  # per served modality: turns, both models' scores

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
        _judge_metrics(decision, registry, base, candidate, data, minority, config)
    _check_champion(decision, registry, base.version)
    _apply(decision, registry)
    log(f"gate {row.version}: {'promoted' if decision.promoted else 'rejected: ' + '; '.join(decision.reasons)}")
    return decision


@dataclass(frozen=True)
class _Scores:
    """Both models' emotion logits on the judged turns, which predictions they are, and the temperature that
    calibrates them (None: each artifact's own; 1 for served probabilities, given as their logarithms)."""

    champion: np.ndarray
    candidate: np.ndarray
    source: str
    temperature: float | None = None

    @classmethod
    def served(cls, pairs: ServedPairs, rows: np.ndarray) -> _Scores:
        return cls(np.log(pairs.champion[rows] + _FLOOR), np.log(pairs.candidate[rows] + _FLOOR), SHADOW, 1.0)

    @classmethod
    def rescored(
        cls, base: ModelArtifact, candidate: ModelArtifact, data: DialogueSet, rows: np.ndarray, reencode: bool
    ) -> _Scores:
        before, after = (heldout_logits(model, data, rows, reencode) for model in (base, candidate))
        return cls(before, after, RESCORED)


def _judge_metrics(
    decision: GateDecision,
    registry: ModelRegistry,
    base: ModelArtifact,
    candidate: ModelArtifact,
    data: DialogueSet,
    minority: Sequence[str],
    config: GateConfig,
) -> None:
    reencode = needs_reencoding(candidate, base)
    pairs = served_pairs(registry.engine, data, base, candidate)
    shadowed = select_shadowed(data, pairs.rows, config) if config.shadow_pairs else None
    selection = shadowed if shadowed is not None else select_heldout(data, config, reencode)
    decision.heldout = selection.describe(data, reencode and shadowed is None)
    decision.heldout["shadow_pairs"] = int((pairs.rows & data.labelled(heldout=True, source=FEEDBACK)).sum())
    rows = selection.rows
    if not rows.any():
        decision.reasons.append(f"the gate does not decide: {selection.note}")
        return
    if shadowed is not None:
        scores = _Scores.served(pairs, rows)
    else:
        scores = _Scores.rescored(base, candidate, data, rows, reencode)
    labels = data.labels[rows]
    champion = report(base, scores.champion, labels, minority, scores.temperature)
    challenger = report(candidate, scores.candidate, labels, minority, scores.temperature)
    decision.champion, decision.candidate = champion.to_dict(), challenger.to_dict()
    conversations = [data.conversations[i] for i in np.flatnonzero(rows)]
    predicted = scores.champion.argmax(axis=1), scores.candidate.argmax(axis=1)
    paired = paired_comparison(labels, *predicted, conversations, base.emotions.names, minority, config)
    decision.paired = paired.to_dict() | {
        "required_lower_bounds": required_lower_bounds(config),
        "predictions": scores.source,
    }
    modalities = np.array(data.modalities())[rows]
    decision.by_modality = {
        served: _modality_scores(base, candidate, scores, labels, modalities == served, minority)
        for served in sorted(set(modalities.tolist()))
    }
    decision.reasons += compare(champion, challenger, paired, config)


def _modality_scores(
    base: ModelArtifact,
    candidate: ModelArtifact,
    scores: _Scores,
    labels: np.ndarray,
    rows: np.ndarray,
    minority: Sequence[str],
) -> dict[str, Any]:
    """Turns of one served modality, and both models' macro F1 and minority recall on them (point estimates)."""
    result = {"turns": int(rows.sum())}
    for role, model, logits in (("champion", base, scores.champion), ("candidate", candidate, scores.candidate)):
        scored = report(model, logits[rows], labels[rows], minority, scores.temperature)
        result[role] = {"macro_f1": scored.macro_f1, "minority_recall": scored.minority_recall}
    return result


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
