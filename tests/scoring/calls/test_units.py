"""The parts of the call pipeline that need no model: word error rate, turns from segments, talk-over, redaction of
transcripts, analytics and the timeline picture."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from matplotlib.image import imread

from model.audio import SAMPLE_RATE
from model.speech_to_text import Transcript, Word
from scoring.calls.analytics import TimedTurn, TurnEmotion, analyse, rms_dbfs, sentiment_by_quarter
from scoring.calls.segment import Segment, build_turns, speech_seconds, talk_over
from scoring.calls.timeline import timeline_png
from scoring.calls.transcribe import redact_transcript
from scoring.calls.wer import edit_distance, word_error_rate
from scoring.summary import SummaryOptions


def seg(channel: int, start_s: float, end_s: float) -> Segment:
    return Segment(channel, round(start_s * SAMPLE_RATE), round(end_s * SAMPLE_RATE))


def test_edit_distance_counts_substitutions_deletions_and_insertions() -> None:
    assert edit_distance([], []) == 0
    assert edit_distance(["a", "b", "c"], ["a", "b", "c"]) == 0
    assert edit_distance(["a", "b", "c"], ["a", "x", "c"]) == 1  # substitution
    assert edit_distance(["a", "b", "c"], ["a", "c"]) == 1  # deletion
    assert edit_distance(["a", "b", "c"], ["a", "b", "x", "c"]) == 1  # insertion
    assert edit_distance(["a", "b"], ["b", "a"]) == 2  # no transposition
    assert edit_distance(["a", "b", "c"], []) == 3
    assert edit_distance([], ["a", "b"]) == 2


def test_word_error_rate_normalises_case_and_punctuation() -> None:
    assert word_error_rate("Kids are talking by the door.", "kids are talking by the door") == 0.0
    assert word_error_rate("I can't pay", "I cannot pay") == pytest.approx(1 / 3)
    assert word_error_rate("one two three four", "one two") == 0.5
    assert word_error_rate("one", "one two three") == 2.0  # insertions can exceed 1
    with pytest.raises(ValueError, match="no words"):
        word_error_rate(" ... ", "anything")


def test_a_speakers_short_pause_stays_in_the_turn_unless_the_other_speaker_starts_in_it() -> None:
    segments = sorted(
        [seg(0, 0.0, 1.0), seg(0, 1.5, 2.0), seg(1, 3.0, 4.0), seg(0, 4.2, 5.0), seg(1, 4.5, 4.8), seg(1, 5.2, 6.0)],
        key=lambda s: s.start,
    )
    turns = build_turns(segments, merge_gap_s=1.0)
    assert [(t.channel, t.start / SAMPLE_RATE, t.end / SAMPLE_RATE) for t in turns] == [
        (0, 0.0, 2.0),  # the 0.5 s pause is inside the turn
        (1, 3.0, 4.0),  # the next segment of channel 1 comes after channel 0 started speaking
        (0, 4.2, 5.0),
        (1, 4.5, 6.0),  # 0.4 s pause while channel 0 had already started: no new start in the pause
    ]
    assert [len(t.segments) for t in turns] == [2, 1, 1, 2]
    assert len(build_turns(segments, merge_gap_s=0.0)) == 6


def test_talk_over_is_the_time_two_channels_speak_at_once() -> None:
    segments = [seg(0, 0.0, 3.0), seg(1, 2.0, 4.0), seg(1, 5.0, 6.0), seg(0, 5.9, 7.0), seg(0, 8.0, 9.0)]
    found = talk_over(sorted(segments, key=lambda s: s.start), min_seconds=0.25)
    assert found.count == 1  # the 0.1 s touch at 5.9 is below the minimum
    assert found.episodes[0] == pytest.approx((2.0, 3.0, 1))  # channel 1 spoke over channel 0
    assert found.seconds == pytest.approx(1.0)
    assert talk_over(segments, min_seconds=0.0).count == 2
    assert speech_seconds(segments) == pytest.approx(4.0 + 2.0 + 1.0)


def _transcript(words: list[str]) -> Transcript:
    return Transcript(" ".join(words), tuple(Word(w, i, i + 0.5, 0.9) for i, w in enumerate(words)))


def test_redaction_reaches_the_words_and_keeps_their_times() -> None:
    words = ["call", "me", "on", "555", "123", "4567", "or", "bob@example.com", "thanks"]
    redacted, changed = redact_transcript(_transcript(words))
    assert changed
    assert redacted.text == "call me on [PHONE] or [EMAIL] thanks"
    assert [w.text for w in redacted.words] == ["call", "me", "on", "[PHONE]", "or", "[EMAIL]", "thanks"]
    phone = redacted.words[3]
    assert (phone.start_s, phone.end_s) == (3, 5.5)  # from the first digit group's start to the last one's end
    assert not any(char.isdigit() for word in redacted.words for char in word.text)
    clean = _transcript(["no", "personal", "data"])
    assert redact_transcript(clean) == (clean, False)


def test_loudness_in_dbfs() -> None:
    time = np.arange(SAMPLE_RATE) / SAMPLE_RATE
    assert rms_dbfs(np.sin(2 * np.pi * 440 * time)) == pytest.approx(-3.0103, abs=1e-3)
    assert rms_dbfs(0.1 * np.sin(2 * np.pi * 440 * time)) == pytest.approx(-23.0103, abs=1e-3)
    assert rms_dbfs(np.zeros(10)) == -math.inf and rms_dbfs(np.zeros(0)) == -math.inf


def _emotion(label: str, anger: float, sentiment: str) -> TurnEmotion:
    return TurnEmotion(label, {"neutral": 1 - anger, "anger": anger}, sentiment)


def test_call_analytics_from_known_segments_turns_and_emotions() -> None:
    duration = 40.0
    channels = np.zeros((2, round(duration * SAMPLE_RATE)), dtype=np.float32)
    channels[0, : 10 * SAMPLE_RATE] = 0.1  # constant: RMS -20 dBFS
    segments = [seg(0, 0.0, 10.0), seg(1, 9.0, 15.0), seg(1, 30.0, 40.0)]
    overlap = talk_over(segments, 0.25)
    turns = [
        TimedTurn(0, "agent", 0, 0.0, 10.0, words=20),
        TimedTurn(1, "customer", 1, 9.0, 15.0, words=6),
        TimedTurn(2, "customer", 1, 30.0, 40.0, words=10),
    ]
    emotions = [
        _emotion("neutral", 0.1, "positive"),
        _emotion("neutral", 0.2, "neutral"),
        _emotion("anger", 0.7, "negative"),
    ]
    found = analyse(channels, ["agent", "customer"], segments, overlap, turns, emotions, SummaryOptions())
    assert found.speech_s == pytest.approx(25.0) and found.silence_s == pytest.approx(15.0)
    assert found.talk_silence_ratio == pytest.approx(25 / 15)
    assert (found.talk_over_count, found.talk_over_s) == (1, pytest.approx(1.0))
    agent, customer = found.speakers
    assert (agent.talk_s, customer.talk_s) == (pytest.approx(10.0), pytest.approx(16.0))
    assert agent.words_per_minute == pytest.approx(120.0) and customer.words_per_minute == pytest.approx(60.0)
    assert agent.loudness_dbfs == pytest.approx(-20.0, abs=1e-3) and customer.loudness_dbfs is None
    assert (agent.talk_over_started, customer.talk_over_started) == (0, 1)
    assert found.escalation_points == (2,)  # the customer's anger rose by 0.5 (scoring.summary's rule)
    assert customer.sentiment_by_quarter == (None, pytest.approx(0.0), None, pytest.approx(-1.0))  # midpoints 12, 35
    assert agent.sentiment_by_quarter == (pytest.approx(1.0), None, None, None)
    assert customer.negative_share == pytest.approx(0.5)
    assert [row["label"] for row in customer.emotion_timeline] == ["neutral", "anger"]
    without = analyse(channels, ["agent", "customer"], segments, overlap, turns)
    assert without.escalation_points is None and without.speakers[1].emotion_timeline == ()
    # A turn the model could not score (no words, for a model trained on text alone) is left out of the figures.
    unscored = analyse(channels, ["agent", "customer"], segments, overlap, turns, [*emotions[:1], None, emotions[2]])
    assert [row["turn"] for row in unscored.speakers[1].emotion_timeline] == [2]
    assert unscored.speakers[1].negative_share == pytest.approx(1.0) and unscored.escalation_points == ()
    with pytest.raises(ValueError, match="2 emotions were given for 3 turns"):
        analyse(channels, ["agent", "customer"], segments, overlap, turns, emotions[:2])


def test_sentiment_by_quarter_uses_probabilities_when_given() -> None:
    emotion = TurnEmotion("joy", {"joy": 1.0}, "positive", {"positive": 0.7, "negative": 0.2, "neutral": 0.1})
    assert emotion.sentiment_score == pytest.approx(0.5)
    rows = [
        {"start_s": 0.0, "end_s": 2.0, "sentiment_score": 0.5},
        {"start_s": 98, "end_s": 100, "sentiment_score": None},
    ]
    assert sentiment_by_quarter(rows, 100.0) == (0.5, None, None, None)


def test_the_timeline_is_a_png_with_a_row_per_speaker() -> None:
    turns = [TimedTurn(0, "agent", 0, 0.0, 2.0, 3), TimedTurn(1, "customer", 1, 2.5, 4.0, 2)]
    picture = timeline_png(["agent", "customer"], turns, ["anger", None], 5.0)
    assert picture.startswith(b"\x89PNG\r\n\x1a\n")
    pixels = imread(io.BytesIO(picture))
    assert pixels.shape[0] > 50 and pixels.shape[1] > 500
    red = (pixels[..., 0] > 0.8) & (pixels[..., 1] < 0.3) & (pixels[..., 2] < 0.3)
    assert red.sum() > 1000  # the anger bar is drawn in its colour
    with pytest.raises(ValueError, match="1 labels were given for 2 turns"):
        timeline_png(["agent", "customer"], turns, ["anger"], 5.0)
