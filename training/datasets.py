"""Training data: MELD dialogues and acted-speech clips as one table of turns per split, cached encoder inputs
(frozen text-encoder outputs, decoded waveforms), the per-epoch batch plan, and collation into network inputs.

A speech clip is a one-turn dialogue with its lexically neutral sentence as text and no sentiment label
(sentiment -1, masked in the loss). Turn labels are class indices of the model's label sets.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from model.audio import SAMPLE_RATE, decode_audio
from model.context_input import EncoderInput
from model.data.meld import group_dialogues, read_utterances
from model.data.speech import read_clips, split_by_speaker
from model.labels import LabelSet
from model.network import ModelConfig
from model.text_encoder import TextEncoder
from training.recipe import DataConfig
from training.samplers import Sampler, epoch_indices

SPLITS = ("train", "dev", "test")
NO_LABEL = -1


@dataclass(frozen=True)
class TurnTable:
    """The turns of one split, dialogue after dialogue; dialogue d is rows starts[d]:starts[d + 1]."""

    split: str
    corpus: tuple[str, ...]  # per turn: "meld", "ravdess", "tess" or "emodb"
    texts: tuple[str, ...]
    audio: tuple[Path | None, ...]
    speakers: np.ndarray  # speaker index within the dialogue, in order of first appearance
    emotions: np.ndarray
    sentiments: np.ndarray  # NO_LABEL where the corpus has none
    starts: np.ndarray  # [dialogues + 1]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_dialogues(self) -> int:
        return len(self.starts) - 1

    @property
    def dialogue_of(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_dialogues), np.diff(self.starts))

    def groups(self) -> dict[str, np.ndarray]:
        """Rows per report group: "meld" and "speech" (all acted-speech corpora), those present."""
        group = np.array(["meld" if c == "meld" else "speech" for c in self.corpus])
        return {name: np.flatnonzero(group == name) for name in ("meld", "speech") if (group == name).any()}


def load_tables(data_dir: Path, data: DataConfig, config: ModelConfig) -> dict[str, TurnTable]:
    """train / dev / test tables: MELD's splits and the speaker-independent splits of the speech corpora."""
    speech = {corpus: split_by_speaker(read_clips(data_dir, corpus)) for corpus in data.speech}
    tables = {}
    for split in SPLITS:
        rows: list[tuple] = []  # (corpus, text, audio, speaker, emotion, sentiment, dialogue number)
        if data.meld:
            dialogues = _head(group_dialogues(read_utterances(data_dir, split)), data.max_dialogues)
            for number, dialogue in enumerate(dialogues):
                rows += [("meld", u.text, None, u.speaker, u.emotion, u.sentiment, number) for u in dialogue.utterances]
        for splits in speech.values():
            for clip in _head(getattr(splits, split), data.max_dialogues):
                number = rows[-1][6] + 1 if rows else 0
                rows.append((clip.corpus, clip.text, clip.path, clip.speaker, clip.emotion, None, number))
        tables[split] = _table(split, rows, config)
    return tables


def _head(items: Sequence, limit: int) -> Sequence:
    return items[:limit] if limit else items


def _table(split: str, rows: list, config: ModelConfig) -> TurnTable:
    emotions, sentiments = LabelSet(config.emotions), LabelSet(config.sentiments)
    keys = [row[6] for row in rows]
    starts = np.flatnonzero(np.r_[True, np.array(keys[1:]) != np.array(keys[:-1])]) if rows else np.zeros(0, int)
    speakers: list[int] = []
    for start, end in zip(starts, np.r_[starts[1:], len(rows)], strict=True):
        order: dict[str, int] = {}
        speakers += [order.setdefault(row[3], len(order)) for row in rows[start:end]]
    return TurnTable(
        split=split,
        corpus=tuple(row[0] for row in rows),
        texts=tuple(row[1] for row in rows),
        audio=tuple(row[2] for row in rows),
        speakers=np.array(speakers, dtype=np.int64),
        emotions=np.array([emotions.index(row[4]) for row in rows], dtype=np.int64),
        sentiments=np.array([NO_LABEL if row[5] is None else sentiments.index(row[5]) for row in rows], np.int64),
        starts=np.r_[starts, len(rows)].astype(np.int64),
    )


# ---- caches -------------------------------------------------------------------------------------------------


