"""Trained deltas: what a run changed on top of the pinned pretrained text encoder, stored small.

A model whose text encoder is partly trained differs from the pinned package only in its trainable top layers
and in the parts trained here (audio encoder, fusion, context, heads). The delta holds exactly those tensors
(float16 by default, safetensors) plus the model config, so a default model can ship in a few MB and be
assembled offline from the package (verified by hash when it loads) and the delta (verified by its own sha256).
A random text encoder (the tiny test network) cannot be rebuilt from a package, so its delta holds all of it.

An artifact carries the same delta in float32 as `weights.safetensors` (`save_weights`): the PyTorch state its
graphs were exported from, with the training recipe in the file's metadata, so that fine-tuning (retraining
tier 3) can start from the model the artifact serves.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model.network import EmotionModel, ModelConfig

TEXT_PREFIX = "encoder.text."
DELTA_FILE = "delta.safetensors"
CONFIG_FILE = "config.json"
RECIPE_METADATA = "recipe"  # weights.safetensors metadata key: the training recipe as JSON


class DeltaError(ValueError):
    """The delta does not fit the model it is applied to."""


def frozen_text_keys(model: EmotionModel) -> set[str]:
    """State keys of the text encoder's frozen (pretrained, untouched) parameters and buffers; none for a random
    text encoder, which no package can restore."""
    if model.config.text_encoder != "minilm":
        return set()
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
    return applied(config, load_file(str(delta_dir / DELTA_FILE)), str(delta_dir))


def applied(config: ModelConfig, delta: Mapping[str, torch.Tensor], source: str) -> EmotionModel:
    """The model of `config` (pinned pretrained text encoder) with `delta` applied, in float32, eval mode;
    `source` names the delta in errors."""
    model = EmotionModel(config)
    state = model.state_dict()
    expected = set(state) - frozen_text_keys(model)
    if set(delta) != expected:
        missing, extra = sorted(expected - set(delta)), sorted(set(delta) - expected)
        raise DeltaError(f"{source}: delta does not fit the model (missing {missing[:5]}, extra {extra[:5]})")
    for key, value in delta.items():
        if value.shape != state[key].shape:
            raise DeltaError(f"{source}: {key} has shape {tuple(value.shape)}, model {tuple(state[key].shape)}")
    model.load_state_dict({k: v.to(state[k].dtype) for k, v in delta.items()}, strict=False)
    return model.eval()


def save_weights(model: EmotionModel, path: Path, recipe: Mapping[str, Any] | None = None) -> Path:
    """The float32 delta of `model` as one safetensors file, with the training recipe (a `Recipe.to_dict()`) in
    its metadata when given: an artifact's `weights.safetensors`."""
    metadata = {RECIPE_METADATA: json.dumps(recipe, sort_keys=True)} if recipe is not None else None
    save_file(trained_delta(model, torch.float32), str(path), metadata=metadata)
    return path


def load_weights(path: Path, config: ModelConfig) -> EmotionModel:
    """The model of `config` with the weights file at `path` applied (float32, eval mode)."""
    return applied(config, load_file(str(path)), str(path))


def weights_recipe(path: Path) -> dict[str, Any] | None:
    """The training recipe recorded in a weights file, if any."""
    with safe_open(str(path), framework="pt") as handle:
        recorded = (handle.metadata() or {}).get(RECIPE_METADATA)
    return None if recorded is None else json.loads(recorded)
