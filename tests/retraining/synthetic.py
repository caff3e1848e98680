"""Synthetic production traffic for the retraining tests: utterance embeddings with class structure, in logged
conversations, and a prior-shifted stream scored by the champion itself."""

from __future__ import annotations

import numpy as np
from scipy.special import softmax

from model.artifact import ModelArtifact
from model.labels import EMOTIONS
from retraining.dataset import FEEDBACK, DialogueSet
from retraining.graphs import EMOTION_OUTPUT, run_context, session
from tests.retraining.conftest import Turn

# Production mix after the drift: minority classes (sadness, disgust, fear) are frequent enough to learn from.
SHARES = np.array([0.35, 0.15, 0.10, 0.10, 0.12, 0.08, 0.10])
MINORITY = ("sadness", "disgust", "fear")
# Words that give each class away, so that a text model can learn the labels (tier 3).
CUES = ("okay fine", "great wonderful", "wow really", "furious annoyed", "sad crying", "gross disgusting", "scared")


def class_means(dim: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(len(EMOTIONS), dim))


def labelled_turns(n: int, dim: int, seed: int, noise: float = 0.6) -> list[Turn]:
    """`n` labelled turns; four in five are in 4-turn conversations (agent/customer), the rest single."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(len(EMOTIONS), n, p=SHARES)
    embeddings = class_means(dim)[labels] + noise * rng.normal(size=(n, dim))
    turns = []
    for i, (label, vector) in enumerate(zip(labels, embeddings, strict=True)):
        conversation = f"s{seed}-c{i // 4}" if i % 5 else None
        turns.append(
            Turn(
                embedding=vector.astype(np.float32),
                label=EMOTIONS[label],
                text=f"{CUES[label]} (utterance {i} of set {seed})",
                conversation=conversation,
                turn=i % 4 if conversation else None,
                speaker=("agent", "customer")[i % 2] if conversation else None,
            )
        )
    return turns


def champion_posteriors(artifact: ModelArtifact, embeddings: np.ndarray) -> np.ndarray:
    """The champion's served probabilities for single-turn utterances."""
    dialogues = [(vector[None].astype(np.float32), np.zeros(1, np.int64), True) for vector in embeddings]
    (logits,) = run_context(session(artifact.context_path), dialogues, [EMOTION_OUTPUT])
    return softmax(logits / artifact.calibration.temperature, axis=1)


def prior_shifted_stream(
    artifact: ModelArtifact, n: int, weights: np.ndarray, seed: int, scale: float = 3.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Traffic whose label prior is the champion's times `weights`, with p(x | y) unchanged.

    Labels follow the champion's own posterior (so it is calibrated on the unshifted traffic); rejection sampling
    by weight shifts the prior. Returns (embeddings, labels, served probabilities, unshifted training prior)."""
    rng = np.random.default_rng(seed)
    proposals = scale * rng.normal(size=(int(n * weights.max() / weights.min()) * 2, artifact.embed_dim))
    posteriors = champion_posteriors(artifact, proposals)
    labels = np.array([rng.choice(len(weights), p=p) for p in posteriors])
    accepted = rng.random(len(labels)) < weights[labels] / weights.max()
    keep = np.flatnonzero(accepted)[:n]
    return proposals[keep], labels[keep], posteriors[keep], posteriors.mean(axis=0)


def single_turns(turns: list[Turn], *, heldout: bool) -> DialogueSet:
    """Labelled turns as single-turn feedback dialogues, all in one split."""
    n = len(turns)
    return DialogueSet(
        embeddings=np.stack([t.embedding for t in turns]),
        speakers=np.zeros(n, np.int64),
        labels=np.array([EMOTIONS.index(t.label or "") for t in turns]),
        sentiments=np.full(n, -1),
        heldout=np.full(n, heldout),
        has_text=np.ones(n, bool),
        has_audio=np.zeros(n, bool),
        lengths=np.ones(n, np.int64),
        causal=np.ones(n, bool),
        keys=[t.text for t in turns],
        conversations=[f"single:{t.text}" for t in turns],
        texts=[t.text for t in turns],
        audio_paths=[None] * n,
        label_kinds=["audit"] * n,
        sources=[FEEDBACK] * n,
    )