def module_sha256(module: torch.nn.Module) -> str:
    """sha256 over a module's state (names, dtypes, shapes and bytes): identifies the weights actually used."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _sha256(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def frozen_layers(encoder: TextEncoder) -> int:
    """How many bottom transformer layers of the text encoder are frozen (with frozen embeddings below them)."""
    if any(p.requires_grad for p in encoder.bert.embeddings.parameters()):
        return 0
    layers = encoder.bert.encoder.layer
    return next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())), len(layers))


def text_features(
    encoder: TextEncoder, tokenizer: Tokenizer, texts: Sequence[EncoderInput], cache_dir: Path | None
) -> Tensor:
    """[N, H] pooled outputs of a frozen text encoder, computed once per (weights, tokenizer, max tokens, texts)
    and stored under `cache_dir/text/` (recomputed when `cache_dir` is None)."""
    table, index = _cached(encoder, tokenizer, texts, cache_dir, "pooled", lambda u: _encode(encoder, tokenizer, u))
    return table[torch.tensor([index[t] for t in texts], dtype=torch.long)]


@dataclass(frozen=True)
class TextStates:
    """Token states of texts after the frozen bottom layers of the text encoder, ragged: text i is rows
    offsets[i]:offsets[i + 1] of `states` (float16), pooled from its token pool_starts[i] on."""

    states: Tensor  # [tokens, H]
    offsets: Tensor  # [texts + 1]
    pool_starts: Tensor  # [texts] 0, or where the current turn starts in an input with earlier turns
    layer: int  # the first layer still to run

    def padded(self, rows: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """[N, L, H] float32 states, [N, L] attention mask and [N, L] pooling mask of the given texts."""
        lengths = (self.offsets[1:] - self.offsets[:-1])[list(rows)]
        out = torch.zeros(len(rows), int(lengths.max()), self.states.shape[1])
        for slot, row in enumerate(rows):
            out[slot, : lengths[slot]] = self.states[self.offsets[row] : self.offsets[row + 1]]
        position = torch.arange(out.shape[1])[None]
        mask = (position < lengths[:, None]).long()
        return out, mask, mask * (position >= self.pool_starts[list(rows)][:, None]).long()


def text_states(
    encoder: TextEncoder, tokenizer: Tokenizer, texts: Sequence[EncoderInput], cache_dir: Path | None
) -> TextStates:
    """Like `text_features` for a partly trainable encoder: the states entering its first trainable layer, so
    that training runs only the top layers (the encoder runs without dropout, so this is exact)."""
    layer = frozen_layers(encoder)
    table, index = _cached(
        encoder, tokenizer, texts, cache_dir, f"states{layer}", lambda u: _states(encoder, tokenizer, u, layer)
    )
    parts = [table["states"][table["offsets"][index[t]] : table["offsets"][index[t] + 1]] for t in texts]
    lengths = torch.tensor([0] + [len(p) for p in parts])
    starts = table.get("pool_starts", torch.zeros(len(index), dtype=torch.long))  # caches of single turns lack it
    return TextStates(torch.cat(parts), lengths.cumsum(0), starts[[index[t] for t in texts]], layer)


def _cached(encoder: TextEncoder, tokenizer: Tokenizer, texts: Sequence[EncoderInput], cache_dir: Path | None,
            kind: str, compute: Callable[[list], Any]) -> tuple[Any, dict[EncoderInput, int]]:  # fmt: skip
    unique = sorted(set(texts), key=_input_order)
    max_tokens = (tokenizer.truncation or {}).get("max_length", 0)
    key = _sha256(module_sha256(encoder), tokenizer.to_str(), str(max_tokens), kind, json.dumps(unique))
    path = None if cache_dir is None else Path(cache_dir) / "text" / f"{key[:32]}.pt"
    if path is not None and path.is_file():
        table = torch.load(path, map_location="cpu")
    else:
        table = compute(unique)
        if path is not None:
            _save_tensor(table, path)
    return table, {text: i for i, text in enumerate(unique)}


def _input_order(text: EncoderInput) -> tuple[str, ...]:
    """Sort key: single texts in plain string order (the cache keys of runs without earlier turns), pairs after."""
    return ("", text) if isinstance(text, str) else ("\uffff", *text)


def _length_batches(
    tokenizer: Tokenizer, texts: list[EncoderInput], batch_size: int
) -> Iterator[tuple[list[int], Tensor, Tensor, Tensor]]:
    size = [len(t) if isinstance(t, str) else len(t[0]) + len(t[1]) for t in texts]
    order = sorted(range(len(texts)), key=size.__getitem__)  # similar lengths, little padding
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield rows, *tokenize(tokenizer, [texts[i] for i in rows])


@torch.inference_mode()
def _encode(encoder: TextEncoder, tokenizer: Tokenizer, texts: list[EncoderInput], batch_size: int = 64) -> Tensor:
    was_training = encoder.training
    encoder.eval()
    out = torch.zeros(len(texts), encoder.hidden_size)
    for rows, ids, mask, pool in _length_batches(tokenizer, texts, batch_size):
        out[rows] = encoder(ids, mask, pool).float()
    encoder.train(was_training)
    return out


@torch.inference_mode()
def _states(
    encoder: TextEncoder, tokenizer: Tokenizer, texts: list[EncoderInput], layer: int, batch_size: int = 64
) -> dict:
    was_training = encoder.training
    encoder.eval()
    parts: list[Tensor] = [torch.zeros(0)] * len(texts)
    pool_starts = torch.zeros(len(texts), dtype=torch.long)
    for rows, ids, mask, pool in _length_batches(tokenizer, texts, batch_size):
        hidden = encoder.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[layer]
        for slot, row in enumerate(rows):
            parts[row] = hidden[slot, : int(mask[slot].sum())].half()
            pool_starts[row] = int(pool[slot].argmax())
    encoder.train(was_training)
    lengths = torch.tensor([0] + [len(p) for p in parts])
    return {"states": torch.cat(parts), "offsets": lengths.cumsum(0), "pool_starts": pool_starts}


def tokenize(tokenizer: Tokenizer, texts: Sequence[EncoderInput]) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids, attention mask and pooling mask (the current turn's tokens: the second segment of a pair)."""
    encodings = tokenizer.encode_batch(list(texts))
    ids = torch.tensor([e.ids for e in encodings], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.long)
    second = torch.tensor([e.type_ids for e in encodings], dtype=torch.long) * mask
    return ids, mask, torch.where(second.any(dim=1, keepdim=True), second, mask)


