"""A live conversation, transport-free: each new turn is answered with causal context from the turns before it,
without those turns being sent or encoded again.

The conversation keeps its turns as the encoder's utterance embeddings (a `History`, tied to the model version that
encoded them). A new turn goes through the same Predictor as /v1/predict/dialogue (decoding, the micro-batcher,
logging as a causal dialogue turn): only the new turn is encoded, and the context head reads the kept embeddings
ahead of it, which is exactly the causal answer for the whole dialogue so far. Customer turns are watched for
escalations with the batch summary's rule (scoring.summary.escalation_points), for anger and negative sentiment.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import Gauge

from api.batcher import History
from api.inputs import RawTurn
from api.predictor import Answer, Predictor, RequestInfo
from api.schemas import UtterancePrediction
from core.db.models import ContextMode, RequestKind
from core.settings import Settings
from scoring.summary import SummaryOptions, escalation_points

ANGER, NEGATIVE_SENTIMENT = "anger", "negative_sentiment"


@dataclass(frozen=True)
class StreamLimits:
    max_turns: int
    idle_timeout_s: float
    open_timeout_s: float
    max_message_bytes: int
    max_pending_turns: int

    @classmethod
    def from_settings(cls, settings: Settings) -> StreamLimits:
        return cls(
            max_turns=settings.max_dialogue_turns,
            idle_timeout_s=settings.stream_idle_timeout_s,
            open_timeout_s=min(settings.stream_open_timeout_s, settings.stream_idle_timeout_s),
            max_message_bytes=settings.stream_max_message_bytes,
            max_pending_turns=settings.stream_max_pending_turns,
        )

    def describe(self) -> dict[str, float | int]:
        return dataclasses.asdict(self)


class OpenStreams:
    """How many streams this process holds open; refuses past `limit` (event-loop confined: no lock needed)."""

    def __init__(self, limit: int, gauge: Gauge) -> None:
        self.limit = limit
        self._open = 0
        self._gauge = gauge

    def enter(self) -> bool:
        if self._open >= self.limit:
            return False
        self._open += 1
        self._gauge.set(self._open)
        return True

    def leave(self) -> None:
        self._open -= 1
        self._gauge.set(self._open)


@dataclass(frozen=True)
class Signal:
    """One probability that rose: `label`'s probability on the customer's previous turn and on this one."""

    signal: str  # ANGER or NEGATIVE_SENTIMENT
    label: str
    probability: float
    previous_probability: float


@dataclass(frozen=True)
class Escalation:
    turn_index: int
    previous_turn_index: int  # the customer's turn it is compared with
    prediction_id: uuid.UUID
    speaker: str
    signals: tuple[Signal, ...]

    def message(self, turn_id: str | None) -> dict[str, Any]:
        body = dataclasses.asdict(self)
        return {"type": "escalation", "id": turn_id, **body, "prediction_id": str(self.prediction_id)}


class EscalationWatch:
    """The batch summary's escalation rule, live: a customer turn escalates when the probability of anger rises by
    more than the threshold over the customer's previous turn or the label turns to anger; the same rule is applied
    to the negative sentiment. A label the model does not have is never signalled."""

    def __init__(self, options: SummaryOptions) -> None:
        self._options = options
        # escalation_points reads `options.anger` as "the label whose rise counts"; here it is also the sentiment's.
        self._rules = {
            ANGER: options,
            NEGATIVE_SENTIMENT: dataclasses.replace(options, anger=options.negative_sentiment),
        }
        self._previous: UtterancePrediction | None = None

    def observe(self, turn: UtterancePrediction) -> Escalation | None:
        if (turn.speaker or "").casefold() != self._options.customer.casefold():
            return None
        previous, self._previous = self._previous, turn
        if previous is None:
            return None
        signals = tuple(signal for name in self._rules if (signal := self._signal(name, previous, turn)))
        if not signals:
            return None
        assert turn.turn_index is not None and previous.turn_index is not None and turn.speaker is not None
        return Escalation(turn.turn_index, previous.turn_index, turn.prediction_id, turn.speaker, signals)

    def _signal(self, name: str, previous: UtterancePrediction, current: UtterancePrediction) -> Signal | None:
        options = self._rules[name]
        rows = [_row(name, options.anger, turn) for turn in (previous, current)]
        if not escalation_points(rows, options):
            return None
        key = f"p_{options.anger}"
        return Signal(name, options.anger, rows[1][key], rows[0][key])


def _row(signal: str, label: str, turn: UtterancePrediction) -> dict[str, Any]:
    """A turn as escalation_points reads it: the emotion's or the sentiment's label and `p_<label>`."""
    predicted, probabilities = (
        (turn.emotion, turn.probabilities) if signal == ANGER else (turn.sentiment, turn.sentiment_probabilities)
    )
    row: dict[str, Any] = {"turn": turn.turn_index, "speaker": turn.speaker or "", "label": predicted}
    if label in probabilities:
        row[f"p_{label}"] = probabilities[label]
    return row


@dataclass(frozen=True)
class Reply:
    prediction: UtterancePrediction
    escalation: Escalation | None


class LiveConversation:
    """One stream's conversation. `add` is called for one turn at a time, in order."""

    def __init__(self, predictor: Predictor, conversation_id: str, customer: str, escalation_threshold: float) -> None:
        self.conversation_id = conversation_id
        self.customer = customer
        self._predictor = predictor
        self._history: History | None = None
        self._watch = EscalationWatch(SummaryOptions(customer=customer, escalation_threshold=escalation_threshold))

    @property
    def turns(self) -> int:
        """Turns answered and kept so far."""
        return len(self._history) if self._history is not None else 0

    async def add(self, turn: RawTurn, started: float) -> Reply:
        """The new turn's prediction, with the turns kept so far as its causal context; the turn is kept only once
        it is answered (a refused turn raises the Predictor's domain error and leaves the context as it was)."""
        # A stream's turn is one voice: audio of several channels is refused (api/voices.py).
        info = RequestInfo(
            RequestKind.DIALOGUE, ContextMode.CAUSAL, self.conversation_id, started, streamed=True, multichannel=False
        )
        answer = await self._predictor.predict([turn], info, self._history)
        self._history = _kept(self._history, answer, turn.speaker)
        (prediction,) = answer.turns
        return Reply(prediction, self._watch.observe(prediction))


def _kept(history: History | None, answer: Answer, speaker: str | None) -> History:
    embedding = np.asarray(answer.embeddings[0], dtype=np.float32)[None, :]
    if history is None:
        return History(answer.model_version, embedding, (speaker,))
    return History(history.version, np.concatenate([history.embeddings, embedding]), (*history.speakers, speaker))


def new_conversation_id() -> str:
    return f"stream-{uuid.uuid4()}"
