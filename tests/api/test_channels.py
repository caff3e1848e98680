"""Multi-channel audio through a real `equipoise serve` (the tiny exported model): each channel is a speaker of its
own, answered as that channel sent alone as mono, in JSON and multipart, utterances and dialogues; silent channels
are reported, text must name its channel, limits name their field; each channel is logged as its own prediction;
/v2 and live streams refuse such audio with the field and the limit."""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from sqlalchemy import select
from websockets.sync.client import connect

from core.db.models import Prediction
from core.db.session import make_engine, session_scope
from tests.api.conftest import Server, running_server, wait_for
from tests.channel_audio import SYNTHETIC_RATE, Recording, recording, speech_recording, synthetic_voices

TOLERANCE = 1e-5
UTTERANCE, DIALOGUE = "/v1/predict/utterance", "/v1/predict/dialogue"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("channels-server")
    url = f"sqlite:///{root / 'equipoise.db'}"
    settings = {"default_model_dir": str(tiny_artifact), "batch_max_wait_ms": "20", "store_audio": "true"}
    with running_server(root / "state", url, **settings) as server:
        yield server


@pytest.fixture(scope="module")
def synthetic() -> Recording:
    return recording(*synthetic_voices(), rate=SYNTHETIC_RATE)


def b64(audio: bytes) -> str:
    return base64.b64encode(audio).decode()


def post(server: Server, path: str, status: int = 200, **request: Any) -> dict[str, Any]:
    response = httpx.post(server.url + path, timeout=30, **request)
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def utterance(server: Server, audio: bytes, multipart: bool, **fields: str) -> dict[str, Any]:
    if multipart:
        return post(server, UTTERANCE, data=fields, files={"audio": ("call.wav", audio, "audio/wav")})
    return post(server, UTTERANCE, json={"audio": b64(audio), **fields})


def assert_same(served: dict[str, Any], alone: dict[str, Any]) -> None:
    assert served["emotion"] == alone["emotion"] and served["sentiment"] == alone["sentiment"]
    np.testing.assert_allclose(
        list(served["probabilities"].values()), list(alone["probabilities"].values()), atol=TOLERANCE
    )
    np.testing.assert_allclose(
        list(served["sentiment_probabilities"].values()),
        list(alone["sentiment_probabilities"].values()),
        atol=TOLERANCE,
    )


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    (error,) = response.json()["errors"]
    return dict(error)


# ------------------------------------------------------------------------------------------------ utterances


@pytest.mark.parametrize("multipart", [False, True], ids=["json", "multipart"])
def test_each_channel_of_an_utterance_is_answered_as_that_channel_alone(
    server: Server, synthetic: Recording, multipart: bool
) -> None:
    named = utterance(server, synthetic.stereo, multipart, channels="agent,customer")
    unnamed = utterance(server, synthetic.stereo, multipart)
    assert [(p["channel"], p["speaker"]) for p in named["channels"]] == [(0, "agent"), (1, "customer")]
    assert [(p["channel"], p["speaker"]) for p in unnamed["channels"]] == [(0, "channel-0"), (1, "channel-1")]
    assert named["silent_channels"] == [] and named["model_version"] == "tiny-0.1"
    for index, mono in enumerate(synthetic.channels):
        alone = utterance(server, mono, multipart)
        assert "channels" not in alone and alone["channel"] is None  # one channel: the answer as before
        assert_same(named["channels"][index], alone)
        assert_same(unnamed["channels"][index], alone)
    assert named["channels"][0]["probabilities"] != named["channels"][1]["probabilities"]


@pytest.mark.data
@pytest.mark.parametrize("multipart", [False, True], ids=["json", "multipart"])
def test_a_stereo_call_of_two_real_speech_clips_is_two_speakers(
    server: Server, data_dir: Path, multipart: bool
) -> None:
    call = speech_recording(data_dir)
    answer = utterance(server, call.stereo, multipart, channels="agent,customer")
    assert [p["speaker"] for p in answer["channels"]] == ["agent", "customer"]
    for served, mono in zip(answer["channels"], call.channels, strict=True):
        assert_same(served, utterance(server, mono, multipart))


