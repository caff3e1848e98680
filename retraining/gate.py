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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from scipy.special import softmax

from core.db.models import ModelStatus
from model.artifact import ENCODER_FILE, ModelArtifact
from model.export import (
    CONTEXT_OUTPUTS,
    PARITY_TOLERANCE,
    eval_mode,
    example_context_inputs,
    example_encoder_inputs,
    to_feeds,
)
from model.registry import ModelRegistry, RegistryError
from retraining.dataset import BASE, FEEDBACK, DialogueSet
from retraining.graphs import (
    EMOTION_OUTPUT,
    FEATURES_OUTPUT,
    EmotionHead,
    encode_texts,
    run_context,
    session,
    with_features_output,
)
from retraining.queue import PermanentError
from training.metrics import MetricsReport, compute_metrics

Inputs = Mapping[str, torch.Tensor]
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


# ---------------------------------------------------------------------------------------------- parity


class ParityReference(Protocol):
    """What the candidate's graphs must compute, in PyTorch."""

    def context(self, inputs: Inputs) -> Sequence[np.ndarray]:
        """(emotion_logits, sentiment_logits) for context-graph inputs."""
        ...

    def encoder(self, inputs: Inputs) -> np.ndarray | None:
        """The utterance embedding; None when the encoder graph is the base model's, copied unchanged."""
        ...


class HeadReference:
    """A new emotion classifier on the base context graph's frozen features (tiers 1 and 2): the features come
    from the base graph, the classifier is applied in PyTorch."""

    def __init__(self, base_context: Path, head: EmotionHead) -> None:
        self.graph = session(with_features_output(base_context))
        self.head = head

    def context(self, inputs: Inputs) -> Sequence[np.ndarray]:
        features, sentiment = self.graph.run([FEATURES_OUTPUT, CONTEXT_OUTPUTS[1]], to_feeds(inputs))
        weight, bias = torch.tensor(self.head.weight), torch.tensor(self.head.bias)
        return torch.nn.functional.linear(torch.from_numpy(features), weight, bias).numpy(), sentiment

    def encoder(self, inputs: Inputs) -> np.ndarray | None:
        return None


class TorchReference:
    """A whole PyTorch model (tier 3)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def context(self, inputs: Inputs) -> Sequence[np.ndarray]:
        with eval_mode(self.model), torch.no_grad():
            return [t.numpy() for t in self.model.head(**inputs)]

    def encoder(self, inputs: Inputs) -> np.ndarray | None:
        with eval_mode(self.model), torch.no_grad():
            return self.model.encoder(**inputs).numpy()


def _context_probes(dim: int) -> list[dict[str, torch.Tensor]]:
    return [example_context_inputs(dim, batch=3, turns=5, causal=False), example_context_inputs(dim, 2, 4, True)]


def parity(candidate: ModelArtifact, reference: ParityReference, base: ModelArtifact) -> float:
    """The largest |PyTorch - ONNX Runtime| over the probe outputs (inf when a graph cannot run)."""
    try:
        graph = session(candidate.context_path)
        diffs = [
            float(np.abs(np.asarray(expected) - actual).max())
            for inputs in _context_probes(candidate.embed_dim)
            for expected, actual in zip(
                reference.context(inputs), graph.run(list(CONTEXT_OUTPUTS), to_feeds(inputs)), strict=True
            )
        ]
        probe = example_encoder_inputs(batch=3, tokens=5, samples=2321, seed=1)
        embedding = reference.encoder(probe)
        if embedding is None:
            if candidate.files[ENCODER_FILE].sha256 != base.files[ENCODER_FILE].sha256:
                return math.inf  # a changed encoder needs a reference to be checked against
        else:
            actual = session(candidate.encoder_path).run(["embedding"], to_feeds(probe))[0]
            diffs.append(float(np.abs(embedding - actual).max()))
    except Exception:  # noqa: BLE001 - a corrupted graph fails in ONNX Runtime in many ways; all mean "no parity"
        return math.inf
    return max(diffs) if all(np.isfinite(diffs)) else math.inf


# ---------------------------------------------------------------------------------------------- metrics


def needs_reencoding(candidate: ModelArtifact, base: ModelArtifact) -> bool:
    """Logged embeddings come from the base encoder; a candidate with another encoder is scored (and so is the
    champion, to keep the data the same) from the stored texts instead."""
    return candidate.files[ENCODER_FILE].sha256 != base.files[ENCODER_FILE].sha256


def heldout_rows(data: DialogueSet, config: GateConfig, reencode: bool = False) -> np.ndarray:
    """The labelled held-out turns the gate scores: production ones, joined by the base corpora's held-out turns
    when production has fewer than `min_feedback_heldout`; only turns with text when re-encoding."""
    rows = data.labelled(heldout=True, source=FEEDBACK)
    if rows.sum() < config.min_feedback_heldout:
        rows |= data.labelled(heldout=True, source=BASE)
    return rows & np.array([bool(text) for text in data.texts], dtype=bool) if reencode else rows


def heldout_logits(artifact: ModelArtifact, data: DialogueSet, rows: np.ndarray, reencode: bool) -> np.ndarray:
    """Emotion logits [n, C] of `rows`, each scored within its whole dialogue; with `reencode` the stored texts are
    encoded by the artifact's own encoder instead of using the logged embeddings."""
    subset, index = data.take(data.dialogues_with(rows))
    embeddings = encode_texts(artifact, subset.texts) if reencode else None
    (logits,) = run_context(session(artifact.context_path), subset.dialogues(embeddings), [EMOTION_OUTPUT])
    return logits[rows[index]]


def report(
    artifact: ModelArtifact,
    logits: np.ndarray,
    labels: np.ndarray,
    minority: Sequence[str],
    temperature: float | None = None,
) -> MetricsReport:
    """Metrics of `logits` against `labels`; ECE with the artifact's temperature unless another is given."""
    names = artifact.emotions.names
    probs = softmax(logits / (temperature or artifact.calibration.temperature), axis=1)
    return compute_metrics(labels, logits.argmax(axis=1), names, probs, [m for m in minority if m in names])


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


# ---------------------------------------------------------------------------------------------- the gate


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
