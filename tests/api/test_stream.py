"""Live streams (/v1/stream) against a real `equipoise serve` process with the tiny exported model, through the
`websockets` client: causal answers equal /v1/predict/dialogue's, keys, limits, backpressure, malformed messages,
escalation events, the prediction log and a model promotion in the middle of a call."""

from __future__ import annotations

import base64
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from api.routes.stream import CloseCode
from core.db.models import Prediction, Role
from core.db.session import make_engine, session_scope
from model.artifact import Calibration, derive_artifact, load_artifact
from model.data.meld import group_dialogues, read_utterances
from model.data.speech import read_clips
from model.registry import ModelRegistry
from scoring.summary import SummaryOptions, escalation_points
from tests.api.conftest import Server, keys_by_role, running_server, wait_for

TOLERANCE = 1e-5
MAX_TURNS = 16
MAX_OPEN = 3
MAX_PENDING = 2
IDLE_S = 3.0
MAX_MESSAGE_BYTES = 256 * 1024
LIMITS = {
    "max_dialogue_turns": str(MAX_TURNS),
    "stream_max_open": str(MAX_OPEN),
    "stream_max_pending_turns": str(MAX_PENDING),
    "stream_idle_timeout_s": str(IDLE_S),
    "stream_open_timeout_s": str(IDLE_S),
    "stream_max_message_bytes": str(MAX_MESSAGE_BYTES),
    "stream_escalation_threshold": "0",  # any rise escalates: the tiny model's probabilities move little
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[Role, str]]:
    url = f"sqlite:///{tmp_path_factory.mktemp('stream-db') / 'equipoise.db'}"
    return url, keys_by_role(url)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path, keys: tuple[str, dict[Role, str]]
) -> Iterator[Server]:
    state = tmp_path_factory.mktemp("stream-server") / "state"
    with running_server(state, keys[0], default_model_dir=str(tiny_artifact), auth_enabled="true", **LIMITS) as server:
        yield server


@pytest.fixture(scope="module")
def key(keys: tuple[str, dict[Role, str]]) -> str:
    return keys[1][Role.PREDICT]


# ------------------------------------------------------------------------------------------------ client helpers


def stream_url(server: Server) -> str:
    return server.url.replace("http://", "ws://", 1) + "/v1/stream"


def bearer(key: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {key}"} if key else None


@contextlib.contextmanager
def connected(server: Server, headers: dict[str, str] | None = None) -> Iterator[ClientConnection]:
    with connect(stream_url(server), additional_headers=headers, proxy=None, open_timeout=30) as connection:
        yield connection


def send(connection: ClientConnection, **message: Any) -> None:
    connection.send(json.dumps(message))


def send_open(connection: ClientConnection, **fields: Any) -> None:
    """The `open` message; the server may have closed already (a refusal needs no message), which until_closed reads."""
    with contextlib.suppress(ConnectionClosed):
        send(connection, type="open", **fields)


def receive(connection: ClientConnection) -> dict[str, Any]:
    return json.loads(connection.recv(timeout=30))  # type: ignore[no-any-return]


@contextlib.contextmanager
def opened(server: Server, key: str | None, **fields: Any) -> Iterator[ClientConnection]:
    """A stream the server has opened (the key, when given, in the Authorization header)."""
    with connected(server, bearer(key)) as connection:
        send_open(connection, **fields)
        answer = receive(connection)
        assert answer["type"] == "opened", answer
        yield connection


def refused(server: Server, headers: dict[str, str] | None, **fields: Any) -> tuple[list[dict[str, Any]], int, str]:
    """What a connection that sends `open` with `fields` reads until the server closes it."""
    with connected(server, headers) as connection:
        send_open(connection, **fields)
        return until_closed(connection)


def until_closed(connection: ClientConnection) -> tuple[list[dict[str, Any]], int, str]:
    """The messages left before the server closed, and its close code and reason."""
    left = []
    try:
        while True:
            left.append(receive(connection))
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "the server never sent a close frame"
        return left, closed.rcvd.code, closed.rcvd.reason


def problem_of(message: dict[str, Any]) -> dict[str, Any]:
    assert message["type"] == "error", message
    return message["problem"]  # type: ignore[no-any-return]


def turn(connection: ClientConnection, **fields: Any) -> dict[str, Any]:
    send(connection, type="turn", **fields)
    return receive(connection)


def metric(server: Server, line_start: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start))


# ------------------------------------------------------------------------------------------------ answers


