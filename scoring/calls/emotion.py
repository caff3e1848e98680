"""Emotion for a call's turns through the served model (model.runtime.InferenceRuntime.classify).

The call is one dialogue: its turns in start order, each with its redacted transcript and its own channel's audio,
the speakers being the channel names. A recording is whole when it is scored, so by default the context head reads
it in both directions (`causal=True` gives each turn only the turns before it, as a live stream has).

A model trained on text alone (`hears_audio` false) cannot score a turn in which nothing was recognised: such a
turn gets no emotion, and the call is the dialogue of its other turns.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from model.labels import LabelSet
from model.preprocess import heard
from model.runtime import TurnPrediction, UtteranceInput
from scoring.calls.analytics import TurnEmotion
from scoring.calls.pipeline import Turn


class Classifier(Protocol):
    """What is used of model.runtime.InferenceRuntime (the service holds it behind a protocol of its own)."""

    emotions: LabelSet
    sentiments: LabelSet

    @property
    def hears_audio(self) -> bool: ...

    def classify(self, dialogues: list[list[UtteranceInput]], causal: bool) -> list[list[TurnPrediction]]: ...


class CallEmotions:
    """An EmotionScorer for `process_call`. `predictions` keeps the model's answers for the turns of the latest call
    it scored (their embeddings and indices, which the service logs; None for a turn the model cannot score): use
    one instance per call at a time."""

    def __init__(self, runtime: Classifier, causal: bool = False) -> None:
        self.runtime = runtime
        self.causal = causal
        self.predictions: list[TurnPrediction | None] = []

    def __call__(self, turns: Sequence[Turn], channels: np.ndarray) -> list[TurnEmotion | None]:
        dialogue = turn_inputs(turns, channels)
        scored = [i for i, turn in enumerate(dialogue) if heard(self.runtime.hears_audio, turn.text, turn.audio)]
        answers = self.runtime.classify([[dialogue[i] for i in scored]], self.causal)[0] if scored else []
        self.predictions = [None] * len(dialogue)
        for index, answer in zip(scored, answers, strict=True):
            self.predictions[index] = answer
        return [self._emotion(p) for p in self.predictions]

    def _emotion(self, prediction: TurnPrediction | None) -> TurnEmotion | None:
        return None if prediction is None else turn_emotion(prediction, self.runtime.emotions, self.runtime.sentiments)


def turn_inputs(turns: Sequence[Turn], channels: np.ndarray) -> list[UtteranceInput]:
    """The model's input for each turn: its transcript (none when nothing was recognised) and its channel's audio."""
    return [UtteranceInput(turn.text or None, turn.audio.cut(channels), turn.speaker) for turn in turns]


def turn_emotion(prediction: TurnPrediction, emotions: LabelSet, sentiments: LabelSet) -> TurnEmotion:
    return TurnEmotion(
        label=prediction.emotion,
        probabilities=_named(emotions, prediction.emotion_probs),
        sentiment=prediction.sentiment,
        sentiment_probabilities=_named(sentiments, prediction.sentiment_probs),
    )


def _named(labels: LabelSet, probabilities: np.ndarray) -> dict[str, float]:
    return {name: float(p) for name, p in zip(labels.names, probabilities, strict=True)}
