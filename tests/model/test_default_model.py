"""The shipped default (model/default/): assembled offline from the pinned encoder + the committed delta, it
scores the data sets as its model card says, refuses a tampered delta or probe, and becomes the first champion."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from core.files import sha256_file
from core.settings import Settings
from model.artifact import load_artifact
from model.default_model import (
    PROBE_TEXTS,
    SHIPPED_DIR,
    DefaultModelError,
    assemble,
    check_probe,
    probe_audio,
    read_release,
    release_model,
    speech_metrics,
)
from model.delta import DELTA_FILE
from tests.api.conftest import running_server
from training.evaluate import audio_only_key, int8_agreements, score_meld, score_speech

BUDGET_BYTES = 40 * 2**20
POINTS = 0.005  # the card's metrics must hold within half a point


@pytest.fixture(scope="session")
def default_runtime(shipped_default: Path):  # noqa: ANN201
    from model.runtime import InferenceRuntime

    return InferenceRuntime.load(shipped_default, device="cpu")


def _assert_close(measured, card: dict, what: str) -> None:  # noqa: ANN001
    for key in ("weighted_f1", "macro_f1"):
        assert getattr(measured, key) == pytest.approx(card[key], abs=POINTS), f"{what} {key}"
    for name, stated in card["per_class"].items():
        assert measured[name].f1 == pytest.approx(stated["f1"], abs=POINTS), f"{what} F1 of {name}"


def test_the_committed_default_fits_the_size_budget() -> None:
    total = sum(p.stat().st_size for p in SHIPPED_DIR.rglob("*") if p.is_file())
    assert total <= BUDGET_BYTES, f"model/default/ holds {total / 2**20:.1f} MB"


def test_meld_test_scores_as_the_card_states(default_runtime, data_dir: Path) -> None:  # noqa: ANN001
    card = read_release()["metrics"]["meld_test"]
    measured = score_meld(default_runtime, data_dir, "test").report(default_runtime.emotions.names)
    _assert_close(measured, card, "MELD test")


@pytest.mark.parametrize(("corpus", "line"), [("ravdess", "clean"), ("ravdess", "mulaw"), ("emodb", "clean")])
def test_audio_only_on_held_out_speakers_scores_as_the_card_states(
    default_runtime, data_dir: Path, corpus: str, line: str
) -> None:  # noqa: ANN001, E501
    card = read_release()["metrics"][audio_only_key(line)][corpus]
    measured = score_speech(default_runtime, data_dir, corpus, line=line).report(default_runtime.emotions.names)
    assert measured.macro_f1 == pytest.approx(card["macro_f1"], abs=POINTS)
    _assert_close(measured, card, f"{corpus} audio only ({line})")


def test_int8_mode_agrees_with_fp32_on_meld_dev(shipped_default: Path, data_dir: Path) -> None:
    """The int8 encoder alone changes the labels of near ties; the service's int8 mode (near ties re-scored in
    fp32 at the default margin) keeps at least 99% of MELD dev labels, and both match the card."""
    metrics = read_release()["metrics"]
    margin = Settings.model_fields["int8_rescore_margin"].default
    alone, rescored = (result.share for result in int8_agreements(shipped_default, data_dir, "dev", (0.0, margin)))
    assert rescored >= 0.99 > alone
    assert metrics["int8_rescore_margin"] == margin
    assert alone == pytest.approx(metrics["int8_label_agreement_meld_dev"], abs=POINTS)
    assert rescored == pytest.approx(metrics["int8_rescored_label_agreement_meld_dev"], abs=POINTS)


def test_the_card_prints_the_released_metrics() -> None:
    release, card = read_release(), (SHIPPED_DIR / "MODEL_CARD.md").read_text(encoding="utf-8")
    meld = release["metrics"]["meld_test"]
    assert f"| {100 * meld['weighted_f1']:.2f} | {100 * meld['macro_f1']:.2f} |" in card
    assert release["version"] in card and "calm" in card and "boredom" in card


def test_a_tampered_delta_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    source = tmp_path / "default"
    shutil.copytree(SHIPPED_DIR, source)
    data = bytearray((source / DELTA_FILE).read_bytes())
    data[-1] ^= 0x01
    (source / DELTA_FILE).write_bytes(bytes(data))
    with pytest.raises(DefaultModelError, match="sha256"):
        assemble(tmp_path / "artifact", source)
    assert not (tmp_path / "artifact").exists()


def test_probe_outputs_that_differ_from_the_release_are_refused(shipped_default: Path) -> None:
    expected = read_release()["probe"]
    assert check_probe(shipped_default, expected) <= 1e-4
    shifted = [[p + (0.01 if i == 0 else 0.0) for i, p in enumerate(row)] for row in expected]
    with pytest.raises(DefaultModelError, match="probe"):
        check_probe(shipped_default, shifted)


def test_a_new_database_gets_the_shipped_default_as_its_first_champion(shipped_default: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(shipped_default, state / "default-model" / shipped_default.name)  # assembled once per session
    url = f"sqlite:///{tmp_path / 'equipoise.db'}"
    with running_server(state, url, shipped_default="true") as server:
        models = httpx.get(server.url + "/v1/models").json()
        reply = httpx.post(server.url + "/v1/predict/utterance", json={"text": "This is outrageous, I want a refund!"})
    version = read_release()["version"]
    champions = [m for m in models["versions"] if m["status"] == "champion"]
    assert [m["version"] for m in champions] == [version] and models["serving"] == version
    assert reply.status_code == 200 and reply.json()["model_version"] == version
    assert reply.json()["emotion"] in read_release()["recipe"]["model"]["emotions"]


def test_the_release_is_calibrated_on_clean_meld_dev_text_and_the_artifact_records_it(shipped_default: Path) -> None:
    """The reference class mix and the temperatures come from MELD dev as text alone (the modality mix the model
    serves, no acted speech), and the assembled artifact carries the whole record."""
    release = read_release()
    recorded = release["calibration"]
    dev = {"data": "MELD dev", "modalities": "text", "turns": 1109, "conversations": 114}
    assert recorded["temperature_source"] == dev and recorded["dev_prior"]["source"] == dev
    assert recorded["posterior"]["source"]["data"] == "MELD dev"
    assert recorded["training_prior"]["source"] == {
        "data": "MELD train",
        "modalities": "text",
        "turns": 9989,
        "conversations": None,
    }
    artifact = load_artifact(shipped_default)
    assert artifact.calibration.has_record and artifact.calibration.temperature == recorded["temperature"]
    assert dict(artifact.reference_distribution) == release["reference_distribution"]
    assert "MELD dev (text, 1,109 turns in 114 conversations)" in (SHIPPED_DIR / "MODEL_CARD.md").read_text("utf-8")


def test_a_speech_artifact_reports_its_speech_head_figures_not_the_old_audio_branch() -> None:
    speech_dir = SHIPPED_DIR / "speech"
    released = read_release(SHIPPED_DIR)["metrics"]
    metrics = speech_metrics({**released, "audio_only": {"ravdess": {}}}, speech_dir)
    assert "audio_only" not in metrics
    assert metrics["meld_test"] == released["meld_test"]  # the text path is the release's
    assert metrics["speech"] == json.loads((speech_dir / "speech.json").read_text(encoding="utf-8"))["figures"]


def test_the_release_serves_its_speech_head_and_refuses_a_tampered_one(tmp_path: Path) -> None:
    release = read_release()
    speech = release["speech"]
    assert sha256_file(SHIPPED_DIR / speech["dir"] / "audio_head.safetensors") == speech["head_sha256"]
    model, recipe = release_model()
    assert model.config.fusion == "late" and recipe["model"]["fusion"] == "late"
    source = tmp_path / "default"
    shutil.copytree(SHIPPED_DIR, source)
    head = source / speech["dir"] / "audio_head.safetensors"
    head.write_bytes(head.read_bytes()[:-1] + bytes([head.read_bytes()[-1] ^ 1]))
    with pytest.raises(DefaultModelError, match="sha256"):
        assemble(tmp_path / "artifact", source)


def test_audio_only_turns_are_calibrated_once(default_runtime) -> None:  # noqa: ANN001
    """A late-fusion graph serves an audio-only turn as its audio evidence, already divided by T_a: the serving
    temperature (fitted on text) must not divide it again, while text turns keep it."""
    from model.runtime import UtteranceInput

    audio = probe_audio()
    (alone,), (both,) = default_runtime.classify(
        [[UtteranceInput(None, audio)], [UtteranceInput(PROBE_TEXTS[0], audio)]], causal=False
    )
    width, classes = default_runtime.artifact.config["embed_dim"], len(default_runtime.emotions.names)
    evidence = alone.embedding[width : width + classes].astype(np.float64)
    expected = np.exp(evidence - evidence.max()) / np.exp(evidence - evidence.max()).sum()
    assert np.abs(alone.emotion_probs - expected).max() < 1e-6
    assert default_runtime.artifact.calibration.temperature != 1.0
    assert not np.allclose(both.emotion_probs, alone.emotion_probs, atol=1e-3)
