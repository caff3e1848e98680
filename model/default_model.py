"""The shipped default model: a trained delta committed in model/default/, assembled into a full artifact offline.

    model/default/delta.safetensors, config.json   the trained tensors (model/delta.py), float16
    model/default/int8_ranges.safetensors          activation ranges that smooth the int8 encoder (model/quantize.py)
    model/default/release.json                     version, sha256 of the delta and the ranges, calibration,
                                                   reference class mix, the card's metrics, and a probe set with
                                                   its expected outputs
    model/default/MODEL_CARD.md                    the model card
    model/default/speech/                          the speech head (training/speech.py): speech.json (its fusion
                                                   numbers, recipe and figures) and audio_head.safetensors, both
                                                   sha256-checked from release.json "speech"; the frozen Whisper
                                                   encoder comes from its pinned package (model/whisper_encoder.py)

Assembly loads the pinned pretrained text encoder (hash-checked), applies the delta (sha256-checked), exports
and parity-checks the ONNX graphs, then scores the probe set through the serving runtime and refuses the result
unless it matches the recorded outputs. `equipoise serve` assembles it once into the state directory. The
artifact carries the applied weights with the release's recipe (weights.safetensors), which fine-tuning starts
from; `release_model` rebuilds them for an artifact of the release assembled without them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from core.files import sha256_file
from model.artifact import ArtifactError, Calibration, ModelArtifact, load_artifact

if TYPE_CHECKING:
    from model.network import EmotionModel

SHIPPED_DIR = Path(__file__).resolve().parent / "default"
RELEASE_FILE = "release.json"
CARD_FILE = "MODEL_CARD.md"
# Probe outputs are float32 graphs run on CPU: they agree to ~1e-6 across machines; a wrong base model or delta
# moves them by far more.
PROBE_TOLERANCE = 1e-3
PROBE_TEXTS = (
    "I can't believe you did that, this is the third time I've called!",
    "Thank you so much, that's exactly what I needed.",
    "Okay.",
    "Wait, what? You cancelled my account?",
    "I'm really scared something happened to my son.",
    "Ugh, that's disgusting.",
)


class DefaultModelError(RuntimeError):
    """The shipped default cannot be assembled as released (wrong delta, base weights or probe outputs)."""


def read_release(source: Path = SHIPPED_DIR) -> dict[str, Any]:
    return json.loads((source / RELEASE_FILE).read_text(encoding="utf-8"))


def verified(path: Path, expected_sha256: str) -> Path:
    """`path`, if its sha256 is the released one."""
    actual = sha256_file(path) if path.is_file() else "missing"
    if actual != expected_sha256:
        raise DefaultModelError(f"{path}: sha256 {actual} is not the released {expected_sha256}")
    return path


def probe_audio(sample_rate: int = 16000) -> np.ndarray:
    """A fixed 1.5 s rising tone with a tremolo: deterministic audio input for the probe."""
    t = np.arange(int(1.5 * sample_rate), dtype=np.float64) / sample_rate
    tone = np.sin(2 * math.pi * (180 * t + 60 * t**2)) * (0.5 + 0.3 * np.sin(2 * math.pi * 5 * t))
    return (0.3 * tone).astype(np.float32)


def probe_outputs(artifact: Path | ModelArtifact) -> list[list[float]]:
    """Emotion probabilities of the probe set: the texts as one dialogue, the tone alone, and text with tone."""
    from model.runtime import InferenceRuntime, UtteranceInput

    runtime = InferenceRuntime.load(artifact, device="cpu")
    audio = probe_audio(runtime.artifact.preprocessing.sample_rate)
    dialogue = [UtteranceInput(text, None, f"s{i % 2}") for i, text in enumerate(PROBE_TEXTS)]
    dialogues = [dialogue, [UtteranceInput(None, audio)], [UtteranceInput(PROBE_TEXTS[0], audio)]]
    turns = [turn for scored in runtime.classify(dialogues, causal=False) for turn in scored]
    return [[round(float(p), 6) for p in turn.emotion_probs] for turn in turns]


def check_probe(artifact: Path | ModelArtifact, expected: list[list[float]]) -> float:
    """Largest probability difference from the recorded probe outputs; raises beyond PROBE_TOLERANCE."""
    got = np.array(probe_outputs(artifact))
    want = np.array(expected)
    if got.shape != want.shape:
        raise DefaultModelError(f"probe outputs have shape {got.shape}, the release recorded {want.shape}")
    worst = float(np.abs(got - want).max())
    if worst > PROBE_TOLERANCE:
        raise DefaultModelError(f"probe outputs differ from the release by {worst:.2e} (> {PROBE_TOLERANCE})")
    return worst


def release_model(source: Path = SHIPPED_DIR) -> tuple[EmotionModel, dict[str, Any]]:
    """The released network (its delta sha256-checked and applied to the pinned text encoder; with the release's
    speech head, also sha256-checked, when it has one) and the training recipe it was trained with."""
    from model.delta import DELTA_FILE, load_delta

    release = read_release(source)
    verified(source / DELTA_FILE, release["delta_sha256"])
    model, recipe = load_delta(source), release["recipe"]
    speech = release.get("speech")
    if speech is None:
        return model, recipe
    speech_dir = source / speech["dir"]
    verified(speech_dir / SPEECH_HEAD_FILE, speech["head_sha256"])
    verified(speech_dir / SPEECH_FILE, speech["record_sha256"])
    return speech_recipe(with_speech(model, speech_dir), recipe)


def release_calibration(release: dict[str, Any]) -> Calibration | None:
    """The release's calibration record (releases before it carry only a temperature: None)."""
    recorded = release.get("calibration")
    return None if recorded is None else Calibration.from_dict(recorded, release["recipe"]["model"]["emotions"])


