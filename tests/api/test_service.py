"""The service in process (fake model): logging, feedback, registry endpoints, reload, overload, metrics, docs."""

from __future__ import annotations

import base64
import gc
import hashlib
import io
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from sqlalchemy import event, select
from sqlalchemy.exc import OperationalError

from api.retention import purge
from core.db import crud
from core.db.models import Feedback, Prediction
from core.db.session import make_engine, session_scope
from equipoise.demo.services import post_json
from model.registry import ModelRegistry
from tests.api.conftest import (
    FakeRuntime,
    InProcess,
    count_rows,
    fake_artifact,
    in_process_app,
    settings_for,
    wait_for,
)


def wav_bytes(seconds: float = 0.5) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, (0.1 * np.sin(np.arange(int(seconds * 16000)) / 9)).astype(np.float32), 16000, format="WAV")
    return buffer.getvalue()


def stored(app: InProcess) -> dict[uuid.UUID, Prediction]:
    with session_scope(app.engine) as session:
        return {row.id: row for row in session.scalars(select(Prediction))}


def test_each_prediction_is_logged_once_redacted_with_its_embedding(start_app: Callable[..., InProcess]) -> None:
    app = start_app()
    text = "my card is 4111 1111 1111 1111, I'm furious"
    utterance = app.client.post("/v1/predict/utterance", json={"text": text, "speaker": "caller"}).json()
    dialogue = app.client.post(
        "/v1/predict/dialogue",
        json={
            "conversation_id": "call-42",
            "context": "causal",
            "turns": [
                {"text": "Hello", "speaker": "agent"},
                {"speaker": "customer", "text": "hi", "audio": base64.b64encode(wav_bytes()).decode()},
            ],
        },
    ).json()
    ids = [uuid.UUID(utterance["prediction_id"])] + [uuid.UUID(turn["prediction_id"]) for turn in dialogue["turns"]]
    rows = wait_for(lambda: (found := stored(app)) and len(found) == 3 and found)
    assert set(rows) == set(ids)
    first = rows[ids[0]]
    assert first.text == "my card is [CARD], I'm furious" and first.text_redacted
    assert first.text_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert first.label == utterance["emotion"] and first.model_version == "fake-1"
    assert first.probabilities == list(utterance["probabilities"].values())
    assert len(first.embedding or b"") == 16 * 4 and first.request_kind == "utterance" and first.context_mode is None
    second, third = rows[ids[1]], rows[ids[2]]
    assert (second.conversation_id, second.turn_index, second.context_mode) == ("call-42", 0, "causal")
    assert third.has_audio and third.audio_seconds == 0.5 and third.audio_path is None  # audio storage is off


def test_feedback_joins_its_prediction_even_before_the_log_is_flushed(start_app: Callable[..., InProcess]) -> None:
    app = start_app(log_flush_interval_s=30.0)
    prediction = app.client.post("/v1/predict/utterance", json={"text": "this is awful"}).json()
    response = app.client.post(
        "/v1/feedback",
        json={
            "prediction_id": prediction["prediction_id"],
            "label": "anger",
            "sentiment": "negative",
            "source": "qa",
        },
    )
    assert response.status_code == 201, response.text
    assert response.json()["predicted"] == prediction["emotion"]
    with session_scope(app.engine) as session:
        feedback = session.scalars(select(Feedback)).one()
        assert (feedback.prediction.label, feedback.label) == (prediction["emotion"], "anger")


def test_feedback_finds_a_prediction_written_between_its_lookup_and_its_pending_check(
    start_app: Callable[..., InProcess],
) -> None:
    """The logging thread inserts the row and forgets the id just after the feedback's lookup missed it."""
    app = start_app(log_flush_interval_s=30.0)
    prediction = app.client.post("/v1/predict/utterance", json={"text": "this is awful"}).json()
    written: list[bool] = []

    def write_the_log_after_the_first_lookup(_connection: object, _cursor: object, statement: str, *_: object) -> None:
        if not written and statement.lstrip().upper().startswith("SELECT") and "FROM predictions" in statement:
            written.append(app.state.logger.flush(5))

    event.listen(app.state.engine, "after_cursor_execute", write_the_log_after_the_first_lookup)
    try:
        body = {"prediction_id": prediction["prediction_id"], "label": "anger"}
        response = app.client.post("/v1/feedback", json=body)
    finally:
        event.remove(app.state.engine, "after_cursor_execute", write_the_log_after_the_first_lookup)
    assert written == [True]
    assert response.status_code == 201, response.text


