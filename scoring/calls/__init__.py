"""Whole call recordings: voice activity per channel, turns, speech to text, analytics (scoring.calls.pipeline)."""

from scoring.calls.analytics import CallAnalytics, SpeakerAnalytics, TurnEmotion
from scoring.calls.emotion import CallEmotions
from scoring.calls.pipeline import AudioSlice, CallOptions, CallResult, EmotionScorer, Turn, process_call

__all__ = [
    "AudioSlice",
    "CallAnalytics",
    "CallEmotions",
    "CallOptions",
    "CallResult",
    "EmotionScorer",
    "SpeakerAnalytics",
    "Turn",
    "TurnEmotion",
    "process_call",
]
