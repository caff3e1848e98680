"""Held-out scoring: which labelled turns the gate judges on, and the metrics of a model on them.

The gate judges on the held-out conversations of the production feedback (retraining/dataset.py's split): on
their audit labels alone when there are enough of them (a random sample of the traffic), else on every label,
and then the decision counts the corrections among them: labels users sent for mistakes they noticed
over-represent the champion's errors, which favours any candidate. With too little held-out feedback the gate
refuses to decide, unless the job allows the base corpora's held-out split (MELD dev, the shipped model's
selection set), and then the decision says so. Every modality the feedback was served with
is scored: from the logged embeddings (which the base encoder computed from whatever the turn carried), or, for
a candidate with a new encoder, by encoding each turn's stored text and stored audio again; a held-out turn
whose inputs were not stored (raw audio is kept only with EQUIPOISE_STORE_AUDIO) cannot be judged, and then the
gate does not decide. When the candidate scored live traffic in shadow (retraining/shadow.py), the held-out
feedback turns both models served are chosen by the same rules (`select_shadowed`) and need no re-scoring; the
shadow selection is a keyed hash independent of the audit one, so shadowed audit labels are a random sample too.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import softmax

from core.db.models import FeedbackKind
from model.artifact import ENCODER_FILE, ModelArtifact
from retraining.dataset import BASE, FEEDBACK, DialogueSet
from retraining.gate_config import GateConfig
from retraining.graphs import EMOTION_OUTPUT, encode_utterances, run_context, session
from training.metrics import MetricsReport, compute_metrics

BASE_SET_NOTE = "the base corpora's held-out split (MELD dev): the shipped model's selection set"
AUDIT_KIND, CORRECTION_KIND = FeedbackKind.AUDIT.value, FeedbackKind.CORRECTION.value


def needs_reencoding(candidate: ModelArtifact, base: ModelArtifact) -> bool:
    """Logged embeddings come from the base encoder; a candidate with another encoder is scored (and so is the
    champion, to keep the data the same) from the stored inputs instead."""
    return candidate.files[ENCODER_FILE].sha256 != base.files[ENCODER_FILE].sha256


@dataclass(frozen=True)
class HeldoutSelection:
    """The turns the gate judges, which set they are and why; no rows: the gate does not decide (`note` says why)."""

    rows: np.ndarray  # bool [N]
    source: str | None  # FEEDBACK, BASE, or None
    note: str
    unscorable: dict[str, int] = field(default_factory=dict)  # held-out feedback turns per modality not re-encodable

    def describe(self, data: DialogueSet, reencode: bool) -> dict[str, Any]:
        """What the decision records about the held-out set."""
        picked = np.flatnonzero(self.rows)
        modalities = data.modalities()
        return {
            "set": self.source,
            "note": self.note,
            "turns": len(picked),
            "conversations": len({data.conversations[i] for i in picked}),
            "feedback": int((self.rows & data.labelled(heldout=True, source=FEEDBACK)).sum()),
            "base": int((self.rows & data.labelled(heldout=True, source=BASE)).sum()),
            "modalities": dict(Counter(modalities[i] for i in picked)),
            "labels": dict(Counter(data.label_kinds[i] or "base" for i in picked)),
            "unscorable": self.unscorable,
            "reencoded": reencode,
        }


def reproducible(data: DialogueSet, reencode: bool) -> np.ndarray:
    """[N] whether each turn can be scored with every modality it was served with: always from the logged
    embeddings; when re-encoding, only with its text and (for audio) its stored file."""
    if not reencode:
        return np.ones(len(data), dtype=bool)
    text = np.array([bool(t) for t in data.texts], dtype=bool)
    audio = np.array([p is not None and os.path.isfile(p) for p in data.audio_paths], dtype=bool)
    return (~data.has_text | text) & (~data.has_audio | audio)


def _enough(data: DialogueSet, rows: np.ndarray, config: GateConfig) -> bool:
    conversations = {data.conversations[i] for i in np.flatnonzero(rows)}
    return rows.sum() >= config.min_heldout_turns and len(conversations) >= config.min_heldout_conversations


def _size(data: DialogueSet, rows: np.ndarray) -> str:
    conversations = len({data.conversations[i] for i in np.flatnonzero(rows)})
    return f"{int(rows.sum())} labelled held-out feedback turns in {conversations} conversations"


def select_heldout(data: DialogueSet, config: GateConfig, reencode: bool = False) -> HeldoutSelection:
    """The held-out turns the gate judges on (see the module's docstring)."""
    feedback = data.labelled(heldout=True, source=FEEDBACK)
    scorable = reproducible(data, reencode)
    missing = feedback & ~scorable
    if missing.any():
        return _unscorable(data, missing)
    return _feedback_set(data, feedback, config) or _fallback(data, feedback, scorable, config)


def select_shadowed(data: DialogueSet, paired: np.ndarray, config: GateConfig) -> HeldoutSelection | None:
    """The held-out feedback turns among `paired` [N] (both models' predictions as served), chosen as
    `select_heldout` chooses feedback; None when they are too few to decide on."""
    found = _feedback_set(data, data.labelled(heldout=True, source=FEEDBACK) & paired, config)
    if found is None:
        return None
    return dataclasses.replace(found, note=f"served by both models (the candidate in shadow): {found.note}")


def _unscorable(data: DialogueSet, missing: np.ndarray) -> HeldoutSelection:
    modalities = data.modalities()
    counts = dict(Counter(modalities[i] for i in np.flatnonzero(missing)))
    note = (
        f"the candidate has a new encoder and {int(missing.sum())} held-out feedback turns {counts} were served "
        "with inputs that were not stored (raw audio is kept only with EQUIPOISE_STORE_AUDIO): their modality "
        "cannot be judged"
    )
    return HeldoutSelection(np.zeros(len(data), dtype=bool), None, note, counts)


def _feedback_set(data: DialogueSet, feedback: np.ndarray, config: GateConfig) -> HeldoutSelection | None:
    """The audit labels of the held-out feedback when they suffice, else all its labels; None: too few."""
    audit = feedback & np.array([kind == AUDIT_KIND for kind in data.label_kinds], dtype=bool)
    if _enough(data, audit, config):
        return HeldoutSelection(audit, FEEDBACK, "the audit labels of the held-out feedback: a random sample")
    if not _enough(data, feedback, config):
        return None
    corrections = sum(data.label_kinds[i] == CORRECTION_KIND for i in np.flatnonzero(feedback))
    note = f"every label of the held-out feedback (too few audit labels: {int(audit.sum())})"
    if corrections:
        note += f"; {corrections} are corrections, which over-represent the champion's mistakes"
    return HeldoutSelection(feedback, FEEDBACK, note)


def _fallback(data: DialogueSet, feedback: np.ndarray, scorable: np.ndarray, config: GateConfig) -> HeldoutSelection:
    """Too little held-out feedback: no decision, or the base corpora's held-out split when the job allows it."""
    none = np.zeros(len(data), dtype=bool)
    short = (
        f"only {_size(data, feedback)}; the gate needs {config.min_heldout_turns} turns in "
        f"{config.min_heldout_conversations} conversations"
    )
    base = data.labelled(heldout=True, source=BASE) & scorable
    if not config.base_fallback:
        return HeldoutSelection(none, None, f"{short}, and does not judge on {BASE_SET_NOTE} unless the job allows it")
    if not _enough(data, base, config):
        return HeldoutSelection(none, None, f"{short}, and {BASE_SET_NOTE} is too small or absent")
    return HeldoutSelection(base, BASE, f"{short}: judged on {BASE_SET_NOTE}, as the job allowed (base_fallback)")


def heldout_rows(data: DialogueSet, config: GateConfig, reencode: bool = False) -> np.ndarray:
    """The labelled held-out turns a candidate's temperature is fitted on: the gate's set, or the base corpora's
    held-out split when the gate has none (a temperature decides nothing)."""
    selection = select_heldout(data, config, reencode)
    if selection.rows.any():
        return selection.rows
    return data.labelled(heldout=True, source=BASE) & reproducible(data, reencode)


def heldout_logits(artifact: ModelArtifact, data: DialogueSet, rows: np.ndarray, reencode: bool) -> np.ndarray:
    """Emotion logits [n, C] of `rows`, each scored within its whole dialogue; with `reencode` every turn is
    encoded by the artifact's own encoder from its stored text and audio instead of using the logged embeddings
    (a context turn whose audio was not stored is encoded from what was)."""
    subset, index = data.take(data.dialogues_with(rows))
    embeddings = None
    if reencode:
        texts = [text if served else None for text, served in zip(subset.texts, subset.has_text, strict=True)]
        audio = [p if p is not None and os.path.isfile(p) else None for p in subset.audio_paths]
        embeddings = encode_utterances(artifact, texts, audio)
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
