"""Emotion for a call's turns (scoring.calls.emotion) through a real ONNX Runtime model: the call as one dialogue in
turn order, both directions by default, each turn with its own channel's audio, its transcript and its speaker."""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from benchmarks.call_builder import assemble, ravdess_held_out
from benchmarks.call_emotions import score_rate
from core.db.models import ContextMode
from model.audio import SAMPLE_RATE
from model.runtime import InferenceRuntime, UtteranceInput
from model.speech_to_text import SpeechToText
from scoring.calls import AudioSlice, CallEmotions, Turn
from scoring.calls.analytics import analyse
from scoring.calls.emotion import turn_inputs
from scoring.calls.pipeline import CallResult
from scoring.calls.records import call_document, call_records
from scoring.calls.segment import talk_over

ROLES = ("agent", "customer")


@pytest.fixture(scope="module")
def runtime(tiny_artifact: Path) -> InferenceRuntime:
    return InferenceRuntime.load(tiny_artifact, device="cpu", intra_op_threads=1)


@pytest.fixture(scope="module")
def call() -> tuple[list[Turn], np.ndarray]:
    """Four turns on two channels; each channel is noise of its own loudness, so cutting the wrong one shows."""
    rng = np.random.default_rng(0)
    seconds = 8
    channels = np.stack([rng.normal(0, 0.05, seconds * SAMPLE_RATE), rng.normal(0, 0.3, seconds * SAMPLE_RATE)])
    spans = [
        (0, 0.0, 1.5, "hello, how can I help?"),
        (1, 2.0, 3.5, "my order never came"),
        (0, 4.0, 5.0, ""),
        (1, 5.5, 7.5, "thanks"),
    ]
    turns = [
        Turn(i, start, end, ROLES[ch], text, (), AudioSlice(ch, int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)), None)
        for i, (ch, start, end, text) in enumerate(spans)
    ]
    return turns, channels.astype(np.float32)


def dialogue(turns: list[Turn], channels: np.ndarray) -> list[UtteranceInput]:
    return [
        UtteranceInput(t.text or None, channels[t.audio.channel, t.audio.start : t.audio.end], t.speaker) for t in turns
    ]


