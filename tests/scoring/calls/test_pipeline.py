"""Whole calls with known truth through the pipeline: stereo calls assembled from the held-out RAVDESS actors'
clips (turns, speakers, start times, talk-over, emotions plugged in) and speech synthesised with espeak-ng (word
error rate of the bundled Whisper tiny.en)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from benchmarks.call_builder import (
    AssembledCall,
    assemble,
    espeak,
    espeak_available,
    matched_turns,
    ravdess_utterances,
)
from model.audio import SAMPLE_RATE
from model.speech_to_text import SpeechToText, voice_activity
from scoring.calls import CallResult, Turn, TurnEmotion, process_call
from scoring.calls.pipeline import MONO_NOTE
from scoring.calls.wer import word_error_rate

START_TOLERANCE_S = 0.5
ROLES = ("agent", "customer")
# Bounds on the word error rate of the synthetic call below, by sample rate: measured 0.10 at 16 kHz and 0.26 at
# 8 kHz (espeak-ng 1.51 on Debian 12; telephone band-limiting costs formant speech much of its consonants).
WER_BOUNDS = {16_000: 0.15, 8_000: 0.35}
SENTENCES = (
    "Thank you for calling, my name is Sarah, how can I help you today?",
    "Hello, I ordered a blue jacket last week and it arrived damaged.",
    "I am sorry to hear that. Could you give me the order number please?",
    "Yes, I placed the order on Monday morning.",
    "Thank you. I can send you a new jacket or refund the money.",
    "I would like a refund please, as soon as possible.",
    "The refund will reach your account within five working days.",
    "Great, thank you very much for your help. Goodbye.",
)

pytestmark = pytest.mark.slow


def assert_turns_found(call: AssembledCall, result: CallResult) -> list[Turn | None]:
    pairs = matched_turns(call, result.turns, START_TOLERANCE_S)
    share = sum(turn is not None for turn in pairs) / len(call.turns)
    print(f"turns: {len(result.turns)} found, {len(call.turns)} true; {share:.0%} matched within {START_TOLERANCE_S} s")
    assert abs(len(result.turns) - len(call.turns)) <= 0.1 * len(call.turns)
    assert share >= 0.9
    assert all(turn.speaker == ROLES[truth.channel] for turn, truth in zip(pairs, call.turns, strict=True) if turn)
    return pairs


@pytest.fixture(scope="module")
def ravdess_call(data_dir: Path) -> AssembledCall:
    return assemble(ravdess_utterances(data_dir, 14, seed=1), seed=1)


@pytest.mark.data
def test_a_stereo_call_of_held_out_speakers_at_8_khz(ravdess_call: AssembledCall, stt: SpeechToText) -> None:
    truth_emotions = {}

    def emotions(turns: Sequence[Turn], channels: np.ndarray) -> list[TurnEmotion]:
        assert channels.shape[0] == 2 and all(len(turn.audio.cut(channels)) > 0 for turn in turns)
        labels = [truth_emotions.get(turn.turn, "neutral") for turn in turns]
        return [TurnEmotion(label, {label: 1.0, "anger": float(label == "anger")}, "neutral") for label in labels]

    first = process_call(ravdess_call.wav(8_000), ",".join(ROLES), stt=stt)
    pairs = assert_turns_found(ravdess_call, first)
    truth_emotions.update(
        {turn.turn: truth.emotion for turn, truth in zip(pairs, ravdess_call.turns, strict=True) if turn}
    )
    result = process_call(ravdess_call.wav(8_000), list(ROLES), stt=stt, emotions=emotions)
    assert [t.text for t in result.turns] == [t.text for t in first.turns]
    texts = [(truth.text, turn.text) for turn, truth in zip(pairs, ravdess_call.turns, strict=True) if turn]
    error = word_error_rate(" ".join(t for t, _ in texts), " ".join(h for _, h in texts))
    print(f"RAVDESS call: word error rate {error:.3f} on {len(texts)} matched turns")
    assert error < 0.3
    assert result.note is None and result.speakers == ROLES
    summary = result.analytics
    assert summary.talk_over_count == 0  # the clips are 0.5-2 s apart
    true_talk = [sum(t.end_s - t.start_s for t in ravdess_call.turns if t.channel == c) for c in (0, 1)]
    for speaker, talk in zip(summary.speakers, true_talk, strict=True):
        assert speaker.talk_s == pytest.approx(talk, rel=0.25)
        assert speaker.words_per_minute is not None and 60 < speaker.words_per_minute < 400
    assert summary.speech_s + summary.silence_s == pytest.approx(result.duration_s)
    timeline = [row["label"] for speaker in summary.speakers for row in speaker.emotion_timeline]
    assert sorted(timeline) == sorted(turn.emotion.label for turn in result.turns if turn.emotion)
    assert result.timeline_png().startswith(b"\x89PNG")
    document = result.to_dict()
    assert len(document["turns"]) == len(result.turns) and document["summary"]["escalation_points"] is not None
    assert set(result.timings) == {"decode", "vad", "asr", "emotion", "analytics"}


@pytest.mark.data
def test_talk_over_is_found_where_a_speaker_starts_before_the_other_ends(data_dir: Path, stt: SpeechToText) -> None:
    call = assemble(ravdess_utterances(data_dir, 5, seed=2), seed=2, overlap_at=3, overlap_s=1.0)
    result = process_call(call.wav(16_000), ",".join(ROLES), stt=stt)
    summary = result.analytics
    print(f"talk-over: {summary.talk_over_count} episodes, {summary.talk_over_s:.2f} s (true: 1, 1.00 s)")
    assert summary.talk_over_count == 1
    assert summary.talk_over_s == pytest.approx(1.0, abs=0.35)
    starter = call.turns[3].channel
    assert summary.speakers[starter].talk_over_started == 1


@pytest.mark.data
def test_a_mono_call_is_one_speaker_and_says_so(ravdess_call: AssembledCall, stt: SpeechToText) -> None:
    mono = AssembledCall(ravdess_call.channels.sum(axis=0, keepdims=True), ravdess_call.turns)
    result = process_call(mono.wav(8_000), stt=stt)
    assert result.note == MONO_NOTE and result.speakers == ("channel-0",)
    assert {turn.speaker for turn in result.turns} == {"channel-0"}
    assert result.to_dict()["diarised"] is False


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (make tools)")
@pytest.mark.parametrize("rate", sorted(WER_BOUNDS))
def test_word_error_rate_of_the_bundled_model_on_synthetic_speech(stt: SpeechToText, rate: int) -> None:
    voices = ("en-us", "en-gb")
    call = assemble([espeak(text, voices[i % 2]) for i, text in enumerate(SENTENCES)], seed=3)
    result = process_call(call.wav(rate), ",".join(ROLES), stt=stt)
    assert_turns_found(call, result)
    reference = " ".join(turn.text for turn in call.turns)
    hypothesis = " ".join(turn.text for turn in result.turns)
    error = word_error_rate(reference, hypothesis)
    print(f"espeak-ng call at {rate} Hz: word error rate {error:.3f} ({len(reference.split())} words)\n{hypothesis}")
    assert error < WER_BOUNDS[rate]
    words = [word for turn in result.turns for word in turn.words]
    assert all(a.start_s <= b.start_s for a, b in zip(words, words[1:], strict=False))
    for turn in result.turns:
        assert all(turn.start_s - 0.1 <= w.start_s <= w.end_s <= turn.end_s + 0.1 for w in turn.words)


@pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (make tools)")
def test_voice_activity_finds_a_sentence_in_silence() -> None:
    speech = espeak(SENTENCES[0]).wave
    wave = np.concatenate([np.zeros(SAMPLE_RATE), speech, np.zeros(SAMPLE_RATE)]).astype(np.float32)
    segments = voice_activity(wave)
    assert segments and abs(segments[0][0] / SAMPLE_RATE - 1.0) < 0.3
    assert abs(segments[-1][1] / SAMPLE_RATE - (1.0 + len(speech) / SAMPLE_RATE)) < 0.3
    assert voice_activity(np.zeros(SAMPLE_RATE, dtype=np.float32)) == []
