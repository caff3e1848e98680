"""The model artifact: one flat directory holding everything needed to serve a model, with a manifest of hashes.

    encoder.onnx, encoder.int8.onnx (optional), context.onnx   the graphs of docs/ARCHITECTURE.md
    tokenizer.json                                              the text tokenizer
    config.json                     {"format", "version", "model": ModelConfig dict (label sets included),
                                     "preprocessing": {max_tokens, sample_rate, max_audio_seconds, max_speakers}}
    calibration.json                {"temperature", "sentiment_temperature", "estimation_weights"}: served
                                    probs = softmax(logits / T); optionally (older artifacts lack it) the record of
                                    what the model was trained and calibrated on (`Calibration`): "training_prior",
                                    "dev_prior", "posterior" (bias-corrected temperature scaling), "dev_reference"
                                    (confusion and class-mix covariance on dev) and "temperature_source"
    reference_distribution.json     {emotion: predicted share on dev} for drift monitoring ({} if not measured)
    metrics.json, MODEL_CARD.md
    weights.safetensors (optional)  the PyTorch state the graphs were exported from (model/delta.py `save_weights`:
                                    float32 delta on the pinned text encoder, training recipe in its metadata);
                                    fine-tuning starts from it. The emotion classifier is read from context.onnx,
                                    which the cheap retraining tiers rewrite without touching this file.
    manifest.json                   {"format", "files": {name: {"sha256", "size"}}}, every other file

The manifest is written last and the directory appears by one rename, so a reader never sees half an artifact.
The artifact's identity (`ModelArtifact.sha256`, recorded by the registry) is the sha256 of the manifest bytes,
which pins every file. Loading verifies every file against the manifest and refuses missing or extra files.
This module does not import torch: the service loads artifacts without it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from core.files import sha256_file
from model.labels import LabelSet
from model.preprocess import DEFAULT_MAX_AUDIO_SECONDS, LATE_FLAGS, PreprocessingConfig

if TYPE_CHECKING:
    from model.network import EmotionModel, ModelConfig

FORMAT_VERSION = 1
ENCODER_FILE, ENCODER_INT8_FILE, CONTEXT_FILE = "encoder.onnx", "encoder.int8.onnx", "context.onnx"
PACKED_TEXT_FILE = "encoder.packed.onnx"  # encoder.onnx's embedding of turns without audio, tokens unpadded
TOKENIZER_FILE, CONFIG_FILE, CALIBRATION_FILE = "tokenizer.json", "config.json", "calibration.json"
REFERENCE_FILE, METRICS_FILE, CARD_FILE = "reference_distribution.json", "metrics.json", "MODEL_CARD.md"
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.safetensors"
GRAPH_FILES = (ENCODER_FILE, ENCODER_INT8_FILE, PACKED_TEXT_FILE, CONTEXT_FILE)
REQUIRED_FILES = (
    ENCODER_FILE,
    CONTEXT_FILE,
    TOKENIZER_FILE,
    CONFIG_FILE,
    CALIBRATION_FILE,
    REFERENCE_FILE,
    METRICS_FILE,
    CARD_FILE,
)
# The version names the registry directory, so it must be a plain file name.
VERSION_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
SHARE_TOLERANCE = 1e-3

Precision = Literal["fp32", "int8"]


class ArtifactError(ValueError):
    """The artifact is incomplete, tampered with or malformed. `file` names the offending file when there is one."""

    def __init__(self, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


@dataclass(frozen=True)
class DataSource:
    """Where a calibration quantity was measured: which data, which modalities, how much of it."""

    data: str  # e.g. "MELD dev"
    modalities: str  # the modality mix of its turns: "text", "audio" or "text+audio"
    turns: int
    conversations: int | None = None

    def __post_init__(self) -> None:
        if not self.data or not self.modalities or self.turns < 1:
            raise ValueError(f"a data source needs a name, its modalities and at least one turn, not {self}")

    def describe(self) -> str:
        conversations = f" in {self.conversations:,} conversations" if self.conversations else ""
        return f"{self.data} ({self.modalities}, {self.turns:,} turns{conversations})"


@dataclass(frozen=True)
class ClassPrior:
    """Class shares of some labels, in the order of the emotion label set."""

    shares: tuple[float, ...]
    source: DataSource

    def __post_init__(self) -> None:
        shares = tuple(float(s) for s in self.shares)
        if not all(math.isfinite(s) and s >= 0 for s in shares) or abs(sum(shares) - 1) > SHARE_TOLERANCE:
            raise ValueError(f"prior shares must be non-negative and sum to 1, not {shares}")
        object.__setattr__(self, "shares", shares)


@dataclass(frozen=True)
class PosteriorCalibration:
    """Bias-corrected temperature scaling (BCTS, Alexandari et al. 2020): calibrated posteriors
    p(y | x) = softmax(z / temperature + biases) of the raw emotion logits z, fitted on dev by NLL. The biases are
    expressed for the training prior (`Calibration.training_prior`): the posteriors are the model's beliefs for
    traffic whose class mix is the training one, which is what label-shift estimation corrects from."""

    temperature: float
    biases: tuple[float, ...]
    source: DataSource

    def __post_init__(self) -> None:
        biases = tuple(float(b) for b in self.biases)
        if not (math.isfinite(self.temperature) and self.temperature > 0) or not all(map(math.isfinite, biases)):
            raise ValueError(f"posterior calibration needs a positive temperature and finite biases, not {self}")
        object.__setattr__(self, "biases", biases)

    def posteriors(self, served: np.ndarray, serving_temperature: float) -> np.ndarray:
        """Served probabilities softmax(z / T_serving) [N, C] -> calibrated posteriors [N, C]. The logits are
        recovered up to a per-row constant, which the softmax ignores: z = T_serving * log(served)."""
        log_served = np.log(np.clip(np.asarray(served, dtype=np.float64), 1e-30, None))
        scaled = log_served * (serving_temperature / self.temperature) + np.asarray(self.biases)
        scaled -= scaled.max(axis=1, keepdims=True)
        exp = np.exp(scaled)
        return exp / exp.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class DevReference:
    """The model's behaviour on the clean dev set, for the monitor: its confusion counts (rows: true class,
    columns: served label) and the covariance of its predicted-class shares under a bootstrap over dev
    conversations (the reference mix is itself a sample)."""

    confusion: tuple[tuple[int, ...], ...]
    share_covariance: tuple[tuple[float, ...], ...]
    source: DataSource

    def __post_init__(self) -> None:
        confusion = tuple(tuple(int(c) for c in row) for row in self.confusion)
        covariance = tuple(tuple(float(c) for c in row) for row in self.share_covariance)
        size = len(confusion)
        if any(len(row) != size for row in (*confusion, *covariance)) or len(covariance) != size:
            raise ValueError("dev confusion and share covariance must be square and of the same size")
        if any(c < 0 for row in confusion for c in row) or not all(math.isfinite(c) for r in covariance for c in r):
            raise ValueError("dev confusion counts must be non-negative and the covariance finite")
        object.__setattr__(self, "confusion", confusion)
        object.__setattr__(self, "share_covariance", covariance)

    def confusion_rates(self) -> np.ndarray:
        """P(served label j | true class i) [C, C]; a class absent from dev keeps its own label."""
        counts = np.asarray(self.confusion, dtype=np.float64)
        totals = counts.sum(axis=1, keepdims=True)
        return np.where(totals > 0, counts / np.where(totals > 0, totals, 1), np.eye(len(counts)))


@dataclass(frozen=True)
class Calibration:
    temperature: float = 1.0
    sentiment_temperature: float = 1.0
    # Per-class weights w for label-free recall estimation: posteriors = normalise(probs * w). A model trained to
    # favour rare classes (logit-adjusted loss, post-hoc offsets) serves probabilities whose argmax is the
    # decision rule but whose values under-state the majority class; w, fitted on dev, restores calibrated
    # posteriors for monitoring without touching the served labels. None = all ones. Superseded by `posterior`
    # (which also carries a temperature); kept so older artifacts load and are monitored as before.
    estimation_weights: tuple[float, ...] | None = None
    # The record of what the model was trained and calibrated on (None in older artifacts): where the serving
    # temperature was fitted, the training and dev class priors, BCTS posteriors, and the dev reference.
    temperature_source: DataSource | None = None
    training_prior: ClassPrior | None = None
    dev_prior: ClassPrior | None = None
    posterior: PosteriorCalibration | None = None
    dev_reference: DevReference | None = None

    def __post_init__(self) -> None:
        for name, value in (("temperature", self.temperature), ("sentiment_temperature", self.sentiment_temperature)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, not {value!r}")
        if self.estimation_weights is not None:
            weights = tuple(float(w) for w in self.estimation_weights)
            if not all(math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(f"estimation_weights must be positive finite numbers, not {weights!r}")
            object.__setattr__(self, "estimation_weights", weights)
        if self.posterior is not None and self.training_prior is None:
            raise ValueError("posterior calibration is expressed for the training prior, which is missing")

    @property
    def has_record(self) -> bool:
        """Whether the artifact records its priors, BCTS posteriors and dev reference (label-shift monitoring)."""
        return None not in (self.training_prior, self.dev_prior, self.posterior, self.dev_reference)

    def sizes(self) -> set[int]:
        """The class counts the per-class parts of the record have (one value when consistent)."""
        found = {len(self.estimation_weights)} if self.estimation_weights is not None else set()
        for prior in (self.training_prior, self.dev_prior):
            if prior is not None:
                found.add(len(prior.shares))
        if self.posterior is not None:
            found.add(len(self.posterior.biases))
        if self.dev_reference is not None:
            found.add(len(self.dev_reference.confusion))
        return found

    def to_dict(self, emotions: Sequence[str]) -> dict[str, Any]:
        """calibration.json: per-class values keyed by emotion, matrices in label order."""
        data: dict[str, Any] = {
            "temperature": self.temperature,
            "sentiment_temperature": self.sentiment_temperature,
            "estimation_weights": None if self.estimation_weights is None else list(self.estimation_weights),
        }
        if self.temperature_source is not None:
            data["temperature_source"] = asdict(self.temperature_source)
        for key in ("training_prior", "dev_prior"):
            prior: ClassPrior | None = getattr(self, key)
            if prior is not None:
                data[key] = {"shares": _by_name(prior.shares, emotions), "source": asdict(prior.source)}
        if self.posterior is not None:
            data["posterior"] = {
                "method": "bias-corrected temperature scaling (Alexandari et al. 2020)",
                "temperature": self.posterior.temperature,
                "biases": _by_name(self.posterior.biases, emotions),
                "prior": "training_prior",
                "source": asdict(self.posterior.source),
            }
        if self.dev_reference is not None:
            data["dev_reference"] = {
                "confusion": [list(row) for row in self.dev_reference.confusion],
                "share_covariance": [list(row) for row in self.dev_reference.share_covariance],
                "source": asdict(self.dev_reference.source),
            }
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], emotions: Sequence[str]) -> Calibration:
        """The inverse of to_dict; raises ValueError (or KeyError/TypeError) on a malformed record."""

        def prior(key: str) -> ClassPrior | None:
            entry = data.get(key)
            return None if entry is None else ClassPrior(_in_order(entry["shares"], emotions), _source(entry))

        posterior, reference = data.get("posterior"), data.get("dev_reference")
        source = data.get("temperature_source")
        return cls(
            temperature=data["temperature"],
            sentiment_temperature=data.get("sentiment_temperature", 1.0),
            estimation_weights=data.get("estimation_weights"),
            temperature_source=None if source is None else DataSource(**source),
            training_prior=prior("training_prior"),
            dev_prior=prior("dev_prior"),
            posterior=None
            if posterior is None
            else PosteriorCalibration(
                float(posterior["temperature"]), _in_order(posterior["biases"], emotions), _source(posterior)
            ),
            dev_reference=None
            if reference is None
            else DevReference(reference["confusion"], reference["share_covariance"], _source(reference)),
        )


CALIBRATION_KEYS = frozenset(
    {
        "temperature",
        "sentiment_temperature",
        "estimation_weights",
        "temperature_source",
        "training_prior",
        "dev_prior",
        "posterior",
        "dev_reference",
    }
)


def _by_name(values: Sequence[float], emotions: Sequence[str]) -> dict[str, float]:
    if len(values) != len(emotions):
        raise ValueError(f"{len(values)} per-class values for {len(emotions)} emotions")
    return dict(zip(emotions, (float(v) for v in values), strict=True))


def _in_order(values: Mapping[str, Any], emotions: Sequence[str]) -> tuple[float, ...]:
    if not isinstance(values, Mapping) or set(values) != set(emotions):
        raise ValueError(f"per-class values must name exactly the emotions {', '.join(emotions)}")
    return tuple(float(values[name]) for name in emotions)


def _source(entry: Mapping[str, Any]) -> DataSource:
    return DataSource(**entry["source"])


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelArtifact:
    """A verified artifact directory and its parsed metadata."""

    path: Path
    version: str
    sha256: str  # of manifest.json's bytes: the artifact's identity
    config: Mapping[str, Any]  # ModelConfig.to_dict(); see model_config()
    preprocessing: PreprocessingConfig
    emotions: LabelSet
    sentiments: LabelSet
    calibration: Calibration
    reference_distribution: Mapping[str, float]
    metrics: Mapping[str, Any]
    files: Mapping[str, FileEntry] = field(repr=False)

    @property
    def encoder_path(self) -> Path:
        return self.path / ENCODER_FILE

    @property
    def weights_path(self) -> Path | None:
        return self.path / WEIGHTS_FILE if WEIGHTS_FILE in self.files else None

    @property
    def encoder_int8_path(self) -> Path | None:
        return self.path / ENCODER_INT8_FILE if ENCODER_INT8_FILE in self.files else None

    @property
    def packed_text_path(self) -> Path | None:
        return self.path / PACKED_TEXT_FILE if PACKED_TEXT_FILE in self.files else None

    def encoder_graphs(self) -> dict[str, Path]:
        """The encoder graph files this artifact has: encoder.onnx and whichever of its int8 and packed forms."""
        optional = {ENCODER_INT8_FILE: self.encoder_int8_path, PACKED_TEXT_FILE: self.packed_text_path}
        return {ENCODER_FILE: self.encoder_path} | {name: path for name, path in optional.items() if path is not None}

    @property
    def context_path(self) -> Path:
        return self.path / CONTEXT_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    @property
    def card_path(self) -> Path:
        return self.path / CARD_FILE

    @property
    def late_fusion(self) -> bool:
        return self.config.get("fusion") == "late"

    @property
    def embed_dim(self) -> int:
        """Width of the encoder graph's utterance embedding (late fusion appends audio evidence and flags)."""
        late = len(self.config["emotions"]) + LATE_FLAGS if self.late_fusion else 0
        return int(self.config["embed_dim"]) + late

    def encoder_file(self, precision: Precision) -> Path:
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be 'fp32' or 'int8', not {precision!r}")
        path = self.encoder_path if precision == "fp32" else self.encoder_int8_path
        if path is None:
            raise ArtifactError(f"{self.version}: precision 'int8' needs {ENCODER_INT8_FILE}; the artifact lacks it")
        return path

    def model_config(self) -> ModelConfig:
        """The network config (imports torch)."""
        from model.network import ModelConfig

        return ModelConfig.from_dict(dict(self.config))


