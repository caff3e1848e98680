"""The packed text path (encoder.packed.onnx): turns without audio scored on their tokens end to end, unpadded.
It gives the encoder's own embedding, the runtime uses it only for calls without audio on the fp32 graph, and
an artifact without it, or with one that disagrees, is scored padded as before."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from model.artifact import ENCODER_FILE, PACKED_TEXT_FILE, ModelArtifact, derive_artifact, export_artifact
from model.export import PACKED_TEXT_INPUTS, PackedTextPath, example_encoder_inputs, example_packed_text_inputs
from model.network import EmotionModel, ModelConfig
from model.preprocess import PreparedUtterance, PreprocessError, pack
from model.runtime import EncoderSessions, InferenceRuntime, UtteranceInput, open_session, session_options
from tests.conftest import one_torch_thread

TEXTS = ["Oh my God!", "I don't know what you're talking about, but fine.", "Yeah.", "", "No way. Really?"]
NO_AUDIO = np.zeros(1, dtype=np.float32)
LATE: dict[str, object] = dict(fusion="late", fusion_weight=0.5, audio_temperature=2.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    yield from one_torch_thread()


def _model(seed: int, **overrides: object) -> EmotionModel:
    torch.manual_seed(seed)
    return EmotionModel(ModelConfig.tiny(**overrides), pretrained_text=False).eval()


@pytest.fixture(scope="module", params=["gate", "late"])
def artifact(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    out = tmp_path_factory.mktemp(request.param)
    return export_artifact(_model(0, **_fusion(request.param)), out, version=f"{request.param}-0", int8=True)


def _fusion(kind: str) -> dict[str, object]:
    return LATE if kind == "late" else {}


def _utterance(ids: list[int], has_text: bool = True) -> PreparedUtterance:
    return PreparedUtterance(np.array(ids, dtype=np.int64), has_text, NO_AUDIO, False)


def _padded_runtime(artifact: ModelArtifact) -> InferenceRuntime:
    runtime = InferenceRuntime.load(artifact, device="cpu", intra_op_threads=1)
    runtime._encoder = replace(runtime._encoder, packed=None)
    return runtime


def test_pack_lays_the_tokens_end_to_end_and_says_where_each_row_finds_them() -> None:
    batch = pack([_utterance([101, 7, 102]), _utterance([101, 102], has_text=False), _utterance([101, 8, 9, 102])])
    np.testing.assert_array_equal(batch.token_ids, [101, 7, 102, 101, 102, 101, 8, 9, 102])
    np.testing.assert_array_equal(batch.positions, [0, 1, 2, 0, 1, 0, 1, 2, 3])
    padding = 9  # one past the last token: the zero row the graph appends
    np.testing.assert_array_equal(batch.row_tokens, [[0, 1, 2, padding], [3, 4, padding, padding], [5, 6, 7, 8]])
    np.testing.assert_array_equal(batch.row_mask, batch.row_tokens != padding)
    np.testing.assert_array_equal(batch.token_slots, [0, 1, 2, 4, 5, 8, 9, 10, 11])
    np.testing.assert_array_equal(batch.row_tokens.reshape(-1)[batch.token_slots], np.arange(9))
    np.testing.assert_array_equal(batch.has_text, [True, False, True])
    assert tuple(batch.feeds()) == PACKED_TEXT_INPUTS


def test_pack_refuses_audio_and_empty_calls() -> None:
    with pytest.raises(PreprocessError, match="without audio"):
        pack([PreparedUtterance(np.array([101, 102]), True, np.ones(5, dtype=np.float32), True)])
    with pytest.raises(PreprocessError, match="no utterances"):
        pack([])


@pytest.mark.parametrize("fusion", ["gate", "late"])
def test_the_packed_forward_is_the_encoders_own_embedding_of_turns_without_audio(fusion: str) -> None:
    encoder = _model(3, **_fusion(fusion)).encoder
    for batch, tokens, seed in ((5, 11, 0), (1, 2, 1), (4, 6, 2)):
        padded = example_encoder_inputs(batch, tokens, samples=1, seed=seed)
        padded["has_audio"] = torch.zeros_like(padded["has_audio"])
        with torch.no_grad():
            expected = encoder(**padded)
            got = PackedTextPath(encoder)(**example_packed_text_inputs(batch, tokens, seed))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_the_runtime_scores_calls_without_audio_packed_with_the_padded_answers(artifact: ModelArtifact) -> None:
    packed = InferenceRuntime.load(artifact, device="cpu", intra_op_threads=1)
    assert artifact.packed_text_path is not None and packed._encoder.packed is not None
    padded = _padded_runtime(artifact)
    dialogues = [
        [UtteranceInput(text, None, "ab"[i % 2]) for i, text in enumerate(TEXTS)],
        [UtteranceInput("Hm.", None)],
    ]
    for causal in (False, True):
        for turns, reference in zip(
            packed.classify(dialogues, causal), padded.classify(dialogues, causal), strict=True
        ):
            for turn, other in zip(turns, reference, strict=True):
                np.testing.assert_allclose(turn.embedding, other.embedding, atol=1e-5, rtol=0)
                np.testing.assert_allclose(turn.emotion_probs, other.emotion_probs, atol=1e-5, rtol=0)


def test_calls_with_audio_and_int8_calls_run_padded(artifact: ModelArtifact, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(EncoderSessions, "embed_packed", lambda self, batch: calls.append(len(batch)))
    runtime = InferenceRuntime.load(artifact, device="cpu", intra_op_threads=1)
    clip = np.random.default_rng(0).normal(0, 0.1, 8_000).astype(np.float32)
    runtime.encode([UtteranceInput(TEXTS[0], clip), UtteranceInput(TEXTS[1], None)])
    assert calls == []
    int8 = InferenceRuntime.load(artifact, device="cpu", intra_op_threads=1, precision="int8")
    assert int8._encoder.packed is None  # the packed graph is fp32's
    rescoring = InferenceRuntime.load(artifact, device="cpu", intra_op_threads=1, precision="int8", rescore_margin=0.1)
    assert rescoring._fp32_encoder is not None and rescoring._fp32_encoder.packed is not None


@pytest.mark.parametrize(("offset", "kept"), [(3e-5, True), (1e-3, False)])
def test_a_packed_text_path_is_kept_within_the_parity_bar_and_dropped_beyond_it(
    artifact: ModelArtifact, tmp_path: Path, offset: float, kept: bool
) -> None:
    """It adds in another order than encoder.onnx, so rounding above the text path's 1e-5 must not drop it; a
    graph that really disagrees must be dropped."""
    assert artifact.packed_text_path is not None
    shifted = _shifted_output(artifact.packed_text_path, tmp_path / PACKED_TEXT_FILE, offset)
    options = session_options(1)
    sessions = EncoderSessions(
        open_session(artifact.encoder_path, "cpu", options), packed=open_session(shifted, "cpu", options)
    )
    probe = InferenceRuntime.load(artifact, device="cpu", intra_op_threads=1).preprocessor.prepare(TEXTS, [None] * 5)
    checked = sessions.checked(probe)
    assert (checked.packed is not None) is kept and checked.full is sessions.full


def _shifted_output(path: Path, out: Path, offset: float) -> Path:
    """The graph at `path` with `offset` added to its embedding."""
    model = onnx.load(str(path))
    graph = model.graph
    for node in graph.node:
        node.output[:] = ["unshifted" if name == "embedding" else name for name in node.output]
    graph.initializer.append(onnx.numpy_helper.from_array(np.array(offset, dtype=np.float32), "offset"))
    graph.node.append(onnx.helper.make_node("Add", ["unshifted", "offset"], ["embedding"]))
    onnx.save(model, str(out))
    return out


def test_an_artifact_without_the_packed_text_path_is_scored_padded(artifact: ModelArtifact, tmp_path: Path) -> None:
    older = derive_artifact(artifact, tmp_path / "older", version="older", graphs={PACKED_TEXT_FILE: None})
    assert older.packed_text_path is None and PACKED_TEXT_FILE not in older.files
    runtime = InferenceRuntime.load(older, device="cpu", intra_op_threads=1)
    assert runtime._encoder.packed is None
    texts = [UtteranceInput(text, None) for text in TEXTS]
    np.testing.assert_allclose(runtime.encode(texts), _padded_runtime(artifact).encode(texts), atol=0, rtol=0)


def test_the_packed_text_path_travels_with_its_encoder_and_not_without_it(
    artifact: ModelArtifact, tmp_path: Path
) -> None:
    assert set(artifact.encoder_graphs()) == {ENCODER_FILE, "encoder.int8.onnx", PACKED_TEXT_FILE}
    recalibrated = derive_artifact(artifact, tmp_path / "same", version="same-encoder")
    assert recalibrated.files[PACKED_TEXT_FILE] == artifact.files[PACKED_TEXT_FILE]
    other = export_artifact(_model(2), tmp_path / "other", version="other", int8=False)
    retrained = derive_artifact(
        artifact, tmp_path / "new", version="new-encoder", graphs={ENCODER_FILE: other.encoder_path}
    )
    assert retrained.packed_text_path is None  # the old one would score the old encoder's weights
