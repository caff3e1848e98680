"""The one pre-processing path of the API and batch scoring: raw utterances -> the graph inputs of
docs/ARCHITECTURE.md.

Text is tokenised with the artifact's tokenizer.json (truncated to max_tokens, [CLS] ... [SEP]); audio arrives
decoded (float32, 16 kHz mono, see model.audio.decode_audio) and is cut to the model's max_audio_seconds.
A missing modality becomes the contract's placeholder ([CLS][SEP] / one zero sample) with its has_* flag off.
Utterances are grouped into length buckets so a batch pads little; `in_original_order` puts results back.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tokenizers import Tokenizer

from core.text import is_present

PAD_ID = 0
DEFAULT_MAX_AUDIO_SECONDS = 30.0
LATE_FLAGS = 2  # has_text, has_audio at the end of a late-fusion utterance embedding
_EMPTY_AUDIO = np.zeros(1, dtype=np.float32)
T = TypeVar("T")


class PreprocessError(ValueError):
    """An input cannot be turned into graph inputs (malformed audio, mismatched lengths); the message says why."""


class DeafModelError(PreprocessError):
    """A turn with audio and no text sent to a model that was trained on text alone."""


def heard(hears_audio: bool, text: str | None, audio: np.ndarray | None) -> bool:
    """Whether a model can score a turn: one trained on text alone (`hears_audio` False) cannot score audio with
    no text. An empty clip is no audio."""
    return hears_audio or is_present(text) or audio is None or np.size(audio) == 0


@dataclass(frozen=True)
class PreprocessingConfig:
    """The pre-processing parameters an artifact was trained with (its config.json "preprocessing")."""

    max_tokens: int = 128
    sample_rate: int = 16000
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS
    max_speakers: int = 8
    # False for a model no audio ever trained (a text-only recipe): its audio path holds its initial weights, so
    # a clip is dropped beside text and a turn with audio alone is refused (`DeafModelError`).
    hears_audio: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens < 2 or self.sample_rate < 1 or self.max_speakers < 1:
            raise ValueError(f"invalid pre-processing parameters: {self}")
        if not (math.isfinite(self.max_audio_seconds) and self.max_audio_seconds > 0):
            raise ValueError(f"max_audio_seconds must be a positive number, not {self.max_audio_seconds}")

    @property
    def max_samples(self) -> int:
        return int(self.max_audio_seconds * self.sample_rate)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessingConfig:
        return cls(
            max_tokens=int(data["max_tokens"]),
            sample_rate=int(data["sample_rate"]),
            max_audio_seconds=float(data["max_audio_seconds"]),
            max_speakers=int(data["max_speakers"]),
            hears_audio=bool(data.get("hears_audio", True)),  # artifacts before the key all heard
        )


@dataclass(frozen=True)
class PreparedUtterance:
    """One utterance ready for batching: unpadded token ids and waveform (placeholders when missing)."""

    token_ids: np.ndarray  # int64 [L], L >= 2
    has_text: bool
    audio: np.ndarray  # float32 [N], N >= 1
    has_audio: bool

    @property
    def bucket_key(self) -> tuple[int, int]:
        return len(self.audio), len(self.token_ids)


@dataclass(frozen=True)
class EncoderBatch:
    """Inputs of encoder.onnx for B utterances."""

    input_ids: np.ndarray  # int64 [B, L]
    attention_mask: np.ndarray  # int64 [B, L]
    audio: np.ndarray  # float32 [B, N]
    audio_lengths: np.ndarray  # int64 [B]
    has_text: np.ndarray  # bool [B]
    has_audio: np.ndarray  # bool [B]

    def __len__(self) -> int:
        return len(self.audio_lengths)

    def feeds(self) -> dict[str, np.ndarray]:
        return _feeds(self)


@dataclass(frozen=True)
class PackedTextBatch:
    """Inputs of encoder.packed.onnx for B utterances without audio, their T tokens end to end, unpadded
    (model.text_encoder.TextEncoder.forward_packed says what each holds)."""

    token_ids: np.ndarray  # int64 [T]
    positions: np.ndarray  # int64 [T]
    row_tokens: np.ndarray  # int64 [B, L]
    row_mask: np.ndarray  # bool [B, L]
    token_slots: np.ndarray  # int64 [T]
    has_text: np.ndarray  # bool [B]

    def __len__(self) -> int:
        return len(self.has_text)

    def feeds(self) -> dict[str, np.ndarray]:
        return _feeds(self)


@dataclass(frozen=True)
class ContextBatch:
    """Inputs of context.onnx for B dialogues padded to T turns."""

    embeddings: np.ndarray  # float32 [B, T, D]
    speakers: np.ndarray  # int64 [B, T]
    turn_mask: np.ndarray  # bool [B, T]
    causal: np.ndarray  # bool []

    def __len__(self) -> int:
        return len(self.turn_mask)

    def feeds(self) -> dict[str, np.ndarray]:
        return _feeds(self)


def _feeds(batch: EncoderBatch | PackedTextBatch | ContextBatch) -> dict[str, np.ndarray]:
    # Not dataclasses.asdict: it deep-copies every array.
    return {field.name: getattr(batch, field.name) for field in fields(batch)}


class Preprocessor:
    """Tokeniser + audio checks + padding, configured by one artifact."""

    def __init__(self, tokenizer: Tokenizer, config: PreprocessingConfig) -> None:
        self.config = config
        self.tokenizer = tokenizer
        # tokenizer.json files often carry fixed padding (MiniLM's pads to 128); padding happens per batch here.
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(max_length=config.max_tokens)
        self._placeholder_ids = np.asarray(self.tokenizer.encode("").ids, dtype=np.int64)

    @classmethod
    def from_file(cls, tokenizer_json: Path | str, config: PreprocessingConfig) -> Preprocessor:
        return cls(Tokenizer.from_file(str(tokenizer_json)), config)

    def tokenize(self, texts: Sequence[str | None]) -> list[tuple[np.ndarray, bool]]:
        """Token ids and has_text per text; None or blank text gives the [CLS][SEP] placeholder."""
        present = [i for i, text in enumerate(texts) if is_present(text)]
        encodings = self.tokenizer.encode_batch([texts[i] for i in present]) if present else []
        tokens: list[tuple[np.ndarray, bool]] = [(self._placeholder_ids, False)] * len(texts)
        for i, encoding in zip(present, encodings, strict=True):
            tokens[i] = (np.asarray(encoding.ids, dtype=np.int64), True)
        return tokens

    def waveform(self, audio: np.ndarray | None) -> tuple[np.ndarray, bool]:
        """A decoded waveform cut to max_audio_seconds, and has_audio; None or empty gives one zero sample."""
        if audio is None:
            return _EMPTY_AUDIO, False
        wave = np.asarray(audio, dtype=np.float32)
        if wave.ndim != 1:
            raise PreprocessError(f"audio must be a 1-D mono waveform, got shape {wave.shape}")
        if wave.size == 0:
            return _EMPTY_AUDIO, False
        wave = wave[: self.config.max_samples]
        if not np.isfinite(wave).all():
            raise PreprocessError("audio contains non-finite samples (NaN or infinity)")
        return wave, True

    def prepare(self, texts: Sequence[str | None], audios: Sequence[np.ndarray | None]) -> list[PreparedUtterance]:
        if len(texts) != len(audios):
            raise PreprocessError(f"{len(texts)} texts but {len(audios)} audio entries")
        tokens = self.tokenize(texts)
        waves = [self.waveform(audio) for audio in audios]
        if not self.config.hears_audio:
            pairs = enumerate(zip(texts, audios, strict=True))
            if unheard := [i for i, (text, audio) in pairs if not heard(False, text, audio)]:
                raise DeafModelError(
                    f"this model was trained on text alone and does not recognise audio: utterance {unheard[0]} "
                    f"(of {len(texts)}) has audio and no text"
                )
            waves = [(_EMPTY_AUDIO, False)] * len(waves)  # every clip is beside text: scored as the text alone
        return [PreparedUtterance(ids, has_text, *wave) for (ids, has_text), wave in zip(tokens, waves, strict=True)]

    def speaker_indices(self, speakers: Sequence[str | None]) -> np.ndarray:
        return speaker_indices(speakers, self.config.max_speakers)


def speaker_indices(speakers: Sequence[str | None], max_speakers: int) -> np.ndarray:
    """Per-dialogue speaker index: order of first appearance, clipped to max_speakers - 1. A missing speaker
    (None) counts as one more speaker of its own."""
    first_seen: dict[str | None, int] = {}
    indices = [first_seen.setdefault(speaker, len(first_seen)) for speaker in speakers]
    return np.minimum(np.asarray(indices, dtype=np.int64), max_speakers - 1)


def _pad(rows: Sequence[np.ndarray], dtype: type[np.generic]) -> np.ndarray:
    out = np.zeros((len(rows), max(len(row) for row in rows)), dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def collate(utterances: Sequence[PreparedUtterance]) -> EncoderBatch:
    """Pad a batch of prepared utterances (token padding id 0, audio zero padding)."""
    if not utterances:
        raise PreprocessError("cannot build an encoder batch of no utterances")
    token_lengths = np.array([len(u.token_ids) for u in utterances], dtype=np.int64)
    return EncoderBatch(
        input_ids=_pad([u.token_ids for u in utterances], np.int64),
        attention_mask=(np.arange(token_lengths.max())[None, :] < token_lengths[:, None]).astype(np.int64),
        audio=_pad([u.audio for u in utterances], np.float32),
        audio_lengths=np.array([len(u.audio) for u in utterances], dtype=np.int64),
        has_text=np.array([u.has_text for u in utterances], dtype=bool),
        has_audio=np.array([u.has_audio for u in utterances], dtype=bool),
    )


def pack(utterances: Sequence[PreparedUtterance]) -> PackedTextBatch:
    """The tokens of utterances without audio, end to end (encoder.packed.onnx's inputs)."""
    if not utterances:
        raise PreprocessError("cannot build an encoder batch of no utterances")
    if any(u.has_audio for u in utterances):
        raise PreprocessError("the packed text path scores utterances without audio only")
    lengths = np.array([len(u.token_ids) for u in utterances], dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    columns = np.arange(lengths.max())
    row_mask = columns[None, :] < lengths[:, None]
    return PackedTextBatch(
        token_ids=np.concatenate([u.token_ids for u in utterances]),
        positions=np.concatenate([columns[:length] for length in lengths]),
        row_tokens=np.where(row_mask, starts[:, None] + columns[None, :], lengths.sum()),
        row_mask=row_mask,
        token_slots=np.flatnonzero(row_mask),
        has_text=np.array([u.has_text for u in utterances], dtype=bool),
    )


def context_batch(dialogues: Sequence[tuple[np.ndarray, np.ndarray]], causal: bool) -> ContextBatch:
    """Pad dialogues (embeddings [T, D], speaker indices [T]) to the longest one."""
    if not dialogues:
        raise PreprocessError("cannot build a context batch of no dialogues")
    turns = max(len(embeddings) for embeddings, _ in dialogues)
    dim = dialogues[0][0].shape[1]
    embeddings = np.zeros((len(dialogues), turns, dim), dtype=np.float32)
    speakers = np.zeros((len(dialogues), turns), dtype=np.int64)
    turn_mask = np.zeros((len(dialogues), turns), dtype=bool)
    for row, (vectors, indices) in enumerate(dialogues):
        embeddings[row, : len(vectors)] = vectors
        speakers[row, : len(indices)] = indices
        turn_mask[row, : len(vectors)] = True
    return ContextBatch(embeddings, speakers, turn_mask, np.array(causal))


def length_buckets(
    keys: Sequence[tuple[int, ...]] | Sequence[int],
    max_batch_size: int,
    call_cost: float = 0.0,
    weights: Sequence[float] | None = None,
) -> list[np.ndarray]:
    """Split item indices into batches of at most max_batch_size, sorting by key (lengths) so each batch holds
    items of similar length. The batches together are a permutation of range(len(keys)).

    With `call_cost` 0 the sorted order is cut every max_batch_size items. Otherwise it is cut where the total cost
    is least: a batch is padded to its longest key, so a short item beside a long one pays for the
    long one, while every extra batch pays `call_cost`; `weights` price each key column (default 1 each)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
    if call_cost < 0:
        raise ValueError(f"call_cost must be >= 0, not {call_cost}")
    if len(keys) == 0:
        return []
    columns = np.asarray(keys, dtype=np.int64).reshape(len(keys), -1)
    order = np.lexsort(columns.T[::-1])  # lexsort sorts by its last key first
    if call_cost == 0:
        return [order[start : start + max_batch_size] for start in range(0, len(order), max_batch_size)]
    prices = np.ones(columns.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    if prices.shape != (columns.shape[1],) or (prices < 0).any():
        raise ValueError(f"weights must be {columns.shape[1]} non-negative numbers, one per key column")
    cuts = _cheapest_cuts(columns[order].astype(np.float64), prices, max_batch_size, call_cost)
    return [order[start:end] for start, end in itertools.pairwise(cuts)]


def _cheapest_cuts(sorted_keys: np.ndarray, weights: np.ndarray, max_batch_size: int, call_cost: float) -> list[int]:
    """Batch boundaries over sorted keys minimising the summed cost (dynamic programming: the best cost of the
    first j items is the best, over the last batch's start i, of the first i items' plus that batch's)."""
    n = len(sorted_keys)
    best, start_of = np.zeros(n + 1), np.zeros(n + 1, dtype=np.int64)
    for end in range(1, n + 1):
        starts = np.arange(max(0, end - max_batch_size), end)
        # The longest key of each candidate batch starts..end-1: a running maximum from the end backwards.
        longest = np.maximum.accumulate(sorted_keys[starts[0] : end][::-1], axis=0)[::-1]
        totals = best[starts] + call_cost + (end - starts) * (longest @ weights)
        pick = int(totals.argmin())
        best[end], start_of[end] = totals[pick], starts[pick]
    cuts = [n]
    while cuts[-1] > 0:
        cuts.append(int(start_of[cuts[-1]]))
    return cuts[::-1]


def in_original_order(buckets: Sequence[np.ndarray], results: Iterable[Sequence[T]]) -> list[T]:
    """Undo `length_buckets`: per-bucket results (one per index, in bucket order) back into input order."""
    placed: dict[int, T] = {}
    for indices, values in zip(buckets, results, strict=True):
        if len(values) != len(indices):
            raise ValueError(f"a bucket of {len(indices)} items gave {len(values)} results")
        placed.update(zip(indices.tolist(), values, strict=True))
    return [placed[i] for i in range(len(placed))]