def load_waveforms(paths: Sequence[Path | None], max_seconds: float, cache_dir: Path | None) -> list[np.ndarray | None]:
    """Decoded 16 kHz waveforms cut to `max_seconds`, cached (float16) under `cache_dir/audio/` and keyed by the
    files' paths, sizes and modification times."""
    present = sorted({p for p in paths if p is not None})
    if not present:
        return [None] * len(paths)
    stamp = [f"{p}|{p.stat().st_size}|{p.stat().st_mtime_ns}" for p in present]
    key = _sha256(*stamp, str(max_seconds), str(SAMPLE_RATE))
    path = None if cache_dir is None else Path(cache_dir) / "audio" / f"{key[:32]}.npz"
    limit = int(max_seconds * SAMPLE_RATE)
    if path is not None and path.is_file():
        with np.load(path) as stored:
            samples, offsets = stored["samples"], stored["offsets"]
    else:
        waves = [decode_audio(p)[:limit].astype(np.float16) for p in present]
        offsets = np.cumsum([0] + [len(w) for w in waves])
        samples = np.concatenate(waves)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path.with_suffix(".tmp.npz"), samples=samples, offsets=offsets)
            path.with_suffix(".tmp.npz").replace(path)
    index = {p: i for i, p in enumerate(present)}
    return [None if p is None else samples[offsets[index[p]] : offsets[index[p] + 1]] for p in paths]


