"""Data assembly for retraining: production feedback joined to its logged predictions, plus the base corpora.

- Feedback: every prediction with feedback (the newest label counts), logged by a model whose encoder is the
  base model's (so the logged embeddings are comparable), together with the other logged turns of its
  conversation as unlabelled context, in turn order. Only what the database stores is used: the utterance
  embedding and the stored text (redacted when redaction is on); never raw text.
- Deduplication by `text_sha256`: of several labelled rows with the same text only the newest label is kept;
  the others stay in their dialogues as unlabelled context.
- Held-out split by conversation: a turn is held out when the salted hash of its conversation (the logged
  conversation id; a turn logged without one is a conversation of its own, keyed by its text hash) falls under
  the held-out fraction. Training and held-out turns never share a conversation, and a conversation keeps its
  side for every job, so no model the loop trained (an earlier job's champion included) saw a held-out
  conversation; the held-out set grows with the feedback, each job judging on every held-out conversation among
  the newest `max_labelled` labels. Speakers cannot be kept apart beyond that: the logged speaker names a role
  within its conversation (agent, customer), not a person across conversations. Base corpora keep their own
  split (MELD train for training, dev held out: the shipped model's selection set, which the gate uses only
  when a job allows it).
- Modalities: every turn records whether it carried text and audio when it was served, and where its raw audio
  was stored (when audio storage is on), so a candidate with a new encoder can be scored on the same inputs.
- Label kinds: each label records whether it answered an audit offer (a random sample) or corrected a mistake.
- Base corpora: MELD dialogues encoded (text only) by the base model's encoder, cached per encoder hash.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import softmax
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core.db.models import ContextMode, Feedback, ModelVersion, Prediction
from model.artifact import ENCODER_FILE, MANIFEST_FILE, ModelArtifact
from model.labels import LabelSet
from model.preprocess import speaker_indices
from retraining.graphs import Dialogue, encode_texts

HELDOUT_SALT = "equipoise-heldout-conversation-v1"
HELDOUT_FRACTION = 0.2
FEEDBACK, BASE = "feedback", "base"
TEXT, AUDIO, TEXT_AUDIO = "text", "audio", "text+audio"  # the modalities a turn was served with
_CHUNK = 5_000  # ids per IN (...) list


def conversation_key(conversation_id: str | None, turn_key: str) -> str:
    """The unit of the held-out split and of the gate's resampling: the logged conversation, else the turn alone
    (`turn_key`: its text hash, else its prediction id)."""
    return f"conversation:{conversation_id}" if conversation_id is not None else f"single:{turn_key}"


def is_heldout(conversation: str, fraction: float = HELDOUT_FRACTION, salt: str = HELDOUT_SALT) -> bool:
    """The split: a stable hash of the conversation key, independent of the job, the candidate and the other
    conversations (benchmarks vary `salt` to draw other splits)."""
    digest = hashlib.sha256(f"{salt}:{conversation}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


def modality(has_text: bool, has_audio: bool) -> str:
    return TEXT_AUDIO if has_text and has_audio else AUDIO if has_audio else TEXT


@dataclass
class DialogueSet:
    """Turns of dialogues, flattened in dialogue and turn order; `lengths` cuts them into dialogues."""

    embeddings: np.ndarray  # float32 [N, D]
    speakers: np.ndarray  # int64 [N], speaker index within the dialogue
    labels: np.ndarray  # int64 [N], emotion index; -1 where unlabelled (or the label was dropped)
    sentiments: np.ndarray  # int64 [N], sentiment index; -1 where unknown
    heldout: np.ndarray  # bool [N]
    lengths: np.ndarray  # int64 [K], turns per dialogue
    causal: np.ndarray  # bool [K], the context mode the dialogue was scored in
    has_text: np.ndarray  # bool [N], the turn was served with text
    has_audio: np.ndarray  # bool [N], the turn was served with audio
    keys: list[str]  # [N] deduplication key
    conversations: list[str]  # [N] conversation key: the split and resampling unit
    texts: list[str | None]  # [N] stored text (redacted when redaction is on)
    audio_paths: list[str | None]  # [N] stored raw audio (only when audio storage was on)
    label_kinds: list[str | None]  # [N] a feedback label's kind ("audit" or "correction"); None otherwise
    sources: list[str]  # [N] FEEDBACK or BASE
    # [N] the logged prediction a feedback turn is (the gate pairs it with shadow predictions); None otherwise.
    # Empty when built without them (sets saved before they were kept, synthetic sets): None for every turn.
    prediction_ids: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prediction_ids:
            self.prediction_ids = [None] * len(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def dialogues(self, embeddings: np.ndarray | None = None) -> list[Dialogue]:
        """(embeddings, speakers, causal) per dialogue; `embeddings` replaces the stored ones (re-encoded)."""
        vectors = self.embeddings if embeddings is None else embeddings
        bounds = np.cumsum(self.lengths)[:-1]
        return list(zip(np.split(vectors, bounds), np.split(self.speakers, bounds), self.causal.tolist(), strict=True))

    def take(self, keep: np.ndarray) -> tuple[DialogueSet, np.ndarray]:
        """The dialogues flagged in `keep` [K], and the index of each of their turns in this set."""
        turn_keep = np.repeat(keep, self.lengths)
        index = np.flatnonzero(turn_keep)
        picked = DialogueSet(
            **{name: getattr(self, name)[turn_keep] for name in _TURN_ARRAYS},
            lengths=self.lengths[keep],
            causal=self.causal[keep],
            **{name: [getattr(self, name)[i] for i in index] for name in _TURN_LISTS},
        )
        return picked, index

    def dialogues_with(self, rows: np.ndarray) -> np.ndarray:
        """[K] whether each dialogue holds one of `rows` [N]."""
        dialogue = np.repeat(np.arange(len(self.lengths)), self.lengths)
        return np.bincount(dialogue, weights=rows, minlength=len(self.lengths)) > 0

    def labelled(self, *, heldout: bool, source: str | None = None) -> np.ndarray:
        rows = (self.labels >= 0) & (self.heldout == heldout)
        return rows & np.array([s == source for s in self.sources]) if source else rows

    def class_counts(self, rows: np.ndarray, num_classes: int) -> np.ndarray:
        return np.bincount(self.labels[rows & (self.labels >= 0)], minlength=num_classes)

    def modalities(self) -> list[str]:
        """[N] the modality each turn was served with (TEXT, AUDIO or TEXT_AUDIO)."""
        return [modality(t, a) for t, a in zip(self.has_text.tolist(), self.has_audio.tolist(), strict=True)]

    def save(self, directory: Path) -> None:
        np.savez(directory / "turns.npz", **{name: getattr(self, name) for name in (*_TURN_ARRAYS, *_DIALOGUE_ARRAYS)})
        lists = {name: getattr(self, name) for name in _TURN_LISTS}
        (directory / "turns.json").write_text(json.dumps(lists), encoding="utf-8")

    @classmethod
    def load(cls, directory: Path) -> DialogueSet:
        with np.load(directory / "turns.npz") as arrays:
            loaded = {name: arrays[name] for name in arrays.files}
        return cls(**loaded, **json.loads((directory / "turns.json").read_text(encoding="utf-8")))

    @classmethod
    def concat(cls, parts: Sequence[DialogueSet]) -> DialogueSet:
        return cls(
            **{name: np.concatenate([getattr(p, name) for p in parts]) for name in (*_TURN_ARRAYS, *_DIALOGUE_ARRAYS)},
            **{name: [item for p in parts for item in getattr(p, name)] for name in _TURN_LISTS},
        )


_TURN_ARRAYS = ("embeddings", "speakers", "labels", "sentiments", "heldout", "has_text", "has_audio")
_DIALOGUE_ARRAYS = ("lengths", "causal")
_TURN_LISTS = ("keys", "conversations", "texts", "audio_paths", "label_kinds", "sources", "prediction_ids")


@dataclass(frozen=True)
class _Turn:
    embedding: np.ndarray
    speaker: str | None
    label: int
    sentiment: int
    key: str
    conversation: str
    text: str | None
    has_text: bool = True
    has_audio: bool = False
    audio_path: str | None = None
    label_kind: str | None = None
    prediction_id: str | None = None


def _build(
    dialogues: Sequence[tuple[Sequence[_Turn], bool]],
    source: str,
    dim: int,
    max_speakers: int,
    heldout: Sequence[bool] | None = None,
) -> DialogueSet:
    """A DialogueSet from (turns, causal) pairs; `heldout` per turn, else the hash split of each conversation."""
    turns = [turn for group, _ in dialogues for turn in group]
    speakers = [speaker_indices([t.speaker for t in group], max_speakers) for group, _ in dialogues]
    return DialogueSet(
        embeddings=np.array([t.embedding for t in turns], dtype=np.float32).reshape(len(turns), dim),
        speakers=np.concatenate([np.zeros(0, np.int64), *speakers]),
        labels=np.array([t.label for t in turns], dtype=np.int64),
        sentiments=np.array([t.sentiment for t in turns], dtype=np.int64),
        heldout=np.array(heldout if heldout is not None else [is_heldout(t.conversation) for t in turns], dtype=bool),
        has_text=np.array([t.has_text for t in turns], dtype=bool),
        has_audio=np.array([t.has_audio for t in turns], dtype=bool),
        lengths=np.array([len(group) for group, _ in dialogues], dtype=np.int64),
        causal=np.array([causal for _, causal in dialogues], dtype=bool),
        keys=[t.key for t in turns],
        conversations=[t.conversation for t in turns],
        texts=[t.text for t in turns],
        audio_paths=[t.audio_path for t in turns],
        label_kinds=[t.label_kind for t in turns],
        sources=[source] * len(turns),
        prediction_ids=[t.prediction_id for t in turns],
    )


# ---------------------------------------------------------------------------------------------- production


def encoder_sha256(artifact_dir: Path) -> str | None:
    """The encoder graph's hash from an artifact's manifest (no full verification: only for grouping)."""
    try:
        manifest = json.loads((artifact_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        return str(manifest["files"][ENCODER_FILE]["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def compatible_versions(session: Session, artifact: ModelArtifact) -> list[str]:
    """Registered versions whose utterance embeddings are interchangeable with `artifact`'s (same encoder)."""
    wanted = artifact.files[ENCODER_FILE].sha256
    rows = session.execute(select(ModelVersion.version, ModelVersion.artifact_path)).all()
    return sorted({artifact.version} | {v for v, path in rows if encoder_sha256(Path(path)) == wanted})


