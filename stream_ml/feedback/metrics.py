"""Prometheus metrics of the feedback worker's join (the learners and drift have their own)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECORDS = Counter(
    "stream_ml_feedback_records_total",
    "Records read by the feedback worker, by topic and outcome (valid, dead_letter).",
    ["topic", "outcome"],
)
JOIN = Counter(
    "stream_ml_feedback_join_total",
    "Join outcomes: joined, prediction_waiting, label_waiting, duplicate_label, duplicate_prediction, "
    "late_prediction, expired_label (unmatched past the TTL), expired_prediction (unlabelled).",
    ["outcome"],
)
SKIPPED = Counter(
    "stream_ml_feedback_skipped_total",
    "Joined examples or predictions left out of learning or drift, by reason.",
    ["reason"],
)
LABEL_DELAY_SECONDS = Histogram(
    "stream_ml_feedback_label_delay_seconds",
    "From a transaction's event time to its label's time, for joined examples.",
    buckets=(1, 10, 60, 300, 900, 3600, 6 * 3600, 86400, 3 * 86400, 7 * 86400, 30 * 86400),
)
BATCH_SECONDS = Histogram(
    "stream_ml_feedback_batch_seconds",
    "Time to join, learn from and check drift on one fetched batch, its writes included.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
CONSUMER_LAG_EVENTS = Gauge(
    "stream_ml_feedback_consumer_lag_events",
    "Records behind the end of each assigned partition.",
    ["topic", "partition"],
)
SNAPSHOTS = Counter(
    "stream_ml_feedback_snapshots_total", "Online models registered as candidates in the model registry."
)