@pytest.mark.data
def test_streamed_meld_dialogues_answer_as_causal_dialogues_of_the_turns_so_far(
    server: Server, key: str, data_dir: Path
) -> None:
    """Each streamed answer equals /v1/predict/dialogue (causal) on the turns sent so far, to 1e-5; one turn in
    three also carries a real RAVDESS recording; the stream's rows are logged as causal dialogue turns."""
    clip = base64.b64encode(read_clips(data_dir, "ravdess")[11].path.read_bytes()).decode()
    meld = [d for d in group_dialogues(read_utterances(data_dir, "test")) if 6 <= len(d.utterances) <= MAX_TURNS]
    headers = {"Authorization": f"Bearer {key}"}
    for number, dialogue in enumerate(meld[:3]):
        turns = [
            {"text": u.text, "speaker": u.speaker} | ({"audio": clip} if i % 3 == 2 else {})
            for i, u in enumerate(dialogue.utterances)
        ]
        conversation = f"meld-test-{dialogue.dialogue_id}"
        streamed = []
        with opened(server, key, conversation_id=conversation) as connection, server.client(headers=headers) as client:
            for index, sent in enumerate(turns):
                answer = turn(connection, id=f"t{index}", **sent)
                assert (answer["type"], answer["id"], answer["turn_index"]) == ("prediction", f"t{index}", index)
                body = {"turns": turns[: index + 1], "context": "causal"}
                expected = client.post("/v1/predict/dialogue", json=body).json()["turns"][index]
                _assert_same(answer, expected)
                streamed.append(answer)
            send(connection, type="close")
            left, code, _ = until_closed(connection)
        assert left == [{"type": "closed", "conversation_id": conversation, "turns": len(turns)}]
        assert code == CloseCode.NORMAL
        if number == 0:
            _assert_logged(server, conversation, streamed)


def _assert_same(streamed: dict[str, Any], expected: dict[str, Any]) -> None:
    assert streamed["emotion"] == expected["emotion"] and streamed["sentiment"] == expected["sentiment"]
    assert streamed["speaker"] == expected["speaker"] and streamed["model_version"] == expected["model_version"]
    for key in ("probabilities", "sentiment_probabilities"):
        assert list(streamed[key]) == list(expected[key])
        for label, probability in streamed[key].items():
            assert probability == pytest.approx(expected[key][label], abs=TOLERANCE), (key, label)


def _assert_logged(server: Server, conversation: str, streamed: list[dict[str, Any]]) -> None:
    engine = make_engine(server.database_url)

    def rows() -> list[Prediction] | None:
        with session_scope(engine) as session:
            found = list(
                session.scalars(
                    select(Prediction).where(Prediction.conversation_id == conversation).order_by(Prediction.turn_index)
                )
            )
            session.expunge_all()
        return found if len(found) == len(streamed) else None

    try:
        logged = wait_for(rows)
    finally:
        engine.dispose()
    for row, answer in zip(logged, streamed, strict=True):
        assert row.id == uuid.UUID(answer["prediction_id"])
        assert (row.request_kind, row.context_mode) == ("dialogue", "causal")
        assert (row.turn_index, row.speaker, row.label) == (answer["turn_index"], answer["speaker"], answer["emotion"])
        assert row.embedding is not None and row.has_audio == (answer["turn_index"] % 3 == 2)


def test_escalation_events_follow_the_batch_summary_rule(server: Server, key: str) -> None:
    """Customer turns are compared with the customer's previous turn (agent turns never escalate), by the rule of
    scoring.summary.escalation_points, for the anger emotion and the negative sentiment; each event follows its
    turn's prediction."""
    lines = [
        ("agent", "Thank you for calling, how can I help?"),
        ("caller", "My parcel never arrived."),
        ("agent", "I am sorry to hear that."),
        ("caller", "This is the third time! I am furious!"),
        ("caller", "I want a refund right now."),
        ("agent", "I understand, let me check."),
        ("caller", "You people are useless."),
        ("caller", "Honestly, this is outrageous!"),
        ("caller", "Forget it."),
    ]
    answers, events = [], []
    with opened(server, key, customer="caller", speakers=["agent", "caller"]) as connection:
        for index, (speaker, text) in enumerate(lines):
            answers.append(turn(connection, id=f"t{index}", speaker=speaker, text=text))
            if speaker == "caller" and any(_rose(answers, index)):
                events.append(receive(connection))
        send(connection, type="ping")
        assert receive(connection) == {"type": "pong"}  # nothing else was pushed
    assert events, "with a threshold of 0 some customer turn ought to escalate"
    for event in events:
        assert event["type"] == "escalation" and event["speaker"] == "caller"
        answer = answers[event["turn_index"]]
        assert (event["id"], event["prediction_id"]) == (answer["id"], answer["prediction_id"])
        assert answers[event["previous_turn_index"]]["speaker"] == "caller"
        for signal in event["signals"]:
            source = "probabilities" if signal["signal"] == "anger" else "sentiment_probabilities"
            assert signal["probability"] == answer[source][signal["label"]]


