"""The text path of a late-fusion encoder (model/text_path.py): the same embedding as the whole graph for calls
without audio, none of the speech branch, used by the runtime only for such calls, and the whole graph wherever the
cut does not apply or does not agree."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from model.artifact import ModelArtifact, export_artifact
from model.network import EmotionModel, ModelConfig
from model.preprocess import collate
from model.runtime import EncoderSessions, InferenceRuntime, UtteranceInput, open_session, session_options
from model.text_path import NoTextPath, text_path_graph
from tests.conftest import one_torch_thread

TEXTS = ["Oh my God!", "I don't know what you're talking about, but fine.", "Yeah."]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    yield from one_torch_thread()


def _late(seed: int, out: Path) -> ModelArtifact:
    torch.manual_seed(seed)
    config = ModelConfig.tiny(fusion="late", fusion_weight=0.5, audio_temperature=2.0)
    return export_artifact(EmotionModel(config, pretrained_text=False).eval(), out, version=f"late-{seed}", int8=True)


@pytest.fixture(scope="module")
def late(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    return _late(0, tmp_path_factory.mktemp("late"))


def _sessions(artifact: ModelArtifact, path: Path) -> EncoderSessions:
    return EncoderSessions.open(artifact, path, "cpu", session_options(1))


def _batch(runtime: InferenceRuntime, audio: list[np.ndarray | None]) -> object:
    return collate(runtime.preprocessor.prepare(TEXTS, audio))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_the_text_path_gives_the_whole_graphs_embedding_without_the_speech_branch(
    late: ModelArtifact, precision: str
) -> None:
    path = late.encoder_file(precision)  # type: ignore[arg-type]
    sessions = _sessions(late, path)
    assert sessions.text_only is not None
    runtime = InferenceRuntime.load(late, device="cpu", intra_op_threads=1, precision=precision)  # type: ignore[arg-type]
    batch = _batch(runtime, [None] * len(TEXTS))
    whole = sessions.full.run(["embedding"], batch.feeds())[0]  # type: ignore[attr-defined]
    cut = sessions.text_only.run(["embedding"], batch.feeds())[0]  # type: ignore[attr-defined]
    assert cut.shape == whole.shape == (len(TEXTS), late.embed_dim)
    np.testing.assert_allclose(cut, whole, atol=1e-6, rtol=0)
    graph = onnx.load_from_string(text_path_graph(path, len(late.emotions)))
    consumed = {name for node in graph.graph.node for name in node.input}
    assert "audio" not in consumed  # no speech branch (has_audio still sets the flag)
    assert len(graph.graph.node) < len(onnx.load(str(path)).graph.node)


def test_the_runtime_uses_the_text_path_only_for_calls_without_audio(late: ModelArtifact) -> None:
    runtime = InferenceRuntime.load(late, device="cpu", intra_op_threads=1)
    options = session_options(1)
    whole = InferenceRuntime(
        late, open_session(late.encoder_path, "cpu", options), open_session(late.context_path, "cpu", options)
    )
    rng = np.random.default_rng(0)
    clip = rng.normal(0, 0.1, 16_000).astype(np.float32)
    dialogues = [
        [UtteranceInput(TEXTS[0], None, "a"), UtteranceInput(TEXTS[1], clip, "b")],
        [UtteranceInput(TEXTS[2], None, "a")],
        [UtteranceInput(None, clip, "c")],
    ]
    for causal in (False, True):
        got, expected = runtime.classify(dialogues, causal), whole.classify(dialogues, causal)
        for turns, reference in zip(got, expected, strict=True):
            for turn, other in zip(turns, reference, strict=True):
                np.testing.assert_allclose(turn.embedding, other.embedding, atol=1e-6, rtol=0)
                np.testing.assert_allclose(turn.emotion_probs, other.emotion_probs, atol=1e-6, rtol=0)
    assert np.abs(got[0][1].embedding[-len(late.emotions) - 2 : -2]).max() > 0  # audio evidence from the full graph


def test_graphs_that_are_not_late_fusion_encoders_keep_the_whole_graph(
    late: ModelArtifact, tiny_artifact: Path
) -> None:
    with pytest.raises(NoTextPath):
        text_path_graph(late.context_path, len(late.emotions))
    gate = InferenceRuntime.load(tiny_artifact, device="cpu", intra_op_threads=1)
    assert gate._encoder.text_only is None  # gate fusion mixes audio into the text embedding: nothing to cut


def test_a_text_path_that_disagrees_with_the_whole_graph_is_dropped(late: ModelArtifact, tmp_path: Path) -> None:
    other = _late(1, tmp_path / "other")
    mixed = EncoderSessions(_sessions(late, late.encoder_path).full, _sessions(other, other.encoder_path).text_only)
    runtime = InferenceRuntime.load(late, device="cpu", intra_op_threads=1)
    checked = mixed.checked(runtime.preprocessor.prepare(TEXTS, [None] * len(TEXTS)))
    assert checked.text_only is None and checked.full is mixed.full


def test_calls_with_audio_get_their_own_threads_and_the_same_answers(late: ModelArtifact) -> None:
    """The whole graph (the speech branch) may run on more threads than the text path, without spinning; answers
    do not depend on it."""
    one = InferenceRuntime.load(late, device="cpu", intra_op_threads=1)
    two = InferenceRuntime.load(late, device="cpu", intra_op_threads=1, audio_intra_op_threads=2)
    full, text = two._encoder.full.get_session_options(), two._encoder.text_only.get_session_options()  # type: ignore[union-attr]
    assert (full.intra_op_num_threads, text.intra_op_num_threads) == (2, 1)
    assert full.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert one._encoder.full.get_session_options().intra_op_num_threads == 1
    clip = np.random.default_rng(1).normal(0, 0.1, 24_000).astype(np.float32)
    dialogue = [[UtteranceInput(TEXTS[0], clip, "a"), UtteranceInput(TEXTS[1], None, "b")]]
    for turn, other in zip(two.classify(dialogue, True)[0], one.classify(dialogue, True)[0], strict=True):
        np.testing.assert_allclose(turn.emotion_probs, other.emotion_probs, atol=1e-5, rtol=0)
