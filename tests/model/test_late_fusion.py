"""Late fusion (docs/SPEECH.md's rule): the rule on known numbers, the text path bit-identical to the text model,
old configs unchanged, ONNX parity (real speech through the Whisper branch), and tier 2 on a late-fusion graph."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from model.artifact import derive_artifact, export_artifact
from model.audio import decode_audio
from model.data.speech import read_clips
from model.default_model import SHIPPED_DIR
from model.export import (
    CONTEXT_OUTPUTS,
    PARITY_TOLERANCE,
    TEXT_EMOTION_OUTPUT,
    export_context_head,
    export_encoder,
    ort_session,
    to_feeds,
)
from model.network import (
    ContextHead,
    EmotionModel,
    LateFusionEncoder,
    LateFusionHead,
    ModelConfig,
    UtteranceEncoder,
    emotion_to_sentiment,
)
from retraining.graphs import EmotionHead, read_head, write_head
from retraining.parity import HeadReference, parity
from tests.conftest import one_torch_thread
from tests.model.test_network import encoder_batch

C, D = 7, 16  # MELD emotions; the tiny config's embed_dim


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    yield from one_torch_thread()


def late_config(**overrides: object) -> ModelConfig:
    return ModelConfig.tiny(**{"fusion": "late", "fusion_weight": 0.5, "audio_temperature": 2.0, **overrides})


def test_old_configs_load_as_gate_models_with_the_scratch_audio_encoder() -> None:
    old = {k: v for k, v in ModelConfig.tiny().to_dict().items() if k not in ("speech_encoder", "fusion")}
    for k in ("speech_layers", "audio_temperature", "fusion_weight", "audio_prior"):
        old.pop(k)
    assert ModelConfig.from_dict(old) == ModelConfig.tiny()
    shipped = ModelConfig.from_dict(json.loads((SHIPPED_DIR / "config.json").read_text()))
    assert (shipped.fusion, shipped.speech_encoder, shipped.utterance_dim) == ("gate", "scratch", shipped.embed_dim)
    with pytest.raises(ValueError, match="fusion"):
        ModelConfig.tiny(fusion="early")
    with pytest.raises(ValueError, match="late"):
        ModelConfig.tiny(speech_encoder="whisper-tiny.en")
    with pytest.raises(ValueError, match="fusion_weight"):
        late_config(fusion_weight=1.5)


def test_the_rule_on_known_numbers() -> None:
    torch.manual_seed(0)
    config = late_config()
    late = LateFusionHead(config).eval()
    text_model = ContextHead(config).eval()
    text_model.load_state_dict(late.state_dict())
    text = torch.randn(1, 4, D)
    evidence = torch.tensor([[0.0] * C, [2.0, 0, 0, 0, 0, 0, 0], [0, 4.0, 0, 0, 0, 0, 0], [0.0] * C])[None]
    flags = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])[None]  # text, both, audio, neither
    inputs = dict(speakers=torch.zeros(1, 4, dtype=torch.long), turn_mask=torch.ones(1, 4, dtype=torch.bool))
    with torch.no_grad():
        emotion, sentiment, text_logits = late(
            torch.cat([text, evidence, flags], -1), causal=torch.tensor(False), **inputs
        )
        expected_emotion, expected_sentiment = text_model(text, causal=torch.tensor(False), **inputs)
    assert torch.equal(text_logits, expected_emotion)
    assert torch.equal(emotion[0, 0], expected_emotion[0, 0]) and torch.equal(emotion[0, 3], expected_emotion[0, 3])
    assert torch.equal(emotion[0, 1], expected_emotion[0, 1] + 0.5 * evidence[0, 1])
    assert torch.equal(emotion[0, 2], evidence[0, 2])  # audio only: the calibrated audio logits
    assert torch.equal(sentiment[0, [0, 1, 3]], expected_sentiment[0, [0, 1, 3]])
    q = 1 / (math.exp(4) + 6)  # audio only, joy evidence 4: neutral q, positive joy + surprise / 2, negative 4.5 q
    expected = torch.tensor([q, 1 - 6 * q + 0.5 * q, 4.5 * q]) + 1e-6
    torch.testing.assert_close(sentiment[0, 2].exp(), expected, atol=1e-6, rtol=0)


def test_emotion_to_sentiment_rows_sum_to_one() -> None:
    mapping = emotion_to_sentiment(
        ("neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear", "boredom"),
        ("neutral", "positive", "negative"),
    )
    torch.testing.assert_close(mapping.sum(1), torch.ones(8))
    assert mapping[2].tolist() == [0.0, 0.5, 0.5] and mapping[7].tolist() == pytest.approx([1 / 3] * 3)


def test_the_text_path_is_the_text_models_bit_for_bit_and_audio_is_calibrated_evidence() -> None:
    torch.manual_seed(0)
    config = late_config(audio_prior=(0.4, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1))
    text_model = EmotionModel(ModelConfig.tiny(), pretrained_text=False).eval()
    late = EmotionModel(config, pretrained_text=False).eval()
    missing = late.load_state_dict(text_model.state_dict(), strict=False)
    assert not missing.unexpected_keys and all(
        k.startswith(("encoder.audio_head.", "encoder.speech.")) for k in missing.missing_keys
    )
    clips = [0.1 * torch.randn(n) for n in (3000, 1, 2500)]
    batch = encoder_batch([[2023, 2003], [7592], [2000]], clips, [True, True, False], [True, False, True])
    encoder = late.encoder
    assert isinstance(encoder, LateFusionEncoder)
    with torch.no_grad():
        embedding = encoder(**batch)
        text_only = text_model.encoder(**{**batch, "has_audio": torch.zeros(3, dtype=torch.bool)})
        audio_logits = encoder.audio_head(encoder.speech(batch["audio"], batch["audio_lengths"]))
    assert embedding.shape == (3, config.utterance_dim) == (3, D + C + 2)
    assert torch.equal(embedding[:, :D], text_only)
    expected = audio_logits / 2.0 - torch.tensor(config.audio_prior).log()
    torch.testing.assert_close(embedding[[0, 2], D : D + C], expected[[0, 2]], atol=1e-6, rtol=0)
    assert torch.equal(embedding[1, D : D + C], torch.zeros(C))
    assert embedding[:, D + C :].tolist() == [[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]]


@pytest.fixture(scope="module")
def tiny_late_graphs(tmp_path_factory: pytest.TempPathFactory) -> tuple[EmotionModel, Path]:
    torch.manual_seed(0)
    model = EmotionModel(late_config(), pretrained_text=False).eval()
    out = tmp_path_factory.mktemp("late")
    export_encoder(model.encoder, out / "encoder.onnx")  # parity checked inside, at shapes not traced
    export_context_head(model.head, out / "context.onnx")
    return model, out


def test_the_context_graph_exposes_the_text_head_and_tier_2_replaces_it_keeping_the_fusion(
    tiny_late_graphs: tuple[EmotionModel, Path], tmp_path: Path
) -> None:
    model, out = tiny_late_graphs
    outputs = [o.name for o in onnx.load(str(out / "context.onnx")).graph.output]
    assert outputs == [*CONTEXT_OUTPUTS, TEXT_EMOTION_OUTPUT]
    head = read_head(out / "context.onnx")
    np.testing.assert_array_equal(head.weight, model.head.emotion_head.weight.detach().numpy())
    new = EmotionHead(np.random.default_rng(0).normal(size=head.weight.shape).astype(np.float32), head.bias + 1.0)
    write_head(out / "context.onnx", tmp_path / "context.onnx", new)
    model.head.emotion_head.weight.data = torch.from_numpy(new.weight)
    model.head.emotion_head.bias.data = torch.from_numpy(new.bias)
    evidence = torch.randn(1, 3, C)
    flags = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])[None]
    inputs = dict(
        embeddings=torch.cat([torch.randn(1, 3, D), evidence, flags], -1),
        speakers=torch.zeros(1, 3, dtype=torch.long),
        turn_mask=torch.ones(1, 3, dtype=torch.bool),
        causal=torch.tensor(False),
    )
    with torch.no_grad():
        expected = [t.numpy() for t in model.head(**inputs)]
    got = ort_session(tmp_path / "context.onnx").run(None, to_feeds(inputs))
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(g, e, atol=PARITY_TOLERANCE, rtol=0)
    np.testing.assert_allclose(got[0][0, 1], got[2][0, 1] + 0.5 * evidence[0, 1].numpy(), atol=1e-5)
    np.testing.assert_allclose(got[0][0, 2], evidence[0, 2].numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def speech(data_dir: Path) -> list[np.ndarray]:
    clips = sorted((c for c in read_clips(data_dir, "ravdess") if c.speaker == "02"), key=lambda c: c.path.name)
    return [decode_audio(c.path) for c in clips[:3]]


def test_whisper_late_encoder_onnx_matches_pytorch_on_real_speech(speech: list[np.ndarray], tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = EmotionModel(late_config(speech_encoder="whisper-tiny.en"), pretrained_text=False).eval()
    path = export_encoder(model.encoder, tmp_path / "encoder.onnx")
    session = ort_session(path)
    clips = [torch.from_numpy(c) for c in speech]
    batch = encoder_batch([[2023, 2003], [7592], [2000]], clips, [True, False, True], [True, True, False])
    with torch.no_grad():
        expected = model.encoder(**batch).numpy()
    np.testing.assert_allclose(session.run(None, to_feeds(batch))[0], expected, atol=PARITY_TOLERANCE, rtol=0)
    alone = {k: v[:1] for k, v in batch.items()}  # ragged batch == alone; and a batch without any audio runs
    np.testing.assert_allclose(session.run(None, to_feeds(alone))[0][0], expected[0], atol=PARITY_TOLERANCE, rtol=0)
    silent = encoder_batch([[2023]], [torch.zeros(1)], [True], [False])
    with torch.no_grad():
        np.testing.assert_allclose(
            session.run(None, to_feeds(silent))[0], model.encoder(**silent).numpy(), atol=PARITY_TOLERANCE, rtol=0
        )
    assert isinstance(model.encoder, UtteranceEncoder)


def test_tier_2_parity_reference_applies_the_late_fusion_after_the_new_head(tmp_path: Path) -> None:
    """Tiers 1 and 2 check a rewritten head against HeadReference on probes whose turns carry audio: on a
    late-fusion artifact the reference must fuse like the graph, or every cheap-tier candidate is refused."""
    torch.manual_seed(0)
    base = export_artifact(
        EmotionModel(late_config(), pretrained_text=False).eval(), tmp_path / "base", version="late-0", int8=False
    )
    old = read_head(base.context_path)
    new = EmotionHead(old.weight * 0.5, old.bias + 1.0)
    graphs = {"context.onnx": write_head(base.context_path, tmp_path / "context.onnx", new)}
    candidate = derive_artifact(base, tmp_path / "candidate", version="late-1", graphs=graphs)
    assert parity(candidate, HeadReference(base, new), base) <= PARITY_TOLERANCE
    # The same check without the fusion (the reference before late fusion was handled) does not hold.
    unfused = HeadReference(base, new)
    unfused.late = False
    assert parity(candidate, unfused, base) > 1e-2
