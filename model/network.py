"""The emotion network: utterance encoder (text + audio, missing-modality fusion) and dialogue context head.

The two halves match the two ONNX graphs of docs/ARCHITECTURE.md; `EmotionModel` joins them for training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from transformers import BertConfig, BertModel

from model.audio_encoder import AudioEncoder, TransformerBlock, key_mask
from model.labels import EMOTIONS, SENTIMENTS, LabelSet
from model.text_encoder import TextEncoder, pretrained_dir, tiny_bert_config

TEXT_ENCODERS = ("minilm", "tiny")


@dataclass(frozen=True)
class ModelConfig:
    """Every hyperparameter of the network, plus the label sets; round-trips through a JSON-able dict."""

    emotions: tuple[str, ...] = EMOTIONS
    sentiments: tuple[str, ...] = SENTIMENTS
    text_encoder: str = "minilm"  # "minilm": the pinned pretrained package; "tiny": random BERT (tests)
    tiny_text: dict[str, int] = field(
        default_factory=lambda: {"hidden": 32, "layers": 2, "heads": 2, "intermediate": 64}
    )
    text_trainable_layers: int = 2
    max_tokens: int = 128
    sample_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    n_mels: int = 64
    audio_dim: int = 128
    audio_layers: int = 2
    audio_heads: int = 4
    embed_dim: int = 256
    context_layers: int = 2
    context_heads: int = 4
    max_speakers: int = 8
    ff_mult: int = 2
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder must be one of {TEXT_ENCODERS}, not {self.text_encoder!r}")
        LabelSet(self.emotions)  # raises on duplicate or empty names
        LabelSet(self.sentiments)

    @classmethod
    def tiny(cls, **overrides: Any) -> ModelConfig:
        """A small random model for fast tests (~1M parameters, nearly all the tiny BERT's vocabulary table)."""
        small = dict(
            text_encoder="tiny",
            n_mels=16,
            audio_dim=16,
            audio_layers=1,
            audio_heads=2,
            embed_dim=16,
            context_layers=1,
            context_heads=2,
            max_speakers=4,
            dropout=0.0,
        )
        return cls(**{**small, **overrides})

    @property
    def emotion_labels(self) -> LabelSet:
        return LabelSet(self.emotions)

    @property
    def sentiment_labels(self) -> LabelSet:
        return LabelSet(self.sentiments)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def build_text_encoder(config: ModelConfig, pretrained: bool = True) -> TextEncoder:
    """The text encoder of `config`; pretrained=False builds the architecture only (a checkpoint follows)."""
    if config.text_encoder == "tiny":
        return TextEncoder.tiny(tiny_bert_config(**config.tiny_text))
    if pretrained:
        return TextEncoder.pretrained()
    bert_config = BertConfig.from_json_file(pretrained_dir() / "config.json")
    return TextEncoder(BertModel(bert_config, add_pooling_layer=False))


class UtteranceEncoder(nn.Module):
    """Encoder graph: text + audio of each utterance -> fused embedding [B, D].

    A missing modality is replaced by a learned embedding (torch.where, so its input, even NaN, cannot leak);
    a gate then mixes the two streams.
    """

    def __init__(self, config: ModelConfig, text: TextEncoder) -> None:
        super().__init__()
        dim = config.embed_dim
        self.text = text
        self.audio = AudioEncoder(
            sample_rate=config.sample_rate,
            n_fft=config.n_fft,
            hop_length=config.hop_length,
            n_mels=config.n_mels,
            dim=config.audio_dim,
            layers=config.audio_layers,
            heads=config.audio_heads,
            ff_mult=config.ff_mult,
            dropout=config.dropout,
        )
        self.text_proj = nn.Linear(text.hidden_size, dim)
        self.audio_proj = nn.Linear(config.audio_dim, dim)
        self.missing_text = nn.Parameter(torch.randn(dim) * 0.02)
        self.missing_audio = nn.Parameter(torch.randn(dim) * 0.02)
        self.gate = nn.Linear(2 * dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(config.dropout)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        audio: torch.Tensor,
        audio_lengths: torch.Tensor,
        has_text: torch.Tensor,
        has_audio: torch.Tensor,
    ) -> torch.Tensor:
        return self.fuse(self.text(input_ids, attention_mask), self.audio(audio, audio_lengths), has_text, has_audio)

    def fuse(
        self, text: torch.Tensor, audio: torch.Tensor, has_text: torch.Tensor, has_audio: torch.Tensor
    ) -> torch.Tensor:
        """[B, D] fused embedding from the two encoders' outputs ([B, hidden] pooled text, [B, audio_dim]); the
        training loop calls it directly with cached text features."""
        text = torch.where(has_text[:, None], self.text_proj(text), self.missing_text)
        speech = torch.where(has_audio[:, None], self.audio_proj(audio), self.missing_audio)
        gate = torch.sigmoid(self.gate(torch.cat([text, speech], dim=-1)))
        return self.norm(self.drop(gate * text + (1 - gate) * speech))


def sinusoidal_positions(length: int, dim: int, device: torch.device) -> torch.Tensor:
    """[length, dim] fixed sinusoidal turn-position encoding (no maximum dialogue length)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(1e4) / dim))
    angle = position * rate
    return torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)[:, :dim]


def turn_permissions(turn_mask: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """[B, T] real turns + scalar causal flag -> [B, T, T] may-attend mask (key real; past only when causal)."""
    turns = turn_mask.shape[1]
    past = torch.ones(turns, turns, dtype=torch.bool, device=turn_mask.device).tril()
    return key_mask(turn_mask) & (past | ~causal) | torch.eye(turns, dtype=torch.bool, device=turn_mask.device)


class ContextHead(nn.Module):
    """Context graph: utterance embeddings [B, T, D] + speakers -> emotion and sentiment logits per turn."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.max_speakers = config.max_speakers
        self.speaker = nn.Embedding(config.max_speakers, dim)
        self.blocks = nn.ModuleList(
            [
                TransformerBlock(dim, config.context_heads, config.ff_mult, config.dropout)
                for _ in range(config.context_layers)
            ]
        )
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(config.dropout)
        self.emotion_head = nn.Linear(dim, len(config.emotions))
        self.sentiment_head = nn.Linear(dim, len(config.sentiments))

    def contextualise(
        self, embeddings: torch.Tensor, speakers: torch.Tensor, turn_mask: torch.Tensor, causal: torch.Tensor
    ) -> torch.Tensor:
        """[B, T, D] features fed to the heads: the utterance embedding plus its dialogue context."""
        batch, turns, dim = embeddings.shape
        x = embeddings + self.speaker(speakers.clamp(0, self.max_speakers - 1))
        x = x + sinusoidal_positions(turns, dim, embeddings.device)
        allowed = turn_permissions(turn_mask, torch.as_tensor(causal, dtype=torch.bool))
        for block in self.blocks:
            x = block(x, allowed)
        return embeddings + self.norm(x)

    def classify(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.drop(features)
        return self.emotion_head(features), self.sentiment_head(features)

    def forward(
        self, embeddings: torch.Tensor, speakers: torch.Tensor, turn_mask: torch.Tensor, causal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.classify(self.contextualise(embeddings, speakers, turn_mask, causal))


class ModelOutput(NamedTuple):
    emotion_logits: torch.Tensor  # [B, T, C_emotion]
    sentiment_logits: torch.Tensor  # [B, T, C_sentiment]
    embeddings: torch.Tensor  # [B, T, D] utterance embeddings gathered into dialogues


class EmotionModel(nn.Module):
    """Utterance encoder + context head with a one-call forward for training."""

    def __init__(self, config: ModelConfig, pretrained_text: bool = True) -> None:
        super().__init__()
        self.config = config
        self.encoder = UtteranceEncoder(config, build_text_encoder(config, pretrained_text))
        self.head = ContextHead(config)
        self.encoder.text.set_trainable_layers(config.text_trainable_layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        audio: torch.Tensor,
        audio_lengths: torch.Tensor,
        has_text: torch.Tensor,
        has_audio: torch.Tensor,
        turn_index: torch.Tensor,
        speakers: torch.Tensor,
        turn_mask: torch.Tensor,
        causal: bool | torch.Tensor = False,
    ) -> ModelOutput:
        """Utterance tensors hold N utterances; turn_index [B, T] picks each turn's row (ignored when padding)."""
        utterances = self.encoder(input_ids, attention_mask, audio, audio_lengths, has_text, has_audio)
        embeddings = utterances[turn_index.clamp(0, utterances.shape[0] - 1)]
        emotion, sentiment = self.head(embeddings, speakers, turn_mask, torch.as_tensor(causal))
        return ModelOutput(emotion, sentiment, embeddings)
