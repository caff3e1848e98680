"""The emotion network: utterance encoder (text + audio, missing-modality fusion) and dialogue context head.

The two halves match the two ONNX graphs of docs/ARCHITECTURE.md; `EmotionModel` joins them for training.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

from model.audio_encoder import AudioEncoder, TransformerBlock, key_mask
from model.labels import EMOTIONS, SENTIMENTS, LabelSet
from model.preprocess import LATE_FLAGS
from model.text_encoder import TextEncoder, pretrained_dir, tiny_bert_config
from model.whisper_encoder import MIN_SAMPLES, WHISPER_DIM, WhisperEncoder, load_whisper_encoder, masked_mean

TEXT_ENCODERS = ("minilm", "tiny")
SPEECH_ENCODERS = ("scratch", "whisper-tiny.en")  # "scratch": the small AudioEncoder of the first releases
FUSIONS = ("gate", "late")  # "gate": the learned gate of the first releases; "late": docs/SPEECH.md's rule


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
    # Speech branch and fusion. The defaults are the first releases' (configs without these keys load as before).
    speech_encoder: str = "scratch"
    speech_layers: tuple[int, ...] = (2, 3)  # Whisper hidden states pooled (0: conv stem, k: layer k)
    fusion: str = "gate"
    audio_temperature: float = 1.0  # T_a of the audio head, fitted on dev speakers
    fusion_weight: float = 0.0  # w of late fusion, fitted on dev under a text floor
    audio_prior: tuple[float, ...] = ()  # the audio head's training class prior; () = uniform (class-balanced)

    def __post_init__(self) -> None:
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder must be one of {TEXT_ENCODERS}, not {self.text_encoder!r}")
        if self.speech_encoder not in SPEECH_ENCODERS:
            raise ValueError(f"speech_encoder must be one of {SPEECH_ENCODERS}, not {self.speech_encoder!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, not {self.fusion!r}")
        if self.fusion == "gate" and self.speech_encoder != "scratch":
            raise ValueError("gate fusion reads the scratch audio encoder; Whisper features need fusion 'late'")
        if not (0.0 <= self.fusion_weight <= 1.0) or not self.audio_temperature > 0:
            raise ValueError(f"need 0 <= fusion_weight <= 1 and audio_temperature > 0: {self}")
        if self.audio_prior and len(self.audio_prior) != len(self.emotions):
            raise ValueError(f"audio_prior has {len(self.audio_prior)} values for {len(self.emotions)} emotions")
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
    def utterance_dim(self) -> int:
        """Width of the encoder graph's embedding: late fusion appends the audio evidence and the two flags."""
        return self.embed_dim + (len(self.emotions) + LATE_FLAGS if self.fusion == "late" else 0)

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
        self.speech_encoder = config.speech_encoder
        self.text = text
        self.audio = _scratch_audio_encoder(config)
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
        speech = torch.where(has_audio[:, None], self.audio_proj(audio), self.missing_audio)
        return self.mix(text, speech, has_text)

    def without_audio(self, text: torch.Tensor, has_text: torch.Tensor) -> torch.Tensor:
        """`forward`'s embedding of utterances that have no audio, from their pooled text [B, hidden] (the packed
        text path, model/export.py)."""
        return self.mix(text, self.missing_audio.expand(has_text.shape[0], -1), has_text)

    def mix(self, text: torch.Tensor, speech: torch.Tensor, has_text: torch.Tensor) -> torch.Tensor:
        text = torch.where(has_text[:, None], self.text_proj(text), self.missing_text)
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

    late = False  # LateFusionHead: a third output, the text head's logits

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.embed_dim
        self.input_size = config.utterance_dim
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


# How an emotion's probability counts towards sentiment when only audio is heard (MELD's label sets); surprise is
# either, split evenly. An emotion not listed spreads evenly over the sentiments.
EMOTION_SENTIMENT: dict[str, dict[str, float]] = {
    "neutral": {"neutral": 1.0},
    "joy": {"positive": 1.0},
    "surprise": {"positive": 0.5, "negative": 0.5},
    **{name: {"negative": 1.0} for name in ("anger", "sadness", "disgust", "fear")},
}


