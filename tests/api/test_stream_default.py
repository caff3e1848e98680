"""Live streams served by the shipped default model (assembled once for this module, about a minute): MELD test
dialogues streamed turn by turn answer as /v1/predict/dialogue in causal mode, and a customer who loses their temper
gets an escalation event on that turn only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from model.data.meld import group_dialogues, read_utterances
from tests.api.conftest import Server, running_server
from tests.api.test_stream import TOLERANCE, opened, receive, send, turn, until_closed

pytestmark = [pytest.mark.data, pytest.mark.slow]
DIALOGUES = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, shipped_default: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("stream-default")
    with running_server(
        root / "state", f"sqlite:///{root / 'equipoise.db'}", default_model_dir=str(shipped_default)
    ) as server:
        yield server


def test_meld_test_dialogues_streamed_turn_by_turn_answer_as_causal_dialogues(server: Server, data_dir: Path) -> None:
    """Twelve MELD test dialogues spread over the split. Causal context makes turn t of the whole dialogue the answer
    for the turns so far, so one request per dialogue checks every turn; the first dialogue is also checked prefix
    by prefix, literally."""
    meld = group_dialogues(read_utterances(data_dir, "test"))
    chosen = meld[:: len(meld) // DIALOGUES][:DIALOGUES]
    checked = 0
    with server.client() as client:
        for number, dialogue in enumerate(chosen):
            turns = [{"text": u.text, "speaker": u.speaker} for u in dialogue.utterances]
            with opened(server, None, conversation_id=f"meld-test-{dialogue.dialogue_id}") as connection:
                streamed = [turn(connection, **sent) for sent in turns]
            whole = client.post("/v1/predict/dialogue", json={"turns": turns, "context": "causal"}).json()["turns"]
            for index, answer in enumerate(streamed):
                _assert_same(answer, whole[index])
                if number == 0:
                    body = {"turns": turns[: index + 1], "context": "causal"}
                    _assert_same(answer, client.post("/v1/predict/dialogue", json=body).json()["turns"][index])
                checked += 1
    assert checked == sum(len(d.utterances) for d in chosen) == 88  # the deterministic choice: 88 turns


def _assert_same(streamed: dict[str, Any], expected: dict[str, Any]) -> None:
    assert streamed["type"] == "prediction" and streamed["turn_index"] == expected["turn_index"]
    assert streamed["emotion"] == expected["emotion"] and streamed["sentiment"] == expected["sentiment"]
    for key in ("probabilities", "sentiment_probabilities"):
        for label, probability in streamed[key].items():
            assert probability == pytest.approx(expected[key][label], abs=TOLERANCE), (key, label)


CALL = [
    ("agent", "Good morning, thanks for calling. How can I help you today?"),
    ("customer", "Hi, I'm calling about my order. It hasn't arrived yet."),
    ("agent", "I'm sorry to hear that. Let me check for you."),
    ("customer", "I've waited three weeks and nobody ever called me back! This is outrageous, I am furious!"),
    ("agent", "I completely understand. I'll send a replacement today."),
    ("customer", "Okay. Thank you, that's great."),
]
ANGRY_TURN = 3


def test_a_customer_losing_their_temper_gets_one_escalation_event(server: Server) -> None:
    pushed = []
    with opened(server, None, conversation_id="call-escalation", speakers=["agent", "customer"]) as connection:
        for index, (speaker, text) in enumerate(CALL):
            answer = turn(connection, id=f"t{index}", speaker=speaker, text=text)
            assert answer["type"] == "prediction" and answer["turn_index"] == index
            if index == ANGRY_TURN:
                assert answer["emotion"] == "anger" and answer["sentiment"] == "negative"
                pushed.append(receive(connection))
        send(connection, type="close")
        left, _, _ = until_closed(connection)
    assert [message["type"] for message in left] == ["closed"]  # no other event was pushed
    (event,) = pushed
    assert (event["type"], event["id"], event["turn_index"], event["previous_turn_index"]) == (
        "escalation",
        f"t{ANGRY_TURN}",
        ANGRY_TURN,
        1,
    )
    assert {signal["signal"] for signal in event["signals"]} == {"anger", "negative_sentiment"}
    for signal in event["signals"]:
        assert signal["probability"] - signal["previous_probability"] > 0.2
