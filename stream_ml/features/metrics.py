"""Prometheus metrics of the feature worker (units in the names)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS = Counter(
    "stream_ml_feature_events_total",
    "Source events seen by the feature worker, by topic and outcome (applied, dead_letter, late).",
    ["topic", "outcome"],
)
UPDATES = Counter(
    "stream_ml_feature_entity_updates_total",
    "Entity updates applied to the online store, by entity type (duplicates skipped are not counted).",
    ["entity"],
)
BATCH_EVENTS = Histogram(
    "stream_ml_feature_batch_events",
    "Records handled per batch.",
    buckets=(1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 20000, 50000),
)
REDIS_WRITE_SECONDS = Histogram(
    "stream_ml_feature_redis_write_seconds",
    "Time of one pipelined write of a batch's states to Redis.",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
)
FRESHNESS_SECONDS = Histogram(
    "stream_ml_feature_freshness_seconds",
    "From an event's time to its effect being visible in Redis (meaningful for live streams).",
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CONSUMER_LAG_EVENTS = Gauge(
    "stream_ml_feature_consumer_lag_events",
    "Records behind the end of each assigned partition.",
    ["topic", "partition"],
)
