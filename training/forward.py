"""The forward pass piece by piece, as the loop runs it, and a session's predictions on a split.

Text arrives as cached pooled features, cached states of the frozen bottom layers or token ids; the audio encoder
runs only on rows that have audio; `UtteranceEncoder.fuse` then joins the two streams exactly as the exported
encoder graph does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from transformers.masking_utils import create_bidirectional_mask

from model.network import EmotionModel
from model.text_encoder import TextEncoder, mean_pool
from training.calibration import apply_temperature
from training.datasets import Batch, eval_steps, frozen_layers
from training.metrics import MetricsReport, compute_metrics, minority_classes
from training.session import Session

MODES = {"bidirectional": False, "causal": True}  # context mode -> the head's `causal` flag

Recombine = Callable[[Tensor, Tensor, Batch], tuple[Tensor, Tensor]]


def encode_text(text: TextEncoder, mask: Tensor, ids: Tensor | None = None, states: Tensor | None = None,
                pool: Tensor | None = None, chunk: int = 32) -> Tensor:  # fmt: skip
    """Pooled text of every row from token ids, or from `states` entering the first trainable layer, pooled over
    `pool` (default: every token); run in chunks of similar length (a dialogue batch mixes 3- and 60-token turns)."""
    pool = mask if pool is None else pool
    lengths = mask.sum(dim=1)
    order = lengths.argsort()
    parts = []
    for rows in order.split(chunk):
        width = int(lengths[rows].max().clamp(min=1))
        m, p = mask[rows, :width], pool[rows, :width]
        parts.append(text(ids[rows, :width], m, p) if states is None else top_layers(text, states[rows, :width], m, p))
    return torch.cat(parts)[order.argsort()]


def top_layers(text: TextEncoder, states: Tensor, mask: Tensor, pool: Tensor | None = None) -> Tensor:
    """The trainable top layers of the text encoder + its mean pooling (over `pool`, default every token), from
    cached bottom-layer states."""
    allowed = create_bidirectional_mask(config=text.bert.config, inputs_embeds=states, attention_mask=mask)
    for layer in text.bert.encoder.layer[frozen_layers(text) :]:
        states = layer(states, allowed)
    return mean_pool(states, mask if pool is None else pool)


def utterance_embeddings(model: EmotionModel, batch: Batch, recombine: Recombine | None = None) -> Tensor:
    """[N, D] fused embedding of every utterance of the batch."""
    encoder = model.encoder
    if batch.text_features is not None:
        text = batch.text_features
    else:
        text = encode_text(encoder.text, batch.attention_mask, batch.input_ids, batch.text_states, batch.pool_mask)
    audio = text.new_zeros(len(text), encoder.audio.dim)
    if len(batch.audio_rows):
        audio = audio.index_put((batch.audio_rows,), encoder.audio(batch.audio, batch.audio_lengths).to(audio.dtype))
    if recombine is not None:
        text, audio = recombine(text, audio, batch)
    return encoder.fuse(text, audio, batch.has_text, batch.has_audio)


def contextual_features(model: EmotionModel, batch: Batch, embeddings: Tensor, causal: bool) -> Tensor:
    """[N, D] classifier input of every utterance: its embedding plus its dialogue context."""
    dialogues = embeddings[batch.turn_index]
    causal_flag = torch.tensor(causal, device=embeddings.device)
    features = model.head.contextualise(dialogues, batch.speakers, batch.turn_mask, causal_flag)
    return features[batch.turn_mask]  # row-major over [B, T] = the batch's utterance order


# ---- predictions of a session --------------------------------------------------------------------------------


class Predictions(NamedTuple):
    emotion: Tensor  # [N, C] logits, table order (float32, CPU)
    sentiment: Tensor  # [N, S]
    features: Tensor  # [N, D] classifier inputs


@torch.inference_mode()
def predict(s: Session, split: str, causal: bool) -> Predictions:
    s.model.eval()
    collator, parts = s.collators[split], []
    for dialogues in eval_steps(s.tables[split], 4 * s.recipe.optim.batch_dialogues):
        batch = collator(dialogues).to(s.device)
        with torch.autocast(s.device.type, dtype=torch.float16, enabled=s.amp):
            features = contextual_features(s.model, batch, utterance_embeddings(s.model, batch), causal)
            emotion, sentiment = s.model.head.classify(features)
        parts.append([t.float().cpu() for t in (emotion, sentiment, features)])
    if not parts:
        empty = torch.zeros(0, s.num_emotions)
        return Predictions(empty, torch.zeros(0, s.num_sentiments), torch.zeros(0, s.model.config.embed_dim))
    return Predictions(*(torch.cat(column) for column in zip(*parts, strict=True)))


def report(s: Session, labels: np.ndarray, logits: Tensor, temperature: float = 1.0) -> MetricsReport:
    probs = torch.softmax(apply_temperature(logits, temperature), dim=1)
    minority = minority_classes(s.counts, s.recipe.model.emotions)
    return compute_metrics(labels, logits.argmax(dim=1), s.recipe.model.emotions, probs, minority)


def dev_selection(s: Session) -> tuple[np.ndarray, Predictions]:
    """Rows used for model selection and tuning: the monitored group of dev (MELD dev when MELD is trained)."""
    rows = s.tables["dev"].groups()[s.monitor_group]
    dev = predict(s, "dev", causal=False)
    return rows, Predictions(*(t[rows] for t in dev))
