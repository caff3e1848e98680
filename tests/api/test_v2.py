"""The Open Inference Protocol routes in process (fake model): metadata, JSON and binary tensors, requested
outputs, dialogue context, versions by name, logging, auth, and every kind of bad request answered in the
protocol's `{"error": ...}` shape with the status /v1 would give, never a 500."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import struct
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from api.app import build_state
from api.versions import MAX_LOADED_VERSIONS
from core.db import crud, migrate
from core.db.models import ModelStatus, Prediction, Role
from core.db.session import make_engine, session_scope
from model.labels import EMOTIONS
from tests.api.conftest import FakeRuntime, InProcess, add_version, in_process_app, settings_for, wait_for
from tests.api.test_service import wav_bytes

INFER = "/v2/models/equipoise/infer"
TEXTS = ["I told you twice already!", "Oh wow, really?", "Thanks, that helps."]


def text_input(texts: list[str], name: str = "text") -> dict[str, Any]:
    return {"name": name, "shape": [len(texts)], "datatype": "BYTES", "data": texts}


def bytes_tensor(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def binary_request(tensors: dict[str, list[bytes]], **fields: Any) -> tuple[bytes, dict[str, str]]:
    """A body in the binary tensor extension: the JSON part, then each tensor's length-prefixed elements."""
    raw = {name: bytes_tensor(items) for name, items in tensors.items()}
    inputs = [
        {"name": name, "shape": [len(items)], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw[name])}}
        for name, items in tensors.items()
    ]
    head = json.dumps({"inputs": inputs, **fields}).encode()
    return head + b"".join(raw.values()), {"Inference-Header-Content-Length": str(len(head))}


def read_binary_response(body: bytes, json_length: int) -> dict[str, Any]:
    """The outputs of a binary response as lists / arrays (what tritonclient's InferResult does)."""
    header, offset, outputs = json.loads(body[:json_length]), json_length, {}
    for output in header["outputs"]:
        size = output["parameters"]["binary_data_size"]
        raw, offset = body[offset : offset + size], offset + size
        if output["datatype"] == "BYTES":
            items, at = [], 0
            while at < len(raw):
                (length,) = struct.unpack_from("<I", raw, at)
                items.append(raw[at + 4 : at + 4 + length].decode())
                at += 4 + length
            outputs[output["name"]] = items
        elif output["datatype"] == "FP32":
            outputs[output["name"]] = np.frombuffer(raw, dtype="<f4").reshape(output["shape"])
        else:
            outputs[output["name"]] = np.frombuffer(raw, dtype=np.uint8).astype(bool).tolist()
    assert offset == len(body)
    return outputs


def json_outputs(response: Any) -> dict[str, Any]:
    return {output["name"]: output for output in response.json()["outputs"]}


def test_server_and_model_metadata_name_the_tensors_and_the_label_order(start_app: Callable[..., InProcess]) -> None:
    app = start_app()
    client = app.client
    assert client.get("/v2").json() | {"version": "-"} == {
        "name": "equipoise",
        "version": "-",
        "extensions": ["binary_tensor_data"],
    }
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2/models/equipoise/ready").json() == {"name": "equipoise", "version": "fake-1", "ready": True}
    metadata = client.get("/v2/models/equipoise").json()
    assert metadata["versions"] == ["fake-1"] and metadata["parameters"] == {"version": "fake-1"}
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("text", "BYTES", [-1]),
        ("speaker", "BYTES", [-1]),
        ("audio", "BYTES", [-1]),
    ]
    outputs = {tensor["name"]: tensor for tensor in metadata["outputs"]}
    assert outputs["probabilities"] == {
        "name": "probabilities",
        "datatype": "FP32",
        "shape": [-1, len(EMOTIONS)],
        "parameters": {"labels": list(EMOTIONS)},
    }
    assert list(outputs) == ["label", "probabilities", "sentiment", "sentiment_probabilities", "prediction_id", "audit"]


