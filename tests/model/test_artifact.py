"""The artifact format: round trip, deterministic identity, and verification of every file against the manifest."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from model import export
from model.artifact import (
    CONTEXT_FILE,
    ENCODER_FILE,
    ENCODER_INT8_FILE,
    MANIFEST_FILE,
    PACKED_TEXT_FILE,
    TOKENIZER_FILE,
    ArtifactError,
    Calibration,
    ModelArtifact,
    derive_artifact,
    load_artifact,
    write_artifact,
)
from model.labels import EMOTIONS, SENTIMENTS
from model.network import ModelConfig

ARTIFACT_FILES = [
    "encoder.onnx",
    "encoder.int8.onnx",
    "encoder.packed.onnx",
    "context.onnx",
    "tokenizer.json",
    "config.json",
    "calibration.json",
    "reference_distribution.json",
    "metrics.json",
    "MODEL_CARD.md",
    "weights.safetensors",
]


@pytest.fixture(scope="module")
def tiny(tiny_artifact: Path) -> ModelArtifact:
    return load_artifact(tiny_artifact)


def rewrite(source: ModelArtifact, out_dir: Path, **changes: Any) -> ModelArtifact:
    """A new artifact from the graphs and metadata of `source`, with `changes` to write_artifact's arguments."""
    graphs = {**source.encoder_graphs(), CONTEXT_FILE: source.context_path}
    arguments: dict[str, Any] = dict(
        version=source.version,
        graphs=graphs,
        tokenizer=source.tokenizer_path,
        model_config=source.config,
        preprocessing=source.preprocessing,
        calibration=source.calibration,
        reference_distribution=source.reference_distribution,
        metrics=source.metrics,
        card_text=source.card_path.read_text(encoding="utf-8"),
        weights=source.weights_path,
    )
    return write_artifact(out_dir, **{**arguments, **changes})


def copy_of(artifact: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(artifact, tmp_path / artifact.name))


def test_exported_artifact_holds_the_layout_and_metadata(tiny: ModelArtifact) -> None:
    assert sorted(p.name for p in tiny.path.iterdir()) == sorted([*tiny.files, MANIFEST_FILE])
    assert set(tiny.files) == set(ARTIFACT_FILES)
    assert tiny.version == "tiny-0.1"
    assert tiny.emotions.names == EMOTIONS and tiny.sentiments.names == SENTIMENTS
    assert tiny.model_config() == ModelConfig.tiny()
    assert tiny.preprocessing.max_tokens == 128 and tiny.preprocessing.sample_rate == 16000
    assert tiny.preprocessing.max_speakers == ModelConfig.tiny().max_speakers
    assert tiny.calibration == Calibration(1.0, 1.0)
    assert sum(tiny.reference_distribution.values()) == pytest.approx(1.0)
    assert tiny.metrics == {"macro_f1": 0.0}
    assert tiny.sha256 == hashlib.sha256((tiny.path / MANIFEST_FILE).read_bytes()).hexdigest()
    card = tiny.card_path.read_text(encoding="utf-8")
    assert "tiny-0.1" in card and ", ".join(EMOTIONS) in card


def test_graph_file_names_agree_with_the_exporter() -> None:
    assert (export.ENCODER_FILE, export.ENCODER_INT8_FILE, export.PACKED_TEXT_FILE, export.CONTEXT_FILE) == (
        ENCODER_FILE,
        ENCODER_INT8_FILE,
        PACKED_TEXT_FILE,
        CONTEXT_FILE,
    )