# ---------------------------------------------------------------------------------------------------- writing


def write_artifact(
    out_dir: Path | str,
    *,
    version: str,
    graphs: Mapping[str, Path | str],
    tokenizer: Path | str,
    model_config: Mapping[str, Any],
    preprocessing: PreprocessingConfig,
    calibration: Calibration | None = None,
    reference_distribution: Mapping[str, float] | None = None,
    metrics: Mapping[str, Any] | None = None,
    card_text: str | None = None,
    weights: Path | str | None = None,
) -> ModelArtifact:
    """Write a complete artifact to `out_dir` (absent or empty): files into a staging directory beside it, the
    manifest last, then one rename. `graphs` maps encoder.onnx, context.onnx and optionally encoder.int8.onnx
    to the files to copy; `weights` is the PyTorch state to carry (WEIGHTS_FILE), if any. Returns the loaded
    (re-verified) artifact."""
    out_dir = Path(out_dir)
    _check_version(version)
    _check_graphs(graphs)
    calibration = calibration or Calibration()
    reference = _checked_shares(
        dict(reference_distribution or {}), LabelSet(tuple(model_config["emotions"])), REFERENCE_FILE
    )
    config = {
        "format": FORMAT_VERSION,
        "version": version,
        "model": dict(model_config),
        "preprocessing": preprocessing.to_dict(),
    }
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ArtifactError(f"{out_dir} already exists and is not an empty directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        copies = {**graphs, TOKENIZER_FILE: tokenizer, **({WEIGHTS_FILE: weights} if weights is not None else {})}
        for name, source in copies.items():
            shutil.copyfile(source, staging / name)
        _write_metadata(staging, config, calibration, reference, _json_safe(dict(metrics or {})), card_text)
        _write_manifest(staging)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_artifact(out_dir)


def _write_metadata(
    root: Path,
    config: dict[str, Any],
    calibration: Calibration,
    reference: dict[str, float],
    metrics: dict[str, Any],
    card_text: str | None,
) -> None:
    _write_json(root / CONFIG_FILE, config)
    _write_json(root / CALIBRATION_FILE, calibration.to_dict(config["model"]["emotions"]))
    _write_json(root / REFERENCE_FILE, reference)
    _write_json(root / METRICS_FILE, metrics)
    card = card_text if card_text is not None else default_card(config, calibration, reference, metrics)
    (root / CARD_FILE).write_text(card, encoding="utf-8")


def derive_artifact(
    source: ModelArtifact,
    out_dir: Path | str,
    *,
    version: str,
    graphs: Mapping[str, Path | str | None] | None = None,
    calibration: Calibration | None = None,
    reference_distribution: Mapping[str, float] | None = None,
    metrics: Mapping[str, Any] | None = None,
    card_text: str | None = None,
) -> ModelArtifact:
    """A new artifact from `source` with some parts replaced, e.g. a retrained context.onnx (head retraining) or
    a new temperature. `graphs` entries replace or add graph files (a None value drops an optional one);
    everything else not given is kept, except the model card, which is regenerated unless given, and the PyTorch
    weights and packed text path, which a new encoder.onnx leaves behind."""
    kept: dict[str, Path] = {**source.encoder_graphs(), CONTEXT_FILE: source.context_path}
    if ENCODER_FILE in (graphs or {}):
        kept.pop(PACKED_TEXT_FILE, None)
    merged = {name: path for name, path in {**kept, **(graphs or {})}.items() if path is not None}
    return write_artifact(
        out_dir,
        version=version,
        graphs=merged,
        tokenizer=source.tokenizer_path,
        model_config=source.config,
        preprocessing=source.preprocessing,
        calibration=calibration or source.calibration,
        reference_distribution=source.reference_distribution
        if reference_distribution is None
        else reference_distribution,
        metrics=source.metrics if metrics is None else metrics,
        card_text=card_text,
        weights=None if ENCODER_FILE in (graphs or {}) else source.weights_path,
    )


def hears_audio(config: ModelConfig, recipe: Mapping[str, Any] | None) -> bool:
    """Whether audio trained the network's audio path: a late-fused speech head (fitted on speech) or a recipe
    with speech corpora. Without a recipe nothing says otherwise, and the audio path is served."""
    if recipe is None or config.fusion == "late":
        return True
    return bool(recipe.get("data", {}).get("speech"))


def export_artifact(
    model: EmotionModel,
    out_dir: Path | str,
    *,
    version: str,
    calibration_temperature: float = 1.0,
    sentiment_temperature: float = 1.0,
    estimation_weights: Sequence[float] | None = None,
    calibration: Calibration | None = None,
    reference_distribution: Mapping[str, float] | None = None,
    metrics: Mapping[str, Any] | None = None,
    card_text: str | None = None,
    int8: bool = True,
    int8_ranges: Mapping[str, np.ndarray] | None = None,
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS,
    check: bool = True,
    recipe: Mapping[str, Any] | None = None,
) -> ModelArtifact:
    """Export `model` to ONNX (parity-checked unless check=False), quantise the encoder to int8 when asked
    (smoothed with `int8_ranges`, model/quantize.py), and write the complete artifact to `out_dir`, carrying the
    model's PyTorch weights with the training `recipe` (a `Recipe.to_dict()`) it was trained with, when known."""
    from model.delta import save_weights
    from model.export import export_model
    from model.quantize import quantize_encoder_int8
    from model.text_encoder import pretrained_dir

    config = model.config
    preprocessing = PreprocessingConfig(
        max_tokens=config.max_tokens,
        sample_rate=config.sample_rate,
        max_audio_seconds=max_audio_seconds,
        max_speakers=config.max_speakers,
        hears_audio=hears_audio(config, recipe),
    )
    with tempfile.TemporaryDirectory(prefix="equipoise-export-") as work:
        graphs = export_model(model, Path(work), check=check)
        if int8:
            int8_path = Path(work) / ENCODER_INT8_FILE
            # The frozen Whisper branch stays fp32 until int8 is shown not to move its audio predictions.
            keep = ("speech.",) if config.speech_encoder != "scratch" else ()
            graphs[ENCODER_INT8_FILE] = quantize_encoder_int8(
                graphs[ENCODER_FILE], int8_path, dict(int8_ranges or {}), keep_fp32=keep
            )
        weights = save_weights(model, Path(work) / WEIGHTS_FILE, recipe)
        return write_artifact(
            out_dir,
            version=version,
            graphs=graphs,
            tokenizer=pretrained_dir() / TOKENIZER_FILE,
            model_config=config.to_dict(),
            preprocessing=preprocessing,
            calibration=calibration  # a whole record, when given, replaces the three values above
            or Calibration(
                calibration_temperature,
                sentiment_temperature,
                None if estimation_weights is None else tuple(estimation_weights),
            ),
            reference_distribution=reference_distribution,
            metrics=metrics,
            card_text=card_text,
            weights=weights,
        )


def default_card(
    config: Mapping[str, Any], calibration: Calibration, reference: Mapping[str, float], metrics: Mapping[str, Any]
) -> str:
    """A model card generated from the metadata, for artifacts exported without a hand-written one."""
    model, pre = config["model"], config["preprocessing"]
    shares = "\n".join(f"| {name} | {share:.3f} |" for name, share in reference.items()) or "| (not measured) | |"
    return f"""# Equipoise emotion model {config["version"]}

Emotion recognition in conversations from text and voice (ONNX: utterance encoder + dialogue context head).

## Labels
- Emotions ({len(model["emotions"])}): {", ".join(model["emotions"])}
- Sentiments ({len(model["sentiments"])}): {", ".join(model["sentiments"])}

## Inputs
- Text: WordPiece tokens of tokenizer.json, cut to {pre["max_tokens"]} tokens ([CLS] and [SEP] included).
- Audio: mono waveform at {pre["sample_rate"]} Hz, cut to {pre["max_audio_seconds"]:g} s.
- Speakers: indexed per dialogue by first appearance; speakers beyond {pre["max_speakers"]} share the last index.
- Either modality may be missing.

## Network
- Text encoder: {model["text_encoder"]}; audio encoder: log-mel ({model["n_mels"]} bins) and
  {model["audio_layers"]} transformer layer(s); utterance embedding size {model["embed_dim"]}.
- Dialogue context head: {model["context_layers"]} transformer layer(s), causal or bidirectional.

## Calibration
Temperature scaling: emotion T = {calibration.temperature:g}, sentiment T = {calibration.sentiment_temperature:g}.
{describe_calibration(calibration, model["emotions"])}

## Reference predicted-class distribution (dev)
| emotion | share |
|---|---|
{shares}

## Metrics
```json
{json.dumps(_json_safe(dict(metrics)), indent=2, sort_keys=True)}
```
"""


def describe_calibration(calibration: Calibration, emotions: Sequence[str]) -> str:
    """The calibration record as model-card text: what each quantity was fitted or counted on."""
    if not calibration.has_record:
        return "This artifact records no class priors or bias-corrected posteriors (an older format)."
    assert calibration.training_prior and calibration.dev_prior and calibration.posterior
    assert calibration.dev_reference
    source = calibration.temperature_source
    rows = [
        ("temperature", f"{calibration.temperature:.3f}", source.describe() if source else "not recorded"),
        (
            "bias-corrected temperature scaling (monitoring posteriors)",
            f"T {calibration.posterior.temperature:.3f}",
            calibration.posterior.source.describe(),
        ),
        ("dev confusion and class-mix covariance", "", calibration.dev_reference.source.describe()),
    ]
    for name, prior in (("training prior", calibration.training_prior), ("dev prior", calibration.dev_prior)):
        shares = ", ".join(f"{e} {s:.3f}" for e, s in zip(emotions, prior.shares, strict=True))
        rows.append((name, shares, prior.source.describe()))
    table = "\n".join(f"| {name} | {value} | {where} |" for name, value, where in rows)
    return f"""
| quantity | value | fitted or counted on |
|---|---|---|
{table}
"""


def _check_version(version: str) -> None:
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise ArtifactError(
            f"version {version!r} must be 1-128 characters of letters, digits, '.', '_', '+', '-' "
            "(starting with a letter or digit)",
            file=CONFIG_FILE,
        )


def _check_graphs(graphs: Mapping[str, Path | str]) -> None:
    unknown = set(graphs) - set(GRAPH_FILES)
    missing = {ENCODER_FILE, CONTEXT_FILE} - set(graphs)
    if unknown or missing:
        raise ArtifactError(
            f"graphs must be {', '.join(GRAPH_FILES)} (int8 and packed optional); "
            f"unknown: {sorted(unknown)}, missing: {sorted(missing)}"
        )


def _json_safe(value: Any) -> Any:
    """numpy values -> Python, non-finite floats -> None (JSON and PostgreSQL JSON have no NaN)."""
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")


def _write_manifest(root: Path) -> None:
    files = {
        entry.name: {"sha256": sha256_file(entry), "size": entry.stat().st_size}
        for entry in sorted(root.iterdir())
        if entry.name != MANIFEST_FILE
    }
    _write_json(root / MANIFEST_FILE, {"format": FORMAT_VERSION, "files": files})


# ---------------------------------------------------------------------------------------------------- loading


def load_artifact(path: Path | str) -> ModelArtifact:
    """Verify every file of the artifact at `path` against its manifest, then parse the metadata."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact directory")
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ArtifactError(f"{root}: {MANIFEST_FILE} is missing", file=MANIFEST_FILE)
    manifest_bytes = manifest_path.read_bytes()
    files = _parse_manifest(manifest_bytes)
    _verify_files(root, files)
    return _parse_metadata(root, files, hashlib.sha256(manifest_bytes).hexdigest())


def _parse_manifest(data: bytes) -> dict[str, FileEntry]:
    try:
        manifest = json.loads(data)
        format_version = manifest["format"]
        files = {name: FileEntry(str(e["sha256"]), int(e["size"])) for name, e in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ArtifactError(f"{MANIFEST_FILE} is malformed: {error!r}", file=MANIFEST_FILE) from None
    if format_version != FORMAT_VERSION:
        raise ArtifactError(f"{MANIFEST_FILE}: unsupported format {format_version!r}", file=MANIFEST_FILE)
    for name in files:
        if name in (MANIFEST_FILE, "", ".", "..") or "/" in name or "\\" in name:
            raise ArtifactError(f"{MANIFEST_FILE} lists an invalid file name {name!r}", file=MANIFEST_FILE)
    missing = [name for name in REQUIRED_FILES if name not in files]
    if missing:
        raise ArtifactError(f"{MANIFEST_FILE} does not list the required file {missing[0]}", file=missing[0])
    return files


def _verify_files(root: Path, files: Mapping[str, FileEntry]) -> None:
    extra = sorted({entry.name for entry in root.iterdir()} - {MANIFEST_FILE} - set(files))
    if extra:
        raise ArtifactError(f"{root}: unexpected file {extra[0]} (not in {MANIFEST_FILE})", file=extra[0])
    for name, expected in sorted(files.items()):
        path = root / name
        if not path.is_file():
            raise ArtifactError(f"{root}: {name} is listed in {MANIFEST_FILE} but missing", file=name)
        size = path.stat().st_size
        if size != expected.size:
            raise ArtifactError(f"{name}: size {size} bytes does not match the manifest's {expected.size}", file=name)
        actual = sha256_file(path)
        if actual != expected.sha256:
            raise ArtifactError(f"{name}: sha256 {actual} does not match the manifest's {expected.sha256}", file=name)


def _read_json(root: Path, name: str) -> Any:
    try:
        return json.loads((root / name).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{name} is not valid JSON: {error}", file=name) from None


def _parse_metadata(root: Path, files: Mapping[str, FileEntry], sha256: str) -> ModelArtifact:
    config = _read_json(root, CONFIG_FILE)
    try:
        version = config["version"]
        _check_version(version)
        model = dict(config["model"])
        preprocessing = PreprocessingConfig.from_dict(config["preprocessing"])
        emotions, sentiments = LabelSet(tuple(model["emotions"])), LabelSet(tuple(model["sentiments"]))
        int(model["embed_dim"])
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, ArtifactError):
            raise
        raise ArtifactError(f"{CONFIG_FILE} is malformed: {error!r}", file=CONFIG_FILE) from None
    calibration = _parse_calibration(_read_json(root, CALIBRATION_FILE), emotions)
    metrics = _read_json(root, METRICS_FILE)
    if not isinstance(metrics, dict):
        raise ArtifactError(f"{METRICS_FILE} must hold a JSON object", file=METRICS_FILE)
    return ModelArtifact(
        path=root,
        version=version,
        sha256=sha256,
        config=model,
        preprocessing=preprocessing,
        emotions=emotions,
        sentiments=sentiments,
        calibration=calibration,
        reference_distribution=_checked_shares(_read_json(root, REFERENCE_FILE), emotions, REFERENCE_FILE),
        metrics=metrics,
        files=dict(files),
    )


def _parse_calibration(data: Any, emotions: LabelSet) -> Calibration:
    """calibration.json: the temperatures (every artifact), the record of priors and BCTS posteriors (newer ones)."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{CALIBRATION_FILE} must hold a JSON object", file=CALIBRATION_FILE)
    unknown = sorted(set(data) - CALIBRATION_KEYS)
    if unknown:
        message = f"{CALIBRATION_FILE}: unknown field {unknown[0]!r} (written by a newer Equipoise?)"
        raise ArtifactError(message, file=CALIBRATION_FILE)
    try:
        calibration = Calibration.from_dict(data, emotions.names)
    except (KeyError, TypeError, ValueError) as error:
        raise ArtifactError(f"{CALIBRATION_FILE} is malformed: {error!r}", file=CALIBRATION_FILE) from None
    sizes = calibration.sizes() - {len(emotions.names)}
    if sizes:
        message = f"{CALIBRATION_FILE}: {sizes.pop()} per-class values for {len(emotions.names)} emotions"
        raise ArtifactError(message, file=CALIBRATION_FILE)
    return calibration


def _checked_shares(shares: Any, emotions: LabelSet, file: str) -> dict[str, float]:
    """{} (not measured) or one non-negative share per emotion, summing to 1."""
    if not isinstance(shares, dict):
        raise ArtifactError(f"{file} must hold a JSON object of emotion shares", file=file)
    if not shares:
        return {}
    if set(shares) != set(emotions.names):
        raise ArtifactError(f"{file}: shares must name exactly the emotions {', '.join(emotions.names)}", file=file)
    try:
        values = {name: float(shares[name]) for name in emotions.names}
    except (TypeError, ValueError):
        raise ArtifactError(f"{file}: shares must be numbers, got {shares}", file=file) from None
    if not all(math.isfinite(v) and v >= 0 for v in values.values()) or abs(sum(values.values()) - 1) > SHARE_TOLERANCE:
        raise ArtifactError(f"{file}: shares must be non-negative and sum to 1, got {values}", file=file)
    return values