@dataclass(frozen=True)
class FeedbackStats:
    labelled: int  # labelled rows kept (deduplicated, known labels)
    duplicates: int  # labels dropped as older duplicates of the same text
    unknown_labels: int  # labels outside the model's label set
    context_turns: int  # unlabelled turns added as dialogue context


def _chunks(values: Sequence[Any]) -> list[Sequence[Any]]:
    return [values[i : i + _CHUNK] for i in range(0, len(values), _CHUNK)]


@dataclass(frozen=True)
class _Label:
    emotion: int
    sentiment: int
    kind: str | None = None  # FeedbackKind value


def _labelled_rows(session: Session, versions: Collection[str], limit: int) -> list[tuple[Prediction, Feedback]]:
    """Predictions with their newest feedback, newest feedback first."""
    newest = (
        select(Feedback.prediction_id, func.max(Feedback.id).label("feedback_id"))
        .group_by(Feedback.prediction_id)
        .subquery()
    )
    query = (
        select(Prediction, Feedback)
        .join(newest, newest.c.prediction_id == Prediction.id)
        .join(Feedback, Feedback.id == newest.c.feedback_id)
        .where(Prediction.model_version.in_(list(versions)), Prediction.embedding.is_not(None))
        .order_by(Feedback.id.desc())
        .limit(limit)
    )
    return [(prediction, feedback) for prediction, feedback in session.execute(query)]


