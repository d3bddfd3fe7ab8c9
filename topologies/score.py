"""`stream-ml worker score`: transactions → predictions, with the HTTP scorer's batcher and model.

Wiring only: the processing is `stream_ml.serving.stream` (see its docstring for what is
published, when offsets are committed and how the features race the feature worker).
"""

from __future__ import annotations

from stream_ml.config import Settings
from stream_ml.features import feature_set
from stream_ml.registry import Registry
from stream_ml.serving.app import Scorer
from stream_ml.serving.model import production_model
from stream_ml.serving.options import ServeOptions
from stream_ml.serving.stream import Collected, StreamScorer
from stream_ml.stack import kafka_bootstrap, redis_url


def build(settings: Settings, options: ServeOptions, group_id: str, max_records: int) -> StreamScorer:
    fs = feature_set(settings.feature_set)
    registry = Registry(settings.registry_path())
    model = production_model(registry, fs, allow_feature_set_mismatch=options.allow_feature_set_mismatch)
    collected = Collected()
    scorer = Scorer(fs, redis_url(settings), options, model=model, predictions=collected, registry=registry)
    return StreamScorer(settings, kafka_bootstrap(settings), scorer, collected, group_id, max_records)
