"""Trained deltas: what a run changed on top of the pinned pretrained text encoder, stored small.

A model whose text encoder is partly trained differs from the pinned package only in its trainable top layers
and in the parts trained here (audio encoder, fusion, context, heads). The delta holds exactly those tensors
(float16 by default, safetensors) plus the model config, so a default model can ship in a few MB and be
assembled offline from the package (verified by hash when it loads) and the delta (verified by its own sha256).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.network import EmotionModel, ModelConfig

TEXT_PREFIX = "encoder.text."
DELTA_FILE = "delta.safetensors"
CONFIG_FILE = "config.json"


class DeltaError(ValueError):
    """The delta does not fit the model it is applied to."""


def frozen_text_keys(model: EmotionModel) -> set[str]:
    """State keys of the text encoder's frozen (pretrained, untouched) parameters and buffers."""
    text = model.encoder.text
    trainable = {name for name, p in text.named_parameters() if p.requires_grad}
    layers = {name.split(".")[3] for name in trainable if name.startswith("bert.encoder.layer.")}
    keys = set()
    for name in text.state_dict():
        in_trained_layer = name.startswith("bert.encoder.layer.") and name.split(".")[3] in layers
        if name not in trainable and not in_trained_layer:
            keys.add(TEXT_PREFIX + name)
    return keys


def trained_delta(model: EmotionModel, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state except the frozen pretrained text encoder's (floats cast to `dtype`)."""
    if model.config.text_encoder != "minilm":
        raise DeltaError("a delta is relative to the pinned pretrained text encoder; this model has a random one")
    frozen = frozen_text_keys(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k not in frozen}
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def save_delta(model: EmotionModel, out_dir: Path, dtype: torch.dtype = torch.float16) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(trained_delta(model, dtype), str(out_dir / DELTA_FILE))
    (out_dir / CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=1), encoding="utf-8")
    return out_dir / DELTA_FILE


def load_delta(delta_dir: Path) -> EmotionModel:
    """The pinned pretrained model (hash-checked as it loads) with the delta applied, in float32, eval mode."""
    config = ModelConfig.from_dict(json.loads((delta_dir / CONFIG_FILE).read_text(encoding="utf-8")))
    model = EmotionModel(config)
    delta = load_file(str(delta_dir / DELTA_FILE))
    state = model.state_dict()
    expected = set(state) - frozen_text_keys(model)
    if set(delta) != expected:
        missing, extra = sorted(expected - set(delta)), sorted(set(delta) - expected)
        raise DeltaError(f"{delta_dir}: delta does not fit the model (missing {missing[:5]}, extra {extra[:5]})")
    for key, value in delta.items():
        if value.shape != state[key].shape:
            raise DeltaError(f"{delta_dir}: {key} has shape {tuple(value.shape)}, model {tuple(state[key].shape)}")
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in delta.items()}, strict=False)
    return model.eval()
