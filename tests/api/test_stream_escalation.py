"""The live escalation watch pins the batch summary's rule (scoring.summary.escalation_points) on scripted turns: a
customer turn escalates when anger's (or the negative sentiment's) probability rises by more than the threshold
over the customer's previous turn, or its label turns to anger (negative); other speakers never escalate."""

from __future__ import annotations

import uuid

from api.schemas import UtterancePrediction
from api.stream import ANGER, NEGATIVE_SENTIMENT, EscalationWatch
from model.labels import EMOTIONS, SENTIMENTS
from scoring.summary import SummaryOptions


def _turn(index: int, speaker: str, anger: float, negative: float = 0.1) -> UtterancePrediction:
    """Neutral takes what anger (and the 0.02 of each other emotion) leave; likewise the neutral sentiment."""
    others = {name: 0.02 for name in EMOTIONS if name not in {"neutral", "anger"}}
    emotions = {"neutral": 1 - anger - sum(others.values()), "anger": anger, **others}
    sentiments = {"neutral": 0.95 - negative, "positive": 0.05, "negative": negative}
    return UtterancePrediction(
        prediction_id=uuid.uuid4(),
        turn_index=index,
        speaker=speaker,
        emotion=max(emotions, key=emotions.__getitem__),
        confidence=max(emotions.values()),
        probabilities={name: emotions[name] for name in EMOTIONS},
        sentiment=max(sentiments, key=sentiments.__getitem__),
        sentiment_probabilities={name: sentiments[name] for name in SENTIMENTS},
        model_version="v",
        latency_ms=1.0,
    )


def _signals(script: list[UtterancePrediction], threshold: float = 0.2) -> dict[int, list[tuple[str, float, float]]]:
    watch = EscalationWatch(SummaryOptions(customer="Customer", escalation_threshold=threshold))
    events = {}
    for turn in script:
        if (event := watch.observe(turn)) is not None:
            assert (event.turn_index, event.prediction_id, event.speaker) == (
                turn.turn_index,
                turn.prediction_id,
                "customer",
            )
            events[event.turn_index] = [(s.signal, s.probability, s.previous_probability) for s in event.signals]
    return events


def test_a_rise_in_anger_over_the_customers_previous_turn_escalates() -> None:
    script = [
        _turn(0, "customer", anger=0.10),  # the first customer turn has nothing to rise from
        _turn(1, "agent", anger=0.90),  # agents never escalate, nor count as the customer's previous turn
        _turn(2, "customer", anger=0.15),  # +0.05
        _turn(3, "customer", anger=0.40),  # +0.25, the label still neutral (0.50): escalates
        _turn(4, "customer", anger=0.48),  # +0.08, but the label turns to anger (neutral 0.42): escalates
        _turn(5, "customer", anger=0.55),  # still anger, +0.07: no
    ]
    assert _signals(script) == {3: [(ANGER, 0.40, 0.15)], 4: [(ANGER, 0.48, 0.40)]}


def test_negative_sentiment_follows_the_same_rule_and_both_can_fire_at_once() -> None:
    script = [
        _turn(0, "customer", anger=0.1, negative=0.20),
        _turn(1, "customer", anger=0.1, negative=0.45),  # +0.25 (still not the likeliest sentiment)
        _turn(2, "customer", anger=0.6, negative=0.80),  # anger turns up and negative becomes the label
    ]
    assert _signals(script) == {
        1: [(NEGATIVE_SENTIMENT, 0.45, 0.20)],
        2: [(ANGER, 0.6, 0.1), (NEGATIVE_SENTIMENT, 0.80, 0.45)],
    }


def test_the_threshold_is_the_rise_that_counts() -> None:
    script = [_turn(0, "customer", anger=0.10), _turn(1, "customer", anger=0.16)]
    assert _signals(script, threshold=0.05) == {1: [(ANGER, 0.16, 0.10)]}
    assert _signals(script, threshold=0.2) == {}
