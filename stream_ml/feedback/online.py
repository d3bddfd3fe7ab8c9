"""Online learning from labelled predictions, with progressive validation of every model in sight.

For each labelled example (the vector as served, the label, the scores the served models gave),
each online model first *predicts*, then *learns*: its prediction is out of sample, like the
production model's, so their rolling metrics compare like with like. The served models' scores
(``Example.served``, e.g. ``{"production:<version>": 0.03, "shadow:<version>": 0.05}``) are
tracked the same way, so the production model's live ROC AUC sits next to the online models'.

Models: ``online-logistic`` (:class:`~stream_ml.feedback.logistic.OnlineLogistic`, exportable to
the registry by :mod:`~stream_ml.feedback.snapshot`) and ``online-forest``
(:class:`~stream_ml.feedback.forest.OnlineForest`, in memory only).

Prometheus: ``stream_ml_online_roc_auc``, ``_pr_auc`` and ``_recall_at_review`` (gauges, over the
rolling window) and ``stream_ml_online_examples_total`` (a counter), each by ``model``.

>>> import random
>>> rng = random.Random(0)
>>> learner = OnlineLearner(["amount", "hour"], window=1000)
>>> examples = []
>>> for i in range(3000):
...     fraud = rng.random() < 0.02
...     x = [rng.gauss(3.0 if fraud else 0.0, 1.0), float("nan")]
...     examples.append(Example(x, fraud, i * 1000, {"production:v1": 0.9 if fraud else 0.1}))
>>> learner.learn_many(examples)
>>> sorted(learner.metrics())
['online-forest', 'online-logistic', 'production:v1']
>>> learner.metrics()["online-logistic"]["roc_auc"] > 0.9, learner.metrics()["production:v1"]["roc_auc"]
(True, 1.0)
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from prometheus_client import Counter, Gauge

from stream_ml.feedback.forest import OnlineForest
from stream_ml.feedback.logistic import OnlineLogistic, model_rows, rows_as_dicts
from stream_ml.feedback.progressive import RollingMetrics
from stream_ml.serving.options import ServeOptions

LOGISTIC = "online-logistic"
FOREST = "online-forest"
REVIEW_THRESHOLD = ServeOptions().review_threshold

ROC_AUC = Gauge(
    "stream_ml_online_roc_auc", "Rolling progressive ROC AUC, by online or served model.", ["model"]
)
PR_AUC = Gauge("stream_ml_online_pr_auc", "Rolling progressive PR AUC, by online or served model.", ["model"])
RECALL_AT_REVIEW = Gauge(
    "stream_ml_online_recall_at_review",
    "Share of the window's frauds scored at or above the review threshold, by model.",
    ["model"],
)
EXAMPLES = Counter(
    "stream_ml_online_examples_total",
    "Labelled examples scored (and, online models, learnt), by model.",
    ["model"],
)


@dataclass(slots=True)
class Example:
    """A labelled payment: the vector as served (NaN = missing), its label, and who scored it how."""

    features: Sequence[float]
    is_fraud: bool
    event_time: int  # ms
    served: dict[str, float] = field(default_factory=dict)  # e.g. "production:<version>" -> score


class OnlineLearner:
    """The online models of one feedback worker, and rolling metrics of those and the served ones.

    ``window`` is the number of latest examples each rolling metric covers; ``review_threshold``
    is the scorer's (the recall metric counts frauds scored at or above it). A served model not
    seen for a whole window (a version replaced) is forgotten, its gauges removed.
    """

    def __init__(
        self,
        names: Sequence[str],
        *,
        window: int = 20_000,
        review_threshold: float = REVIEW_THRESHOLD,
        seed: int = 0,
    ) -> None:
        self.names = list(names)
        self.window = window
        self.review_threshold = review_threshold
        self.logistic = OnlineLogistic(self.names)
        self.forest = OnlineForest(self.names, seed=seed)
        self.rolling: dict[str, RollingMetrics] = {
            LOGISTIC: RollingMetrics(window, review_threshold),
            FOREST: RollingMetrics(window, review_threshold),
        }
        self.seen = 0  # examples through learn_many in this process
        self._last_seen: dict[str, int] = {}  # served model -> self.seen at its latest example
        self._exported_at = -float("inf")

    @property
    def examples(self) -> int:
        """Examples the online logistic model has learnt, over its life (restores included)."""
        return self.logistic.examples

    def learn_many(self, examples: Iterable[Example]) -> None:
        """Each online model predicts then learns each example, in order; all scores are tracked."""
        examples = list(examples)
        if not examples:
            return
        # One conversion for the batch: the rows as float64 arrays (the logistic model's scaler
        # learns those) and as river's dicts (the same numbers), shared by both models.
        rows = model_rows([e.features for e in examples], self.names)
        dicts = rows_as_dicts(rows, self.names)
        labels = [bool(e.is_fraud) for e in examples]
        logistic, forest = self.logistic, self.forest
        p_logistic, p_forest = [], []
        for row, x, y in zip(rows, dicts, labels, strict=True):
            p_logistic.append(logistic.predict_learn(x, row, y))
            p_forest.append(forest.predict_learn_dict(x, y))
        y = np.array(labels, dtype=bool)
        self.rolling[LOGISTIC].add_many(y, p_logistic)
        self.rolling[FOREST].add_many(y, p_forest)
        EXAMPLES.labels(LOGISTIC).inc(len(examples))
        EXAMPLES.labels(FOREST).inc(len(examples))
        self._track_served(examples, labels)
        self.seen += len(examples)

    def _track_served(self, examples: list[Example], labels: list[bool]) -> None:
        # served names are "<variant>:<version>", never the online models' names
        served: dict[str, tuple[list[bool], list[float]]] = {}
        for e, y in zip(examples, labels, strict=True):
            for name, score in e.served.items():
                ys, ps = served.setdefault(name, ([], []))
                ys.append(y)
                ps.append(score)
        for name, (ys, ps) in served.items():
            rolling = self.rolling.get(name)
            if rolling is None:
                rolling = self.rolling[name] = RollingMetrics(self.window, self.review_threshold)
            rolling.add_many(ys, ps)
            EXAMPLES.labels(name).inc(len(ys))
            self._last_seen[name] = self.seen + len(examples)
        now = self.seen + len(examples)
        for name in [n for n, at in self._last_seen.items() if now - at > self.window]:
            del self.rolling[name], self._last_seen[name]
            for metric in (ROC_AUC, PR_AUC, RECALL_AT_REVIEW, EXAMPLES):
                metric.remove(name)

    def metrics(self) -> dict[str, dict[str, float | int]]:
        """Per model (online ones first): its rolling metrics (see RollingMetrics.metrics)."""
        return {name: rolling.metrics() for name, rolling in self.rolling.items()}

    def export_gauges(self, *, every_s: float = 1.0) -> bool:
        """Set the rolling-metric gauges, at most once per ``every_s`` (sorting the windows costs
        milliseconds; Prometheus scrapes every few seconds). True when they were set."""
        now = time.monotonic()
        if now - self._exported_at < every_s:
            return False
        self._exported_at = now
        for name, values in self.metrics().items():
            ROC_AUC.labels(name).set(values["roc_auc"])
            PR_AUC.labels(name).set(values["pr_auc"])
            RECALL_AT_REVIEW.labels(name).set(values["recall_at_review"])
        return True
