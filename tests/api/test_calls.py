"""POST /v1/calls in the service process: a stereo recording of synthesised speech is queued, processed off the
request path (real decoding, voice activity and Whisper; the fast fake model), and its turns arrive as predictions
of kind `call`; personal data is redacted in the transcript, pseudonymised in the speakers and silenced in the
stored recording; limits answer problem+json; bad recordings fail with a clear error and the service stays healthy."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from sqlalchemy import select

from api.calls import calls_dir
from api.retention import purge
from benchmarks.call_builder import assemble, espeak, espeak_available
from core.db.models import Prediction, RequestKind
from core.db.session import session_scope
from core.redaction import PSEUDONYM
from tests.api.conftest import InProcess, wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not espeak_available(), reason="espeak-ng is not installed (make tools)"),
]
SENTENCES = ("Good morning, thank you for calling.", "My parcel has not arrived yet.", "Let me check that for you.")


@pytest.fixture(scope="module")
def call_wav() -> bytes:
    return assemble([espeak(text) for text in SENTENCES], seed=0).wav(16_000)


def tone(seconds: float, rate: int = 8_000, channels: int = 2) -> bytes:
    samples = 0.3 * np.sin(2 * np.pi * 300 * np.arange(round(seconds * rate)) / rate)
    buffer = io.BytesIO()
    sf.write(buffer, np.repeat(samples[:, None], channels, axis=1), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def not_finite(seconds: float, rate: int = 8_000) -> bytes:
    """A float WAV whose samples are NaN: its header is valid, its body cannot be scored."""
    buffer = io.BytesIO()
    sf.write(buffer, np.full((round(seconds * rate), 2), np.nan, np.float32), rate, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def two_hours() -> bytes:
    """Two hours of 8 kHz mono silence as FLAC: small to send, refused from its header."""
    buffer = io.BytesIO()
    with sf.SoundFile(buffer, "w", 8_000, 1, format="FLAC", subtype="PCM_16") as file:
        for _ in range(12):
            file.write(np.zeros(8_000 * 600, dtype=np.int16))
    return buffer.getvalue()


def post(app: InProcess, audio: bytes, **fields: str) -> Any:
    return app.client.post("/v1/calls", files={"audio": ("call.wav", audio, "audio/wav")}, data=fields)


def settled(app: InProcess, call_id: str, timeout_s: float = 120.0) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        body = app.client.get(f"/v1/calls/{call_id}").json()
        return body if body["status"] in {"done", "failed"} else None

    return wait_for(finished, timeout_s=timeout_s, interval_s=0.2)


def test_a_call_is_queued_processed_and_its_turns_logged(start_app: Callable[..., InProcess], call_wav: bytes) -> None:
    app = start_app()
    response = post(app, call_wav, roles="agent,customer")
    assert response.status_code == 202, response.text
    call_id = response.json()["id"]
    assert response.headers["location"] == f"/v1/calls/{call_id}"
    body = settled(app, call_id)
    assert body["status"] == "done", body
    assert [turn["speaker"] for turn in body["turns"]] == ["agent", "customer", "agent"]
    for turn in body["turns"]:
        assert {"turn", "start_s", "end_s", "speaker", "text", "emotion", "probabilities", "prediction_id"} <= set(turn)
        assert sum(turn["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert "calling" in body["turns"][0]["text"].lower(), body["turns"]
    assert body["summary"]["escalation_points"] is not None and body["model_version"] == "fake-1"
    with session_scope(app.engine) as session:
        rows = session.scalars(select(Prediction).where(Prediction.call_id == uuid.UUID(call_id))).all()
        stored = {str(row.id): (row.request_kind, row.turn_index, row.start_s, row.end_s) for row in rows}
    assert stored == {
        t["prediction_id"]: (
            RequestKind.CALL,
            t["turn"],
            pytest.approx(t["start_s"], abs=1e-3),
            pytest.approx(t["end_s"], abs=1e-3),
        )
        for t in body["turns"]
    }
    feedback = app.client.post(
        "/v1/feedback", json={"prediction_id": body["turns"][0]["prediction_id"], "label": "joy"}
    )
    assert feedback.status_code == 201, feedback.text
    picture = app.client.get(f"/v1/calls/{call_id}/timeline.png")
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
    metrics = app.client.get("/metrics").text
    assert 'equipoise_calls_total{outcome="done"} 1.0' in metrics
    assert "equipoise_call_real_time_factor_count 1.0" in metrics and "equipoise_calls_queued 0.0" in metrics


@pytest.mark.parametrize(
    ("recording", "status", "limit"),
    [
        (b"this is a text file, not a recording" * 10, 422, None),
        (tone(1.0)[:30], 422, None),  # truncated inside the header
        (tone(1.0, rate=1_000), 422, 8_000),
        (tone(0.2, channels=16), 413, 8),
        (two_hours(), 413, 3_600.0),
    ],
    ids=["not-audio", "truncated", "1-kHz", "16-channels", "2-hours"],
)
def test_a_bad_recording_is_refused_before_it_is_queued_and_the_service_stays_healthy(
    start_app: Callable[..., InProcess], recording: bytes, status: int, limit: float | None
) -> None:
    """What the header shows (format, rate, channels, declared length) is refused at once, as problem+json naming
    the field and the limit; nothing is queued or kept."""
    app = start_app()
    response = post(app, recording)
    assert response.status_code == status and response.headers["content-type"] == "application/problem+json"
    error = response.json()["errors"][0]
    assert error["field"] == "audio" and error["message"] and error["limit"] == limit, error
    assert not any(calls_dir(app.settings).glob("*.audio"))
    assert app.client.get("/healthz").status_code == 200
    assert post(app, tone(0.5)).status_code == 202  # the service goes on


def test_a_recording_whose_header_lies_fails_when_it_is_decoded(start_app: Callable[..., InProcess]) -> None:
    """A valid header over a body of non-finite samples passes the check at the door; the call then ends `failed`
    with the decoder's reason, and the runner goes on."""
    app = start_app()
    body = settled(app, post(app, not_finite(0.5)).json()["id"])
    assert body["status"] == "failed" and body["error"]["field"] == "audio" and body["error"]["message"], body
    assert app.client.get(f"/v1/calls/{body['id']}/timeline.png").status_code == 409
    assert settled(app, post(app, tone(0.5)).json()["id"])["status"] == "done"


