"""Held-out scoring: which labelled turns the gate judges on, and the metrics of a model on them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import softmax

from model.artifact import ENCODER_FILE, ModelArtifact
from retraining.dataset import BASE, FEEDBACK, DialogueSet
from retraining.gate_config import GateConfig
from retraining.graphs import EMOTION_OUTPUT, encode_texts, run_context, session
from training.metrics import MetricsReport, compute_metrics


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
