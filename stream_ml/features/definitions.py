"""The language of feature definitions: aggregations of an entity's events over event-time windows.

A window of length W is cut into ``TILES`` tiles of W / TILES. Read at time t, it covers the
``TILES`` tiles that end with the tile holding t: the events of (t − W, t], give or take one tile
at the old end (a 1 h window's tail resolution is 5 min). Every path (stream worker, replay,
scorer) uses this one rule, so online and offline values agree exactly.

>>> f = Feature("card_amount_sum_1h", "card", "sum", window_s=3600, field="amount")
>>> f.tile_ms
300000
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field

TILES = 12
ENTITIES = {"card": "card_id", "merchant": "merchant_id", "device": "device_id"}
SOURCES = ("transactions", "labels")
# What each aggregation reads from its tiles.
AGGREGATIONS = {
    "count": "number of events",
    "sum": "sum of FIELD",
    "mean": "mean of FIELD",
    "min": "smallest FIELD",
    "max": "largest FIELD",
    "distinct": "number of distinct values of FIELD",
    "since_last": "seconds since the entity's latest event, capped at the window",
}
REQUEST_FEATURES = {
    "amount": "the payment's amount",
    "log_amount": "log(1 + amount)",
    "amount_to_mean": "amount / mean of the amount feature named by ARG (1 when that mean is 0)",
    "hour_of_day": "hour of the event time, UTC",
    "is_weekend": "1 on Saturday and Sunday (UTC)",
    "channel_is": "1 when the channel is ARG",
    "is_new": "1 when the entity has not seen this transaction's FIELD in the distinct feature ARG",
}


@dataclass(frozen=True, slots=True)
class Feature:
    """A windowed aggregation of one entity's events, kept in the online store."""

    name: str
    entity: str  # a key of ENTITIES
    agg: str  # a key of AGGREGATIONS
    window_s: int
    field: str | None = None  # the event field aggregated (amount, merchant_id, is_fraud...)
    source: str = "transactions"  # or "labels": then counted at label time
    default: float = 0.0  # the value when the entity has no state

    def __post_init__(self) -> None:
        if self.entity not in ENTITIES:
            raise ValueError(f"feature {self.name}: entity must be one of {sorted(ENTITIES)}")
        if self.agg not in AGGREGATIONS:
            raise ValueError(f"feature {self.name}: aggregation must be one of {sorted(AGGREGATIONS)}")
        if self.source not in SOURCES:
            raise ValueError(f"feature {self.name}: source must be one of {SOURCES}")
        if self.agg not in ("count", "since_last") and not self.field:
            raise ValueError(f"feature {self.name}: {self.agg} needs a field")
        if not 60 <= self.window_s <= 31 * 86400 or (self.window_s * 1000) % TILES:
            raise ValueError(
                f"feature {self.name}: window must be 1 min to 31 days, a multiple of {TILES} ms"
            )

    @property
    def window_ms(self) -> int:
        return self.window_s * 1000

    @property
    def tile_ms(self) -> int:
        return self.window_ms // TILES

    @property
    def series(self) -> tuple[str, str, str | None, int]:
        """Features with the same series share their tiles (count, sum, mean, min, max of one field)."""
        if self.agg == "distinct":
            return (self.entity, self.source, f"distinct:{self.field}", self.window_s)
        if self.agg == "since_last":
            return (self.entity, self.source, "last", 0)
        return (self.entity, self.source, self.field, self.window_s)


@dataclass(frozen=True, slots=True)
class RequestFeature:
    """A feature computed at request time from the transaction and the stored features."""

    name: str
    kind: str  # a key of REQUEST_FEATURES
    arg: str | None = None
    field: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in REQUEST_FEATURES:
            raise ValueError(f"request feature {self.name}: kind must be one of {sorted(REQUEST_FEATURES)}")


@dataclass(frozen=True, slots=True)
class FeatureSet:
    """The model's inputs, in order: stored features, then request-time features."""

    name: str
    features: tuple[Feature, ...]
    request_features: tuple[RequestFeature, ...] = field(default_factory=tuple)
    allowed_lateness_s: int = 3600

    def __post_init__(self) -> None:
        names = [f.name for f in self.features] + [f.name for f in self.request_features]
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ValueError(f"feature set {self.name}: duplicate names {sorted(duplicates)}")
        stored = {f.name: f for f in self.features}
        for rf in self.request_features:
            if rf.kind in ("amount_to_mean", "is_new") and rf.arg not in stored:
                raise ValueError(f"request feature {rf.name}: {rf.arg!r} is not a stored feature")

    @property
    def names(self) -> list[str]:
        return list(_names(self))  # a copy: callers may change theirs

    @property
    def version(self) -> str:
        """A hash of the definitions: state and models are tied to it."""
        return _version(self)

    def entities(self) -> list[str]:
        return sorted({f.entity for f in self.features}, key=list(ENTITIES).index)

    def longest_window_ms(self) -> int:
        return max(f.window_ms for f in self.features)


# Read per event on hot paths (the scorer, the feedback worker): computed once per feature set.
@functools.cache
def _names(fs: FeatureSet) -> tuple[str, ...]:
    return tuple(f.name for f in fs.features) + tuple(f.name for f in fs.request_features)


@functools.cache
def _version(fs: FeatureSet) -> str:
    spec = {
        "features": [asdict(f) for f in fs.features],
        "request": [asdict(f) for f in fs.request_features],
        "tiles": TILES,
        "lateness": fs.allowed_lateness_s,
    }
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return f"{fs.name}-{digest}"
