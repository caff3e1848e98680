"""Tier selection, and the shape every tier hands to the gate.

Cheapest first: without enough labels, tier 1 corrects the class priors from unlabelled predictions; with enough
feedback labels (and enough of every minority class), tier 2 retrains the emotion classifier; tier 3 (full
fine-tuning) runs only when an admin names it. A job that names a tier gets that tier.

Every tier returns a `Draft` (graphs + the PyTorch reference they must match); `finalise` scores it on the
held-out split, refits the temperature when asked, and writes the complete candidate artifact.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from model.artifact import (
    CONTEXT_FILE,
    Calibration,
    ClassPrior,
    DataSource,
    ModelArtifact,
    write_artifact,
)
from model.preprocess import PreprocessingConfig
from retraining.dataset import DialogueSet
from retraining.gate_config import GateConfig, config_from
from retraining.heldout import heldout_logits, heldout_rows, needs_reencoding, report
from retraining.parity import ParityReference
from retraining.queue import TIERS, PermanentError
from retraining.steps import JobContext
from training.calibration import fit_calibration_record

CLASS_PRIOR_KEY = "class_prior"  # in an artifact's metrics.json: {emotion: share} its posteriors assume


class NotEnoughEvidence(RuntimeError):
    """Neither labels nor unlabelled predictions enough for any automatic tier yet (retried later)."""


@dataclass(frozen=True)
class TierRules:
    min_labels: int = 200  # deduplicated feedback labels for tier 2
    min_per_minority: int = 10  # ... with at least this many of each minority class
    min_unlabelled: int = 100  # recent predictions of the base version for tier 1's EM

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> TierRules:
        return config_from(cls, params.get("tiers"), "tier rules")


@dataclass(frozen=True)
class Evidence:
    labelled: int  # deduplicated feedback labels usable for training or evaluation
    per_class: Mapping[str, int]
    recent_predictions: int


@dataclass(frozen=True)
class TierChoice:
    tier: int
    reason: str


def choose_tier(requested: int | None, evidence: Evidence, rules: TierRules, minority: Sequence[str]) -> TierChoice:
    if requested is not None:
        if requested not in TIERS:
            raise PermanentError(f"tier {requested} does not exist (tiers: {TIERS})")
        return TierChoice(requested, "named by the job")
    short = {name: evidence.per_class.get(name, 0) for name in minority}
    short = {name: count for name, count in short.items() if count < rules.min_per_minority}
    if evidence.labelled >= rules.min_labels and not short:
        return TierChoice(
            2,
            f"{evidence.labelled} feedback labels (>= {rules.min_labels}) with >= "
            f"{rules.min_per_minority} of each minority class",
        )
    lacking = (
        f"only {evidence.labelled} feedback labels (< {rules.min_labels})"
        if evidence.labelled < rules.min_labels
        else f"too few minority labels {short} (< {rules.min_per_minority} each)"
    )
    if evidence.recent_predictions >= rules.min_unlabelled:
        return TierChoice(1, f"{lacking}: prior correction from {evidence.recent_predictions} unlabelled predictions")
    raise NotEnoughEvidence(
        f"{lacking}, and only {evidence.recent_predictions} recent predictions "
        f"(< {rules.min_unlabelled}) for prior correction"
    )


@dataclass(frozen=True)
class TierInputs:
    base: ModelArtifact
    data: DialogueSet
    data_dir: Path  # the data step's output (recent probabilities, statistics)
    version: str  # the candidate's version
    params: Mapping[str, Any]
    minority: tuple[str, ...]
    engine: str  # "local" or "ray"
    device: str  # torch device for training
    gate: GateConfig
    corpora: Path | None = None  # the base corpora's directory (tier 3 reads the recipe's speech clips there)
    cache_dir: Path | None = None  # decoded audio, kept across jobs


@dataclass(frozen=True)
class Draft:
    graphs: Mapping[str, Path]
    reference: ParityReference
    recipe: dict[str, Any]
    # The class prior the candidate's posteriors assume (a later tier 1 corrects from it); None: unknown.
    class_prior: Mapping[str, float] | None = None
    calibration: Calibration | None = None  # None: refit the temperature on the held-out split
    tokenizer: Path | None = None  # None: the base artifact's (likewise below)
    model_config: Mapping[str, Any] | None = None
    preprocessing: PreprocessingConfig | None = None
    # The PyTorch state of the graphs; None: the base artifact's (tiers 1 and 2 rewrite only the emotion
    # classifier, which fine-tuning reads back from context.onnx).
    weights: Path | None = None
    # The predicted-class mix on clean dev data the monitor compares traffic with; None: the held-out split's.
    reference_distribution: Mapping[str, float] | None = None


def uniform_prior(artifact: ModelArtifact) -> dict[str, float]:
    """What class-balanced training (sampling or logit-adjusted loss) leaves the raw logits calibrated to."""
    return dict.fromkeys(artifact.emotions.names, 1 / len(artifact.emotions))


def head_graphs(base: ModelArtifact, context: Path) -> dict[str, Path]:
    """The base's encoder graphs, copied unchanged, with a new context graph."""
    return {**base.encoder_graphs(), CONTEXT_FILE: context}


