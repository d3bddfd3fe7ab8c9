"""`stream-ml worker features`: transactions and labels into entity window state in Redis.

Wiring only: the feature set comes from the settings, the processing from
`stream_ml.features.worker` (see its docstring for the two stages and the exactly-once effect).
"""

from __future__ import annotations

from stream_ml.config import Settings
from stream_ml.features import feature_set
from stream_ml.features.worker import FeatureWorker, WorkerOptions
from stream_ml.stack import kafka_bootstrap, redis_url


def build(settings: Settings, options: WorkerOptions) -> FeatureWorker:
    return FeatureWorker(
        settings, feature_set(settings.feature_set), kafka_bootstrap(settings), redis_url(settings), options
    )
