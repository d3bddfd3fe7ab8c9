"""Prometheus metrics of `stream-ml produce` (served with --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter

PRODUCED = Counter(
    "stream_ml_produced_events_total", "Events published by `stream-ml produce`, by topic.", ["topic"]
)
SCORED_BY_GATEWAY = Counter(
    "stream_ml_gateway_calls_total",
    "Scoring calls of `produce --score-url`, by HTTP status (0: no answer).",
    ["status"],
)