def test_feedback_for_a_prediction_the_log_has_not_written_yet_is_a_503_to_retry(
    start_app: Callable[..., InProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database slower than the feedback's wait: the prediction exists, so "not found" would be a lie."""
    app = start_app(log_flush_interval_s=30.0)
    prediction = app.client.post("/v1/predict/utterance", json={"text": "this is awful"}).json()
    monkeypatch.setattr(app.state.logger, "flush", lambda timeout_s: False)  # the write does not finish in time
    body = {"prediction_id": prediction["prediction_id"], "label": "anger"}
    response = app.client.post("/v1/feedback", json=body)
    assert response.status_code == 503 and response.headers["retry-after"], response.text
    assert "still being written" in response.json()["detail"]
    monkeypatch.undo()
    assert app.client.post("/v1/feedback", json=body).status_code == 201


def test_the_demo_client_sends_feedback_again_after_the_retry_after_of_a_503(
    start_app: Callable[..., InProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = start_app(log_flush_interval_s=30.0)
    prediction = app.client.post("/v1/predict/utterance", json={"text": "this is awful"}).json()
    flush, waits = app.state.logger.flush, []

    def first_wait_runs_out(timeout_s: float) -> bool:
        waits.append(timeout_s)
        return len(waits) > 1 and flush(timeout_s)

    monkeypatch.setattr(app.state.logger, "flush", first_wait_runs_out)
    body = {"prediction_id": prediction["prediction_id"], "label": "anger"}
    assert post_json(app.client, "/v1/feedback", body, "feedback")["label"] == "anger"
    assert len(waits) == 2  # a 503, then the retry


def test_stored_audio_and_old_predictions_are_purged_by_retention(start_app: Callable[..., InProcess]) -> None:
    app = start_app(store_audio=True)
    audio = wav_bytes()
    prediction = app.client.post("/v1/predict/utterance", files={"audio": ("hi.wav", audio)}).json()
    app.client.post("/v1/feedback", json={"prediction_id": prediction["prediction_id"], "label": "joy"})
    row = stored(app)[uuid.UUID(prediction["prediction_id"])]
    assert row.audio_path is not None and Path(row.audio_path).read_bytes() == audio
    assert purge(app.engine, retention_days=1).predictions == 0
    result = purge(app.engine, retention_days=1, now=datetime.now(UTC) + timedelta(days=2))
    assert (result.predictions, result.audio_files) == (1, 1)
    assert count_rows(app.engine) == 0 and count_rows(app.engine, "feedback") == 0
    assert not Path(row.audio_path).exists()


def test_promotion_and_rollback_through_the_api_swap_the_served_model(
    start_app: Callable[..., InProcess], tmp_path: Path
) -> None:
    app = start_app(champion=False)
    registry = ModelRegistry(app.engine, app.settings.registry_dir)  # type: ignore[arg-type]
    for version in ("m-1", "m-2"):
        registry.register(fake_artifact(tmp_path / "built", version))
    assert app.client.get("/readyz").status_code == 503
    assert app.client.post("/v1/models/m-1/promote").json()["status"] == "champion"
    wait_for(lambda: app.client.get("/readyz").status_code == 200)
    assert app.client.post("/v1/models/m-2/promote").status_code == 200
    wait_for(lambda: app.client.get("/v1/models").json()["serving"] == "m-2")
    assert app.client.post("/v1/predict/utterance", json={"text": "hi"}).json()["model_version"] == "m-2"
    assert app.client.post("/v1/models/rollback").json()["version"] == "m-1"
    wait_for(lambda: app.client.get("/v1/models").json()["serving"] == "m-1")
    statuses = {row["version"]: row["status"] for row in app.client.get("/v1/models").json()["versions"]}
    assert statuses == {"m-1": "champion", "m-2": "rejected"}
    assert app.client.post("/v1/models/nope/promote").status_code == 404
    assert app.client.post("/v1/models/rollback").status_code == 409


def test_database_outages_on_the_request_path_are_503_not_500(
    start_app: Callable[..., InProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    app = start_app()
    prediction = app.client.post("/v1/predict/utterance", json={"text": "hello"}).json()

    def unreachable(*_args: object) -> None:
        raise OperationalError("SELECT", {}, Exception("connection refused"))

    monkeypatch.setattr(crud, "get_prediction", unreachable)
    response = app.client.post("/v1/feedback", json={"prediction_id": prediction["prediction_id"], "label": "joy"})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["type"].endswith("database-unavailable")


def test_jobs_are_queued_against_the_champion(start_app: Callable[..., InProcess]) -> None:
    app = start_app()
    created = app.client.post("/v1/jobs", json={"reason": "minority recall dropped", "tier": 2})
    assert created.status_code == 201
    job = app.client.get(f"/v1/jobs/{created.json()['id']}").json()
    assert (job["status"], job["trigger"], job["tier"], job["base_version"]) == ("queued", "admin", 2, "fake-1")


def test_without_a_model_predictions_and_readiness_answer_503(start_app: Callable[..., InProcess]) -> None:
    app = start_app(champion=False)
    assert app.client.get("/healthz").status_code == 200
    ready = app.client.get("/readyz")
    assert ready.status_code == 503 and "no model" in ready.json()["detail"]
    response = app.client.post("/v1/predict/utterance", json={"text": "hello"})
    assert response.status_code == 503 and response.headers["retry-after"]
    assert response.headers["content-type"] == "application/problem+json"


def test_overload_is_refused_with_retry_after_not_queued(start_app: Callable[..., InProcess]) -> None:
    app = start_app(
        runtime=lambda row: FakeRuntime(version=row.version, delay_s=0.3), batch_queue_limit=1, batch_max_size=1
    )
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: app.client.post("/v1/predict/utterance", json={"text": f"t{i}"}), range(8)))
    statuses = sorted(response.status_code for response in responses)
    assert set(statuses) == {200, 503} and statuses.count(200) >= 2
    refused = next(response for response in responses if response.status_code == 503)
    assert refused.headers["retry-after"] == "1" and "overloaded" in refused.json()["type"]


def test_metrics_cover_requests_batches_predictions_and_logging(start_app: Callable[..., InProcess]) -> None:
    app = start_app()
    app.client.post("/v1/predict/utterance", json={"text": "hello"})
    app.client.post("/v1/predict/utterance", json={"text": ""})
    exposition = app.client.get("/metrics").text
    for name in (
        'equipoise_http_request_duration_seconds_count{method="POST",route="/v1/predict/utterance",status="200"} 1.0',
        'equipoise_http_request_duration_seconds_count{method="POST",route="/v1/predict/utterance",status="422"} 1.0',
        "equipoise_http_requests_in_flight",
        "equipoise_batch_size_utterances_bucket",
        "equipoise_batch_queue_depth",
        'equipoise_predictions_total{emotion="',
        "equipoise_prediction_confidence_bucket",
        "equipoise_log_lag_seconds",
        "equipoise_log_spooled_rows 0.0",
        'precision="fp32",providers="FakeExecutionProvider"',
        "equipoise_model_loaded 1.0",
    ):
        assert name in exposition, name


def test_the_openapi_document_offers_json_and_multipart_bodies(start_app: Callable[..., InProcess]) -> None:
    app = start_app()
    assert app.client.get("/docs").status_code == 200
    document = app.client.get("/openapi.json").json()
    for path, model in (("/v1/predict/utterance", "UtteranceRequest"), ("/v1/predict/dialogue", "DialogueRequest")):
        content = document["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data"}
        assert content["application/json"]["schema"]["$ref"] == f"#/components/schemas/{model}"
        assert model in document["components"]["schemas"]
    assert "application/problem+json" in document["paths"]["/v1/feedback"]["post"]["responses"]["404"]["content"]


def test_shutdown_flushes_the_prediction_log(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, log_flush_interval_s=30.0, log_flush_rows=10_000)
    with in_process_app(settings) as app:
        for i in range(5):
            assert app.client.post("/v1/predict/utterance", json={"text": f"bye {i}"}).status_code == 200
        assert count_rows(app.engine) == 0
        engine = make_engine(str(settings.database_url))
    assert count_rows(engine) == 5  # written by the lifespan's shutdown
    engine.dispose()


def test_the_service_freezes_start_up_objects_while_it_serves(tmp_path: Path) -> None:
    previous = gc.get_threshold()
    with in_process_app(settings_for(tmp_path, gc_freeze=True, gc_gen0_threshold=1_234)) as app:
        assert app.client.get("/readyz").status_code == 200
        assert gc.get_freeze_count() > 0 and gc.get_threshold()[0] == 1_234
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == previous