def finalise(ctx: JobContext, inputs: TierInputs, draft: Draft) -> Path:
    """The candidate artifact directory (step "candidate")."""
    return ctx.step("candidate", lambda out: _package(out, inputs, draft)) / "artifact"


def _package(out: Path, inputs: TierInputs, draft: Draft) -> None:
    base, data = inputs.base, inputs.data
    fields: dict[str, Any] = dict(
        version=inputs.version,
        graphs=draft.graphs,
        tokenizer=draft.tokenizer or base.tokenizer_path,
        model_config=draft.model_config or base.config,
        preprocessing=draft.preprocessing or base.preprocessing,
        weights=draft.weights or base.weights_path,
    )
    sentiment_t = base.calibration.sentiment_temperature
    provisional = write_artifact(
        out / "draft", **fields, calibration=draft.calibration or Calibration(1.0, sentiment_t)
    )
    reencode = needs_reencoding(provisional, base)
    rows = heldout_rows(data, inputs.gate, reencode)
    calibration, shares = provisional.calibration, {}
    metrics: dict[str, Any] = {"recipe": draft.recipe}
    if draft.class_prior is not None:
        metrics[CLASS_PRIOR_KEY] = dict(draft.class_prior)
    if rows.any():
        logits, labels = heldout_logits(provisional, data, rows, reencode), data.labels[rows]
        calibration = _calibration(draft, data, rows, logits, base, sentiment_t)
        predicted = np.bincount(logits.argmax(axis=1), minlength=len(base.emotions)) / len(logits)
        shares = dict(zip(base.emotions.names, predicted.tolist(), strict=True))
        metrics["heldout"] = report(provisional, logits, labels, inputs.minority, calibration.temperature).to_dict()
    reference = shares if draft.reference_distribution is None else dict(draft.reference_distribution)
    write_artifact(
        out / "artifact", **fields, calibration=calibration, reference_distribution=reference, metrics=metrics
    )
    shutil.rmtree(out / "draft")


def _calibration(
    draft: Draft, data: DialogueSet, rows: np.ndarray, logits: np.ndarray, base: ModelArtifact, sentiment_t: float
) -> Calibration:
    """The candidate's calibration record, so the monitor can test its class mix against its own confusion: fitted
    on the gate's held-out turns (training/calibration.py; the temperature does not move a label, so the gate's
    decision is not fitted there) with the training prior the draft states. A tier that brings its own record
    (tier 1: the base's corrected to the new prior; tier 3: fitted on its own dev split) keeps it, given the
    confusion of its new decision rule on the held-out turns where it has none."""
    names = base.emotions.names
    conversations = np.unique(np.asarray(data.conversations, dtype=object)[rows], return_inverse=True)[1]
    held_out = DataSource(
        "the gate's held-out feedback", _modalities(data, rows), int(rows.sum()), int(conversations.max()) + 1
    )
    trained = (data.labels >= 0) & ~data.heldout
    shares = draft.class_prior or dict(
        zip(names, np.bincount(data.labels[trained], minlength=len(names)) / max(1, trained.sum()), strict=True)
    )
    prior = ClassPrior(
        tuple(shares[name] for name in names),
        DataSource(
            f"tier {draft.recipe.get('tier', '?')} training turns",
            _modalities(data, trained),
            max(1, int(trained.sum())),
        ),
    )
    fit = fit_calibration_record(
        logits,
        data.labels[rows],
        conversations,
        names,
        dev_source=held_out,
        training_prior=prior,
        sentiment_temperature=sentiment_t,
    )
    if draft.calibration is None:
        return fit.calibration
    if draft.calibration.dev_reference is not None:
        return draft.calibration
    return replace(draft.calibration, dev_reference=fit.calibration.dev_reference)


def _modalities(data: DialogueSet, rows: np.ndarray) -> str:
    present = [name for name, flags in (("text", data.has_text), ("audio", data.has_audio)) if flags[rows].any()]
    return "+".join(present) or "text"