def emotion_to_sentiment(emotions: tuple[str, ...], sentiments: tuple[str, ...]) -> torch.Tensor:
    """[C_emotion, C_sentiment] row-stochastic map from emotion to sentiment probabilities."""
    rows = []
    for emotion in emotions:
        shares = EMOTION_SENTIMENT.get(emotion, {})
        if not set(shares) <= set(sentiments) or not shares:
            shares = {name: 1.0 / len(sentiments) for name in sentiments}
        rows.append([shares.get(name, 0.0) for name in sentiments])
    return torch.tensor(rows, dtype=torch.float32)


class AudioEmotionHead(nn.Module):
    """Pooled speech features [B, F] -> emotion logits [B, C] (trained by training/, read here)."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(features)
        self.linear = nn.Linear(features, classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))


class SpeechFeatures(nn.Module):
    """Waveform [B, N] + lengths [B] -> pooled speech features [B, F]: the frozen Whisper encoder's masked means
    of `layers`, concatenated, or the scratch AudioEncoder's pooled output."""

    def __init__(self, config: ModelConfig, pretrained: bool = True) -> None:
        super().__init__()
        self.layers = config.speech_layers
        if config.speech_encoder == "whisper-tiny.en":
            self.encoder: nn.Module = load_whisper_encoder() if pretrained else _whisper_architecture()
            self.encoder.requires_grad_(False)
            self.size = WHISPER_DIM * len(self.layers)
        else:
            self.encoder = _scratch_audio_encoder(config)
            self.size = config.audio_dim

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.encoder, WhisperEncoder):
            return self.encoder(audio, lengths)
        # A batch without audio carries one placeholder sample per row; the front end needs MIN_SAMPLES.
        audio = F.pad(audio, (0, torch.sym_max(0, MIN_SAMPLES - audio.shape[1])))
        out = self.encoder(audio, lengths)
        pooled = masked_mean(out.hidden_states[:, list(self.layers)], out.frame_mask)
        return pooled.flatten(1)


def _whisper_architecture() -> WhisperEncoder:
    return WhisperEncoder(n_mels=80, dim=WHISPER_DIM, heads=6, layers=4, ff_mult=4, positions=1500)