def test_json_rows_score_like_v1_utterances_and_are_logged_as_such(start_app: Callable[..., InProcess]) -> None:
    app = start_app()
    response = app.client.post(INFER, json={"id": "req-7", "inputs": [text_input(TEXTS)]})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("equipoise", "fake-1", "req-7")
    outputs = json_outputs(response)
    probabilities = np.array(outputs["probabilities"]["data"]).reshape(outputs["probabilities"]["shape"])
    assert probabilities.shape == (3, len(EMOTIONS))
    for row, text in enumerate(TEXTS):
        v1 = app.client.post("/v1/predict/utterance", json={"text": text}).json()
        assert outputs["label"]["data"][row] == v1["emotion"]
        np.testing.assert_allclose(probabilities[row], list(v1["probabilities"].values()), atol=1e-6)
    ids = [uuid.UUID(value) for value in outputs["prediction_id"]["data"]]
    rows = logged(app, ids)
    assert [(rows[i].request_kind, rows[i].context_mode, rows[i].text) for i in ids] == [
        ("utterance", None, text) for text in TEXTS
    ]


def test_binary_tensors_in_and_out_with_speakers_and_audio(start_app: Callable[..., InProcess]) -> None:
    app = start_app()
    audio = wav_bytes()
    body, headers = binary_request(
        {"text": [t.encode() for t in TEXTS], "speaker": [b"customer", b"agent", b""], "audio": [b"", audio, b""]},
        parameters={"binary_data_output": True},
    )
    response = app.client.post(INFER, content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    outputs = read_binary_response(response.content, int(response.headers["inference-header-content-length"]))
    v1 = app.client.post(
        "/v1/predict/utterance", json={"text": TEXTS[1], "audio": base64.b64encode(audio).decode()}
    ).json()
    assert outputs["label"][1] == v1["emotion"]
    np.testing.assert_allclose(outputs["probabilities"][1], list(v1["probabilities"].values()), atol=1e-6)
    ids = [uuid.UUID(value) for value in outputs["prediction_id"]]
    rows = logged(app, ids)
    assert [rows[i].speaker for i in ids] == ["customer", "agent", None]
    assert [rows[i].has_audio for i in ids] == [False, True, False]


def test_requested_outputs_come_in_their_order_each_json_or_binary(start_app: Callable[..., InProcess]) -> None:
    app = start_app()
    request = {
        "inputs": [text_input(TEXTS[:2])],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "label"}],
    }
    response = app.client.post(INFER, json=request)
    assert response.status_code == 200, response.text
    json_length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:json_length])
    assert [output["name"] for output in header["outputs"]] == ["probabilities", "label"]
    assert header["outputs"][1]["data"] == [
        app.client.post("/v1/predict/utterance", json={"text": t}).json()["emotion"] for t in TEXTS[:2]
    ]
    probabilities = np.frombuffer(response.content[json_length:], dtype="<f4").reshape(2, len(EMOTIONS))
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


@pytest.mark.parametrize("context", ["causal", "bidirectional"])
def test_the_context_parameter_scores_the_rows_as_one_dialogue(
    start_app: Callable[..., InProcess], context: str
) -> None:
    app = start_app()
    parameters = {"context": context, "conversation_id": "call-9"}
    speakers = ["customer", "agent", "customer"]
    response = app.client.post(
        INFER, json={"inputs": [text_input(TEXTS), text_input(speakers, "speaker")], "parameters": parameters}
    )
    assert response.status_code == 200, response.text
    turns = [{"text": t, "speaker": s} for t, s in zip(TEXTS, speakers, strict=True)]
    v1 = app.client.post("/v1/predict/dialogue", json={"turns": turns, "context": context}).json()
    outputs = json_outputs(response)
    assert outputs["label"]["data"] == [turn["emotion"] for turn in v1["turns"]]
    ids = [uuid.UUID(value) for value in outputs["prediction_id"]["data"]]
    rows = logged(app, ids)
    assert [(rows[i].conversation_id, rows[i].turn_index, rows[i].context_mode) for i in ids] == [
        ("call-9", index, context) for index in range(3)
    ]


def test_more_rows_than_the_queue_holds_are_fed_to_it_one_batch_at_a_time(
    start_app: Callable[..., InProcess],
) -> None:
    app = start_app(batch_queue_limit=4, batch_max_size=4)
    texts = [f"row {index}" for index in range(10)]
    response = app.client.post(INFER, json={"inputs": [text_input(texts)]})
    assert response.status_code == 200, response.text
    assert len(json_outputs(response)["label"]["data"]) == 10
    (runtime,) = app.runtimes
    scored = [sizes for sizes, _ in runtime.calls[2:]]  # after the load probe's two calls
    assert sum(map(sum, scored)) == 10 and max(map(sum, scored)) <= 4


