"""Bad input never gets a 500: every refusal is problem+json naming the field and, where one applies, the limit."""

from __future__ import annotations

import base64
import gzip
import io
import json
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.errors import PROBLEM_MEDIA_TYPE
from tests.api.conftest import InProcess, in_process_app, settings_for, without_equipoise_environment

MAX_REQUEST_BYTES = 8 * 1024 * 1024  # small enough to exceed in a test, large enough for the other cases
MAX_AUDIO_BYTES = 2 * 1024 * 1024


def wav(seconds: float, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    samples = (0.1 * np.sin(np.arange(round(seconds * rate)) / 5)).astype(np.float32)
    sf.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# Two hours at 50 Hz: a real, valid two-hour recording that is small enough to upload (720 kB).
TWO_HOURS = wav(2 * 3600, rate=50)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcess]:
    """One app for the whole module: the cases only read."""
    with pytest.MonkeyPatch.context() as patch:
        without_equipoise_environment(patch)
        settings = settings_for(
            tmp_path_factory.mktemp("bad_input"), max_request_bytes=MAX_REQUEST_BYTES, max_audio_bytes=MAX_AUDIO_BYTES
        )
        with in_process_app(settings) as running:
            yield running


def assert_problem(response: Any, status: int, field: str | None = None, limit: Any = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    body = response.json()
    assert {"type", "title", "status", "detail", "errors"} <= set(body) and body["status"] == status
    if field is not None:
        assert field in [error["field"] for error in body["errors"]], body
    if limit is not None:
        assert limit in [error["limit"] for error in body["errors"]], body
    return body


JsonCase = tuple[str, Any, int, str | None, Any]

JSON_CASES: list[JsonCase] = [
    ("/v1/predict/utterance", {"text": 123}, 422, "text", None),
    ("/v1/predict/utterance", {"text": ["a"]}, 422, "text", None),
    ("/v1/predict/utterance", ["hello"], 422, "body", None),
    ("/v1/predict/utterance", {}, 422, "text", None),
    ("/v1/predict/utterance", {"text": ""}, 422, "text", None),
    ("/v1/predict/utterance", {"text": "", "audio": ""}, 422, "text", None),
    ("/v1/predict/utterance", {"text": "hi", "mood": "x"}, 422, "mood", None),
    ("/v1/predict/utterance", {"text": "hi", "speaker": "s" * 300}, 422, "speaker", 256),
    ("/v1/predict/utterance", {"text": "a" * 1_000_000}, 413, "text", 2000),
    ("/v1/predict/utterance", {"audio": "not base64!"}, 422, "audio", None),
    ("/v1/predict/utterance", {"audio": b64(b"RIFF but not really a wav file")}, 422, "audio", None),
    ("/v1/predict/utterance", {"audio": b64(b"")}, 422, "text", None),
    ("/v1/predict/utterance", {"audio": b64(TWO_HOURS)}, 413, "audio", 30.0),
    ("/v1/predict/utterance", {"audio": b64(b"\0" * (MAX_AUDIO_BYTES + 10))}, 413, "audio", MAX_AUDIO_BYTES),
    ("/v1/predict/dialogue", {"turns": []}, 422, "turns", None),
    ("/v1/predict/dialogue", {"turns": "hello"}, 422, "turns", None),
    ("/v1/predict/dialogue", {"turns": [{"text": "hi"}], "context": "sideways"}, 422, "context", None),
    ("/v1/predict/dialogue", {"turns": [{"text": "hi"}, {"text": ""}]}, 422, "turns.1.text", None),
    ("/v1/predict/dialogue", {"turns": [{"text": "hi"}] * 10_000}, 413, "turns", 200),
    ("/v1/predict/dialogue", {"turns": [{"text": "hi"}, {"audio": b64(TWO_HOURS)}]}, 413, "turns.1.audio", 30.0),
    ("/v1/feedback", {"prediction_id": "not-a-uuid", "label": "joy"}, 422, "prediction_id", None),
    ("/v1/feedback", {"prediction_id": str(uuid.uuid4()), "label": "joy"}, 404, None, None),
    ("/v1/jobs", {"reason": "collapse", "tier": 7}, 422, "tier", None),
    ("/v1/jobs", {"tier": 1}, 422, "reason", None),
]


@pytest.mark.parametrize(("path", "body", "status", "field", "limit"), JSON_CASES)
def test_bad_json_bodies_get_a_problem(
    app: InProcess, path: str, body: Any, status: int, field: str | None, limit: Any
) -> None:
    assert_problem(app.client.post(path, json=body), status, field, limit)


@pytest.mark.parametrize("path", ["/v1/predict/utterance", "/v1/predict/dialogue", "/v1/feedback", "/v1/jobs"])
@pytest.mark.parametrize("raw", [b'{"text": "unterminated', b'{"text": "caf\xe9 \xff\xfe"}', b"\x80\x81\x82", b""])
def test_malformed_or_non_utf8_json_is_400(app: InProcess, path: str, raw: bytes) -> None:
    response = app.client.post(path, content=raw, headers={"content-type": "application/json"})
    empty_body_is_missing_fields = not raw and not path.startswith("/v1/predict")
    assert_problem(response, 422 if empty_body_is_missing_fields else 400, "body")


@pytest.mark.parametrize("path", ["/v1/predict/utterance", "/v1/predict/dialogue", "/v1/feedback", "/v1/jobs"])
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_unsupported_media_types_are_415(app: InProcess, path: str, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = app.client.post(path, content=b'{"text": "hi"}', headers=headers)
    assert_problem(response, 415, "content-type")


def test_an_oversize_body_is_413_naming_the_limit_whether_declared_or_streamed(app: InProcess) -> None:
    body = json.dumps({"text": "a" * (MAX_REQUEST_BYTES + 10)}).encode()
    declared = app.client.post("/v1/predict/utterance", content=body, headers={"content-type": "application/json"})
    assert_problem(declared, 413, "body", MAX_REQUEST_BYTES)

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must hold while streaming
        for start in range(0, len(body), 1 << 20):
            yield body[start : start + (1 << 20)]

    streamed = app.client.post("/v1/predict/utterance", content=chunks(), headers={"content-type": "application/json"})
    assert_problem(streamed, 413, "body", MAX_REQUEST_BYTES)


def _post_encoded(app: InProcess, body: bytes, coding: str) -> Any:
    headers = {"content-type": "application/json", "content-encoding": coding}
    return app.client.post("/v1/predict/utterance", content=body, headers=headers)


@pytest.mark.parametrize(("coding", "compress"), [("gzip", gzip.compress), ("deflate", zlib.compress)])
def test_a_compressed_body_is_answered_as_the_same_body_sent_plain(app: InProcess, coding: str, compress: Any) -> None:
    body = json.dumps({"text": "I have been waiting on hold for an hour!"}).encode()
    plain = app.client.post("/v1/predict/utterance", content=body, headers={"content-type": "application/json"})
    compressed = _post_encoded(app, compress(body), coding)
    assert compressed.status_code == 200, compressed.text
    assert compressed.json()["probabilities"] == plain.json()["probabilities"]


def test_a_gzip_body_of_several_members_is_read_whole(app: InProcess) -> None:
    response = _post_encoded(app, gzip.compress(b'{"text": ') + gzip.compress(b'"hello"}'), "gzip")
    assert response.status_code == 200, response.text


def test_a_body_that_decompresses_beyond_the_limit_is_413(app: InProcess) -> None:
    bomb = gzip.compress(b'{"text": "' + b"a" * (4 * MAX_REQUEST_BYTES) + b'"}')
    assert len(bomb) < MAX_REQUEST_BYTES // 100
    body = assert_problem(_post_encoded(app, bomb, "gzip"), 413, "body", MAX_REQUEST_BYTES)
    assert "once decompressed" in body["detail"]


@pytest.mark.parametrize(
    "body", [b"not gzip at all", gzip.compress(b'{"text": "cut short"}')[:-12]], ids=["garbage", "truncated"]
)
def test_a_body_that_does_not_decompress_is_400(app: InProcess, body: bytes) -> None:
    assert_problem(_post_encoded(app, body, "gzip"), 400, "body")


def test_an_unsupported_content_coding_is_415_naming_the_supported_ones(app: InProcess) -> None:
    response = _post_encoded(app, b'{"text": "hi"}', "br")
    assert_problem(response, 415, "content-encoding", "deflate, gzip, x-gzip")
    assert response.headers["accept-encoding"] == "deflate, gzip, x-gzip"  # the same list as the problem's


Part = tuple[str | None, bytes | str]
MultipartCase = tuple[str, dict[str, Part], int, str | None, Any]
WAV_PART: Part = ("a.wav", wav(0.5))

MULTIPART_CASES: list[MultipartCase] = [
    ("/v1/predict/utterance", {"speaker": (None, "a")}, 422, "text", None),
    ("/v1/predict/utterance", {"text": (None, "a" * 5000)}, 413, "text", 2000),
    ("/v1/predict/utterance", {"audio": ("x.wav", b"garbage")}, 422, "audio", None),
    ("/v1/predict/utterance", {"audio": ("x.wav", TWO_HOURS)}, 413, "audio", 30.0),
    ("/v1/predict/utterance", {"audio": ("x.wav", b"\0" * (MAX_AUDIO_BYTES + 1))}, 413, "audio", MAX_AUDIO_BYTES),
    ("/v1/predict/utterance", {"audio": WAV_PART, "text": (None, "hi"), "x": (None, "y")}, 422, "x", None),
    ("/v1/predict/dialogue", {"context": (None, "causal")}, 422, "turns", None),
    ("/v1/predict/dialogue", {"turns": (None, "[{")}, 400, "turns", None),
    ("/v1/predict/dialogue", {"turns": (None, json.dumps([{"text": "hi"}] * 300))}, 413, "turns", 200),
    (
        "/v1/predict/dialogue",
        {"turns": (None, json.dumps([{"text": "hi"}])), "audio_5": WAV_PART},
        422,
        "audio_5",
        None,
    ),
    (
        "/v1/predict/dialogue",
        {"turns": (None, json.dumps([{"speaker": "a"}])), "audio_0": ("x.wav", b"garbage")},
        422,
        "turns.0.audio",
        None,
    ),
]


@pytest.mark.parametrize(("path", "parts", "status", "field", "limit"), MULTIPART_CASES)
def test_bad_multipart_uploads_get_a_problem(
    app: InProcess, path: str, parts: dict[str, Part], status: int, field: str | None, limit: Any
) -> None:
    assert_problem(app.client.post(path, files=parts), status, field, limit)


def test_a_broken_multipart_body_is_400(app: InProcess) -> None:
    response = app.client.post(
        "/v1/predict/utterance",
        content=b"--x\r\nContent-Disposition: form-data\r\n\r\nnot closed",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert response.status_code in (400, 422)
    assert_problem(response, response.status_code)


def test_unknown_routes_and_methods_are_problems(app: InProcess) -> None:
    assert_problem(app.client.get("/v1/nothing-here"), 404)
    assert_problem(app.client.get("/v1/predict/utterance"), 405)
    assert_problem(app.client.get("/v1/jobs/999999"), 404)
    assert_problem(app.client.get("/v1/jobs/not-a-number"), 422, "job_id")


def test_feedback_label_must_be_one_of_the_models_labels(app: InProcess) -> None:
    prediction = app.client.post("/v1/predict/utterance", json={"text": "great, thanks"}).json()
    body = assert_problem(
        app.client.post("/v1/feedback", json={"prediction_id": prediction["prediction_id"], "label": "boredom"}),
        422,
        "label",
    )
    assert "neutral" in body["errors"][0]["limit"]
    wrong_sentiment = {"prediction_id": prediction["prediction_id"], "label": "joy", "sentiment": "ecstatic"}
    assert_problem(app.client.post("/v1/feedback", json=wrong_sentiment), 422, "sentiment")


def test_good_requests_still_work_beside_the_bad_ones(app: InProcess) -> None:
    utterance = app.client.post("/v1/predict/utterance", data={"text": "hello"}, files={"audio": ("a.wav", wav(0.5))})
    assert utterance.status_code == 200, utterance.text
    dialogue = app.client.post(
        "/v1/predict/dialogue",
        data={"turns": json.dumps([{"text": "hi", "speaker": "a"}, {"speaker": "b"}]), "context": "causal"},
        files={"audio_1": ("b.flac", wav(0.5))},
    )
    assert dialogue.status_code == 200, dialogue.text
    assert [turn["turn_index"] for turn in dialogue.json()["turns"]] == [0, 1]


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["text", "audio", "speaker", "turns", "context", "conversation_id", "x"]),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/predict/utterance", "/v1/predict/dialogue"]), body=JSON_VALUES)
def test_no_json_value_causes_a_server_error(app: InProcess, path: str, body: Any) -> None:
    response = app.client.post(path, json=body)
    assert response.status_code < 500, response.text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.binary(max_size=200),
    content_type=st.sampled_from(["application/json", "multipart/form-data", "multipart/form-data; boundary=abc"]),
)
def test_no_byte_string_causes_a_server_error(app: InProcess, raw: bytes, content_type: str) -> None:
    response = app.client.post("/v1/predict/dialogue", content=raw, headers={"content-type": content_type})
    assert response.status_code < 500, response.text
