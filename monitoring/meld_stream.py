"""All of MELD (train, dev, test: 13,708 turns in 1,432 dialogues) scored once through the serving runtime, cached.

The simulation's streams are built from these scores. Scoring takes minutes on two cores, so the result is cached
under a key made of the artifact's graph hashes and the MELD files' hashes: the emotion logits (up to a per-turn
constant, T · log of the served probabilities), the utterance embeddings, the gold labels and each turn's
conversation. The served probabilities of any calibration of the same graphs are softmax(logits / T), exactly as
the runtime computes them (model/runtime.py), so a re-calibrated release reuses the cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.files import sha256_file
from model.artifact import CONTEXT_FILE, ENCODER_FILE, ModelArtifact, load_artifact
from model.data.meld import SPLITS, group_dialogues, read_utterances
from model.preprocess import speaker_indices

DIALOGUES_PER_CALL = 64
CACHE_FORMAT = "2"  # bumped when the cached arrays change
SPLIT_ORDER = ("train", "dev", "test")


@dataclass(frozen=True)
class ScoredMeld:
    """Every MELD turn, dialogues in order (train, dev, test), turns in order within each."""

    names: tuple[str, ...]
    logits: np.ndarray  # [N, C] float64, emotion logits up to a per-turn constant
    embeddings: np.ndarray  # [N, D] float32 utterance embeddings
    true: np.ndarray  # [N] gold class index
    conversation: np.ndarray  # [N] int, one id per dialogue, increasing in stream order
    split: np.ndarray  # [N] str
    speakers: np.ndarray  # [N] speaker index within the dialogue, as the runtime feeds the context head

    def __len__(self) -> int:
        return len(self.true)

    def probabilities(self, temperature: float) -> np.ndarray:
        """The served probabilities softmax(logits / T)."""
        scaled = self.logits / temperature
        scaled -= scaled.max(axis=1, keepdims=True)
        exp = np.exp(scaled)
        return exp / exp.sum(axis=1, keepdims=True)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.split == split)

    def dialogues(self, rows: np.ndarray) -> list[np.ndarray]:
        """`rows` (in stream order) cut where the conversation changes."""
        rows = np.asarray(rows)
        cuts = np.flatnonzero(np.diff(self.conversation[rows])) + 1
        return np.split(rows, cuts)


def cache_key(artifact: ModelArtifact, data_dir: Path) -> str:
    digest = hashlib.sha256(CACHE_FORMAT.encode())
    for name in (ENCODER_FILE, CONTEXT_FILE):
        digest.update(artifact.files[name].sha256.encode())
    for split in SPLIT_ORDER:
        digest.update(sha256_file(Path(data_dir) / "meld" / f"{split}_sent_emo.csv").encode())
    return digest.hexdigest()[:20]


def score_all_meld(artifact_dir: Path, data_dir: Path, cache_dir: Path) -> ScoredMeld:
    """The cached scores of `artifact_dir`'s graphs on all of MELD, computed through the runtime when absent."""
    artifact = load_artifact(artifact_dir)
    path = Path(cache_dir) / f"meld-scores-{cache_key(artifact, data_dir)}.npz"
    if not path.is_file():
        scored = _score(artifact, data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(".partial.npz")
        np.savez_compressed(staging, names=np.array(scored.names), **_arrays(scored))
        staging.rename(path)
    with np.load(path, allow_pickle=False) as stored:
        return ScoredMeld(
            names=tuple(str(name) for name in stored["names"]),
            logits=stored["logits"],
            embeddings=stored["embeddings"],
            true=stored["true"],
            conversation=stored["conversation"],
            split=stored["split"],
            speakers=stored["speakers"],
        )


def _arrays(scored: ScoredMeld) -> dict[str, np.ndarray]:
    return {
        "logits": scored.logits,
        "embeddings": scored.embeddings,
        "true": scored.true,
        "conversation": scored.conversation,
        "split": scored.split,
        "speakers": scored.speakers,
    }


def _score(artifact: ModelArtifact, data_dir: Path) -> ScoredMeld:
    """Every MELD dialogue as text turns with their speakers, bidirectional context, as batch scoring does."""
    from model.runtime import InferenceRuntime, UtteranceInput

    assert set(SPLIT_ORDER) == set(SPLITS)
    runtime = InferenceRuntime.load(artifact, device="cpu")
    dialogues = [d for split in SPLIT_ORDER for d in group_dialogues(read_utterances(data_dir, split))]
    inputs = [[UtteranceInput(u.text, None, u.speaker) for u in d.utterances] for d in dialogues]
    turns = []
    for start in range(0, len(inputs), DIALOGUES_PER_CALL):
        for scored in runtime.classify(inputs[start : start + DIALOGUES_PER_CALL], causal=False):
            turns += scored
    names = runtime.emotions.names
    probabilities = np.stack([t.emotion_probs for t in turns]).astype(np.float64)
    return ScoredMeld(
        names=names,
        logits=artifact.calibration.temperature * np.log(np.clip(probabilities, 1e-30, None)),
        embeddings=np.stack([t.embedding for t in turns]).astype(np.float32),
        true=np.array([names.index(u.emotion) for d in dialogues for u in d.utterances], dtype=np.int64),
        conversation=np.repeat(np.arange(len(dialogues)), [len(d.utterances) for d in dialogues]),
        split=np.array([d.split for d in dialogues for _ in d.utterances]),
        speakers=np.concatenate(
            [speaker_indices([u.speaker for u in d.utterances], artifact.preprocessing.max_speakers) for d in dialogues]
        ),
    )