def test_text_sent_with_a_recording_belongs_to_the_channel_its_speaker_names(
    server: Server, synthetic: Recording
) -> None:
    words = "I have been on hold for an hour"
    unattributed = httpx.post(
        server.url + UTTERANCE, json={"audio": b64(synthetic.stereo), "text": words, "channels": "agent,customer"}
    )
    error = problem(unattributed, 422)
    assert (error["field"], error["limit"]) == ("speaker", "agent,customer")
    answer = utterance(server, synthetic.stereo, False, text=words, speaker="customer", channels="agent,customer")
    agent, customer = answer["channels"]
    assert_same(agent, utterance(server, synthetic.channels[0], False))
    assert_same(customer, utterance(server, synthetic.channels[1], False, text=words))


def test_a_silent_channel_is_reported_not_scored(server: Server, synthetic: Recording) -> None:
    voice, _ = synthetic_voices()
    hiss = np.random.default_rng(1).normal(0, 10 ** (-70 / 20), len(voice)).astype(np.float32)
    call = recording(voice, np.zeros_like(voice), hiss, rate=SYNTHETIC_RATE)
    answer = utterance(server, call.stereo, False, channels="agent,customer,line")
    (scored,) = answer["channels"]
    assert (scored["channel"], scored["speaker"]) == (0, "agent")
    assert_same(scored, utterance(server, call.channels[0], False))
    muted, noisy = answer["silent_channels"]
    assert muted == {"turn_index": None, "channel": 1, "speaker": "customer", "level_dbfs": None}
    assert (noisy["channel"], noisy["speaker"]) == (2, "line") and -72 < noisy["level_dbfs"] < -60

    nothing = recording(np.zeros(8000, dtype=np.float32), np.zeros(8000, dtype=np.float32), rate=SYNTHETIC_RATE)
    assert problem(httpx.post(server.url + UTTERANCE, json={"audio": b64(nothing.stereo)}), 422)["field"] == "audio"
    words = utterance(server, nothing.stereo, False, text="hello?", speaker="channel-1")
    assert [p["speaker"] for p in words["channels"]] == ["channel-1"]  # the words alone are scored
    assert [s["channel"] for s in words["silent_channels"]] == [0]


# ------------------------------------------------------------------------------------------------ dialogues


@pytest.mark.parametrize("multipart", [False, True], ids=["json", "multipart"])
def test_a_dialogue_turn_of_two_channels_is_two_turns_of_the_dialogue(
    server: Server, synthetic: Recording, multipart: bool
) -> None:
    opening = {"text": "Good morning, how can I help?", "speaker": "agent"}
    if multipart:
        form = {"turns": json.dumps([opening, {}]), "channels": "agent,customer", "context": "causal"}
        answer = post(server, DIALOGUE, data=form, files={"audio_1": ("call.wav", synthetic.stereo, "audio/wav")})
    else:
        turns = [opening, {"audio": b64(synthetic.stereo)}]
        answer = post(server, DIALOGUE, json={"turns": turns, "channels": "agent,customer", "context": "causal"})
    assert [(t["turn_index"], t["channel"], t["speaker"]) for t in answer["turns"]] == [
        (0, None, "agent"),
        (1, 0, "agent"),
        (1, 1, "customer"),
    ]
    mono_turns = [
        opening,
        {"audio": b64(synthetic.channels[0]), "speaker": "agent"},
        {"audio": b64(synthetic.channels[1]), "speaker": "customer"},
    ]
    expected = post(server, DIALOGUE, json={"turns": mono_turns, "context": "causal"})
    for served, alone in zip(answer["turns"], expected["turns"], strict=True):
        assert_same(served, alone)


def test_channel_names_must_match_the_channel_count_and_each_limit_names_its_field(
    server: Server, synthetic: Recording
) -> None:
    three = {"audio": b64(synthetic.stereo), "channels": "agent,customer,supervisor"}
    error = problem(httpx.post(server.url + UTTERANCE, json=three), 422)
    assert (error["field"], error["limit"]) == ("channels", 2)
    assert "2 channels but 3 channel names" in error["message"]
    dialogue = {"turns": [{"text": "hi"}, {"audio": b64(synthetic.stereo)}], "channels": ["agent"]}
    assert problem(httpx.post(server.url + DIALOGUE, json=dialogue), 422)["field"] == "channels"
    dialogue["turns"][1]["channels"] = "a,b,c"
    assert problem(httpx.post(server.url + DIALOGUE, json=dialogue), 422)["field"] == "turns.1.channels"
    dialogue["turns"][1]["channels"] = "a,b"  # the turn's own names win over the dialogue's
    assert [t["speaker"] for t in post(server, DIALOGUE, json=dialogue)["turns"][1:]] == ["a", "b"]

    for names in ("agent,,customer", "agent,agent"):
        upload = {"audio": ("call.wav", synthetic.stereo, "audio/wav")}
        error = problem(httpx.post(server.url + UTTERANCE, data={"channels": names}, files=upload), 422)
        assert error["field"] == "channels"

    nine = recording(*[np.full(1600, 0.1 * (i + 1), dtype=np.float32) for i in range(9)], rate=SYNTHETIC_RATE)
    error = problem(httpx.post(server.url + UTTERANCE, files={"audio": ("nine.wav", nine.stereo)}), 413)
    assert (error["field"], error["limit"]) == ("audio", 8)
    turns = {"turns": [{"text": "hi"}, {"audio": b64(nine.stereo)}]}
    assert problem(httpx.post(server.url + DIALOGUE, json=turns), 413)["field"] == "turns.1.audio"


