"""Context over kept turns: `InferenceRuntime.classify(..., history=...)` encodes only the new turns and reads the
kept embeddings ahead of them, which in causal mode is the whole dialogue's answer for those turns (what a live
stream relies on). Real MELD dialogues and real speech on the tiny artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.audio import decode_audio
from model.data.meld import group_dialogues, read_utterances
from model.data.speech import read_clips
from model.preprocess import PreprocessError
from model.runtime import EmbeddedDialogue, InferenceRuntime, TurnPrediction, UtteranceInput

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def runtime(tiny_artifact: Path) -> InferenceRuntime:
    return InferenceRuntime.load(tiny_artifact, device="cpu", intra_op_threads=1)


@pytest.fixture(scope="module")
def dialogues(data_dir: Path) -> list[list[UtteranceInput]]:
    """Three MELD test dialogues; every third turn also carries a real RAVDESS clip."""
    clip = decode_audio(read_clips(data_dir, "ravdess")[7].path)
    meld = [d for d in group_dialogues(read_utterances(data_dir, "test")) if 5 <= len(d.utterances) <= 12][:3]
    return [
        [
            UtteranceInput(text=u.text, audio=clip if index % 3 == 2 else None, speaker=u.speaker)
            for index, u in enumerate(dialogue.utterances)
        ]
        for dialogue in meld
    ]


def _kept(turns: list[TurnPrediction], dialogue: list[UtteranceInput], upto: int) -> EmbeddedDialogue:
    return np.stack([turn.embedding for turn in turns[:upto]]), [turn.speaker for turn in dialogue[:upto]]


def _assert_same(streamed: TurnPrediction, whole: TurnPrediction) -> None:
    np.testing.assert_allclose(streamed.emotion_probs, whole.emotion_probs, atol=TOLERANCE)
    np.testing.assert_allclose(streamed.sentiment_probs, whole.sentiment_probs, atol=TOLERANCE)
    np.testing.assert_allclose(streamed.embedding, whole.embedding, atol=TOLERANCE)
    assert streamed.emotion == whole.emotion


@pytest.mark.data
def test_one_new_turn_after_kept_embeddings_equals_the_whole_causal_dialogue(
    runtime: InferenceRuntime, dialogues: list[list[UtteranceInput]]
) -> None:
    for dialogue in dialogues:
        (whole,) = runtime.classify([dialogue], causal=True)
        for t in range(len(dialogue)):
            history = [_kept(whole, dialogue, t)] if t else [None]
            (streamed,) = runtime.classify([[dialogue[t]]], causal=True, history=history)
            assert len(streamed) == 1
            _assert_same(streamed[0], whole[t])


@pytest.mark.data
def test_dialogues_with_and_without_history_share_one_call(
    runtime: InferenceRuntime, dialogues: list[list[UtteranceInput]]
) -> None:
    """A batch mixes a plain dialogue, two new turns after a history, and a history with no new turn."""
    first, second, third = dialogues
    wholes = [runtime.classify([d], causal=True)[0] for d in dialogues]
    results = runtime.classify(
        [first, second[3:5], []],
        causal=True,
        history=[None, _kept(wholes[1], second, 3), _kept(wholes[2], third, 2)],
    )
    assert [len(r) for r in results] == [len(first), 2, 0]
    for streamed, whole in zip(results[0], wholes[0], strict=True):
        _assert_same(streamed, whole)
    for streamed, whole in zip(results[1], wholes[1][3:5], strict=True):
        _assert_same(streamed, whole)


@pytest.mark.data
def test_waves_read_each_dialogue_after_its_own_history(
    tiny_artifact: Path, dialogues: list[list[UtteranceInput]]
) -> None:
    """Answered wave by wave (calls of two turns, shortest first, so out of input order), a new turn still reads
    the history given for it, and an empty dialogue after a history comes back empty."""
    pairs = InferenceRuntime.load(tiny_artifact, device="cpu", intra_op_threads=1, max_batch_size=2)
    first, second, third = dialogues
    wholes = [pairs.classify([d], causal=True)[0] for d in dialogues]
    asked = [first, [second[3]], [third[2]], []]
    history = [None, _kept(wholes[1], second, 3), _kept(wholes[2], third, 2), _kept(wholes[2], third, 2)]
    waves = list(pairs.classify_in_waves(asked, True, history))
    answered = {i: turns for wave, scored in waves for i, turns in zip(wave, scored, strict=True)}
    assert sorted(answered) == [0, 1, 2, 3] and answered[3] == []
    for streamed, whole in zip(answered[0], wholes[0], strict=True):
        _assert_same(streamed, whole)
    _assert_same(answered[1][0], wholes[1][3])
    _assert_same(answered[2][0], wholes[2][2])


@pytest.mark.data
def test_int8_near_tie_rescoring_keeps_the_history(tiny_artifact: Path, dialogues: list[list[UtteranceInput]]) -> None:
    """With a margin just under 1 every int8 turn is re-encoded in fp32, so the answer after a kept (fp32) history
    must be fp32's: the re-scoring pass reads the same history as the first pass."""
    fp32 = InferenceRuntime.load(tiny_artifact, device="cpu", intra_op_threads=1)
    int8 = InferenceRuntime.load(
        tiny_artifact, device="cpu", intra_op_threads=1, precision="int8", rescore_margin=0.999
    )
    dialogue = dialogues[0]
    (whole,) = fp32.classify([dialogue], causal=True)
    last = len(dialogue) - 1
    (streamed,) = int8.classify([[dialogue[last]]], causal=True, history=[_kept(whole, dialogue, last)])
    assert streamed[0].rescored
    _assert_same(streamed[0], whole[last])


def test_a_history_that_does_not_fit_the_model_is_refused(runtime: InferenceRuntime) -> None:
    turn = [UtteranceInput(text="hello", audio=None, speaker="a")]
    with pytest.raises(PreprocessError, match="history embeddings"):
        runtime.classify([turn], causal=True, history=[(np.zeros((2, runtime.embed_dim + 1)), ["a", "b"])])
    with pytest.raises(PreprocessError, match="speakers"):
        runtime.classify([turn], causal=True, history=[(np.zeros((2, runtime.embed_dim)), ["a"])])
    with pytest.raises(PreprocessError, match="histories"):
        runtime.classify([turn], causal=True, history=[])