def _rose(answers: list[dict[str, Any]], index: int) -> list[str]:
    """The signals the summary rule raises for customer turn `index` (computed here from the answers)."""
    customer = [a for a in answers[: index + 1] if a["speaker"] == "caller"][-2:]
    options = SummaryOptions(customer="caller", escalation_threshold=0.0)
    raised = []
    for signal, label, source, key in (
        ("anger", "anger", "probabilities", "emotion"),
        ("negative_sentiment", "negative", "sentiment_probabilities", "sentiment"),
    ):
        rows = [
            {"turn": a["turn_index"], "speaker": a["speaker"], "label": a[key], f"p_{label}": a[source][label]}
            for a in customer
        ]
        if escalation_points(rows, SummaryOptions(options.customer, options.escalation_threshold, anger=label)):
            raised.append(signal)
    return raised


# ------------------------------------------------------------------------------------------------ keys


def test_a_key_is_required_in_the_headers_or_the_open_message_and_never_logged(
    server: Server, keys: tuple[str, dict[Role, str]]
) -> None:
    predict, admin = keys[1][Role.PREDICT], keys[1][Role.ADMIN]
    for headers in (None, bearer("not-a-key")):
        left, code, reason = refused(server, headers)
        assert code == CloseCode.UNAUTHORIZED and "API key" in reason
        assert problem_of(left[0])["status"] == 401
    with opened(server, None, api_key=predict) as browser:  # a browser: the key in the open message
        assert turn(browser, text="hello")["type"] == "prediction"
    with connected(server, {"X-API-Key": admin}) as x_api_key:
        send_open(x_api_key)
        assert receive(x_api_key)["type"] == "opened"
    left, code, _ = refused(server, bearer(predict), api_key=predict)
    assert code == CloseCode.BAD_REQUEST and problem_of(left[0])["errors"][0]["field"] == "api_key"
    assert not any(k in server.log() for k in (predict, admin))


# ------------------------------------------------------------------------------------------------ limits


def test_the_turn_after_the_limit_is_refused_and_the_stream_closed_once_the_others_are_answered(
    server: Server, key: str
) -> None:
    with opened(server, key) as connection:
        for index in range(MAX_TURNS):
            assert turn(connection, text=f"turn {index}", speaker="a")["turn_index"] == index
        send(connection, type="turn", id="over", text="one too many")
        left, code, _ = until_closed(connection)
    assert code == CloseCode.TOO_MANY_TURNS
    (refusal,) = left
    assert refusal["id"] == "over" and problem_of(refusal)["errors"][0] == {
        "field": "turns",
        "message": f"a stream holds at most {MAX_TURNS} turns; open a new stream",
        "limit": MAX_TURNS,
    }


def test_a_stream_without_messages_is_closed_after_the_idle_time(server: Server, key: str) -> None:
    with connected(server) as silent, opened(server, key) as idle:  # `silent` does not even send `open`
        assert turn(idle, text="hello")["type"] == "prediction"
        started = time.monotonic()
        left, code, _ = until_closed(idle)
        waited = time.monotonic() - started
        assert code == CloseCode.IDLE and problem_of(left[0])["status"] == 408
        assert IDLE_S - 0.5 < waited < IDLE_S + 10
        left, code, _ = until_closed(silent)
        assert code == CloseCode.IDLE and "open" in problem_of(left[0])["detail"]


def test_open_streams_are_limited_per_process(server: Server, key: str) -> None:
    wait_for(lambda: metric(server, "equipoise_streams_open") == 0)  # earlier tests' streams have ended
    with contextlib.ExitStack() as streams:
        for _ in range(MAX_OPEN):
            streams.enter_context(opened(server, key))
        assert metric(server, "equipoise_streams_open") == MAX_OPEN
        left, code, _ = refused(server, bearer(key))
        assert code == CloseCode.TRY_AGAIN_LATER and problem_of(left[0])["status"] == 503
    wait_for(lambda: metric(server, "equipoise_streams_open") == 0)
    with opened(server, key) as again:
        assert turn(again, text="there is room again")["type"] == "prediction"
    assert metric(server, 'equipoise_stream_closes_total{code="1013"}') >= 1


def test_a_message_over_the_size_limit_closes_the_stream_with_1009(server: Server, key: str) -> None:
    with opened(server, key) as connection:
        connection.send(json.dumps({"type": "turn", "text": "x" * MAX_MESSAGE_BYTES}))
        _, code, reason = until_closed(connection)
    assert code == CloseCode.MESSAGE_TOO_BIG and str(MAX_MESSAGE_BYTES) in reason


