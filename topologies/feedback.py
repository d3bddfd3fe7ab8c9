"""`stream-ml worker feedback`: labels ⨝ predictions → online learning and drift detection.

Wiring only: the processing is `stream_ml.feedback.worker` (see its docstring for the join, the
learners, drift and what survives a restart).
"""

from __future__ import annotations

from stream_ml.config import Settings
from stream_ml.features import feature_set
from stream_ml.feedback.options import FeedbackOptions
from stream_ml.feedback.worker import FeedbackWorker
from stream_ml.registry import Registry
from stream_ml.stack import kafka_bootstrap, redis_url


def build(settings: Settings, options: FeedbackOptions) -> FeedbackWorker:
    return FeedbackWorker(
        settings,
        feature_set(settings.feature_set),
        kafka_bootstrap(settings),
        redis_url(settings),
        Registry(settings.registry_path()),
        options,
    )
