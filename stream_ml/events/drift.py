"""The drift messages: what the drift detector publishes to ``drift`` for every closed window.

Three message types, told apart by the ``type`` field and by the record key:

- ``feature`` (key: the feature name, or ``score`` for the model's score): one column's drift in one
  window, self-contained (window, model version, statistics and the histograms to plot);
- ``window`` (key ``__window__``): the window's summary, its worst severity and whether it
  recommends retraining;
- ``performance`` (key ``__performance__``): the model's error rate changed (ADWIN on the labels).

Record timestamps are the window's end (performance: the event time of the detection), so the log
can be searched by time like the other topics.

>>> m = DriftWindow(1_700_000_000_000, 1_700_003_600_000, 5000, 0, "v3", "model", "critical",
...                 True, "critical drift in: amount (PSI 0.41)", ["amount"], [])
>>> decode_drift(encode_drift(m)) == m
True
>>> record(m).key
b'__window__'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from stream_ml.events.codec import (
    InvalidMessage,
    decode_map,
    encode_map,
    req_bool,
    req_number,
    req_str,
    req_time_ms,
)

KEY_WINDOW = "__window__"
KEY_PERFORMANCE = "__performance__"
KEY_SCORE = "score"
KINDS = ("numeric", "binary")
REFERENCES = ("model", "bootstrap")  # a model's saved reference, or the first live rows
# "insufficient": too few rows in the window to judge; never an alarm.
SEVERITIES = ("insufficient", "none", "warning", "critical")
_MAX_BINS = 1024


@dataclass(slots=True)
class FeatureDrift:
    """One column (a feature, or ``score``) in one window."""

    feature: str
    kind: str  # one of KINDS
    window_start: int  # ms, inclusive
    window_end: int  # ms, exclusive
    rows: int
    model_version: str
    reference: str  # one of REFERENCES
    psi: float
    severity: str  # one of SEVERITIES
    ks_statistic: float | None  # numeric columns
    ks_pvalue: float | None
    chi2_statistic: float | None  # binary columns
    chi2_pvalue: float | None
    p_adjusted: float | None  # the column's p-value (KS or chi²), Benjamini-Hochberg across columns
    edges: list[float]  # numeric: inner bin edges, bins are (-inf, e0], (e0, e1], ..., (e_last, inf)
    reference_fractions: list[float]  # per bin (binary: categories 0, 1, other)
    current_fractions: list[float]
    nan_rows: int = 0  # rows where the served value was missing (scored as 0)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "feature", **asdict(self)}


@dataclass(slots=True)
class DriftWindow:
    """A window's summary."""

    window_start: int
    window_end: int
    rows: int
    late_rows: int  # rows dropped as late since the previous window closed
    model_version: str
    reference: str
    severity: str  # the worst of the window's columns
    retrain: bool
    reason: str  # why retraining is recommended ("" when it is not)
    critical: list[str]  # columns at critical
    warning: list[str]  # columns at warning

    def to_dict(self) -> dict[str, Any]:
        return {"type": "window", **asdict(self)}


@dataclass(slots=True)
class PerformanceDrift:
    """ADWIN found a change in the production model's error stream (``|is_fraud - score|``)."""

    model_version: str
    event_time: int  # ms: event time of the label that made the change visible
    labels: int  # labelled predictions seen so far
    detections: int  # changes detected so far, this one included
    error_before: float  # mean error over ADWIN's window just before the change
    error_after: float  # mean error over the window ADWIN kept (the recent part)
    width: int  # rows in the window ADWIN kept

    def to_dict(self) -> dict[str, Any]:
        return {"type": "performance", **asdict(self)}


DriftMessage = FeatureDrift | DriftWindow | PerformanceDrift


class Record(NamedTuple):
    """A Kafka record of the ``drift`` topic."""

    key: bytes
    value: bytes
    timestamp_ms: int


def key_of(message: DriftMessage) -> str:
    if isinstance(message, FeatureDrift):
        return message.feature
    return KEY_WINDOW if isinstance(message, DriftWindow) else KEY_PERFORMANCE


def record(message: DriftMessage) -> Record:
    """The message as the record to publish: key, msgpack value, timestamp."""
    t = message.event_time if isinstance(message, PerformanceDrift) else message.window_end
    return Record(key_of(message).encode(), encode_drift(message), t)


def encode_drift(message: DriftMessage) -> bytes:
    return encode_map(message.to_dict())


def decode_drift(data: bytes) -> DriftMessage:
    return validate_drift(decode_map(data))


def validate_drift(d: Mapping[str, Any]) -> DriftMessage:
    kind = d.get("type")
    if kind == "feature":
        return _feature(d)
    if kind == "window":
        return _window(d)
    if kind == "performance":
        return _performance(d)
    raise InvalidMessage(f"field type: expected feature, window or performance, got {kind!r}")


