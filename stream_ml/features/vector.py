"""The one function that turns stored state and a request into the model's input vector.

The scorer, the replay CLI and `stream-ml features vector` all call :meth:`VectorBuilder.build`;
there is no second implementation of any feature.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from stream_ml.events.transaction import Transaction
from stream_ml.features.definitions import ENTITIES, FeatureSet, RequestFeature
from stream_ml.features.state import EntityState, Layout, layouts

_DAY_MS = 86_400_000


class VectorBuilder:
    """Compiled once per feature set; ``build`` is then called per request."""

    def __init__(self, feature_set: FeatureSet) -> None:
        self.feature_set = feature_set
        self.layouts = layouts(feature_set)
        self.names = feature_set.names
        self._stored = {f.name: f for f in feature_set.features}
        self._entity_order = [f.name for layout in self.layouts.values() for f in layout.features]

    def entity_ids(self, tx: Transaction) -> dict[str, str | None]:
        """The ids of the entities whose state a vector for ``tx`` reads."""
        return {entity: getattr(tx, ENTITIES[entity]) for entity in self.layouts}

    def build(self, states: Mapping[str, EntityState | None], tx: Transaction, as_of_ms: int) -> list[float]:
        """The input vector for ``tx`` from each entity's state (``states[entity]``) as of ``as_of_ms``.

        This is the only place a feature vector is computed: the scorer, replay and the CLI call it
        (or :meth:`build_many`, the same computation for a batch).
        """
        return self.build_many([states], [tx], [as_of_ms])[0]

    def build_many(
        self,
        states: Sequence[Mapping[str, EntityState | None]],
        txs: Sequence[Transaction],
        as_of: Sequence[int],
    ) -> list[list[float]]:
        """:meth:`build` for a batch: each entity type's stored features are read together."""
        read = {
            entity: layout.read_many([s.get(entity) for s in states], as_of)
            for entity, layout in self.layouts.items()
        }
        vectors = []
        for i, tx in enumerate(txs):
            # stored features come out grouped by entity; put them back in declaration order
            values = [v for entity in self.layouts for v in read[entity][i]]
            by_name = dict(zip(self._entity_order, values, strict=True))
            out = [by_name[name] for name in self._stored]
            for rf in self.feature_set.request_features:
                out.append(self._request(rf, states[i], tx, as_of[i], by_name))
            vectors.append(out)
        return vectors

    def _request(
        self,
        rf: RequestFeature,
        states: Mapping[str, EntityState | None],
        tx: Transaction,
        as_of_ms: int,
        stored: dict[str, float],
    ) -> float:
        kind = rf.kind
        if kind == "amount":
            return tx.amount
        if kind == "log_amount":
            return math.log1p(tx.amount)
        if kind == "amount_to_mean":
            mean = stored[rf.arg]  # type: ignore[index]
            return tx.amount / mean if mean > 0 else 1.0
        if kind == "hour_of_day":
            return float((tx.event_time % _DAY_MS) // 3_600_000)
        if kind == "is_weekend":
            return 1.0 if datetime.fromtimestamp(tx.event_time / 1000, UTC).weekday() >= 5 else 0.0
        if kind == "channel_is":
            return 1.0 if tx.channel == rf.arg else 0.0
        if kind == "is_new":
            feature = self._stored[rf.arg]  # type: ignore[index]
            layout: Layout = self.layouts[feature.entity]
            value = getattr(tx, rf.field)  # type: ignore[arg-type]
            return 0.0 if layout.seen(states.get(feature.entity), feature, value, as_of_ms) else 1.0
        raise ValueError(f"unknown request feature kind {kind!r}")