def test_each_channel_is_logged_as_its_own_prediction_open_to_feedback(server: Server, synthetic: Recording) -> None:
    turns = [{"audio": b64(synthetic.stereo)}]
    answer = post(server, DIALOGUE, json={"turns": turns, "conversation_id": "call-7", "channels": "agent,customer"})
    ids = [uuid.UUID(turn["prediction_id"]) for turn in answer["turns"]]
    assert len(set(ids)) == 2
    engine = make_engine(server.database_url)
    try:

        def logged() -> list[Prediction]:
            with session_scope(engine) as session:
                rows = session.scalars(select(Prediction).where(Prediction.id.in_(ids))).all()
                session.expunge_all()
                return list(rows)

        rows = sorted(wait_for(lambda: len(found := logged()) == 2 and found), key=lambda row: ids.index(row.id))
    finally:
        engine.dispose()
    assert [(r.conversation_id, r.turn_index, r.speaker, r.has_audio) for r in rows] == [
        ("call-7", 0, "agent", True),
        ("call-7", 0, "customer", True),
    ]
    for row, mono in zip(rows, synthetic.channels, strict=True):
        assert row.audio_path is not None
        kept, rate = sf.read(row.audio_path, dtype="float32")  # the channel alone, at 16 kHz
        expected, _ = sf.read(io.BytesIO(mono), dtype="float32")
        assert kept.ndim == 1 and rate == 16000 and len(kept) == round(len(expected) * 16000 / SYNTHETIC_RATE)
    feedback = {"prediction_id": str(ids[1]), "label": "anger"}
    assert httpx.post(server.url + "/v1/feedback", json=feedback).status_code == 201


# ------------------------------------------------------------------------------------------------ /v2, streams


def test_v2_and_live_streams_refuse_a_recording_naming_the_field_and_the_limit(
    server: Server, synthetic: Recording
) -> None:
    rows = {"name": "audio", "shape": [1], "datatype": "BYTES", "data": [b64(synthetic.stereo)]}
    # Rows as utterances name the field as /v1/predict/utterance does; rows as a dialogue, as /v1's dialogue does.
    for parameters, field in (({}, "audio"), ({"context": "causal"}, "turns.0.audio")):
        body = {"inputs": [rows], "parameters": parameters}
        response = httpx.post(server.url + "/v2/models/equipoise/infer", json=body)
        assert response.status_code == 422, response.text
        (error,) = response.json()["errors"]
        assert (error["field"], error["limit"]) == (field, 1)
        assert f"{field}: the audio has 2 channels" in response.json()["error"]

    with connect(server.url.replace("http", "ws") + "/v1/stream") as stream:
        stream.send(json.dumps({"type": "open"}))
        assert json.loads(stream.recv(timeout=30))["type"] == "opened"
        stream.send(json.dumps({"type": "turn", "id": "t1", "audio": b64(synthetic.stereo), "speaker": "customer"}))
        refused = json.loads(stream.recv(timeout=30))
        assert (refused["type"], refused["id"]) == ("error", "t1")
        (error,) = refused["problem"]["errors"]
        assert (error["field"], error["limit"]) == ("audio", 1)
        stream.send(json.dumps({"type": "turn", "id": "t2", "audio": b64(synthetic.channels[1]), "speaker": "c"}))
        answered = json.loads(stream.recv(timeout=30))
        assert (answered["type"], answered["id"], answered["turn_index"]) == ("prediction", "t2", 0)