def _save_tensor(tensor: Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(tensor, tmp)
    tmp.replace(path)


# ---- batches ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """N utterances (rows of a table, dialogue after dialogue) and the dialogues they form.

    Text comes as cached pooled outputs, cached states of the frozen bottom layers, or tokens. Audio is only
    carried for the rows that have it (`audio_rows`). `draw` lists the utterances the training loss covers
    (positions in the batch, repeated when the sampler drew a turn more than once); evaluation covers every row.
    """

    rows: Tensor  # [N] table rows
    text_features: Tensor | None  # [N, H] pooled outputs of a frozen text encoder
    text_states: Tensor | None  # [N, L, H] states entering the first trainable text layer
    input_ids: Tensor | None  # [N, L]
    attention_mask: Tensor | None  # [N, L], for text_states or input_ids
    pool_mask: Tensor | None  # [N, L] the tokens the text encoder pools (the current turn's)
    audio: Tensor  # [A, S]
    audio_lengths: Tensor  # [A]
    audio_rows: Tensor  # [A] positions in the batch
    has_text: Tensor  # [N] bool
    has_audio: Tensor  # [N] bool
    turn_index: Tensor  # [B, T] position of each turn (0 where padding)
    speakers: Tensor  # [B, T]
    turn_mask: Tensor  # [B, T] bool
    emotions: Tensor  # [N], NO_LABEL where not trained on
    sentiments: Tensor  # [N], NO_LABEL where absent
    draw: Tensor  # [M]

    def to(self, device: torch.device) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: v.to(device, non_blocking=True) for k, v in moved.items() if v is not None})


TextSource = Tensor | TextStates | Tokenizer  # pooled features, bottom-layer states, or tokens


class Collator:
    """Builds `Batch`es from dialogue numbers of one table."""

    def __init__(
        self, table: TurnTable, text: TextSource, waveforms: Sequence[np.ndarray | None],
        inputs: Sequence[EncoderInput] | None = None,
    ) -> None:  # fmt: skip
        """`inputs`: the text encoder's input of each turn, when not the turn's own text (`TextSource` tokens)."""
        self.table, self.text, self.waveforms = table, text, waveforms
        self.inputs = table.texts if inputs is None else inputs

    def __call__(
        self, dialogues: Sequence[int], labels: np.ndarray | None = None, draw: np.ndarray | None = None
    ) -> Batch:
        """`labels` replaces the table's emotions (relabelled or dropped samples); `draw` holds table rows."""
        table = self.table
        spans = [(int(table.starts[d]), int(table.starts[d + 1])) for d in dialogues]
        rows = np.concatenate([np.arange(a, b) for a, b in spans])
        lengths = np.array([b - a for a, b in spans])
        turn_mask = np.arange(lengths.max())[None] < lengths[:, None]
        turn_index = np.zeros(turn_mask.shape, dtype=np.int64)
        turn_index[turn_mask] = np.arange(len(rows))
        speakers = np.zeros(turn_mask.shape, dtype=np.int64)
        speakers[turn_mask] = table.speakers[rows]
        position = np.full(len(table), -1)
        position[rows] = np.arange(len(rows))
        labels = table.emotions if labels is None else labels
        return Batch(
            rows=torch.from_numpy(rows),
            **self._text(rows),
            **self._audio(rows),
            has_text=torch.ones(len(rows), dtype=torch.bool),
            turn_index=torch.from_numpy(turn_index),
            speakers=torch.from_numpy(speakers),
            turn_mask=torch.from_numpy(turn_mask),
            emotions=torch.from_numpy(labels[rows]),
            sentiments=torch.from_numpy(table.sentiments[rows]),
            draw=torch.from_numpy(np.arange(len(rows)) if draw is None else position[draw]),
        )

    def _text(self, rows: np.ndarray) -> dict[str, Tensor | None]:
        keys = ("text_features", "text_states", "input_ids", "attention_mask", "pool_mask")
        out: dict[str, Tensor | None] = dict.fromkeys(keys)
        if isinstance(self.text, Tensor):
            out["text_features"] = self.text[rows]
        elif isinstance(self.text, TextStates):
            out["text_states"], out["attention_mask"], out["pool_mask"] = self.text.padded(rows.tolist())
        else:
            tokens = tokenize(self.text, [self.inputs[r] for r in rows])
            out["input_ids"], out["attention_mask"], out["pool_mask"] = tokens
        return out

    def _audio(self, rows: np.ndarray) -> dict[str, Tensor]:
        waves = [self.waveforms[r] for r in rows]
        present = [i for i, w in enumerate(waves) if w is not None]
        lengths = [len(waves[i]) for i in present]
        audio = np.zeros((len(present), max(lengths, default=1)), dtype=np.float32)
        for slot, i in enumerate(present):
            audio[slot, : lengths[slot]] = waves[i]
        has_audio = np.zeros(len(rows), dtype=bool)
        has_audio[present] = True
        return dict(
            audio=torch.from_numpy(audio),
            audio_lengths=torch.tensor(lengths, dtype=torch.long),
            audio_rows=torch.tensor(present, dtype=torch.long),
            has_audio=torch.from_numpy(has_audio),
        )


def plan_epoch(
    table: TurnTable, labels: np.ndarray, sampler: Sampler, epoch: int, seed: int, batch_dialogues: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(dialogues, drawn turns) per step. The sampler draws turns (as many as there are labelled turns); each
    dialogue holding a drawn turn is encoded once per epoch with its whole context, and the loss covers the turns
    drawn from it. So class-aware sampling works per utterance while the context head always sees real
    dialogues, and an epoch costs one pass over the dialogues whatever the sampler."""
    active = np.flatnonzero(labels >= 0)
    drawn = active[epoch_indices(sampler, labels[active], epoch, seed)]
    dialogue = table.dialogue_of[drawn]
    order = np.random.default_rng([seed, epoch, 7]).permutation(np.unique(dialogue))
    by_dialogue = {d: drawn[dialogue == d] for d in order}
    steps = [order[i : i + batch_dialogues] for i in range(0, len(order), batch_dialogues)]
    return [(step, np.concatenate([by_dialogue[d] for d in step])) for step in steps]


def eval_steps(table: TurnTable, batch_dialogues: int) -> list[np.ndarray]:
    order = np.arange(table.num_dialogues)
    return [order[i : i + batch_dialogues] for i in range(0, len(order), batch_dialogues)]