def test_a_flood_of_turns_is_refused_beyond_the_pending_limit_and_never_queued(server: Server, key: str) -> None:
    """Turns sent without waiting for answers: at most MAX_PENDING wait; each other one is refused at once with an
    `overloaded` error naming it; every turn gets exactly one answer, and the kept turns are numbered in order."""
    sent = 30
    with opened(server, key) as connection:
        for index in range(sent):
            send(connection, type="turn", id=f"t{index}", text=f"flood {index}", speaker="a")
        answers = [receive(connection) for _ in range(sent)]
        assert turn(connection, text="after the flood")["type"] == "prediction"
    assert sorted(answer["id"] for answer in answers) == sorted(f"t{index}" for index in range(sent))
    refused = [answer for answer in answers if answer["type"] == "error"]
    predicted = [answer for answer in answers if answer["type"] == "prediction"]
    assert refused and all(problem_of(a)["type"].endswith("/overloaded") for a in refused)
    assert [p["turn_index"] for p in predicted] == list(range(len(predicted)))


# ------------------------------------------------------------------------------------------------ malformed input


NOT_AUDIO = base64.b64encode(b"RIFF but not a WAV file").decode()


def test_malformed_messages_are_answered_with_the_field_and_the_stream_carries_on(server: Server, key: str) -> None:
    refusals: list[tuple[Any, int, str]] = [
        ("not json", 400, "body"),
        ("[1, 2]", 400, "body"),
        (json.dumps({"type": "shout"}), 422, "type"),
        (json.dumps({"type": "turn", "text": "hi", "mood": "x"}), 422, "mood"),
        (json.dumps({"type": "turn", "text": ""}), 422, "text"),
        (json.dumps({"type": "turn", "text": "y" * 2_001}), 413, "text"),
        (json.dumps({"type": "turn", "audio": "@@not base64@@"}), 422, "audio"),
        (json.dumps({"type": "turn", "audio": NOT_AUDIO, "speaker": "agent"}), 422, "audio"),
        (json.dumps({"type": "turn", "text": "hi"}), 422, "speaker"),  # speakers were declared: a turn names one
        (json.dumps({"type": "turn", "text": "hi", "speaker": "stranger"}), 422, "speaker"),
        (json.dumps({"type": "open"}), 422, "type"),
        (b"\x00binary", 415, "message"),
    ]
    with opened(server, key, speakers=["agent", "customer"]) as connection:
        for message, status, field in refusals:
            connection.send(message)
            problem = problem_of(receive(connection))
            assert (problem["status"], problem["errors"][0]["field"]) == (status, field), message
        answer = turn(connection, text="still here", speaker="agent")
    assert answer["type"] == "prediction" and answer["turn_index"] == 0  # refused turns are not kept
    assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200


def test_an_open_message_that_does_not_fit_closes_with_its_problem(server: Server, key: str) -> None:
    for fields, field in (({"customer": "boss", "speakers": ["agent", "customer"]}, "customer"), ({"x": 1}, "x")):
        left, code, _ = refused(server, bearer(key), **fields)
        assert code == CloseCode.INVALID_OPEN and problem_of(left[0])["errors"][0]["field"] == field
    with connected(server, {"X-API-Key": key}) as connection:
        send(connection, type="turn", text="no open first")
        left, code, _ = until_closed(connection)
    assert code == CloseCode.BAD_REQUEST and "open" in problem_of(left[0])["detail"]


# ------------------------------------------------------------------------------------------------ promotion


def test_a_promotion_mid_call_closes_the_stream_with_1012_instead_of_mixing_models(
    tmp_path: Path, tiny_artifact: Path
) -> None:
    """The kept turns were encoded by the old champion: the next turn is refused (409 model-changed) and the stream
    closed with 1012; a new stream is served by the new champion."""
    url = f"sqlite:///{tmp_path / 'promotion.db'}"
    with running_server(tmp_path / "state", url, default_model_dir=str(tiny_artifact)) as server:
        with opened(server, None) as connection:
            assert turn(connection, text="hello", speaker="a")["model_version"] == "tiny-0.1"
            _promote_a_successor(server, tiny_artifact, tmp_path)
            send(connection, type="turn", id="after", text="still there?", speaker="b")
            left, code, reason = until_closed(connection)
        assert code == CloseCode.SERVICE_RESTART and "tiny-0.2" in reason
        assert left[0]["id"] == "after" and problem_of(left[0])["type"].endswith("/model-changed")
        with opened(server, None) as fresh:
            assert turn(fresh, text="hello again")["model_version"] == "tiny-0.2"


def _promote_a_successor(server: Server, tiny_artifact: Path, tmp_path: Path) -> None:
    successor = derive_artifact(
        load_artifact(tiny_artifact), tmp_path / "tiny-0.2", version="tiny-0.2", calibration=Calibration(2.0)
    )
    engine = make_engine(server.database_url)
    try:
        registry = ModelRegistry(engine, tmp_path / "state" / "models")
        registry.promote(registry.register(successor.path).version)
    finally:
        engine.dispose()
    wait_for(lambda: httpx.get(server.url + "/readyz", timeout=30).json().get("model_version") == "tiny-0.2")
