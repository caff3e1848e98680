"""The PyTorch network behind a registered artifact, and the recipe it was trained with: where fine-tuning
(tier 3) starts.

An artifact holds ONNX graphs; its PyTorch state is found, in this order:
1. its own `weights.safetensors` (model/artifact.py): every artifact exported from a PyTorch model carries it,
   with the training recipe in its metadata (tier-3 candidates and the assembled default included), and tiers
   1 and 2 hand it on unchanged;
2. the shipped default release (model/default/), when the artifact is that release assembled before its
   artifacts carried weights: the delta, sha256-checked, on the pinned text encoder, with the release's recipe.
Anything else (an artifact written from graphs alone) is refused: fine-tuning a network rebuilt from random
weights would serve a random audio encoder.

The emotion classifier is then read from the artifact's context.onnx (the cheap tiers rewrite it there), and the
network must reproduce the artifact's own encoder and context graphs on the parity probes (text, audio, both,
neither) within the export tolerance, so tier 3 provably starts from the model that serves. An artifact without
a recorded recipe is fine-tuned with the shipped recipe (training/recipes/default.toml) on its own network.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from model.artifact import ModelArtifact
from model.default_model import read_release, release_model
from model.delta import DeltaError, load_weights, weights_recipe
from model.export import PARITY_TOLERANCE
from model.network import EmotionModel
from retraining.graphs import read_head
from retraining.parity import TorchReference, parity
from retraining.queue import PermanentError
from training.recipe import Recipe, RecipeError, load_recipe

SHIPPED_RECIPE = "default"  # training/recipes/default.toml


@dataclass(frozen=True)
class ChampionWeights:
    model: EmotionModel  # float32, eval mode, the emotion classifier of context.onnx
    recipe: Recipe  # the champion's training recipe, with the champion's network config
    weights_source: str
    recipe_source: str
    parity: float  # max |PyTorch - ONNX Runtime| against the artifact's own graphs

    def describe(self) -> dict[str, Any]:
        return {
            "weights": self.weights_source,
            "recipe": self.recipe_source,
            "parity_with_champion_graphs": self.parity,
        }


def champion_weights(artifact: ModelArtifact) -> ChampionWeights:
    """The network and recipe of `artifact`, checked against its graphs; PermanentError when there are none."""
    model, recipe, weights_source = _network(artifact)
    if model.config != artifact.model_config():
        raise PermanentError(f"{weights_source} hold another network config than {artifact.version}'s config.json")
    head = read_head(artifact.context_path)
    with torch.no_grad():
        model.head.emotion_head.weight.copy_(torch.from_numpy(head.weight))
        model.head.emotion_head.bias.copy_(torch.from_numpy(head.bias))
    diff = parity(artifact, TorchReference(model), artifact)
    if not diff <= PARITY_TOLERANCE:
        raise PermanentError(
            f"{weights_source} do not reproduce {artifact.version}'s graphs (max |PyTorch - ONNX Runtime| = "
            f"{diff:.3g} > {PARITY_TOLERANCE}); tier 3 would not start from the model that serves"
        )
    chosen, recipe_source = _recipe(recipe, artifact)
    return ChampionWeights(model.eval(), chosen, weights_source, recipe_source, diff)


def _network(artifact: ModelArtifact) -> tuple[EmotionModel, dict[str, Any] | None, str]:
    path = artifact.weights_path
    if path is not None:
        try:
            return (
                load_weights(path, artifact.model_config()),
                weights_recipe(path),
                f"{artifact.version}'s {path.name}",
            )
        except (DeltaError, ValueError) as error:
            raise PermanentError(f"{artifact.version}'s {path.name} does not fit its network: {error}") from error
    release = read_release()["version"]
    if artifact.version == release:
        model, recipe = release_model()
        return model, recipe, f"the shipped release {release} (model/default/)"
    raise PermanentError(
        f"tier 3 fine-tunes from the champion's PyTorch weights, and {artifact.version} carries none (no "
        f"weights.safetensors, and it is not the shipped release {release}); register an artifact exported from a "
        "PyTorch model (`equipoise export`), or retrain with tier 1 or 2"
    )


def _recipe(recorded: dict[str, Any] | None, artifact: ModelArtifact) -> tuple[Recipe, str]:
    """The recorded recipe (else the shipped one), on the artifact's network config."""
    if recorded is None:
        recipe, source = (
            load_recipe(SHIPPED_RECIPE),
            f"the shipped recipe {SHIPPED_RECIPE} ({artifact.version} records none)",
        )
    else:
        try:
            recipe = Recipe.from_dict(recorded, where=f"{artifact.version}'s recipe")
        except RecipeError as error:
            raise PermanentError(str(error)) from error
        source = f"{artifact.version}'s recipe {recipe.name!r}"
    return dataclasses.replace(recipe, model=artifact.model_config()), source
