"""Online/offline consistency: the vectors the scorer served against the vectors replay computes.

For every production prediction in the ``predictions`` log whose transaction is in the
``transactions`` log, replay computes the vector as of the same event time (point in time, see
`stream_ml.training.pointintime`) and the two are compared feature by feature, as Chronon's
consistency job does. A difference is put down to an event *in flight* when one of the
transaction's entities had an event less than ``in_flight_ms`` before it: the store may not have
applied it yet when the scorer read (freshness is not zero). Every other difference is skew: a
bug, a lost state, two implementations that disagree.

>>> report = Report(feature_names=["a", "b"])
>>> report.add(served=[1.0, 2.0], replayed=[1.0, 2.5], in_flight=False)
>>> report.compared, report.skewed, report.by_feature["b"].skewed
(1, 1, 1)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stream_ml.config import Settings
from stream_ml.features.definitions import FeatureSet
from stream_ml.training.replay import ReplayOptions, replay

# float32 in replay against float64 served: ~7 significant digits
RTOL, ATOL = 1e-5, 1e-4


@dataclass(slots=True)
class FeatureCount:
    skewed: int = 0
    in_flight: int = 0
    max_abs_diff: float = 0.0


@dataclass(slots=True)
class Report:
    feature_names: list[str]
    compared: int = 0  # predictions compared
    matched: int = 0
    skewed: int = 0  # predictions with a difference that is not explained by an event in flight
    in_flight: int = 0  # predictions whose differences can be events in flight at serving time
    not_in_log: int = 0  # predictions whose transaction was never published
    degraded: int = 0  # served without the online store: not compared
    other_feature_set: int = 0  # served with other feature definitions: not compared
    by_feature: dict[str, FeatureCount] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)  # a few skewed predictions

    def __post_init__(self) -> None:
        self.by_feature = {name: FeatureCount() for name in self.feature_names}

    def add(self, served: list[float], replayed: list[float], in_flight: bool, event_id: str = "") -> None:
        self.compared += 1
        a = np.asarray(served, dtype=np.float64)
        b = np.asarray(replayed, dtype=np.float64)
        same = np.isclose(a, b, rtol=RTOL, atol=ATOL) | (np.isnan(a) & np.isnan(b))
        if same.all():
            self.matched += 1
            return
        if in_flight:
            self.in_flight += 1
        else:
            self.skewed += 1
        for j in np.flatnonzero(~same).tolist():
            count = self.by_feature[self.feature_names[j]]
            if in_flight:
                count.in_flight += 1
            else:
                count.skewed += 1
            diff = abs(a[j] - b[j])
            count.max_abs_diff = max(count.max_abs_diff, diff if math.isfinite(diff) else math.inf)
        if not in_flight and len(self.examples) < 5:
            differ = np.flatnonzero(~same).tolist()
            self.examples.append(
                {
                    "event_id": event_id,
                    "features": {self.feature_names[j]: [float(a[j]), float(b[j])] for j in differ},
                }
            )

    @property
    def skew_rate(self) -> float:
        return self.skewed / self.compared if self.compared else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "compared": self.compared,
            "matched": self.matched,
            "skewed": self.skewed,
            "in_flight": self.in_flight,
            "not_in_log": self.not_in_log,
            "degraded": self.degraded,
            "other_feature_set": self.other_feature_set,
            "skew_rate": self.skew_rate,
            "by_feature": {
                n: {"skewed": c.skewed, "in_flight": c.in_flight, "max_abs_diff": c.max_abs_diff}
                for n, c in self.by_feature.items()
                if c.skewed or c.in_flight
            },
            "examples": self.examples,
        }


async def check(
    settings: Settings,
    feature_set: FeatureSet,
    bootstrap: str,
    *,
    in_flight_ms: int = 2_000,
    progress: bool = True,
) -> Report:
    """Replay the log with the predictions and compare (see the module docstring)."""
    result = await replay(
        settings, feature_set, bootstrap, ReplayOptions(predictions=True, progress=progress)
    )
    report = Report(feature_set.names)
    predictions = result.predictions
    seen: set[str] = set()
    for chunk in result.chunks:
        for i, event_id in enumerate(chunk.event_ids):
            p = predictions.get(event_id)
            if p is None:
                continue
            seen.add(event_id)
            if p.feature_set != feature_set.version:
                report.other_feature_set += 1
                continue
            if p.degraded:
                report.degraded += 1
                continue
            latest = int(chunk.latest_before[i])
            in_flight = latest >= 0 and int(chunk.event_times[i]) - latest < in_flight_ms
            report.add(p.features, chunk.features[i].tolist(), in_flight, event_id)
    report.not_in_log = len(predictions) - len(seen)
    return report


def describe(report: Report, tolerance: float) -> str:
    lines = [
        f"compared {report.compared:,} served predictions with replay: {report.matched:,} equal, "
        f"{report.skewed:,} skewed ({report.skew_rate:.3%}), {report.in_flight:,} differ by events "
        "in flight at serving time",
        f"  not compared: {report.not_in_log:,} not in the transactions log, {report.degraded:,} "
        f"degraded, {report.other_feature_set:,} served with another feature set",
    ]
    rows = [(n, c) for n, c in report.by_feature.items() if c.skewed or c.in_flight]
    if rows:
        width = max(len(n) for n, _ in rows)
        lines.append(f"  {'feature':<{width}}  {'skewed':>8}  {'in flight':>9}  {'max |diff|':>10}")
        for name, c in sorted(rows, key=lambda r: -r[1].skewed):
            lines.append(f"  {name:<{width}}  {c.skewed:>8,}  {c.in_flight:>9,}  {c.max_abs_diff:>10.4g}")
    for example in report.examples[:3]:
        lines.append(f"  e.g. {example['event_id']}: served vs replayed {example['features']}")
    verdict = "OK" if report.skew_rate <= tolerance else "FAIL"
    lines.append(f"{verdict}: skew rate {report.skew_rate:.3%}, tolerance {tolerance:.3%}")
    return "\n".join(lines)