def _context_rows(session: Session, versions: Collection[str], conversations: Sequence[str]) -> list[Prediction]:
    rows: list[Prediction] = []
    for chunk in _chunks(conversations):
        query = select(Prediction).where(
            Prediction.conversation_id.in_(list(chunk)),
            Prediction.model_version.in_(list(versions)),
            Prediction.embedding.is_not(None),
        )
        rows.extend(session.scalars(query))
    return rows


def _index(labels: LabelSet, name: str | None) -> int:
    return labels.index(name) if name in labels.names else -1


def _dedup_labels(
    labelled: list[tuple[Prediction, Feedback]], emotions: LabelSet, sentiments: LabelSet
) -> tuple[dict[Any, _Label], int, int]:
    """Prediction id -> label for the newest label of each text; also the duplicate and unknown-label counts."""
    kept: dict[Any, _Label] = {}
    seen: set[str] = set()
    duplicates = unknown = 0
    for prediction, feedback in labelled:  # newest feedback first
        if feedback.label not in emotions.names:
            unknown += 1
        elif _key(prediction) in seen:
            duplicates += 1
        else:
            seen.add(_key(prediction))
            kind = None if feedback.kind is None else str(feedback.kind)
            kept[prediction.id] = _Label(emotions.index(feedback.label), _index(sentiments, feedback.sentiment), kind)
    return kept, duplicates, unknown