def test_round_trip_and_deterministic_identity(tiny: ModelArtifact, tmp_path: Path) -> None:
    metrics = {"macro_f1": 0.31, "per_class": {"fear": {"recall": float("nan")}}}
    shares = dict(zip(EMOTIONS, (0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05), strict=True))
    changes = dict(
        version="v2", calibration=Calibration(1.7, 0.9), metrics=metrics, reference_distribution=shares, card_text=None
    )
    first = rewrite(tiny, tmp_path / "a", **changes)
    second = rewrite(tiny, tmp_path / "b", **changes)
    assert first.sha256 == second.sha256 != tiny.sha256
    loaded = load_artifact(first.path)
    assert loaded == first
    assert loaded.version == "v2" and loaded.calibration == Calibration(1.7, 0.9)
    assert loaded.reference_distribution == shares
    assert loaded.metrics == {"macro_f1": 0.31, "per_class": {"fear": {"recall": None}}}  # NaN is not JSON
    assert loaded.config == tiny.config and loaded.preprocessing == tiny.preprocessing
    assert "emotion T = 1.7" in loaded.card_path.read_text(encoding="utf-8")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_derive_replaces_parts_and_keeps_the_rest(tiny: ModelArtifact, tmp_path: Path) -> None:
    fp32_only = derive_artifact(tiny, tmp_path / "fp32", version="fp32-only", graphs={ENCODER_INT8_FILE: None})
    assert fp32_only.encoder_int8_path is None and ENCODER_INT8_FILE not in fp32_only.files
    with pytest.raises(ArtifactError, match="int8"):
        fp32_only.encoder_file("int8")
    new_head = tmp_path / "retrained_context.onnx"
    new_head.write_bytes(tiny.context_path.read_bytes())
    retrained = derive_artifact(
        tiny, tmp_path / "head", version="head-1", graphs={CONTEXT_FILE: new_head}, metrics={"macro_f1": 0.4}
    )
    assert retrained.files[ENCODER_FILE] == tiny.files[ENCODER_FILE]
    assert retrained.files[ENCODER_INT8_FILE] == tiny.files[ENCODER_INT8_FILE]
    assert retrained.metrics == {"macro_f1": 0.4} and retrained.calibration == tiny.calibration
    assert retrained.reference_distribution == tiny.reference_distribution
    assert "head-1" in retrained.card_path.read_text(encoding="utf-8")


def test_writes_into_an_empty_directory_but_never_over_an_artifact(tiny: ModelArtifact, tmp_path: Path) -> None:
    target = tmp_path / "empty"
    target.mkdir()
    rewrite(tiny, target)
    with pytest.raises(ArtifactError, match="already exists"):
        rewrite(tiny, target)
    assert load_artifact(target).sha256 == tiny.sha256


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"version": "../escape"}, "version"),
        ({"version": ""}, "version"),
        ({"reference_distribution": {"neutral": 1.0}}, "exactly the emotions"),
        ({"reference_distribution": dict.fromkeys(EMOTIONS, 0.5)}, "sum to 1"),
        ({"graphs": {ENCODER_FILE: "x.onnx"}}, "missing"),
    ],
)
def test_refuses_bad_contents_and_leaves_nothing(
    tiny: ModelArtifact, tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(ArtifactError, match=message):
        rewrite(tiny, tmp_path / "bad", **changes)
    assert list(tmp_path.iterdir()) == []


def test_failed_copy_leaves_no_staging(tiny: ModelArtifact, tmp_path: Path) -> None:
    graphs = {ENCODER_FILE: tiny.encoder_path, CONTEXT_FILE: tmp_path / "absent.onnx"}
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(FileNotFoundError):
        rewrite(tiny, out / "artifact", graphs=graphs)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "name",
    ARTIFACT_FILES,
)
def test_a_flipped_byte_in_any_file_is_named(tiny_artifact: Path, tmp_path: Path, name: str) -> None:
    artifact = copy_of(tiny_artifact, tmp_path)
    data = bytearray((artifact / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (artifact / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{name}: sha256") as caught:
        load_artifact(artifact)
    assert caught.value.file == name


def test_a_tampered_manifest_changes_the_identity(tiny_artifact: Path, tmp_path: Path) -> None:
    artifact = copy_of(tiny_artifact, tmp_path)
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    manifest["files"]["metrics.json"]["size"] += 1
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="metrics.json: size"):
        load_artifact(artifact)
    manifest["files"]["metrics.json"]["size"] -= 1
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest, indent=4))
    reformatted = load_artifact(artifact)  # same contents, other bytes: verifies, but is another artifact
    assert reformatted.sha256 != load_artifact(tiny_artifact).sha256


def test_missing_manifest(tiny_artifact: Path, tmp_path: Path) -> None:
    artifact = copy_of(tiny_artifact, tmp_path)
    (artifact / MANIFEST_FILE).unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing") as caught:
        load_artifact(artifact)
    assert caught.value.file == MANIFEST_FILE


