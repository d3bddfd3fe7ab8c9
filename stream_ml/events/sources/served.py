"""Predictions as a scorer would have served them, for a stream of transactions and labels.

For tests, benchmarks and demos of the feedback loop without running the scorer: each transaction
gets the feature vector as of just before it (point in time, the same feature code as the stream
worker and the scorer), is scored by a model, and becomes a :class:`Prediction` served
``served_delay_ms`` after its event time. Labels pass through in order; a prediction comes out
up to one allowed lateness after the events around it, as a real prediction log may.

>>> from stream_ml.events.sources.synthetic import SyntheticConfig, SyntheticStream
>>> from stream_ml.features import FRAUD_FEATURES
>>> from stream_ml.serving.model import default_model
>>> items = SyntheticStream(SyntheticConfig(seed=1, start_ms=1_700_000_000_000, rate=20)).items(
...     1_700_000_060_000)
>>> out = list(served(items, FRAUD_FEATURES, default_model(FRAUD_FEATURES)))
>>> predictions = [p for p in out if isinstance(p, Prediction)]
>>> len(predictions) > 100, len(predictions[0].features) == len(FRAUD_FEATURES.names)
(True, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from stream_ml.events.label import Label
from stream_ml.events.prediction import Prediction
from stream_ml.events.transaction import Transaction
from stream_ml.features.definitions import FeatureSet
from stream_ml.serving.model import ScoringModel
from stream_ml.serving.options import ServeOptions
from stream_ml.training.pointintime import PointInTime

_TAG = "served:0"
_RELEASE_EVERY = 2048


def served(
    items: Iterable[Transaction | Label],
    feature_set: FeatureSet,
    model: ScoringModel,
    *,
    served_delay_ms: int = 20,
    options: ServeOptions | None = None,
) -> Iterator[Prediction | Label]:
    """Each transaction replaced by its served prediction; labels unchanged."""
    options = options or ServeOptions()
    pit = PointInTime(feature_set, [_TAG])
    pending: dict[str, Transaction] = {}
    for i, item in enumerate(items):
        if isinstance(item, Transaction):
            pending[item.event_id] = item
            pit.add_transaction(item, _TAG, i)
        else:
            pit.add_label(item, _TAG, i)
            yield item
        if i % _RELEASE_EVERY == _RELEASE_EVERY - 1:
            yield from _predictions(pit, pending, model, feature_set, served_delay_ms, options, final=False)
    yield from _predictions(pit, pending, model, feature_set, served_delay_ms, options, final=True)


def _predictions(
    pit: PointInTime,
    pending: dict[str, Transaction],
    model: ScoringModel,
    feature_set: FeatureSet,
    served_delay_ms: int,
    options: ServeOptions,
    *,
    final: bool,
) -> Iterator[Prediction]:
    chunk = pit.release(final=final)
    if not chunk.event_ids:
        return
    vectors = chunk.features.tolist()
    scores = model.probabilities(vectors)
    for event_id, vector, score in zip(chunk.event_ids, vectors, scores, strict=True):
        tx = pending.pop(event_id)
        yield Prediction(
            event_id,
            tx.event_time,
            score,
            options.decision(score),
            model.version,
            "production",
            feature_set.version,
            vector,
            tx.event_time + served_delay_ms,
        )