def _scratch_audio_encoder(config: ModelConfig) -> AudioEncoder:
    return AudioEncoder(
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


class LateFusionEncoder(UtteranceEncoder):
    """Encoder graph of late fusion: [B, D + C + 2] = the text model's embedding (its audio always missing),
    the calibrated audio evidence audio_logits / T_a - log prior_a (0 without audio), has_text, has_audio.

    The text path is the gate encoder's with audio absent, so the text model's weights load unchanged (its
    scratch audio encoder and projection stay in the state but are not in the graph)."""

    def __init__(self, config: ModelConfig, text: TextEncoder, pretrained: bool = True) -> None:
        super().__init__(config, text)
        self.speech = SpeechFeatures(config, pretrained)
        self.audio_head = AudioEmotionHead(self.speech.size, len(config.emotions))
        self.audio_temperature = config.audio_temperature
        prior = torch.tensor(config.audio_prior or [1.0 / len(config.emotions)] * len(config.emotions))
        self.register_buffer("audio_log_prior", prior.log(), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        audio: torch.Tensor,
        audio_lengths: torch.Tensor,
        has_text: torch.Tensor,
        has_audio: torch.Tensor,
    ) -> torch.Tensor:
        text = super().without_audio(self.text(input_ids, attention_mask), has_text)
        return torch.cat([text, self.audio_evidence(audio, audio_lengths, has_audio), _flags(has_text, has_audio)], -1)

    def without_audio(self, text: torch.Tensor, has_text: torch.Tensor) -> torch.Tensor:
        mixed = super().without_audio(text, has_text)
        no_evidence = mixed.new_zeros(mixed.shape[0], len(self.audio_log_prior))
        return torch.cat([mixed, no_evidence, _flags(has_text, torch.zeros_like(has_text))], -1)

    def audio_evidence(self, audio: torch.Tensor, lengths: torch.Tensor, has_audio: torch.Tensor) -> torch.Tensor:
        logits = self.audio_head(self.speech(audio, lengths)) / self.audio_temperature - self.audio_log_prior
        return torch.where(has_audio[:, None], logits, 0.0)


def _flags(has_text: torch.Tensor, has_audio: torch.Tensor) -> torch.Tensor:
    return torch.stack([has_text, has_audio], dim=-1).to(torch.float32)


class LateFusionHead(ContextHead):
    """Context graph of late fusion: the text model's context head on the text part of each embedding, then
    per turn: text and audio: text_logits + w * evidence; audio only: the evidence (the calibrated audio logits),
    text only or neither: text_logits unchanged. Sentiment stays the text head's where text is present; audio only
    maps the audio emotion probabilities to sentiment (EMOTION_SENTIMENT). The third output is the text head's
    logits, where the retraining tiers find the classifier they replace."""

    late = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.split = (config.embed_dim, len(config.emotions), LATE_FLAGS)
        self.fusion_weight = config.fusion_weight
        self.register_buffer(
            "sentiment_map", emotion_to_sentiment(config.emotions, config.sentiments), persistent=False
        )

    def forward(  # type: ignore[override]
        self, embeddings: torch.Tensor, speakers: torch.Tensor, turn_mask: torch.Tensor, causal: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        text, evidence, flags = embeddings.split(self.split, dim=-1)
        text_logits, text_sentiment = super().forward(text, speakers, turn_mask, causal)
        emotion = fuse_late(text_logits, evidence, flags, self.fusion_weight)
        audio_sentiment = torch.log(torch.softmax(evidence, dim=-1) @ self.sentiment_map + 1e-6)
        return emotion, torch.where(_audio_only(flags), audio_sentiment, text_sentiment), text_logits


def fuse_late(text_logits: torch.Tensor, evidence: torch.Tensor, flags: torch.Tensor, weight: float) -> torch.Tensor:
    """Late fusion's emotion logits per turn: text and audio: text_logits + weight * evidence; audio only: the
    evidence; text only or neither: text_logits. `flags` are the embedding's (has_text, has_audio)."""
    has_audio = (flags[..., 1] > 0.5)[..., None]
    fused = torch.where(has_audio, text_logits + weight * evidence, text_logits)
    return torch.where(_audio_only(flags), evidence, fused)


def _audio_only(flags: torch.Tensor) -> torch.Tensor:
    has_text, has_audio = (flags > 0.5).unbind(-1)
    return (has_audio & ~has_text)[..., None]


class ModelOutput(NamedTuple):
    emotion_logits: torch.Tensor  # [B, T, C_emotion]
    sentiment_logits: torch.Tensor  # [B, T, C_sentiment]
    embeddings: torch.Tensor  # [B, T, D] utterance embeddings gathered into dialogues


class EmotionModel(nn.Module):
    """Utterance encoder + context head with a one-call forward for training."""

    def __init__(self, config: ModelConfig, pretrained_text: bool = True) -> None:
        super().__init__()
        self.config = config
        text = build_text_encoder(config, pretrained_text)
        if config.fusion == "late":
            self.encoder: UtteranceEncoder = LateFusionEncoder(config, text, pretrained_text)
            self.head: ContextHead = LateFusionHead(config)
        else:
            self.encoder, self.head = UtteranceEncoder(config, text), ContextHead(config)
        self.encoder.text.set_trainable_layers(config.text_trainable_layers)

    def audio_modules(self) -> tuple[nn.Module, ...]:
        """What turns audio into the served outputs, encoder first: the scratch encoder and its projection (gate
        fusion), or the Whisper features and the audio head (late fusion)."""
        encoder = self.encoder
        if isinstance(encoder, LateFusionEncoder):
            return encoder.speech, encoder.audio_head
        return encoder.audio, encoder.audio_proj

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
        emotion, sentiment = self.head(embeddings, speakers, turn_mask, torch.as_tensor(causal))[:2]
        return ModelOutput(emotion, sentiment, embeddings)