def test_limits_and_bad_requests_answer_problem_json(start_app: Callable[..., InProcess]) -> None:
    app = start_app(max_call_bytes=4096, max_queued_calls=1, call_workers=0)
    too_big = post(app, tone(1.0))
    assert too_big.status_code == 413 and too_big.headers["content-type"] == "application/problem+json"
    assert too_big.json()["errors"][0]["field"] == "audio" and too_big.json()["errors"][0]["limit"] == 4096
    empty = post(app, b"")
    assert empty.status_code == 422 and empty.json()["errors"][0]["field"] == "audio"
    assert app.client.post("/v1/calls", files={"roles": (None, "a,b")}).json()["errors"][0]["field"] == "audio"
    assert post(app, tone(0.1), roles="agent,agent").json()["errors"][0]["field"] == "roles"
    assert post(app, tone(0.1), context="sideways").json()["errors"][0]["field"] == "context"
    assert post(app, tone(0.1), colour="blue").json()["errors"][0]["field"] == "colour"
    assert app.client.post("/v1/calls", json={"audio": "x"}).status_code == 415
    assert post(app, tone(0.1)).status_code == 202  # nothing processes calls here (call_workers 0)
    full = post(app, tone(0.1))
    assert full.status_code == 503 and full.headers["retry-after"]
    assert app.client.get(f"/v1/calls/{uuid.uuid4()}").status_code == 404
    assert app.client.get("/v1/calls/not-an-id").status_code == 404


def test_roles_that_do_not_name_every_channel_are_refused(start_app: Callable[..., InProcess]) -> None:
    app = start_app()
    response = post(app, tone(0.5), roles="agent,customer,supervisor")
    assert response.status_code == 422 and response.json()["errors"][0]["field"] == "roles", response.text
    assert response.json()["errors"][0]["limit"] == 2  # the recording's channels


def test_a_call_may_be_larger_than_a_prediction_request(start_app: Callable[..., InProcess]) -> None:
    app = start_app(max_request_bytes=4096, call_workers=0)
    recording = tone(1.0)  # 32 kB
    assert post(app, recording).status_code == 202
    files = {"audio": ("one.wav", recording, "audio/wav")}
    refused = app.client.post("/v1/predict/utterance", files=files)
    assert refused.status_code == 413 and refused.json()["errors"][0]["limit"] == 4096


def test_retention_purges_ended_calls_with_their_recordings_and_keeps_waiting_ones(
    start_app: Callable[..., InProcess], call_wav: bytes
) -> None:
    app = start_app()
    done = settled(app, post(app, call_wav, roles="agent,customer").json()["id"])
    assert done["status"] == "done" and len(list(calls_dir(app.settings).iterdir())) == 2  # recording, timeline
    app.state.calls.stop()  # nothing takes the next call: it stays queued
    waiting = post(app, tone(0.5)).json()["id"]
    later = datetime.now(UTC) + timedelta(days=2)
    result = purge(app.engine, retention_days=1, now=later)
    assert result.calls == 1 and result.predictions == len(done["turns"]) and result.audio_files == 1
    assert app.client.get(f"/v1/calls/{done['id']}").status_code == 404
    assert app.client.get(f"/v1/calls/{waiting}").json()["status"] == "queued"
    assert [p.name for p in calls_dir(app.settings).iterdir()] == [f"{waiting}.audio"]


def test_personal_data_is_redacted_in_the_transcript_the_speakers_and_the_stored_recording(
    start_app: Callable[..., InProcess],
) -> None:
    app = start_app()
    said = [espeak("Good morning, thank you for calling."), espeak("My number is 555 123 4567, please call me back.")]
    response = post(app, assemble(said, seed=0).wav(16_000), roles="agent,ann@example.com")
    body = settled(app, response.json()["id"])
    assert body["status"] == "done", body
    agent, customer = body["turns"]
    assert "[PHONE]" in customer["text"] and "555" not in customer["text"], customer["text"]
    assert PSEUDONYM.fullmatch(customer["speaker"]) and body["roles"] == ["agent", customer["speaker"]]
    with session_scope(app.engine) as session:
        speakers = session.scalars(select(Prediction.speaker).order_by(Prediction.turn_index)).all()
    assert speakers == ["agent", customer["speaker"]]
    redacted = [word for word in customer["words"] if "[PHONE]" in word["text"]]
    kept = [word for word in customer["words"] if word["text"].strip(" .,").lower() in {"number", "call"}]
    assert len(redacted) == 1 and len(kept) == 2 and body["recording"]["muted_s"] > 0, customer["words"]
    stored, rate = sf.read(str(calls_dir(app.settings) / f"{body['id']}.audio"), always_2d=True)

    def loudest(word: dict[str, Any]) -> float:
        return float(np.abs(stored[round(word["start_s"] * rate) : round(word["end_s"] * rate)]).max())

    assert loudest(redacted[0]) == 0.0 and min(loudest(word) for word in kept) > 0.05
    assert loudest({"start_s": agent["start_s"], "end_s": agent["end_s"]}) > 0.05
