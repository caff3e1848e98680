"""Integration: a real `equipoise serve` process with the tiny exported model, on SQLite and on PostgreSQL."""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from sqlalchemy import Engine, func, select

from core.db.models import Feedback, Prediction, Role
from core.db.session import make_engine, session_scope
from model.audio import decode_audio
from model.runtime import InferenceRuntime, UtteranceInput
from tests.api.conftest import Server, keys_by_role, new_database, running_server, wait_for

TURNS = [
    {"text": "I have been waiting for an hour!", "speaker": "customer"},
    {"text": "I am sorry about that, let me check.", "speaker": "agent"},
    {"text": "Thank you, that is all I wanted.", "speaker": "customer"},
]


def wav(seconds: float = 0.6, pitch: float = 7.0) -> bytes:
    buffer = io.BytesIO()
    samples = (0.2 * np.sin(np.arange(int(seconds * 16000)) / pitch)).astype(np.float32)
    sf.write(buffer, samples, 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp(f"server-{request.param}")
    settings = {"default_model_dir": str(tiny_artifact), "batch_max_wait_ms": "20"}
    # A new database: `serve` migrates it and registers the tiny model as champion.
    with new_database(request.param, root) as url, running_server(root / "state", url, **settings) as server:
        yield server


@pytest.fixture(scope="module")
def engine(server: Server) -> Iterator[Engine]:
    engine = make_engine(server.database_url)
    yield engine
    engine.dispose()


def stored_counts(engine: Engine, ids: list[str]) -> dict[str, int]:
    with session_scope(engine) as session:
        rows = session.execute(
            select(Prediction.id, func.count())
            .where(Prediction.id.in_([uuid.UUID(i) for i in ids]))
            .group_by(Prediction.id)
        ).all()
    return {str(prediction_id): count for prediction_id, count in rows}


def check_prediction(prediction: dict[str, Any]) -> str:
    assert prediction["model_version"] == "tiny-0.1" and prediction["latency_ms"] > 0
    probabilities = prediction["probabilities"]
    assert list(probabilities) == ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]
    assert sum(probabilities.values()) == pytest.approx(1, abs=1e-4)
    assert prediction["emotion"] == max(probabilities, key=probabilities.__getitem__)
    assert prediction["sentiment"] in prediction["sentiment_probabilities"]
    return str(uuid.UUID(prediction["prediction_id"]))


def test_predictions_are_returned_and_each_is_logged_exactly_once(server: Server, engine: Engine) -> None:
    audio = wav()
    with server.client() as client:
        responses = [
            client.post("/v1/predict/utterance", json={"text": "Where is my refund?", "speaker": "c"}),
            client.post("/v1/predict/utterance", json={"text": "hello", "audio": base64.b64encode(audio).decode()}),
            client.post("/v1/predict/utterance", files={"audio": ("a.wav", audio, "audio/wav")}),
            client.post("/v1/predict/dialogue", json={"turns": TURNS, "conversation_id": "call-1"}),
            client.post(
                "/v1/predict/dialogue",
                data={"turns": json.dumps(TURNS[:2]), "context": "causal"},
                files={"audio_1": ("b.wav", audio, "audio/wav")},
            ),
        ]
    assert [response.status_code for response in responses] == [200] * 5, [r.text for r in responses]
    bodies = [response.json() for response in responses]
    ids = [check_prediction(body) for body in bodies[:3]]
    for body in bodies[3:]:
        ids += [check_prediction(turn) for turn in body["turns"]]
    assert bodies[3]["context"] == "bidirectional" and bodies[4]["context"] == "causal"
    assert len(set(ids)) == 8
    assert wait_for(lambda: (counts := stored_counts(engine, ids)) and len(counts) == 8 and counts) == dict.fromkeys(
        ids, 1
    )