def _feature(d: Mapping[str, Any]) -> FeatureDrift:
    start, end = _span(d)
    kind = _one_of(d, "kind", KINDS)
    edges = _floats(d, "edges")
    ref, cur = _floats(d, "reference_fractions"), _floats(d, "current_fractions")
    if len(ref) != len(cur):
        raise InvalidMessage(f"fields reference_fractions/current_fractions: {len(ref)} and {len(cur)} bins")
    if kind == "numeric" and len(ref) != len(edges) + 1:
        raise InvalidMessage(f"field edges: {len(edges)} edges for {len(ref)} bins, expected {len(ref) - 1}")
    return FeatureDrift(
        feature=req_str(d, "feature"),
        kind=kind,
        window_start=start,
        window_end=end,
        rows=_count(d, "rows"),
        model_version=req_str(d, "model_version"),
        reference=_one_of(d, "reference", REFERENCES),
        psi=_non_negative(d, "psi"),
        severity=_one_of(d, "severity", SEVERITIES),
        ks_statistic=_opt_number(d, "ks_statistic"),
        ks_pvalue=_opt_pvalue(d, "ks_pvalue"),
        chi2_statistic=_opt_number(d, "chi2_statistic"),
        chi2_pvalue=_opt_pvalue(d, "chi2_pvalue"),
        p_adjusted=_opt_pvalue(d, "p_adjusted"),
        edges=edges,
        reference_fractions=ref,
        current_fractions=cur,
        nan_rows=_count(d, "nan_rows") if "nan_rows" in d else 0,
    )


def _window(d: Mapping[str, Any]) -> DriftWindow:
    start, end = _span(d)
    return DriftWindow(
        window_start=start,
        window_end=end,
        rows=_count(d, "rows"),
        late_rows=_count(d, "late_rows"),
        model_version=req_str(d, "model_version"),
        reference=_one_of(d, "reference", REFERENCES),
        severity=_one_of(d, "severity", SEVERITIES),
        retrain=req_bool(d, "retrain"),
        reason=_text(d, "reason"),
        critical=_names(d, "critical"),
        warning=_names(d, "warning"),
    )


def _performance(d: Mapping[str, Any]) -> PerformanceDrift:
    return PerformanceDrift(
        model_version=req_str(d, "model_version"),
        event_time=req_time_ms(d, "event_time"),
        labels=_count(d, "labels"),
        detections=_count(d, "detections"),
        error_before=_non_negative(d, "error_before"),
        error_after=_non_negative(d, "error_after"),
        width=_count(d, "width"),
    )


def _span(d: Mapping[str, Any]) -> tuple[int, int]:
    start, end = req_time_ms(d, "window_start"), req_time_ms(d, "window_end")
    if end <= start:
        raise InvalidMessage(f"field window_end: {end} is not after window_start {start}")
    return start, end


def _one_of(d: Mapping[str, Any], name: str, allowed: tuple[str, ...]) -> str:
    value = req_str(d, name, 32)
    if value not in allowed:
        raise InvalidMessage(f"field {name}: expected one of {', '.join(allowed)}, got {value!r}")
    return value


def _count(d: Mapping[str, Any], name: str) -> int:
    value = d.get(name)
    if value is None:
        raise InvalidMessage(f"field {name}: required, missing")
    if type(value) is not int or value < 0:
        raise InvalidMessage(f"field {name}: expected a count (integer >= 0), got {value!r}")
    return value


def _non_negative(d: Mapping[str, Any], name: str) -> float:
    value = req_number(d, name)
    if value < 0:
        raise InvalidMessage(f"field {name}: expected a number >= 0, got {value!r}")
    return value


def _opt_number(d: Mapping[str, Any], name: str) -> float | None:
    return None if d.get(name) is None else _non_negative(d, name)


def _opt_pvalue(d: Mapping[str, Any], name: str) -> float | None:
    value = _opt_number(d, name)
    if value is not None and value > 1.0:
        raise InvalidMessage(f"field {name}: expected a p-value between 0 and 1, got {value!r}")
    return value


def _floats(d: Mapping[str, Any], name: str) -> list[float]:
    value = d.get(name)
    if value is None:
        raise InvalidMessage(f"field {name}: required, missing")
    if (
        not isinstance(value, list)
        or len(value) > _MAX_BINS
        or not all(type(x) in (float, int) and math.isfinite(x) for x in value)
    ):
        raise InvalidMessage(f"field {name}: expected a list of at most {_MAX_BINS} finite numbers")
    return [float(x) for x in value]


def _names(d: Mapping[str, Any], name: str) -> list[str]:
    value = d.get(name)
    if value is None:
        raise InvalidMessage(f"field {name}: required, missing")
    if not isinstance(value, list) or not all(type(x) is str and x for x in value):
        raise InvalidMessage(f"field {name}: expected a list of column names")
    return list(value)


def _text(d: Mapping[str, Any], name: str) -> str:
    value = d.get(name, "")
    if type(value) is not str or len(value) > 4096:
        raise InvalidMessage(f"field {name}: expected a string of at most 4096 characters")
    return value
