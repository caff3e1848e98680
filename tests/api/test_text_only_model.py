"""A model no audio ever trained (a text-only recipe) does not serve its untrained audio path: the artifact records
it at export, a clip beside text is dropped (the turn scores as its text alone), and a turn with audio and no text
is refused: by the runtime, by the service as a 422 problem naming the turn, and by batch scoring as an error row."""

from __future__ import annotations

import base64
import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from model.artifact import export_artifact, hears_audio, load_artifact
from model.data.turns import Turn, TurnRow
from model.network import EmotionModel, ModelConfig
from model.preprocess import DeafModelError
from model.runtime import InferenceRuntime, UtteranceInput
from scoring.inputs import AUDIO_NOT_HEARD, InputOptions, prepare_turn

TEXTS = ("I have been waiting for an hour!", "Thank you, that is all I wanted.")


def _clip(seconds: float = 0.8) -> np.ndarray:
    return (0.2 * np.sin(np.arange(int(seconds * 16_000)) / 3.0)).astype(np.float32)


def _dialogue(audio: list[np.ndarray | None], texts: tuple[str | None, ...] = TEXTS) -> list[UtteranceInput]:
    return [UtteranceInput(text, clip, f"s{i}") for i, (text, clip) in enumerate(zip(texts, audio, strict=True))]


def test_which_models_hear_audio() -> None:
    gate, late = ModelConfig.tiny(), ModelConfig.tiny(speech_encoder="whisper-tiny.en", fusion="late")
    assert hears_audio(gate, None)  # nothing says otherwise: the audio path is served as before
    assert hears_audio(gate, {"data": {"speech": ["ravdess"]}})
    assert not hears_audio(gate, {"data": {"meld": True, "speech": []}})
    assert hears_audio(late, {"data": {"speech": []}})  # the late-fused speech head was fitted on speech


def test_export_records_a_text_only_recipe_and_loading_keeps_it(tmp_path: Path) -> None:
    model = EmotionModel(ModelConfig.tiny()).eval()
    recipe: dict[str, Any] = {"data": {"meld": True, "speech": []}}
    exported = export_artifact(model, tmp_path / "text-only", version="text-only-0", int8=False, recipe=recipe)
    assert load_artifact(exported.path).preprocessing.hears_audio is False
    recipe["data"]["speech"] = ["ravdess"]
    exported = export_artifact(model, tmp_path / "speech", version="speech-0", int8=False, recipe=recipe)
    assert load_artifact(exported.path).preprocessing.hears_audio is True


def test_a_clip_beside_text_is_dropped_and_audio_alone_is_refused(
    tiny_artifact: Path, text_only_artifact: Path
) -> None:
    hearing = InferenceRuntime.load(tiny_artifact, device="cpu", intra_op_threads=1)
    text_only = InferenceRuntime.load(text_only_artifact, device="cpu", intra_op_threads=1)
    with_clips, without = _dialogue([_clip(), _clip(1.2)]), _dialogue([None, None])
    (heard,), (plain,) = hearing.classify([with_clips], causal=True), hearing.classify([without], causal=True)
    assert not np.allclose([t.emotion_probs for t in heard], [t.emotion_probs for t in plain], atol=1e-4)
    (dropped,) = text_only.classify([with_clips], causal=True)
    np.testing.assert_allclose([t.emotion_probs for t in dropped], [t.emotion_probs for t in plain], atol=1e-6)

    with pytest.raises(DeafModelError, match="trained on text alone.*utterance 1 \\(of 2\\) has audio and no text"):
        text_only.classify([_dialogue([None, _clip()], (TEXTS[0], None))], causal=True)


def test_the_service_answers_audio_alone_with_a_problem(text_only_artifact: Path, start_app: Any) -> None:
    app = start_app(runtime=lambda row: InferenceRuntime.load(text_only_artifact, device="cpu", intra_op_threads=1))
    buffer = io.BytesIO()
    sf.write(buffer, _clip(), 16_000, format="WAV", subtype="PCM_16")
    audio = base64.b64encode(buffer.getvalue()).decode()
    turns = [{"text": TEXTS[0], "speaker": "customer"}, {"audio": audio, "speaker": "agent"}]
    response = app.client.post("/v1/predict/dialogue", json={"turns": turns})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "does not recognise audio" in response.text and "utterance 1" in response.text
    both = app.client.post("/v1/predict/utterance", json={"text": TEXTS[0], "audio": audio})
    alone = app.client.post("/v1/predict/utterance", json={"text": TEXTS[0]})
    assert both.status_code == alone.status_code == 200, both.text
    assert both.json()["probabilities"] == pytest.approx(alone.json()["probabilities"], abs=1e-6)


def test_batch_scoring_makes_audio_alone_an_error_row_for_a_text_only_model(tmp_path: Path) -> None:
    sf.write(tmp_path / "turn.wav", _clip(), 16_000, subtype="PCM_16")
    options = InputOptions(tmp_path, 1000, 10_000_000, 30.0, 100, 8, -60.0, hears_audio=False)
    alone = TurnRow(0, Turn(conversation_id="c", turn=0, speaker="agent", audio_path="turn.wav"))
    both = TurnRow(1, Turn(conversation_id="c", turn=1, speaker="agent", text=TEXTS[0], audio_path="turn.wav"))
    (refused,) = prepare_turn(alone, options)
    assert refused.utterance is None and refused.error is not None and refused.error.kind == AUDIO_NOT_HEARD
    (kept,) = prepare_turn(both, options)
    assert kept.error is None and kept.utterance is not None and kept.utterance.text == TEXTS[0]
    (heard,) = prepare_turn(alone, dataclasses.replace(options, hears_audio=True))
    assert heard.error is None and heard.utterance is not None and heard.utterance.audio is not None
