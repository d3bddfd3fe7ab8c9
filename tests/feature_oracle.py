"""A brute-force oracle for the feature definitions: plain Python over the list of events.

Independent of `stream_ml.features.state`: it keeps every event and recomputes each feature from
scratch with the documented rule. A window of W at read time t holds the events whose tile
(event time // (W/12)) is one of the 12 tiles ending with t's tile. Events later than the allowed
lateness behind their source partition's watermark (the largest event time seen before them on
that partition) are dropped.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from stream_ml.events import Label, Transaction
from stream_ml.features.definitions import ENTITIES, TILES, Feature, FeatureSet


@dataclass
class Oracle:
    feature_set: FeatureSet
    # entity type -> id -> list of (source, time, fields)
    events: dict[str, dict[str, list[tuple[str, int, dict]]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list))
    )
    watermarks: dict[tuple[str, int], int] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def _late(self, source: str, partition: int, t: int) -> bool:
        mark = self.watermarks.get((source, partition))
        if mark is not None and t < mark - self.feature_set.allowed_lateness_s * 1000:
            return True
        self.watermarks[(source, partition)] = max(t, mark if mark is not None else t)
        return False

    def transaction(self, tx: Transaction, partition: int) -> bool:
        if self._late("transactions", partition, tx.event_time):
            self.dropped.append(tx.event_id)
            return False
        fields = {
            "amount": tx.amount,
            "merchant_id": tx.merchant_id,
            "device_id": tx.device_id,
            "country": tx.country,
            "card_id": tx.card_id,
        }
        for entity, id_field in ENTITIES.items():
            entity_id = getattr(tx, id_field)
            if entity_id is not None:
                self.events[entity][entity_id].append(("transactions", tx.event_time, fields))
        return True

    def label(self, label: Label, tx: Transaction, partition: int) -> bool:
        if self._late("labels", partition, label.label_time):
            return False
        fields = {"is_fraud": 1.0 if label.is_fraud else 0.0}
        for entity, id_field in ENTITIES.items():
            entity_id = getattr(tx, id_field)
            if entity_id is not None:
                self.events[entity][entity_id].append(("labels", label.label_time, fields))
        return True

    def value(self, f: Feature, entity_id: str, t: int, before: int | None = None) -> float:
        """The feature as of ``t``; with ``before``, from the events earlier than that (point in time)."""
        events = [
            (ts, fields)
            for source, ts, fields in self.events[f.entity].get(entity_id, [])
            if source == f.source and (before is None or ts < before)
        ]
        if f.agg == "since_last":
            if not events:
                return f.default
            last = max(ts for ts, _ in events)
            return min(max(t - last, 0) / 1000, float(f.window_s))
        tile = f.window_ms // TILES
        now = t // tile
        inside = [fields for ts, fields in events if now - TILES < ts // tile <= now]
        if f.agg == "count":
            return float(len(inside))
        if f.agg == "distinct":
            return float(len({x[f.field] for x in inside if x[f.field] is not None}))
        values = [x[f.field] for x in inside]
        if not values:
            return f.default
        if f.agg == "sum":
            return sum(values)
        if f.agg == "mean":
            return sum(values) / len(values)
        return min(values) if f.agg == "min" else max(values)
