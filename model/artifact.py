"""The model artifact: one flat directory holding everything needed to serve a model, with a manifest of hashes.

    encoder.onnx, encoder.int8.onnx (optional), context.onnx   the graphs of docs/ARCHITECTURE.md
    tokenizer.json                                              the text tokenizer
    config.json                     {"format", "version", "model": ModelConfig dict (label sets included),
                                     "preprocessing": {max_tokens, sample_rate, max_audio_seconds, max_speakers}}
    calibration.json                {"temperature", "sentiment_temperature", "estimation_weights"}:
                                    probs = softmax(logits / T); monitoring's posteriors = normalise(probs * w)
    reference_distribution.json     {emotion: predicted share on dev} for drift monitoring ({} if not measured)
    metrics.json, MODEL_CARD.md
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
from model.preprocess import DEFAULT_MAX_AUDIO_SECONDS, PreprocessingConfig

if TYPE_CHECKING:
    from model.network import EmotionModel, ModelConfig

FORMAT_VERSION = 1
ENCODER_FILE, ENCODER_INT8_FILE, CONTEXT_FILE = "encoder.onnx", "encoder.int8.onnx", "context.onnx"
TOKENIZER_FILE, CONFIG_FILE, CALIBRATION_FILE = "tokenizer.json", "config.json", "calibration.json"
REFERENCE_FILE, METRICS_FILE, CARD_FILE = "reference_distribution.json", "metrics.json", "MODEL_CARD.md"
MANIFEST_FILE = "manifest.json"
GRAPH_FILES = (ENCODER_FILE, ENCODER_INT8_FILE, CONTEXT_FILE)
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
class Calibration:
    temperature: float = 1.0
    sentiment_temperature: float = 1.0
    # Per-class weights w for label-free recall estimation: posteriors = normalise(probs * w). A model trained to
    # favour rare classes (logit-adjusted loss, post-hoc offsets) serves probabilities whose argmax is the
    # decision rule but whose values under-state the majority class; w, fitted on dev, restores calibrated
    # posteriors for monitoring without touching the served labels. None = all ones.
    estimation_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name, value in (("temperature", self.temperature), ("sentiment_temperature", self.sentiment_temperature)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, not {value!r}")
        if self.estimation_weights is not None:
            weights = tuple(float(w) for w in self.estimation_weights)
            if not all(math.isfinite(w) and w > 0 for w in weights):
                raise ValueError(f"estimation_weights must be positive finite numbers, not {weights!r}")
            object.__setattr__(self, "estimation_weights", weights)


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
    def encoder_int8_path(self) -> Path | None:
        return self.path / ENCODER_INT8_FILE if ENCODER_INT8_FILE in self.files else None

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
    def embed_dim(self) -> int:
        return int(self.config["embed_dim"])

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
) -> ModelArtifact:
    """Write a complete artifact to `out_dir` (absent or empty): files into a staging directory beside it, the
    manifest last, then one rename. `graphs` maps encoder.onnx, context.onnx and optionally encoder.int8.onnx
    to the files to copy. Returns the loaded (re-verified) artifact."""
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
        for name, source in {**graphs, TOKENIZER_FILE: tokenizer}.items():
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
    _write_json(root / CALIBRATION_FILE, asdict(calibration))
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
    a new temperature. `graphs` entries replace or add graph files (a None value drops encoder.int8.onnx);
    everything else not given is kept, except the model card, which is regenerated unless given."""
    kept = {ENCODER_FILE: source.encoder_path, CONTEXT_FILE: source.context_path}
    if source.encoder_int8_path is not None:
        kept[ENCODER_INT8_FILE] = source.encoder_int8_path
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
    )


def export_artifact(
    model: EmotionModel,
    out_dir: Path | str,
    *,
    version: str,
    calibration_temperature: float = 1.0,
    sentiment_temperature: float = 1.0,
    estimation_weights: Sequence[float] | None = None,
    reference_distribution: Mapping[str, float] | None = None,
    metrics: Mapping[str, Any] | None = None,
    card_text: str | None = None,
    int8: bool = True,
    int8_ranges: Mapping[str, np.ndarray] | None = None,
    max_audio_seconds: float = DEFAULT_MAX_AUDIO_SECONDS,
    check: bool = True,
) -> ModelArtifact:
    """Export `model` to ONNX (parity-checked unless check=False), quantise the encoder to int8 when asked
    (smoothed with `int8_ranges`, model/quantize.py), and write the complete artifact to `out_dir`."""
    from model.export import export_model
    from model.quantize import quantize_encoder_int8
    from model.text_encoder import pretrained_dir

    config = model.config
    preprocessing = PreprocessingConfig(
        max_tokens=config.max_tokens,
        sample_rate=config.sample_rate,
        max_audio_seconds=max_audio_seconds,
        max_speakers=config.max_speakers,
    )
    with tempfile.TemporaryDirectory(prefix="equipoise-export-") as work:
        graphs = export_model(model, Path(work), check=check)
        if int8:
            int8_path = Path(work) / ENCODER_INT8_FILE
            graphs[ENCODER_INT8_FILE] = quantize_encoder_int8(graphs[ENCODER_FILE], int8_path, dict(int8_ranges or {}))
        return write_artifact(
            out_dir,
            version=version,
            graphs=graphs,
            tokenizer=pretrained_dir() / TOKENIZER_FILE,
            model_config=config.to_dict(),
            preprocessing=preprocessing,
            calibration=Calibration(
                calibration_temperature,
                sentiment_temperature,
                None if estimation_weights is None else tuple(estimation_weights),
            ),
            reference_distribution=reference_distribution,
            metrics=metrics,
            card_text=card_text,
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

## Reference predicted-class distribution (dev)
| emotion | share |
|---|---|
{shares}

## Metrics
```json
{json.dumps(_json_safe(dict(metrics)), indent=2, sort_keys=True)}
```
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
            f"graphs must be {', '.join(GRAPH_FILES)} (int8 optional); "
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
    calibration_data = _read_json(root, CALIBRATION_FILE)
    try:
        calibration = Calibration(**calibration_data)
    except (TypeError, ValueError) as error:
        raise ArtifactError(f"{CALIBRATION_FILE} is malformed: {error}", file=CALIBRATION_FILE) from None
    weights = calibration.estimation_weights
    if weights is not None and len(weights) != len(emotions.names):
        message = f"{CALIBRATION_FILE}: {len(weights)} estimation weights for {len(emotions.names)} emotions"
        raise ArtifactError(message, file=CALIBRATION_FILE)
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
