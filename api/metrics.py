"""Prometheus metrics of one app, in a registry of its own (several apps can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
CONFIDENCE_BUCKETS = tuple(round(0.1 * step, 1) for step in range(1, 11))
CALL_SECONDS_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0)
# Processing seconds per second of recording; the target for a 5-minute call on 2 cores is 0.2.
REAL_TIME_FACTOR_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.request_latency = Histogram(
            "equipoise_http_request_duration_seconds",
            "HTTP request latency.",
            ["route", "method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("equipoise_http_requests_in_flight", "HTTP requests being served.", registry=r)
        self.batch_size = Histogram(
            "equipoise_batch_size_utterances", "Utterances per model call.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_seconds = Histogram(
            "equipoise_batch_seconds",
            "Wall seconds of a micro-batch on its model thread (scoring, and waiting for a core or the GIL).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("equipoise_batch_queue_depth", "Requests waiting for the model.", registry=r)
        self.rejected = Counter(
            "equipoise_batch_rejected_total", "Requests refused because the queue was full.", registry=r
        )
        self.predictions = Counter(
            "equipoise_predictions_total", "Predicted utterances.", ["emotion", "model_version"], registry=r
        )
        self.rescored = Counter(
            "equipoise_int8_rescored_total",
            "Utterances whose int8 answer was a near tie, re-scored with the fp32 encoder.",
            ["model_version"],
            registry=r,
        )
        self.confidence = Histogram(
            "equipoise_prediction_confidence",
            "Probability of the predicted emotion.",
            ["model_version"],
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.log_lag = Gauge(
            "equipoise_log_lag_seconds", "Age of the oldest prediction not yet in the database.", registry=r
        )
        self.spooled_rows = Gauge(
            "equipoise_log_spooled_rows", "Prediction rows in the local spool, waiting for the database.", registry=r
        )
        self.log_rows = Counter(
            "equipoise_log_rows_total", "Prediction rows by logging outcome.", ["outcome"], registry=r
        )
        self.model_info = Info("equipoise_model", "The model being served.", registry=r)
        self.model_loaded = Gauge("equipoise_model_loaded", "1 while a model is loaded.", registry=r)
        self.reloads = Counter("equipoise_model_reloads_total", "Model loads by outcome.", ["outcome"], registry=r)
        self.streams_open = Gauge("equipoise_streams_open", "Live streams (/v1/stream) open now.", registry=r)
        self.stream_closes = Counter(
            "equipoise_stream_closes_total", "Live streams closed, by WebSocket close code.", ["code"], registry=r
        )
        self.escalations = Counter(
            "equipoise_stream_escalations_total", "Escalation events pushed to live streams.", registry=r
        )
        self.shadow = Counter(
            "equipoise_shadow_predictions_total",
            "Live turns selected for shadow scoring, by outcome: scored by the challenger, dropped (queue full or "
            "stopping), failed (the challenger could not load or score), skipped (no challenger to compare).",
            ["outcome"],
            registry=r,
        )
        self.shadow_agreement = Gauge(
            "equipoise_shadow_agreement_ratio",
            "Share of the challenger's recent shadow-scored turns whose emotion is the champion's live answer.",
            ["challenger"],
            registry=r,
        )

        self.calls_queued = Gauge(
            "equipoise_calls_queued", "Calls waiting to be processed (all processes on the database).", registry=r
        )
        self.calls_running = Gauge("equipoise_calls_running", "Calls this process is processing now.", registry=r)
        self.calls = Counter(
            "equipoise_calls_total", "Calls processed, by outcome (done, failed).", ["outcome"], registry=r
        )
        self.call_seconds = Histogram(
            "equipoise_call_processing_seconds",
            "Processing time of a call, by stage (decode, vad, asr, emotion, analytics, logging, total).",
            ["stage"],
            buckets=CALL_SECONDS_BUCKETS,
            registry=r,
        )
        self.call_real_time_factor = Histogram(
            "equipoise_call_real_time_factor",
            "Processing seconds per second of call recording.",
            buckets=REAL_TIME_FACTOR_BUCKETS,
            registry=r,
        )

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
