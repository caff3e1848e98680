"""Recipes: a TOML file -> a typed, validated `Recipe`.

Layout: top-level `name`, `description`, optional `extends` (a recipe path relative to this file; its tables are
merged key by key, this file winning), then one table per section below. `[model]` takes the fields of
`model.network.ModelConfig` (plus `preset = "tiny"` for the small test network). In `[sampler]` and `[loss]`
every key but `name` is a parameter of the library builder (training/samplers.py `build_sampler`,
training/losses.py `build_loss`, which have no defaults of their own): the method's parameter dataclass here
(`SAMPLER_PARAMS`, `LOSS_PARAMS`) holds the defaults, and the method is checked by building it once. Any unknown
key is an error that names the key, the file and the keys allowed there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.data.speech import CORPORA
from model.network import ModelConfig
from training.common import ArrayLike
from training.losses import ImbalanceLoss, build_loss
from training.samplers import ClassShareSampler, build_sampler

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"
CONTEXT_MODES = ("random", "causal", "bidirectional")
MONITOR_METRICS = ("macro_f1", "weighted_f1", "accuracy", "balanced_accuracy", "minority_recall")
AUGMENT_METHODS = ("none", "mixup", "manifold_mixup", "balancemix", "smote")
DECOUPLED_METHODS = ("none", "crt", "tau_norm")
AMBIGUOUS = ("downweight", "drop", "keep")  # what label-noise handling does with an ambiguous label


class RecipeError(ValueError):
    """The recipe is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class DataConfig:
    meld: bool = True
    speech: tuple[str, ...] = ()  # acted-speech corpora trained alongside MELD (speaker-independent splits)
    max_audio_seconds: float = 6.0  # longer clips are cut (RAVDESS/TESS/EmoDB clips are 1.5-9 s)
    max_dialogues: int = 0  # > 0: only the first N dialogues (and clips) of each split, for smoke tests

    def __post_init__(self) -> None:
        unknown = set(self.speech) - set(CORPORA)
        _check(not unknown, f"data.speech: unknown corpora {sorted(unknown)}; known: {', '.join(CORPORA)}")
        _check(self.meld or bool(self.speech), "data: enable meld or at least one speech corpus")
        _check(self.max_audio_seconds > 0 and self.max_dialogues >= 0, "data: limits must be positive")


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 20
    batch_dialogues: int = 16  # dialogues per step (a speech clip is a one-turn dialogue)
    lr: float = 1e-3
    text_lr: float = 3e-5  # for the trainable top layers of the text encoder
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    grad_clip: float = 1.0
    # 0: warm-up then cosine decay. k > 0: warm-up, constant, then x lr_drop_factor from epoch k on (a step
    # schedule; LDAM-DRW starts its re-weighting at this drop)
    lr_drop_epoch: int = 0
    lr_drop_factor: float = 0.1

    def __post_init__(self) -> None:
        _check(self.epochs >= 1 and self.batch_dialogues >= 1, "optim: epochs and batch_dialogues must be >= 1")
        _check(self.lr > 0 and self.text_lr > 0 and self.warmup_epochs >= 0, "optim: rates must be positive")
        _check(0 <= self.lr_drop_epoch < self.epochs, "optim: lr_drop_epoch must lie in [0, epochs)")
        _check(0 < self.lr_drop_factor <= 1, "optim: lr_drop_factor must lie in (0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # mixed precision (autocast + GradScaler), CUDA only
    context: str = "random"  # per batch: random causal/bidirectional, or always one of them
    sentiment_weight: float = 0.5  # multi-task weight; clips without a sentiment label are masked
    modality_dropout: float = 0.2  # drop text or audio of a row that has both, with this probability
    monitor: str = "macro_f1"  # dev metric for model selection and early stopping (MELD dev when present)
    patience: int = 5  # epochs without improvement before stopping; 0 disables early stopping

    def __post_init__(self) -> None:
        _check(self.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, not {self.device!r}")
        _check(self.context in CONTEXT_MODES, f"train.context must be one of {CONTEXT_MODES}, not {self.context!r}")
        _check(self.monitor in MONITOR_METRICS, f"train.monitor must be one of {MONITOR_METRICS}")
        _check(0 <= self.modality_dropout <= 1 and self.patience >= 0, "train: modality_dropout in [0, 1]")


@dataclass(frozen=True)
class MethodConfig:
    """A library method by name plus its keyword parameters."""

    name: str
    params: Mapping[str, Any] = field(default_factory=dict)


# ---- method parameters: the defaults of every [loss] and [sampler] parameter ------------------------------------

# beta of Cui et al.'s effective-number class weights. At MELD's counts 0.9999 is almost inverse frequency; 0.999
# is the default here (not tuned on dev). LDAM-DRW keeps Cao et al.'s 0.9999.
CB_BETA = 0.999
DRW_BETA = 0.9999


@dataclass(frozen=True)
class NoParams:
    """A method without parameters."""


@dataclass(frozen=True)
class WeightedCEParams:
    scheme: str = "inverse"  # training/losses.py WEIGHT_SCHEMES
    beta: float = CB_BETA


@dataclass(frozen=True)
class FocalParams:
    gamma: float = 2.0
    alpha: str | list[float] | None = None  # None, a weight scheme name or per-class weights
    beta: float = CB_BETA


@dataclass(frozen=True)
class LDAMParams:
    max_margin: float = 0.5
    s: float = 30.0  # scale of the cosine logits (the emotion head becomes a cosine classifier)
    drw: bool = True  # deferred re-weighting from the recipe's optim.lr_drop_epoch on
    beta: float = DRW_BETA


@dataclass(frozen=True)
class LogitAdjustedParams:
    tau: float = 1.0
    prior: str = "per_corpus"  # each row adjusted by its own corpus's training prior; "pooled": all corpora's


@dataclass(frozen=True)
class ProgressiveParams:
    total_epochs: int | None = None  # None: the recipe's epochs


@dataclass(frozen=True)
class DevF1Params:
    q: float = 0.0
    power: float = 1.0
    floor: float = 0.1
    momentum: float = 0.0


LOSS_PARAMS: dict[str, type] = {
    "ce": NoParams,
    "soft_ce": NoParams,
    "weighted_ce": WeightedCEParams,
    "focal": FocalParams,
    "ldam": LDAMParams,
    "logit_adjusted": LogitAdjustedParams,
    "balanced_softmax": NoParams,
}
SAMPLER_PARAMS: dict[str, type] = {
    "instance": NoParams,
    "sqrt": NoParams,
    "class_balanced": NoParams,
    "progressive": ProgressiveParams,
    "dev_f1": DevF1Params,
}
SAMPLER_NAMES = tuple(SAMPLER_PARAMS)


def _method_params(method: MethodConfig, kinds: Mapping[str, type], what: str) -> dict[str, Any]:
    """Every parameter of the method: the recipe's values over the defaults of its parameter dataclass."""
    if method.name not in kinds:
        raise ValueError(f"unknown {what} {method.name!r}; expected one of {', '.join(kinds)}")
    kind = kinds[method.name]
    if kind is NoParams and method.params:
        raise TypeError(f"{what} {method.name!r} takes no parameters, got {sorted(method.params)}")
    return dataclasses.asdict(kind(**method.params))


def make_loss(method: MethodConfig, counts: ArrayLike, optim: OptimConfig | None = None) -> ImbalanceLoss:
    """The library loss with every parameter set (`LOSS_PARAMS` defaults where the recipe sets none). `counts` are
    `[C]` or per training corpus `[G, C]`. LDAM's deferred re-weighting starts at `optim.lr_drop_epoch`, so
    LDAM-DRW needs the recipe's `optim`."""
    params = _method_params(method, LOSS_PARAMS, "loss")
    if method.name == "ldam":
        drop = 0 if optim is None else optim.lr_drop_epoch
        if params.pop("drw") and not drop:
            raise ValueError("LDAM-DRW re-weights from the learning-rate drop: set optim.lr_drop_epoch, or drw = false")
        params["drw_epoch"] = drop or None
    return build_loss(method.name, counts, **params)


def make_sampler(method: MethodConfig, epochs: int) -> ClassShareSampler:
    """The library sampler with every parameter set (`SAMPLER_PARAMS` defaults where the recipe sets none);
    `progressive` defaults its schedule to the recipe's epochs."""
    params = _method_params(method, SAMPLER_PARAMS, "sampler")
    if method.name == "progressive" and params["total_epochs"] is None:
        params["total_epochs"] = epochs
    return build_sampler(method.name, **params)


@dataclass(frozen=True)
class AugmentConfig:
    method: str = "none"
    alpha: float = 0.4  # Beta(alpha, alpha) mixing weights (mixup, manifold mixup, BalanceMix)
    mix_at: tuple[int, ...] = ()  # 0: fused utterance embeddings, 1: contextual features; () = method default
    smote_k: int = 5
    cross_modal: float = 0.0  # probability of swapping audio between same-class clips that have both modalities

    def __post_init__(self) -> None:
        _check(self.method in AUGMENT_METHODS, f"augment.method must be one of {AUGMENT_METHODS}")
        _check(set(self.mix_at) <= {0, 1}, "augment.mix_at: levels are 0 (utterance) and 1 (context)")
        _check(0 <= self.cross_modal <= 1 and self.alpha >= 0, "augment: cross_modal in [0, 1], alpha >= 0")

    @property
    def levels(self) -> tuple[int, ...]:
        defaults = {"mixup": (0,), "manifold_mixup": (0, 1)}
        return self.mix_at or defaults.get(self.method, ())


@dataclass(frozen=True)
class DecoupledConfig:
    """Classifier stage after the main one, on frozen contextual features (Kang et al. 2020)."""

    method: str = "none"  # crt: re-train the emotion classifier with `sampler`; tau_norm: tau chosen on dev
    epochs: int = 30
    lr: float = 1e-3
    sampler: str = "class_balanced"

    def __post_init__(self) -> None:
        _check(self.method in DECOUPLED_METHODS, f"decoupled.method must be one of {DECOUPLED_METHODS}")
        _check(self.sampler in SAMPLER_NAMES[:3], "decoupled.sampler must be instance, sqrt or class_balanced")


@dataclass(frozen=True)
class PosthocConfig:
    """Corrections folded into the emotion classifier's bias after training."""

    logit_adjustment: str | float = "none"  # "none", "tune" (tau on dev for macro F1) or a fixed tau
    bias_tuning: bool = False  # per-class biases tuned on dev for macro F1

    def __post_init__(self) -> None:
        ok = isinstance(self.logit_adjustment, float) or self.logit_adjustment in ("none", "tune")
        _check(ok, f"posthoc.logit_adjustment must be 'none', 'tune' or a number, not {self.logit_adjustment!r}")


@dataclass(frozen=True)
class NoiseConfig:
    """BalanceMix-style label-noise handling: from `warmup_epochs` on, each epoch re-partitions the training
    labels (clean / relabel / ambiguous) with a per-class two-component GMM on the per-sample loss."""

    enabled: bool = False
    warmup_epochs: int = 3
    clean_threshold: float = 0.5
    relabel_confidence: float = 0.9
    # downweight: train on the given label with weight P(clean) (BalanceMix); drop: leave the sample out of the
    # epoch; keep: train on the given label with full weight
    ambiguous: str = "downweight"

    def __post_init__(self) -> None:
        _check(self.ambiguous in AMBIGUOUS, f"noise.ambiguous must be one of {AMBIGUOUS}")


@dataclass(frozen=True)
class ContrastiveConfig:
    """A supervised contrastive term (SupCon, training/losses.py `supervised_contrastive`) on the classifier inputs
    of the step's drawn turns with their labels, added to the loss times `weight` (0: off). Khosla et al. train
    through a projection head; here the term shapes the classifier inputs themselves."""

    weight: float = 0.0
    temperature: float = 0.1

    def __post_init__(self) -> None:
        _check(self.weight >= 0 and self.temperature > 0, "contrastive: weight >= 0 and temperature > 0")


@dataclass(frozen=True)
class DistillConfig:
    """Knowledge distillation (Hinton et al. 2015) from finished runs: the emotion loss becomes (1 − weight) x the
    recipe's loss + weight x `distillation_term` at `temperature`, against the teachers' softened probabilities
    averaged over `teachers` (run directories: absolute, or names beside this run's own directory). Empty: off."""

    teachers: tuple[str, ...] = ()
    weight: float = 0.5
    temperature: float = 2.0

    def __post_init__(self) -> None:
        _check(0 < self.weight <= 1 and self.temperature > 0, "distill: weight in (0, 1] and temperature > 0")


@dataclass(frozen=True)
class ContextInputConfig:
    """Earlier turns of the dialogue in the text encoder's input, EmoBERTa style (model/context_input.py): a turn
    is encoded as the pair (its earlier turns, itself), whole earlier turns kept newest first within `tokens` in
    all, and the encoder pools the turn's own tokens. 0: off (each turn alone). Training only for now: export
    refuses it, as serving builds single-turn inputs."""

    tokens: int = 0  # at most model.max_tokens
    turns: int = 8  # at most this many earlier turns

    def __post_init__(self) -> None:
        _check(self.tokens == 0 or self.tokens >= 16, "context_input.tokens: 0 (off) or at least 16")
        _check(self.turns >= 1, "context_input.turns must be >= 1")


@dataclass(frozen=True)
class SwaConfig:
    """Stochastic weight averaging (Izmailov et al. 2018): from epoch `from_epoch` on (0-based), the learning rates stay
    constant at `lr_factor` x the recipe's (the cosine decay before it ends there), the weights at the end of each
    epoch are folded into an equal-weight running average, and dev selection scores that average (the model that
    would ship). 0: off. The paper's batch-norm update has nothing to do here: the network uses layer norm only."""

    from_epoch: int = 0
    lr_factor: float = 0.5

    def __post_init__(self) -> None:
        _check(self.from_epoch >= 0, "swa.from_epoch must be >= 0 (0: off)")
        _check(0 < self.lr_factor <= 1, "swa.lr_factor must lie in (0, 1]")


# Sections added after runs existed: left out of `Recipe.to_dict` while off, so that earlier runs keep their digest.
OPTIONAL_SECTIONS = ("contrastive", "distill", "context_input", "swa")


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sampler: MethodConfig = field(default_factory=lambda: MethodConfig("instance"))
    loss: MethodConfig = field(default_factory=lambda: MethodConfig("ce"))
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    decoupled: DecoupledConfig = field(default_factory=DecoupledConfig)
    posthoc: PosthocConfig = field(default_factory=PosthocConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    context_input: ContextInputConfig = field(default_factory=ContextInputConfig)
    swa: SwaConfig = field(default_factory=SwaConfig)

    def __post_init__(self) -> None:
        mixed = self.augment.method != "none"
        _check(not (self.distill.teachers and mixed), "distill: teachers score real turns; set augment.method = none")
        tokens, most = self.context_input.tokens, self.model.max_tokens
        _check(tokens <= most, f"context_input.tokens ({tokens}) must not exceed model.max_tokens ({most})")
        swa, optim = self.swa.from_epoch, self.optim
        _check(swa < optim.epochs, f"swa.from_epoch ({swa}) must come before optim.epochs ({optim.epochs})")
        _check(not (swa and optim.lr_drop_epoch), "swa: its constant rate replaces the schedule; unset lr_drop_epoch")
        _check(not swa or swa >= optim.warmup_epochs, "swa.from_epoch must not fall inside the warm-up")

    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["model"] = self.model.to_dict()
        for section in ("sampler", "loss"):  # flat, as written in a recipe file
            data[section] = {"name": data[section].name, **data[section].params}
        for section in OPTIONAL_SECTIONS:
            if data[section] == type(data[section])():
                del data[section]
        return json.loads(json.dumps(_plain(data)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "recipe") -> Recipe:
        """Build and validate; `where` names the source in error messages."""
        _reject_unknown(data, {f.name for f in dataclasses.fields(cls)}, where)
        if "name" not in data or not isinstance(data["name"], str) or not data["name"]:
            raise RecipeError(f"{where}: a recipe needs a non-empty string `name`")
        sections: dict[str, Any] = {
            name: _section(kind, data.get(name, {}), f"{where} [{name}]") for name, kind in _SECTIONS.items()
        }
        for name in ("sampler", "loss"):  # an absent one keeps the field's default
            if name in data:
                sections[name] = _method(data[name], f"{where} [{name}]")
        recipe = cls(
            name=data["name"], description=str(data.get("description", "")), model=_model(data, where), **sections
        )
        _validate_methods(recipe, where)
        return recipe

    def with_seed(self, seed: int) -> Recipe:
        return dataclasses.replace(self, train=dataclasses.replace(self.train, seed=seed))

    def digest(self) -> str:
        """sha256 of the resolved recipe: a run directory belongs to exactly one."""
        return _sha256_json(self.to_dict())

    def training_digest(self) -> str:
        """sha256 of what shapes the epochs (not the name, nor the stages after them): runs that differ only in
        their decoupled / post-hoc stage share checkpoints."""
        after = ("name", "description", "decoupled", "posthoc")
        return _sha256_json({k: v for k, v in self.to_dict().items() if k not in after})


def _sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "augment": AugmentConfig,
    "decoupled": DecoupledConfig,
    "posthoc": PosthocConfig,
    "noise": NoiseConfig,
    "contrastive": ContrastiveConfig,
    "distill": DistillConfig,
    "context_input": ContextInputConfig,
    "swa": SwaConfig,
}


def load_recipe(path: Path | str) -> Recipe:
    """Read a recipe file (a bare name such as "default" is looked up in training/recipes/)."""
    return Recipe.from_dict(read_recipe_table(resolve_recipe_path(path)), where=str(path))


def resolve_recipe_path(path: Path | str) -> Path:
    candidate = Path(path)
    if not candidate.exists() and candidate.suffix == "" and (RECIPES_DIR / f"{candidate}.toml").is_file():
        candidate = RECIPES_DIR / f"{candidate}.toml"
    if not candidate.is_file():
        raise RecipeError(f"recipe {path}: file not found (bundled recipes: {', '.join(bundled_recipes())})")
    return candidate.resolve()


def bundled_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml") if not p.stem.startswith("_"))


def read_recipe_table(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The TOML table of `path` with its `extends` chain merged in (the file itself wins)."""
    if path in _seen:
        raise RecipeError(f"recipe {path}: `extends` cycle through {', '.join(map(str, _seen))}")
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as error:
        raise RecipeError(f"recipe {path}: not valid TOML ({error})") from None
    parent = table.pop("extends", None)
    if parent is None:
        return table
    if not isinstance(parent, str):
        raise RecipeError(f"recipe {path}: `extends` must be a file name")
    return merge_tables(read_recipe_table((path.parent / parent).resolve(), (*_seen, path)), table)


def merge_tables(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        both_tables = isinstance(value, dict) and isinstance(base.get(key), dict)
        # A method table with a new name replaces the parent's (its parameters belong to the old method).
        same_method = both_tables and value.get("name", base[key].get("name")) == base[key].get("name")
        merged[key] = merge_tables(base[key], value) if both_tables and same_method else value
    return merged


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RecipeError(message)


def _reject_unknown(table: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise RecipeError(f"{where}: unknown key(s) {names}; allowed: {', '.join(sorted(known))}")


def _section(kind: type, table: Any, where: str) -> Any:
    if not isinstance(table, Mapping):
        raise RecipeError(f"{where}: expected a table")
    hints = typing.get_type_hints(kind)
    _reject_unknown(table, set(hints), where)
    values = {key: _coerce(value, hints[key], f"{where} {key}") for key, value in table.items()}
    try:
        return kind(**values)
    except RecipeError as error:
        raise RecipeError(f"{where}: {error}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """TOML value -> the annotated type (int, float, bool, str, tuple[X, ...] and unions of those)."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        if typing.get_origin(option) is tuple and isinstance(value, list):
            item = typing.get_args(option)[0]
            return tuple(_coerce(v, item, where) for v in value)
        if typing.get_origin(option) is dict and isinstance(value, dict):
            return dict(value)
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option in (int, str, bool) and type(value) is option:
            return value
    raise RecipeError(f"{where}: expected {_type_name(hint)}, got {value!r}")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _method(table: Any, where: str) -> MethodConfig:
    if not isinstance(table, Mapping) or not isinstance(table.get("name"), str):
        raise RecipeError(f"{where}: expected a table with a string `name`")
    params = {k: list(v) if isinstance(v, list) else v for k, v in table.items() if k != "name"}
    return MethodConfig(table["name"], params)


def _model(data: Mapping[str, Any], where: str) -> ModelConfig:
    where = f"{where} [model]"
    table = data.get("model", {})
    if not isinstance(table, Mapping):
        raise RecipeError(f"{where}: expected a table")
    hints = typing.get_type_hints(ModelConfig)
    _reject_unknown(table, {*hints, "preset"}, where)
    preset = table.get("preset", "default")
    if preset not in ("default", "tiny"):
        raise RecipeError(f"{where}: preset must be 'default' or 'tiny', not {preset!r}")
    values = {k: _coerce(v, hints[k], f"{where} {k}") for k, v in table.items() if k != "preset"}
    try:
        return ModelConfig.tiny(**values) if preset == "tiny" else ModelConfig(**values)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"{where}: {error}") from None


def _validate_methods(recipe: Recipe, where: str) -> None:
    """Build the sampler and the loss once with dummy counts so unknown names or parameters fail now."""
    counts = np.arange(1, len(recipe.model.emotions) + 1) * 10
    builds = {
        "sampler": lambda: make_sampler(recipe.sampler, recipe.optim.epochs),
        "loss": lambda: make_loss(recipe.loss, counts, recipe.optim),
    }
    for section, build in builds.items():
        try:
            build()
        except (TypeError, ValueError, KeyError) as error:
            raise RecipeError(f"{where} [{section}] {getattr(recipe, section).name!r}: {error}") from None


def _plain(value: Any) -> Any:
    """Dataclasses, mappings and tuples -> JSON-able dicts and lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value