def _key(prediction: Prediction) -> str:
    return prediction.text_sha256 or f"prediction:{prediction.id}"


def _conversation_turns(rows: list[Prediction], labels: dict[Any, _Label]) -> list[Prediction]:
    """One row per turn index (the labelled one, else the newest), in turn order."""
    by_turn: dict[Any, Prediction] = {}
    for row in sorted(rows, key=lambda r: (r.id in labels, r.created_at)):
        by_turn[row.turn_index if row.turn_index is not None else row.id] = row
    return sorted(by_turn.values(), key=lambda r: (r.turn_index is None, r.turn_index or 0, r.created_at))


def _causal(rows: Sequence[Prediction]) -> bool:
    modes = Counter(row.context_mode for row in rows if row.context_mode is not None)
    return not modes or modes.most_common(1)[0][0] == ContextMode.CAUSAL


def _logged_turn(row: Prediction, label: _Label | None) -> _Turn:
    label = label or _Label(-1, -1)
    vector = np.frombuffer(row.embedding or b"", dtype="<f4")
    return _Turn(
        vector,
        row.speaker,
        label.emotion,
        label.sentiment,
        _key(row),
        conversation_key(row.conversation_id, _key(row)),
        row.text,
        bool(row.has_text),
        bool(row.has_audio),
        row.audio_path,
        label.kind,
        str(row.id),
    )


def feedback_dialogues(
    session: Session, artifact: ModelArtifact, *, max_labelled: int = 50_000
) -> tuple[DialogueSet, FeedbackStats]:
    """The labelled production turns (newest `max_labelled` labels) in their logged dialogues."""
    versions = compatible_versions(session, artifact)
    labelled = _labelled_rows(session, versions, max_labelled)
    labels, duplicates, unknown = _dedup_labels(labelled, artifact.emotions, artifact.sentiments)
    conversations = sorted({p.conversation_id for p, _ in labelled if p.conversation_id is not None})
    rows = {p.id: p for p in [*_context_rows(session, versions, conversations), *(p for p, _ in labelled)]}
    grouped: dict[str, list[Prediction]] = defaultdict(list)
    for prediction in rows.values():
        grouped[prediction.conversation_id or f"single:{prediction.id}"].append(prediction)
    dialogues = []
    for group in grouped.values():
        ordered = _conversation_turns(group, labels)
        dialogues.append(([_logged_turn(r, labels.get(r.id)) for r in ordered], _causal(ordered)))
    data = _build(dialogues, FEEDBACK, artifact.embed_dim, artifact.preprocessing.max_speakers)
    return data, FeedbackStats(len(labels), duplicates, unknown, int((data.labels < 0).sum()))