def test_a_version_is_served_by_name_and_loaded_once(start_app: Callable[..., InProcess]) -> None:
    app = start_app()
    add_version(app.engine, "fake-2", ModelStatus.CANDIDATE)
    path = "/v2/models/equipoise/versions/fake-2"
    assert app.client.get(path + "/ready").json() == {"name": "equipoise", "version": "fake-2", "ready": True}
    response = app.client.post(path + "/infer", json={"inputs": [text_input(TEXTS[:1])]})
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "fake-2"
    assert app.client.post(INFER, json={"inputs": [text_input(TEXTS[:1])]}).json()["model_version"] == "fake-1"
    assert app.client.get(path).json()["parameters"] == {"version": "fake-2"}
    assert [runtime.version for runtime in app.runtimes] == ["fake-1", "fake-2"]  # loaded once, on demand
    (prediction_id,) = json_outputs(response)["prediction_id"]["data"]
    assert logged(app, [uuid.UUID(prediction_id)])[uuid.UUID(prediction_id)].model_version == "fake-2"
    # The champion by its own version name is the champion itself, not a second copy.
    assert (
        app.client.post("/v2/models/equipoise/versions/fake-1/infer", json={"inputs": [text_input(["a"])]}).json()[
            "model_version"
        ]
        == "fake-1"
    )
    assert len(app.runtimes) == 2


