"""Which served predictions are watched for drift, against which reference.

Drift is measured on what the production model was given and what it answered: its served,
non-degraded predictions, per model version (a new version brings its own reference). The
reference is the one saved with the model by the trainer; a model without one (the untrained
default) gets one from its first ``bootstrap_rows`` live predictions in event time, so drift is
watched from the first day, relative to how traffic started.

ADWIN watches the production model's error on the labelled predictions, per version too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from stream_ml.events.drift import Record, record
from stream_ml.events.prediction import Prediction
from stream_ml.features.definitions import FeatureSet
from stream_ml.feedback import metrics as feedback_metrics
from stream_ml.feedback.options import WatchOptions
from stream_ml.monitoring import metrics
from stream_ml.monitoring.drift import DriftDetector, PerformanceMonitor, WindowReport, bootstrap_reference
from stream_ml.registry import Registry, RegistryError

log = logging.getLogger(__name__)


class DriftWatch:
    def __init__(self, registry: Registry, feature_set: FeatureSet, options: WatchOptions) -> None:
        self.registry = registry
        self.feature_set = feature_set
        self.options = options
        self.lateness_ms = feature_set.allowed_lateness_s * 1000
        self._detectors: dict[str, DriftDetector] = {}
        self._bootstrap: dict[str, list[Prediction]] = {}
        self._last_seen: dict[str, int] = {}  # version -> latest event time fed
        self._performance: dict[str, PerformanceMonitor] = {}

    def add(self, predictions: Sequence[Prediction]) -> list[Record]:
        """Feed a batch of served predictions; the ``drift`` records of the windows that closed."""
        by_version: dict[str, list[Prediction]] = {}
        names = self.feature_set.names
        version = self.feature_set.version  # read once: hashed out of the feature set on every access
        for p in predictions:
            if p.variant != "production":
                continue
            if p.degraded:
                feedback_metrics.SKIPPED.labels("drift_degraded").inc()
                continue
            if p.feature_set != version or len(p.features) != len(names):
                feedback_metrics.SKIPPED.labels("other_feature_set").inc()
                continue
            by_version.setdefault(p.model_version, []).append(p)
        closed: list[WindowReport] = []
        for version, rows in by_version.items():
            latest = max(p.event_time for p in rows)
            self._last_seen[version] = max(self._last_seen.get(version, latest), latest)
            detector = self._detector(version, rows)
            if detector is not None:
                times, features, scores = _arrays(rows)
                closed += detector.add_many(times, features, scores)
        closed += self._retire_idle()
        return self._publishable(closed)

    def flush(self) -> list[Record]:
        """Close every open window now (at shutdown)."""
        closed = [r for d in self._detectors.values() for r in d.flush()]
        return self._publishable(closed)

    def performance(self, is_fraud: bool, score: float, event_time: int, model_version: str) -> list[Record]:
        """Feed one labelled production prediction to ADWIN; a record when its error rate changed."""
        monitor = self._performance.get(model_version)
        if monitor is None:
            monitor = self._performance[model_version] = PerformanceMonitor(model_version)
        if not monitor.update(is_fraud, score, event_time):
            return []
        metrics.PERFORMANCE_DRIFT.inc()
        log.warning(
            "performance drift of model %s: error %.4f -> %.4f",
            model_version,
            monitor.last.error_before,
            monitor.last.error_after,
        )
        return [record(monitor.last)]

    # -- internals ------------------------------------------------------------------------

    def _detector(self, version: str, rows: list[Prediction]) -> DriftDetector | None:
        detector = self._detectors.get(version)
        if detector is not None:
            return detector
        reference = self._model_reference(version)
        if reference is None:
            waiting = self._bootstrap.setdefault(version, [])
            waiting += rows
            rows.clear()
            n = self.options.bootstrap_rows
            if len(waiting) < n:
                return None
            # The earliest rows by event time, once nothing earlier can still come (the partitions
            # are read at different paces): the rest are compared with them, not part of them.
            waiting.sort(key=lambda p: p.event_time)
            if waiting[-1].event_time < waiting[n - 1].event_time + self.lateness_ms:
                return None
            first, rows[:] = waiting[:n], waiting[n:]
            _, features, scores = _arrays(first)
            reference = bootstrap_reference(features, self.feature_set.names, scores, model_version=version)
            del self._bootstrap[version]
            log.info("drift reference of model %s: its first %d predictions", version, n)
        o = self.options
        detector = self._detectors[version] = DriftDetector(
            reference,
            self.feature_set.names,
            model_version=version,
            window_ms=o.window_s * 1000,
            window_events=o.window_events,
            lateness_ms=self.lateness_ms,
            ignore=self.calendar_features(),
        )
        return detector

    def calendar_features(self) -> list[str]:
        """Features that cycle within a day or a week: a shorter window always sees them move.

        An hourly window holds one hour of the day; against a reference spanning whole days it
        would be critical every time. They are watched only by windows at least their cycle long.
        """
        cycles = {"hour_of_day": 86_400, "is_weekend": 7 * 86_400}
        span = None if self.options.window_events is not None else self.options.window_s
        return [
            rf.name
            for rf in self.feature_set.request_features
            if rf.kind in cycles and (span is None or span < cycles[rf.kind])
        ]

    def _model_reference(self, version: str) -> dict | None:
        try:
            reference = self.registry.reference(version)
        except (LookupError, RegistryError, FileNotFoundError):
            return None  # not a registry version (the built-in default) or not readable
        return reference if reference.get("features") and reference.get("rows") else None

    def _retire_idle(self) -> list[WindowReport]:
        """Close the windows of versions no longer served (a model swap), once they fall idle."""
        if not self._last_seen or self.options.window_events is not None:
            return []
        now = max(self._last_seen.values())
        horizon = self.options.idle_windows * self.options.window_s * 1000
        closed: list[WindowReport] = []
        for version, seen in list(self._last_seen.items()):
            if now - seen > horizon:
                detector = self._detectors.pop(version, None)
                if detector is not None:
                    closed += detector.flush()
                self._bootstrap.pop(version, None)
                del self._last_seen[version]
        return closed

    def _publishable(self, closed: list[WindowReport]) -> list[Record]:
        out: list[Record] = []
        for report in closed:
            metrics.export(report)
            if report.retrain:
                log.warning("drift: %s", report.reason)
            out += report.records()
        return out


def _arrays(rows: Sequence[Prediction]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    times = np.fromiter((p.event_time for p in rows), dtype=np.int64, count=len(rows))
    features = np.array([p.features for p in rows], dtype=np.float64)
    scores = np.fromiter((p.score for p in rows), dtype=np.float64, count=len(rows))
    return times, features, scores
