"""Prometheus metrics of the scorer (units in the names)."""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from stream_ml.serving.workers import METRICS_DIR

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)

REQUEST_SECONDS = Histogram(
    "stream_ml_score_request_seconds", "Time to answer a scoring call.", buckets=_LATENCY
)
QUEUE_WAIT_SECONDS = Histogram(
    "stream_ml_score_queue_wait_seconds", "Longest wait in the queue of each batch.", buckets=_LATENCY
)
BATCH_SIZE = Histogram(
    "stream_ml_score_batch_size_requests",
    "Requests per model batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_SECONDS = Histogram("stream_ml_score_batch_seconds", "Time to score one batch.", buckets=_LATENCY)
FEATURE_SECONDS = Histogram(
    "stream_ml_score_feature_fetch_seconds", "Time to read a batch's features from Redis.", buckets=_LATENCY
)
MODEL_SECONDS = Histogram("stream_ml_score_model_seconds", "Time of the model on a batch.", buckets=_LATENCY)
REJECTED = Counter("stream_ml_score_rejected_total", "Calls refused, by reason.", ["reason"])
RESPONSES = Counter(
    "stream_ml_score_responses_total",
    "Answers of /score and /score/batch, by HTTP status (every status: 401, 413, 422 too).",
    ["endpoint", "status"],
)
DEGRADED = Counter(
    "stream_ml_score_degraded_total", "Transactions scored without stored features (store slow or down)."
)


def exposition() -> bytes:
    """``/metrics``: this process's metrics, or every worker's added up (``serve --workers``,
    where prometheus_client keeps them in files in ``PROMETHEUS_MULTIPROC_DIR``)."""
    if METRICS_DIR not in os.environ:
        return generate_latest()
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    return generate_latest(registry)


def observe_batch(size: int, queue_wait_s: float, run_s: float) -> None:
    BATCH_SIZE.observe(size)
    QUEUE_WAIT_SECONDS.observe(queue_wait_s)
    BATCH_SECONDS.observe(run_s)


PREDICTIONS_LOGGED = Counter("stream_ml_score_predictions_logged_total", "Predictions published to the log.")
PREDICTIONS_DROPPED = Counter(
    "stream_ml_score_predictions_dropped_total",
    "Predictions not logged: the buffer was full (broker slow or down) or the broker failed them.",
)

# `stream-ml worker score`
STREAM_EVENTS = Counter(
    "stream_ml_stream_score_events_total", "Transactions read by the stream scorer, by outcome.", ["outcome"]
)
STREAM_LAG_EVENTS = Gauge(
    "stream_ml_stream_score_consumer_lag_events",
    "Records behind the end of each assigned partition.",
    ["topic", "partition"],
)