def test_the_call_is_scored_as_one_bidirectional_dialogue_of_its_turns(
    runtime: InferenceRuntime, call: tuple[list[Turn], np.ndarray]
) -> None:
    turns, channels = call
    scorer = CallEmotions(runtime)
    emotions = scorer(turns, channels)
    expected = runtime.classify([dialogue(turns, channels)], causal=False)[0]
    assert len(emotions) == len(scorer.predictions) == len(turns)
    for emotion, prediction in zip(emotions, expected, strict=True):
        assert emotion.label == prediction.emotion
        assert list(emotion.probabilities) == list(runtime.emotions.names)
        np.testing.assert_allclose(list(emotion.probabilities.values()), prediction.emotion_probs, atol=1e-6)
        assert emotion.sentiment == prediction.sentiment
        assert sum(emotion.sentiment_probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    # Both directions: the first turn's answer depends on the turns after it (causal it would not).
    alone = runtime.classify([dialogue(turns[:1], channels)], causal=False)[0][0]
    assert not np.allclose(scorer.predictions[0].emotion_probs, alone.emotion_probs, atol=1e-6)
    causal = CallEmotions(runtime, causal=True)
    causal(turns, channels)
    np.testing.assert_allclose(causal.predictions[0].emotion_probs, alone.emotion_probs, atol=1e-5)


def test_each_turn_is_heard_on_its_own_channel_and_an_empty_transcript_is_no_text(
    runtime: InferenceRuntime, call: tuple[list[Turn], np.ndarray]
) -> None:
    turns, channels = call
    scorer = CallEmotions(runtime)
    scorer(turns, channels)
    swapped = channels[::-1].copy()
    other = CallEmotions(runtime)
    other(turns, swapped)
    assert not np.allclose(scorer.predictions[1].emotion_probs, other.predictions[1].emotion_probs, atol=1e-6)
    inputs = turn_inputs(turns, channels)
    assert inputs[2].text is None and inputs[1].text == "my order never came"
    assert inputs[3].audio is not None and np.array_equal(
        inputs[3].audio, channels[1, 5 * SAMPLE_RATE + 8000 : 7 * SAMPLE_RATE + 8000]
    )


def test_speakers_are_the_channel_names(runtime: InferenceRuntime, call: tuple[list[Turn], np.ndarray]) -> None:
    turns, channels = call
    one_speaker = [Turn(t.turn, t.start_s, t.end_s, "agent", t.text, (), t.audio, None) for t in turns]
    scorer, same = CallEmotions(runtime), CallEmotions(runtime)
    scorer(turns, channels)
    same(one_speaker, channels)
    moved = [
        not np.allclose(a.emotion_probs, b.emotion_probs, atol=1e-6)
        for a, b in zip(scorer.predictions, same.predictions, strict=True)
    ]
    assert any(moved)


def test_a_model_trained_on_text_alone_scores_the_turns_with_words_and_leaves_the_others(
    text_only_artifact: Path, call: tuple[list[Turn], np.ndarray]
) -> None:
    """Turn 2 has no words: a text-only model cannot score it, so it gets no emotion and the call is the dialogue
    of the other turns (their answers are those of that dialogue), instead of the whole call failing."""
    turns, channels = call
    runtime = InferenceRuntime.load(text_only_artifact, device="cpu", intra_op_threads=1)
    scorer = CallEmotions(runtime)
    emotions = scorer(turns, channels)
    assert emotions[2] is None and scorer.predictions[2] is None
    worded = [turn for turn in turns if turn.text]
    expected = runtime.classify([dialogue(worded, channels)], causal=False)[0]
    got = [p for p in scorer.predictions if p is not None]
    assert len(got) == len(expected) == 3
    for prediction, reference in zip(got, expected, strict=True):
        np.testing.assert_allclose(prediction.emotion_probs, reference.emotion_probs, atol=1e-6)
    assert [e.label for e in emotions if e is not None] == [p.emotion for p in expected]
    # As stored: the unscored turn has no prediction row and no prediction id; the call's document keeps the turn.
    scored = tuple(dataclasses.replace(turn, emotion=e) for turn, e in zip(turns, emotions, strict=True))
    timed = [turn.timed() for turn in scored]
    analytics = analyse(channels, list(ROLES), [], talk_over([], 0.25), timed, emotions)
    result = CallResult(ROLES, scored, analytics, {}, None, channels)
    call_id = uuid.uuid4()
    records = call_records(
        call_id, result, scorer.predictions, model_version="v", context=ContextMode.BIDIRECTIONAL,
        created_at=datetime.now(UTC), latency_ms=1.0,
    )  # fmt: skip
    assert [r.turn_index for r in records] == [0, 1, 3]
    document = call_document(call_id, result, "v")["turns"]
    assert document[2]["emotion"] is None and document[2]["prediction_id"] is None
    assert document[3]["prediction_id"] == str(records[2].id)


def test_a_call_without_turns_has_no_emotions(runtime: InferenceRuntime) -> None:
    scorer = CallEmotions(runtime)
    assert scorer([], np.zeros((2, SAMPLE_RATE), dtype=np.float32)) == [] and scorer.predictions == []


@pytest.mark.data
@pytest.mark.slow
def test_turns_in_a_call_score_about_as_the_same_clips_alone(
    data_dir: Path, shipped_default: Path, stt: SpeechToText
) -> None:
    """Issue 22's comparison on 60 clips of the held-out actors at 16 kHz (benchmarks/call_emotions.py measures all
    240 at 16 and 8 kHz): per-turn accuracy of the call's turns against the same clips scored alone, both with
    their transcript and their audio. The bound is looser than the issue's 0.03, which the full benchmark measures."""
    runtime = InferenceRuntime.load(shipped_default, device="cpu", intra_op_threads=2)
    clips = ravdess_held_out(data_dir)[:60]
    calls = [(assemble(clips[i : i + 20], seed=i), clips[i : i + 20]) for i in range(0, len(clips), 20)]
    hits = score_rate(calls, 16_000, runtime, stt)
    accuracy = {name: float(np.mean(list(by_clip.values()))) for name, by_clip in hits.items()}
    print(f"60 clips at 16 kHz: {accuracy}")
    assert all(len(by_clip) == 60 for by_clip in hits.values())
    assert accuracy["matched"] >= 0.9
    assert abs(accuracy["call"] - accuracy["separate"]) <= 0.05