def assemble(out_dir: Path, source: Path = SHIPPED_DIR) -> ModelArtifact:
    """Build the artifact of the shipped default into `out_dir` (which must not exist) and verify it."""
    release = read_release(source)
    model, recipe = release_model(source)
    artifact = _export(model, recipe, out_dir, release["version"], release["metrics"], source)
    try:
        check_probe(artifact, release["probe"])
    except DefaultModelError:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return artifact


def _export(
    model: EmotionModel, recipe: dict[str, Any], out_dir: Path, version: str, metrics: dict[str, Any], source: Path
) -> ModelArtifact:
    """`model` exported with the calibration, reference mix, int8 ranges and card of the release in `source`."""
    from model.artifact import export_artifact
    from model.quantize import RANGES_FILE, load_ranges

    release = read_release(source)
    ranges_sha256 = release.get("int8_ranges_sha256")
    return export_artifact(
        model,
        out_dir,
        version=version,
        calibration_temperature=release.get("calibration_temperature", 1.0),  # releases without a record
        reference_distribution=release["reference_distribution"],
        estimation_weights=release.get("estimation_weights"),
        calibration=release_calibration(release),
        int8_ranges=load_ranges(verified(source / RANGES_FILE, ranges_sha256)) if ranges_sha256 else None,
        metrics=metrics,
        card_text=(source / CARD_FILE).read_text(encoding="utf-8"),
        recipe=recipe,
    )


SPEECH_HEAD_FILE, SPEECH_FILE = "audio_head.safetensors", "speech.json"  # what speech training writes
SPEECH_FIELDS = ("speech_layers", "audio_temperature", "audio_prior", "fusion_weight")
SPEECH_PREFIXES = ("encoder.audio_head.", "encoder.speech.")  # the speech branch's parameters in the state


def with_speech(text_model: EmotionModel, speech_dir: Path) -> EmotionModel:
    """`text_model`'s text path, untouched, with the frozen Whisper branch and the audio head of `speech_dir` (its
    speech.json and audio_head.safetensors), fused late."""
    from safetensors.torch import load_file

    from model.network import EmotionModel

    record = json.loads((speech_dir / SPEECH_FILE).read_text(encoding="utf-8"))
    if list(record.get("emotions", text_model.config.emotions)) != list(text_model.config.emotions):
        raise DefaultModelError(f"{speech_dir}: the audio head's emotions are not the text model's")
    numbers = {key: tuple(record[key]) if isinstance(record[key], list) else record[key] for key in SPEECH_FIELDS}
    config = dataclasses.replace(text_model.config, speech_encoder="whisper-tiny.en", fusion="late", **numbers)
    model = EmotionModel(config).eval()
    text_state = {k: v for k, v in text_model.state_dict().items() if not k.startswith(SPEECH_PREFIXES)}
    loaded = model.load_state_dict(text_state, strict=False)
    if loaded.unexpected_keys or any(not k.startswith(SPEECH_PREFIXES) for k in loaded.missing_keys):
        raise DefaultModelError(f"the text weights do not fit the speech model: {loaded}")
    model.encoder.audio_head.load_state_dict(load_file(str(speech_dir / SPEECH_HEAD_FILE)), strict=True)
    return model


def speech_recipe(model: EmotionModel, recipe: dict[str, Any]) -> tuple[EmotionModel, dict]:
    """`model` with the text recipe it was trained by and its own network config (the speech head's recipe is in
    its speech.json, and in the artifact's metrics)."""
    return model, {**recipe, "model": model.config.to_dict()}


def speech_metrics(release_metrics: dict[str, Any], speech_dir: Path) -> dict[str, Any]:
    """The release's text figures (its text path is unchanged) with the speech head's own figures in place of the
    old audio branch's audio-only ones."""
    record = json.loads((speech_dir / SPEECH_FILE).read_text(encoding="utf-8"))
    return {**{k: v for k, v in release_metrics.items() if k != "audio_only"}, "speech": record["figures"]}


def assemble_speech(out_dir: Path, speech_dir: Path, version: str, source: Path = SHIPPED_DIR) -> ModelArtifact:
    """A "text + speech" candidate into `out_dir`: the release's text path plus `speech_dir`'s audio head. The
    probe's text-only dialogue must score as the release recorded it (the text path is unchanged)."""
    release = read_release(source)
    text_model, recipe = release_model(source)
    model, recipe = speech_recipe(with_speech(text_model, speech_dir), recipe)
    artifact = _export(model, recipe, out_dir, version, speech_metrics(release["metrics"], speech_dir), source)
    text_rows = len(PROBE_TEXTS)
    got = np.array(probe_outputs(artifact)[:text_rows])
    worst = float(np.abs(got - np.array(release["probe"][:text_rows])).max())
    if worst > PROBE_TOLERANCE:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise DefaultModelError(f"text-only probe outputs moved by {worst:.2e} from the release's")
    return artifact


def artifact_or_shipped(model: Path | None) -> Path:
    """`model`, or the shipped default assembled under the settings' state directory (a tool's `--model` default)."""
    if model is not None:
        return model
    from core.settings import get_settings

    return shipped_artifact(get_settings().state_dir)


def shipped_artifact(state_dir: Path, source: Path = SHIPPED_DIR) -> Path:
    """The assembled default under `state_dir`, built on first use (about a minute on two CPU cores)."""
    version = read_release(source)["version"]
    target = Path(state_dir) / "default-model" / version
    if target.is_dir():
        try:
            load_artifact(target)
            return target
        except ArtifactError:
            shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    assemble(target, source)
    return target
