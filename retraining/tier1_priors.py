"""Tier 1: prior correction without training.

EM (Saerens, Latinne & Decaestecker 2002, training/posthoc.py) estimates the class priors of recent production
traffic from the served (calibrated) probabilities alone; the posteriors are then moved from the training prior
to the new one by adding log(new / training prior) per class. The served probabilities are
softmax(logits / T), so in raw-logit units the offset is T · log(new / training). It goes into the emotion
head's bias inside context.onnx: the candidate stays a self-contained artifact, nothing else changes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from retraining.dataset import BASE
from retraining.graphs import EmotionHead, read_head, write_head
from retraining.parity import HeadReference
from retraining.queue import PermanentError
from retraining.steps import JobContext
from retraining.tiers import CLASS_PRIOR_KEY, Draft, TierInputs, head_graphs
from training.common import class_prior
from training.posthoc import estimate_priors_em, prior_shift

PRIORS_FILE = "priors.json"
# A class EM finds nearly absent would otherwise get an offset near log(1e-6) and never be predicted again.
MAX_LOG_RATIO = 3.0


@dataclass(frozen=True)
class PriorCorrection:
    train_prior: list[float]
    new_prior: list[float]
    iterations: int
    converged: bool
    offset: list[float]  # added to the emotion head's bias (raw-logit units, centred)
    samples: int


def correction(
    probs: np.ndarray, train_prior: np.ndarray, temperature: float, max_log_ratio: float = MAX_LOG_RATIO
) -> PriorCorrection:
    if len(probs) == 0:
        raise PermanentError("no recent predictions of the base version to estimate priors from")
    estimate = estimate_priors_em(probs, train_prior)
    log_ratio = np.clip(prior_shift(train_prior, estimate.prior), -max_log_ratio, max_log_ratio)
    offset = temperature * log_ratio
    return PriorCorrection(
        train_prior=class_prior(train_prior).tolist(),
        new_prior=estimate.prior.tolist(),
        iterations=estimate.iterations,
        converged=estimate.converged,
        offset=(offset - offset.mean()).tolist(),
        samples=len(probs),
    )


def training_prior(inputs: TierInputs) -> np.ndarray:
    """The prior the base model's posteriors assume: params["train_prior"] ({emotion: share}), else the one its
    artifact records (metrics "class_prior": a retrained candidate's, e.g. an earlier correction's new prior), else
    the base corpus's training labels, else the base model's reference distribution."""
    names = inputs.base.emotions.names
    recorded = inputs.params.get("train_prior") or inputs.base.metrics.get(CLASS_PRIOR_KEY)
    if recorded:
        return class_prior([float(recorded[name]) for name in names])
    counts = inputs.data.class_counts(inputs.data.labelled(heldout=False, source=BASE), len(names))
    if counts.sum() > 0:
        return class_prior(counts)
    if inputs.base.reference_distribution:
        return class_prior([inputs.base.reference_distribution[name] for name in names])
    raise PermanentError(
        "no training prior: pass params.train_prior, provide the base corpora, or use a base "
        "artifact with a class prior or a reference distribution"
    )


def corrected_head(context_graph: Path, offset: list[float]) -> EmotionHead:
    head = read_head(context_graph)
    return EmotionHead(head.weight, (head.bias + np.asarray(offset, dtype=np.float32)).astype(np.float32))


def _correct(out: Path, inputs: TierInputs) -> None:
    probs = np.load(inputs.data_dir / "recent_probabilities.npy")
    limit = float(inputs.params.get("max_log_ratio", MAX_LOG_RATIO))
    found = correction(probs, training_prior(inputs), inputs.base.calibration.temperature, limit)
    write_head(inputs.base.context_path, out / "context.onnx", corrected_head(inputs.base.context_path, found.offset))
    (out / PRIORS_FILE).write_text(json.dumps(asdict(found), indent=2), encoding="utf-8")


def build(ctx: JobContext, inputs: TierInputs) -> Draft:
    directory = ctx.step("priors", lambda out: _correct(out, inputs))
    found = PriorCorrection(**json.loads((directory / PRIORS_FILE).read_text(encoding="utf-8")))
    names = inputs.base.emotions.names
    ctx.log(
        "tier 1: priors "
        + ", ".join(
            f"{n} {old:.3f}->{new:.3f}" for n, old, new in zip(names, found.train_prior, found.new_prior, strict=True)
        )
    )
    head = corrected_head(inputs.base.context_path, found.offset)
    return Draft(
        graphs=head_graphs(inputs.base, directory / "context.onnx"),
        reference=HeadReference(inputs.base.context_path, head),
        recipe={"tier": 1, "method": "EM prior correction (Saerens et al. 2002)", **asdict(found)},
        class_prior=dict(zip(names, found.new_prior, strict=True)),
        calibration=inputs.base.calibration,
    )