def test_malformed_manifest(tiny_artifact: Path, tmp_path: Path) -> None:
    artifact = copy_of(tiny_artifact, tmp_path)
    (artifact / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json is malformed"):
        load_artifact(artifact)


def test_missing_listed_file(tiny_artifact: Path, tmp_path: Path) -> None:
    artifact = copy_of(tiny_artifact, tmp_path)
    (artifact / CONTEXT_FILE).unlink()
    with pytest.raises(ArtifactError, match="context.onnx is listed in manifest.json but missing") as caught:
        load_artifact(artifact)
    assert caught.value.file == CONTEXT_FILE


@pytest.mark.parametrize("extra", ["notes.txt", "subdir"])
def test_extra_file_or_directory(tiny_artifact: Path, tmp_path: Path, extra: str) -> None:
    artifact = copy_of(tiny_artifact, tmp_path)
    if extra == "subdir":
        (artifact / extra).mkdir()
    else:
        (artifact / extra).write_text("hello")
    with pytest.raises(ArtifactError, match=f"unexpected file {extra}") as caught:
        load_artifact(artifact)
    assert caught.value.file == extra


def test_a_required_file_must_be_listed(tiny_artifact: Path, tmp_path: Path) -> None:
    artifact = copy_of(tiny_artifact, tmp_path)
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    del manifest["files"][TOKENIZER_FILE]
    (artifact / TOKENIZER_FILE).unlink()
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not list the required file tokenizer.json"):
        load_artifact(artifact)


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        load_artifact(tmp_path / "nothing")


def _record() -> Calibration:
    from model.artifact import ClassPrior, DataSource, DevReference, PosteriorCalibration

    dev = DataSource("MELD dev", "text", 1109, 114)
    train = DataSource("MELD train", "text", 9989)
    shares = (0.4, 0.2, 0.1, 0.1, 0.1, 0.05, 0.05)
    confusion = [[10 if i == j else 1 for j in range(7)] for i in range(7)]
    return Calibration(
        temperature=1.25,
        temperature_source=dev,
        training_prior=ClassPrior(shares, train),
        dev_prior=ClassPrior(shares, dev),
        posterior=PosteriorCalibration(1.4, (0.5, 0.1, 0.0, 0.0, -0.1, -0.2, -0.3), dev),
        dev_reference=DevReference(confusion, [[0.001 * (i == j) for j in range(7)] for i in range(7)], dev),
    )


def test_the_calibration_record_round_trips_and_older_artifacts_still_load(tiny: ModelArtifact, tmp_path: Path) -> None:
    recorded = rewrite(tiny, tmp_path / "recorded", version="recorded", calibration=_record(), card_text=None)
    assert recorded.calibration == _record() and recorded.calibration.has_record
    stored = json.loads((recorded.path / "calibration.json").read_text())
    assert stored["training_prior"]["shares"]["neutral"] == 0.4 and stored["posterior"]["prior"] == "training_prior"
    assert stored["dev_prior"]["source"] == {
        "data": "MELD dev",
        "modalities": "text",
        "turns": 1109,
        "conversations": 114,
    }
    assert "MELD train (text, 9,989 turns)" in recorded.card_path.read_text(encoding="utf-8")
    assert not tiny.calibration.has_record  # an artifact written before the record: temperatures only
    assert set(json.loads((tiny.path / "calibration.json").read_text())) == {
        "temperature",
        "sentiment_temperature",
        "estimation_weights",
    }


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c | {"newer_field": 1}, "unknown field 'newer_field'"),
        (lambda c: c | {"training_prior": {**c["training_prior"], "shares": {"neutral": 1.0}}}, "malformed"),
        (lambda c: {k: v for k, v in c.items() if k != "training_prior"}, "training prior, which is missing"),
        (lambda c: c | {"dev_reference": {**c["dev_reference"], "confusion": [[1, 2], [3, 4]]}}, "malformed"),
    ],
)
def test_a_malformed_calibration_record_is_refused_with_the_file_named(
    tiny: ModelArtifact, tmp_path: Path, edit: Any, message: str
) -> None:
    recorded = rewrite(tiny, tmp_path / "recorded", version="recorded", calibration=_record(), card_text=None)
    path = recorded.path / "calibration.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    manifest = json.loads((recorded.path / MANIFEST_FILE).read_text())
    manifest["files"]["calibration.json"] = {
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "size": path.stat().st_size,
    }
    (recorded.path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message) as raised:
        load_artifact(recorded.path)
    assert raised.value.file == "calibration.json"