def test_feedback_joins_its_prediction(server: Server, engine: Engine) -> None:
    with server.client() as client:
        prediction = client.post("/v1/predict/utterance", json={"text": "This is terrible."}).json()
        response = client.post("/v1/feedback", json={"prediction_id": prediction["prediction_id"], "label": "anger"})
        assert response.status_code == 201, response.text
        unknown = client.post("/v1/feedback", json={"prediction_id": str(uuid.uuid4()), "label": "anger"})
        assert unknown.status_code == 404
    with session_scope(engine) as session:
        joined = session.execute(
            select(Feedback.label, Prediction.label, Prediction.text)
            .join(Prediction, Feedback.prediction_id == Prediction.id)
            .where(Prediction.id == uuid.UUID(prediction["prediction_id"]))
        ).one()
    assert tuple(joined) == ("anger", prediction["emotion"], "This is terrible.")


@pytest.mark.parametrize("context", ["causal", "bidirectional"])
def test_a_dialogue_scores_like_the_runtime_with_the_same_context(
    server: Server, tiny_artifact: Path, context: str
) -> None:
    audio = wav(0.8, pitch=3.0)
    turns = [*TURNS, {"speaker": "agent", "audio": base64.b64encode(audio).decode()}]
    with server.client() as client:
        response = client.post("/v1/predict/dialogue", json={"turns": turns, "context": context})
    assert response.status_code == 200, response.text
    runtime = InferenceRuntime.load(tiny_artifact, device="cpu", intra_op_threads=1)
    dialogue = [UtteranceInput(text=t.get("text"), audio=None, speaker=t["speaker"]) for t in TURNS]
    dialogue.append(UtteranceInput(text=None, audio=decode_audio(audio), speaker="agent"))
    (expected,) = runtime.classify([dialogue], causal=context == "causal")
    for served, local in zip(response.json()["turns"], expected, strict=True):
        assert served["emotion"] == local.emotion and served["sentiment"] == local.sentiment
        np.testing.assert_allclose(list(served["probabilities"].values()), local.emotion_probs, atol=1e-5)
        np.testing.assert_allclose(list(served["sentiment_probabilities"].values()), local.sentiment_probs, atol=1e-5)


def test_a_burst_of_concurrent_requests_is_micro_batched(server: Server) -> None:
    def metric(client: Any, name: str) -> float:
        lines = client.get("/metrics").text.splitlines()
        return float(next(line.split()[-1] for line in lines if line.startswith(name + " ")))

    with server.client() as client:
        batches_before = metric(client, "equipoise_batch_size_utterances_count")
        with ThreadPoolExecutor(16) as pool:
            statuses = list(
                pool.map(
                    lambda i: client.post("/v1/predict/utterance", json={"text": f"burst {i}"}).status_code, range(48)
                )
            )
        batches = metric(client, "equipoise_batch_size_utterances_count") - batches_before
    assert statuses == [200] * 48
    assert batches < 48


def test_roles_are_enforced_over_http_and_keys_never_reach_the_log(tmp_path: Path, tiny_artifact: Path) -> None:
    url = f"sqlite:///{tmp_path / 'auth.db'}"
    keys = keys_by_role(url)
    with running_server(tmp_path / "state", url, default_model_dir=str(tiny_artifact), auth_enabled="true") as server:
        with server.client() as client:
            predict = {"Authorization": f"Bearer {keys[Role.PREDICT]}"}
            admin = {"X-API-Key": keys[Role.ADMIN]}
            assert client.post("/v1/predict/utterance", json={"text": "hi"}).status_code == 401
            assert client.post("/v1/predict/utterance", json={"text": "hi"}, headers=predict).status_code == 200
            assert client.post("/v1/models/tiny-0.1/promote", headers=predict).status_code == 403
            assert client.post("/v1/models/tiny-0.1/promote").status_code == 401
            assert client.post("/v1/models/tiny-0.1/promote", headers=admin).status_code == 200
            assert client.get("/v1/models", headers=admin).json()["serving"] == "tiny-0.1"
        server.stop()
        log = server.log()
    assert "POST /v1/models/tiny-0.1/promote" in log  # the access log is there...
    assert not any(key in log for key in keys.values())  # ...and no key is in it