def recent_probabilities(session: Session, version: str, emotions: LabelSet, limit: int) -> np.ndarray:
    """The newest `limit` logged probability rows of `version` [N, C] (calibrated, as served)."""
    query = (
        select(Prediction.probabilities)
        .where(Prediction.model_version == version)
        .order_by(Prediction.created_at.desc())
        .limit(limit)
    )
    rows = [served_probabilities(p, emotions) for p in session.scalars(query)]
    return np.array(rows, dtype=np.float64).reshape(-1, len(emotions))


def served_probabilities(logged: Any, emotions: LabelSet) -> list[float]:
    """A logged probability column (a list in the version's label order, or a name -> probability mapping) in
    the order of `emotions`."""
    if isinstance(logged, dict):
        return [float(logged[name]) for name in emotions.names]
    return [float(p) for p in logged]


# ---------------------------------------------------------------------------------------------- base corpora


def base_dialogues(
    data_dir: Path | None,
    artifact: ModelArtifact,
    cache_dir: Path,
    *,
    max_dialogues: int | None = None,
    causal_modes: Sequence[bool] = (True, False),
) -> DialogueSet | None:
    """MELD train (training) and dev (held out) encoded by `artifact`'s encoder, in each context mode; None
    without the corpus."""
    from model.data.meld import group_dialogues, read_utterances

    if data_dir is None or not (Path(data_dir) / "meld").is_dir():
        return None
    parts = []
    for split in ("train", "dev"):
        dialogues = group_dialogues(read_utterances(Path(data_dir), split))[:max_dialogues]
        utterances = [u for d in dialogues for u in d.utterances]
        name = f"meld-{split}-{artifact.files[ENCODER_FILE].sha256[:16]}-{max_dialogues or 'all'}.npy"
        vectors = iter(_encoded(cache_dir / name, artifact, [u.text for u in utterances]))
        grouped = [
            [
                _Turn(
                    next(vectors),
                    u.speaker,
                    _index(artifact.emotions, u.emotion),
                    _index(artifact.sentiments, u.sentiment),
                    f"meld:{split}:{u.dialogue_id}:{u.turn}",
                    f"meld:{split}:{u.dialogue_id}",
                    u.text,
                )
                for u in d.utterances
            ]
            for d in dialogues
        ]
        held = [split == "dev"] * len(utterances)
        for causal in causal_modes:
            parts.append(
                _build(
                    [(group, causal) for group in grouped],
                    BASE,
                    artifact.embed_dim,
                    artifact.preprocessing.max_speakers,
                    heldout=held,
                )
            )
    return DialogueSet.concat(parts)


def _encoded(path: Path, artifact: ModelArtifact, texts: list[str]) -> np.ndarray:
    """encode_texts, cached in `path` (named after the encoder's hash and the corpus selection)."""
    if path.is_file():
        return np.load(path)
    values = encode_texts(artifact, texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex}.npy")
    np.save(staging, values)
    staging.rename(path)
    return values


# ---------------------------------------------------------------------------------------------- label noise


def filter_label_noise(logits: np.ndarray, labels: np.ndarray, rows: np.ndarray, seed: int = 0) -> np.ndarray:
    """`labels` with the noisy ones among `rows` (training/noise.py: small-loss GMM) relabelled by the model
    when it is confident, or dropped (-1) when ambiguous."""
    from training.noise import partition_noisy_labels, per_sample_loss
    from training.recipe import NoiseConfig

    index = np.flatnonzero(rows & (labels >= 0))
    if len(index) < 2:
        return labels
    z, y = logits[index], labels[index]
    thresholds = NoiseConfig()  # the training recipes' defaults
    partition = partition_noisy_labels(
        per_sample_loss(z, y),
        y,
        softmax(z, axis=1),
        clean_threshold=thresholds.clean_threshold,
        relabel_confidence=thresholds.relabel_confidence,
        seed=seed,
    )
    cleaned = labels.copy()
    cleaned[index] = np.where(partition.ambiguous, -1, partition.labels)
    return cleaned
