"""The running service monitors itself on a schedule and exports every series the dashboard and alerts read."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.api.conftest import running_server
from tests.monitoring.test_prometheus_files import metrics_used

FEEDBACK = ["anger", "fear", "sadness", "disgust", "neutral"]
TEXTS = ["I can't believe you did that!", "Okay, fine.", "That is wonderful news!", "I'm so sorry for your loss."]
# Exported only once a retraining job's gate has reached the paired test; no job runs here, and
# tests/retraining/test_gate.py::test_the_newest_decision_is_exported_with_its_bounds scrapes them after a real gate.
AFTER_A_GATE_DECISION = {"equipoise_gate_gain", "equipoise_gate_required_lower_bound"}
# Counted once a stream closes (tests/api/test_stream.py scrapes it) or escalates, and once a challenger is shadowed
# (tests/api/test_shadow.py scrapes them); this service opens no stream and has no challenger.
AFTER_STREAMS_AND_SHADOWING = {
    "equipoise_stream_closes_total",
    "equipoise_stream_escalations_total",
    "equipoise_shadow_predictions_total",
    "equipoise_shadow_agreement_ratio",
    # Counted once a call is processed (tests/api/test_calls.py scrapes them); this service is sent no call.
    "equipoise_calls_total",
    "equipoise_call_processing_seconds_bucket",
}


def _sample_names(client: httpx.Client) -> set[str]:
    text = client.get("/metrics").text
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_service_schedules_monitoring_and_exports_every_series_used(tmp_path: Path, tiny_artifact: Path) -> None:
    settings = {
        "default_model_dir": str(tiny_artifact),
        # a window expecting at least one turn of each minority class (the tiny model gives them ~2% each), so that
        # the label-free minority recall and its interval are defined
        "monitor_window": "100",
        "monitor_interval_s": "0.5",
        "monitor_recall_precision": "0.5",  # a few dozen labels then measure minority recall (0.04 needs thousands)
    }
    database = f"sqlite:///{tmp_path / 'equipoise.db'}"
    with running_server(tmp_path / "state", database, **settings) as server, server.client() as client:
        for i in range(200):
            response = client.post("/v1/predict/utterance", json={"text": TEXTS[i % len(TEXTS)]})
            assert response.status_code == 200, response.text
            if i % 2 == 0:  # feedback on every other prediction, minority classes included
                label = FEEDBACK[(i // 2) % len(FEEDBACK)]
                body = {"prediction_id": response.json()["prediction_id"], "label": label}
                assert client.post("/v1/feedback", json=body).status_code == 201
        deadline = time.monotonic() + 60
        while (
            missing := sorted(
                metrics_used() - AFTER_A_GATE_DECISION - AFTER_STREAMS_AND_SHADOWING - _sample_names(client)
            )
        ) and time.monotonic() < deadline:
            time.sleep(0.5)
    assert missing == [], f"used by the dashboard or the rules but not exported: {missing}"
