"""The PyTorch network on tiny random configurations: padding, modality masks, causality, config round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.audio_encoder import AudioEncoder
from model.network import ContextHead, EmotionModel, ModelConfig, UtteranceEncoder, build_text_encoder
from model.text_encoder import TextEncoder, WeightsHashError, load_tokenizer, verify_weights

ATOL = 1e-5


@pytest.fixture
def config() -> ModelConfig:
    return ModelConfig.tiny()


@pytest.fixture
def encoder(config: ModelConfig) -> UtteranceEncoder:
    torch.manual_seed(0)
    return UtteranceEncoder(config, build_text_encoder(config)).eval()


@pytest.fixture
def head(config: ModelConfig) -> ContextHead:
    torch.manual_seed(0)
    return ContextHead(config).eval()


def pad_stack(rows: list[torch.Tensor], width: int, fill: float = 0.0) -> torch.Tensor:
    return torch.stack([torch.nn.functional.pad(row, (0, width - row.shape[-1]), value=fill) for row in rows])


def encoder_batch(texts: list[list[int]], clips: list[torch.Tensor], has_text: list[bool], has_audio: list[bool]):
    ids = [torch.tensor([101, *t, 102]) for t in texts]
    tokens, samples = max(len(i) for i in ids), max(len(c) for c in clips)
    return dict(
        input_ids=pad_stack(ids, tokens),
        attention_mask=pad_stack([torch.ones_like(i) for i in ids], tokens),
        audio=pad_stack(clips, samples),
        audio_lengths=torch.tensor([len(c) for c in clips]),
        has_text=torch.tensor(has_text),
        has_audio=torch.tensor(has_audio),
    )


def test_config_round_trips_through_json(config: ModelConfig) -> None:
    assert ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({**config.to_dict(), "typo": 1})
    with pytest.raises(ValueError):
        ModelConfig(emotions=("joy", "joy"))


def test_text_pooling_ignores_padding() -> None:
    torch.manual_seed(0)
    text = TextEncoder.tiny().eval()
    sentences = [torch.tensor([101, 2023, 2003, 102]), torch.tensor([101, 7592, 102]), torch.tensor([101, 102])]
    batch = pad_stack(sentences, 9)
    mask = pad_stack([torch.ones_like(s) for s in sentences], 9)
    with torch.no_grad():
        batched = text(batch, mask)
        alone = torch.cat([text(s[None], torch.ones_like(s)[None]) for s in sentences])
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)


@pytest.mark.parametrize("padding", [0.0, 0.7, float("nan")])
def test_audio_encoder_ignores_padding(padding: float) -> None:
    torch.manual_seed(0)
    audio = AudioEncoder(n_mels=16, dim=16, layers=1, heads=2, dropout=0.0).eval()
    # Lengths around the frame and conv-stride boundaries, shorter than one FFT window too.
    clips = [0.1 * torch.randn(n) for n in (1, 150, 401, 3200, 4801)]
    with torch.no_grad():
        batched = audio(pad_stack(clips, 6000, fill=padding), torch.tensor([len(c) for c in clips]))
        alone = torch.cat([audio(c[None], torch.tensor([len(c)])) for c in clips])
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)


def test_text_only_ignores_audio_and_audio_only_ignores_text(encoder: UtteranceEncoder) -> None:
    clips = [0.1 * torch.randn(2000), 0.1 * torch.randn(1200)]
    first = encoder_batch([[2023, 2003], [7592]], clips, has_text=[True, False], has_audio=[False, True])
    second = encoder_batch(
        [[2023, 2003], [2054, 2017, 2031]], [c.flip(0) * 3 for c in clips], [True, False], [False, True]
    )
    second["audio"][1, :1200] = first["audio"][1, :1200]
    second["audio"][0] = float("nan")  # an ignored modality cannot leak, not even NaN
    with torch.no_grad():
        out1, out2 = encoder(**first), encoder(**second)
    torch.testing.assert_close(out1, out2, atol=ATOL, rtol=0)
    # The present modality does matter.
    with torch.no_grad():
        both = encoder(**{**first, "has_text": torch.tensor([True, True]), "has_audio": torch.tensor([True, True])})
    assert not torch.allclose(both, out1, atol=1e-3)


def test_forward_is_fuse_after_the_two_encoders(encoder: UtteranceEncoder) -> None:
    """The training loop encodes text and audio its own way (cached text, audio rows only) and calls `fuse`."""
    clips = [0.1 * torch.randn(2000), 0.1 * torch.randn(1200)]
    batch = encoder_batch([[2023, 2003], [7592]], clips, has_text=[True, False], has_audio=[True, True])
    with torch.no_grad():
        text = encoder.text(batch["input_ids"], batch["attention_mask"])
        audio = encoder.audio(batch["audio"], batch["audio_lengths"])
        fused = encoder.fuse(text, audio, batch["has_text"], batch["has_audio"])
        assert torch.equal(encoder(**batch), fused)


def test_degenerate_inputs_give_finite_values_and_gradients(config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = EmotionModel(config)
    batch = encoder_batch([[], [2023]], [torch.zeros(1), torch.zeros(1)], [False, True], [False, False])
    batch["audio_lengths"] = torch.tensor([0, 1])
    out = model(
        **batch,
        turn_index=torch.tensor([[0, 1]]),
        speakers=torch.tensor([[0, 1]]),
        turn_mask=torch.tensor([[True, True]]),
    )
    loss = out.emotion_logits.sum() + out.sentiment_logits.sum()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def context_inputs(turns: int, dim: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return dict(
        embeddings=torch.randn(2, turns, dim),
        speakers=torch.tensor([[0, 1, 0, 2, 1, 9][:turns]] * 2),
        turn_mask=torch.ones(2, turns, dtype=torch.bool),
    )


def perturb_after(inputs: dict[str, torch.Tensor], turn: int) -> dict[str, torch.Tensor]:
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["embeddings"][:, turn + 1 :] += 1.0
    changed["speakers"][:, turn + 1 :] = 3
    return changed


@pytest.mark.parametrize("causal", [True, False])
def test_context_causal_mask(head: ContextHead, config: ModelConfig, causal: bool) -> None:
    inputs, turn = context_inputs(6, config.embed_dim), 2
    with torch.no_grad():
        before = head(**inputs, causal=torch.tensor(causal))[0]
        after = head(**perturb_after(inputs, turn), causal=torch.tensor(causal))[0]
    unchanged = torch.allclose(before[:, : turn + 1], after[:, : turn + 1], atol=ATOL, rtol=0)
    assert unchanged is causal
    assert not torch.allclose(before[:, turn + 1 :], after[:, turn + 1 :], atol=1e-3)


@pytest.mark.parametrize("causal", [True, False])
def test_context_ignores_padded_turns(head: ContextHead, config: ModelConfig, causal: bool) -> None:
    inputs = context_inputs(6, config.embed_dim)
    padded = perturb_after(inputs, 3)
    padded["turn_mask"][:, 4:] = False
    trimmed = {k: v[:, :4] for k, v in inputs.items()}
    with torch.no_grad():
        full = head(**padded, causal=torch.tensor(causal))
        short = head(**trimmed, causal=torch.tensor(causal))
    for a, b in zip(full, short, strict=True):
        torch.testing.assert_close(a[:, :4], b, atol=ATOL, rtol=0)


def test_emotion_model_forward_shapes_and_freezing(config: ModelConfig) -> None:
    torch.manual_seed(0)
    model = EmotionModel(ModelConfig.tiny(text_trainable_layers=1))
    batch = encoder_batch([[2023], [2003, 2023], [7592]], [torch.randn(800)] * 3, [True] * 3, [True, False, True])
    out = model(
        **batch,
        turn_index=torch.tensor([[0, 1], [2, -1]]),
        speakers=torch.tensor([[0, 1], [0, 0]]),
        turn_mask=torch.tensor([[True, True], [True, False]]),
        causal=True,
    )
    assert out.emotion_logits.shape == (2, 2, len(config.emotions))
    assert out.sentiment_logits.shape == (2, 2, len(config.sentiments))
    assert out.embeddings.shape == (2, 2, config.embed_dim)
    bert = model.encoder.text.bert
    assert not bert.embeddings.word_embeddings.weight.requires_grad
    assert not any(p.requires_grad for p in bert.encoder.layer[0].parameters())
    assert all(p.requires_grad for p in bert.encoder.layer[-1].parameters())


def test_weights_hash_mismatch_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"not the pinned weights")
    with pytest.raises(WeightsHashError, match="does not match the pinned"):
        verify_weights(weights)


@pytest.mark.slow
def test_pretrained_encoder_reproduces_published_minilm_similarity() -> None:
    """sentence-transformers documents cos("The new movie is awesome", "... is so great") = 0.8939 for this model."""
    tokenizer, text = load_tokenizer(), TextEncoder.pretrained().eval()
    encodings = tokenizer.encode_batch(["The new movie is awesome", "The new movie is so great"])
    with torch.no_grad():
        pooled = text(torch.tensor([e.ids for e in encodings]), torch.tensor([e.attention_mask for e in encodings]))
    assert torch.cosine_similarity(pooled[0], pooled[1], dim=0).item() == pytest.approx(0.8939, abs=1e-4)
    with pytest.raises(WeightsHashError):
        TextEncoder.pretrained(expected_sha256="0" * 64)
