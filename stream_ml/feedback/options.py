"""The feedback worker's options: a module of their own, so `stream-ml --help` imports no torch,
river or scipy."""

from __future__ import annotations

from dataclasses import dataclass, field

from stream_ml.serving.options import ServeOptions


@dataclass(frozen=True, slots=True)
class WatchOptions:
    window_s: int = 3600  # tumbling windows of event time
    window_events: int | None = None  # or windows of this many predictions
    bootstrap_rows: int = 5_000  # predictions that become the reference of a model without one
    idle_windows: int = 2  # a version unseen this many windows (of event time) is closed and dropped


@dataclass(frozen=True, slots=True)
class FeedbackOptions:
    group_id: str = "stream-ml-feedback"
    join_ttl_s: int = 86_400  # how long a prediction waits for its label (and a label for its prediction)
    watch: WatchOptions = field(default_factory=WatchOptions)
    metrics_window: int = 20_000  # examples behind the rolling AUCs
    review_threshold: float = ServeOptions().review_threshold
    snapshot_every_s: float = 600.0
    snapshot_min_examples: int = 1_000  # new examples needed before another snapshot is registered
    learn: bool = True
    max_records: int = 10_000