def test_the_least_recently_used_version_makes_room_after_its_last_request(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    migrate.upgrade(str(settings.database_url))
    state = build_state(settings, loader=lambda row: FakeRuntime(version=row.version))
    for version in ("v-a", "v-b", "v-c"):
        add_version(state.engine, version, ModelStatus.CANDIDATE)
    pool = state.versions

    async def scenario() -> list[list[str]]:
        seen = []
        async with pool.predictor("v-a") as (model_a, _):
            async with pool.predictor("v-b"):
                pass
            async with pool.predictor("v-c"):
                pass
            seen.append(pool.versions)  # v-a left the pool, but still serves this request
            assert model_a.version == "v-a"
        async with pool.predictor("v-b"):
            pass
        seen.append(pool.versions)
        await pool.close()
        seen.append(pool.versions)
        return seen

    assert asyncio.run(scenario()) == [["v-b", "v-c"], ["v-c", "v-b"], []]
    assert MAX_LOADED_VERSIONS == 2
    state.engine.dispose()


BAD_REQUESTS: list[tuple[str, Any, int, str]] = [
    ("wrong datatype", {"inputs": [{**text_input(["a"]), "datatype": "FP32"}]}, 400, "is BYTES, not FP32"),
    ("shape mismatch", {"inputs": [{**text_input(["a", "b"]), "shape": [3]}]}, 400, "shape [3] but 2 elements"),
    ("rank 2", {"inputs": [{**text_input(["a"]), "shape": [1, 1]}]}, 400, "has shape [n]"),
    ("unknown input", {"inputs": [text_input(["a"], "txt")]}, 400, "unknown input 'txt'"),
    ("twice", {"inputs": [text_input(["a"]), text_input(["b"])]}, 400, "more than once"),
    ("rows differ", {"inputs": [text_input(["a"]), text_input(["x", "y"], "speaker")]}, 400, "same number of rows"),
    ("not a string", {"inputs": [{**text_input(["a"]), "data": [7]}]}, 400, "are strings"),
    ("oversize text", {"inputs": [text_input(["x" * 2_001])]}, 413, "limit is 2000"),
    ("too many rows", {"inputs": [text_input(["x"] * 201)]}, 413, "the limit is 200"),
    ("empty row", {"inputs": [text_input([""])]}, 422, "needs text, audio or both"),
    ("NUL", {"inputs": [text_input(["a\x00b"])]}, 422, "NUL"),
    ("bad base64 audio", {"inputs": [text_input(["a"]), text_input(["%%%"], "audio")]}, 422, "not valid base64"),
    ("unknown context", {"inputs": [text_input(["a"])], "parameters": {"context": "sideways"}}, 422, "causal"),
    ("unknown parameter", {"inputs": [text_input(["a"])], "parameters": {"sequence_id": 4}}, 400, "sequence_id"),
    ("id without context", {"inputs": [text_input(["a"])], "parameters": {"conversation_id": "c"}}, 400, "context"),
    ("unknown output", {"inputs": [text_input(["a"])], "outputs": [{"name": "logits"}]}, 400, "unknown output"),
    (
        "classification",
        {"inputs": [text_input(["a"])], "outputs": [{"name": "label", "parameters": {"classification": 3}}]},
        400,
        "classification is not supported",
    ),
    ("no inputs", {"inputs": []}, 422, "inputs"),
    ("not JSON", "{", 400, "not valid UTF-8 JSON"),
]


@pytest.mark.parametrize(("case", "body", "status", "message"), BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_the_protocol_error_with_the_v1_status(
    start_app: Callable[..., InProcess], case: str, body: Any, status: int, message: str
) -> None:
    app = start_app()
    content = body if isinstance(body, str) else json.dumps(body)
    response = app.client.post(INFER, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert message in error, error


def test_broken_binary_parts_and_encodings_are_refused(start_app: Callable[..., InProcess]) -> None:
    app = start_app()
    body, headers = binary_request({"text": [b"hello"]})
    cases = [
        (body + b"extra", headers, 400, "after the declared binary tensors"),
        (body[:-2], headers, 400, "beyond the"),
        (body, {"Inference-Header-Content-Length": str(len(body) + 1)}, 400, "length of the JSON part"),
        (body, {}, 400, "not valid UTF-8 JSON"),
        (binary_request({"text": [b"\xff\xfe"]})[0], binary_request({"text": [b"\xff\xfe"]})[1], 422, "UTF-8"),
        (gzip.compress(body)[:-8], headers | {"Content-Encoding": "gzip"}, 400, "not valid gzip data"),
        (body, headers | {"Content-Encoding": "br"}, 415, "Content-Encoding br is not supported"),
        (body, headers | {"Content-Type": "text/plain"}, 415, "text/plain"),
    ]
    for content, extra, status, message in cases:
        response = app.client.post(INFER, content=content, headers=extra)
        assert response.status_code == status, (message, response.text)
        assert message in response.json()["error"], response.json()


def test_unknown_models_and_versions_are_404_and_a_missing_model_503(start_app: Callable[..., InProcess]) -> None:
    app = start_app(champion=False)
    request = {"inputs": [text_input(["a"])]}
    assert app.client.post("/v2/models/other/infer", json=request).status_code == 404
    assert app.client.get("/v2/models/equipoise/versions/a%00b/ready").status_code == 422  # PostgreSQL takes no NUL
    missing = app.client.post("/v2/models/equipoise/versions/nope/infer", json=request)
    assert missing.status_code == 404 and "unknown version 'nope'" in missing.json()["error"]
    no_model = app.client.post(INFER, json=request)
    assert no_model.status_code == 503 and no_model.headers["retry-after"] == "1"
    assert "no champion" in no_model.json()["error"]
    assert app.client.get("/v2/models/equipoise/ready").status_code == 503
    not_ready = app.client.get("/v2/health/ready")
    assert not_ready.status_code == 400 and not_ready.json()["error"].startswith("not ready")
    assert app.client.get("/v2/health/live").status_code == 200


def test_same_keys_as_v1_and_v1_errors_stay_problem_json(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, auth_enabled=True)
    migrate.upgrade(str(settings.database_url))
    engine = make_engine(str(settings.database_url))
    with session_scope(engine) as session:
        _, key = crud.create_api_key(session, "caller", Role.PREDICT)
    engine.dispose()
    with in_process_app(settings) as app:
        request = {"inputs": [text_input(["a"])]}
        refused = app.client.post(INFER, json=request)
        assert refused.status_code == 401 and "API key is required" in refused.json()["error"]
        assert refused.headers["www-authenticate"] == "Bearer"
        assert app.client.get("/v2/models/equipoise").status_code == 401
        assert app.client.get("/v2/health/live").status_code == 200  # health needs no key, as /healthz
        accepted = app.client.post(INFER, json=request, headers={"Authorization": f"Bearer {key}"})
        assert accepted.status_code == 200, accepted.text
        v1 = app.client.post("/v1/predict/utterance", json={"text": "a"})
        assert v1.status_code == 401 and v1.headers["content-type"] == "application/problem+json"


def logged(app: InProcess, ids: list[uuid.UUID]) -> dict[uuid.UUID, Prediction]:
    """The logged rows of these predictions, once all are in the database."""

    def rows() -> dict[uuid.UUID, Prediction] | None:
        with session_scope(app.engine) as session:
            found = {row.id: row for row in session.scalars(select(Prediction).where(Prediction.id.in_(ids)))}
        return found if len(found) == len(ids) else None

    return wait_for(rows)  # type: ignore[no-any-return]
