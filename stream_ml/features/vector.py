"""The one function that turns stored state and a request into the model's input vector.

The scorer, the replay CLI and `stream-ml features vector` all call :meth:`VectorBuilder.build`
(or its batch forms); there is no second implementation of any feature.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from stream_ml.events.transaction import Transaction
from stream_ml.features.definitions import ENTITIES, Feature, FeatureSet
from stream_ml.features.state import EntityState, Layout, ReadPlan, StateColumns, in_window, layouts

_DAY_MS = 86_400_000
_HOUR_MS = 3_600_000
_THURSDAY = 3  # 1970-01-01 was a Thursday: Monday is 0


class VectorBuilder:
    """Compiled once per feature set; ``build`` is then called per request."""

    def __init__(self, feature_set: FeatureSet) -> None:
        self.feature_set = feature_set
        self.layouts = layouts(feature_set)
        self.names = feature_set.names
        self._stored = {f.name: f for f in feature_set.features}
        column = {name: i for i, name in enumerate(self.names)}
        # where each entity's stored features go in the vector
        self.columns = {
            entity: np.array([column[f.name] for f in layout.features], dtype=np.intp)
            for entity, layout in self.layouts.items()
        }
        # every entity type's stored features read in one pass (each pass is dozens of numpy calls)
        self._read = ReadPlan.merged(
            [
                (
                    layout.read_plan,
                    self.columns[entity],
                    len(layout.distinct_series()),
                    len(layout.last_sources()),
                )
                for entity, layout in self.layouts.items()
            ]
        )
        self._request = [(column[rf.name], rf) for rf in feature_set.request_features]
        self._column = column
        # (name, layout, distinct feature, transaction field) of each is_new request feature
        self.novelty: list[tuple[str, Layout, Feature, str]] = [
            (rf.name, self.layouts[self._stored[rf.arg].entity], self._stored[rf.arg], rf.field)  # type: ignore[index, misc]
            for rf in feature_set.request_features
            if rf.kind == "is_new"
        ]

    def entity_ids(self, tx: Transaction) -> dict[str, str | None]:
        """The ids of the entities whose state a vector for ``tx`` reads."""
        return {entity: getattr(tx, ENTITIES[entity]) for entity in self.layouts}

    def entity_columns(self, txs: Sequence[Transaction]) -> dict[str, list[str | None]]:
        """:meth:`entity_ids` of a batch, by entity type: what :meth:`build_columns` reads."""
        return {entity: [getattr(tx, ENTITIES[entity]) for tx in txs] for entity in self.layouts}

    def build(self, states: Mapping[str, EntityState | None], tx: Transaction, as_of_ms: int) -> list[float]:
        """The input vector for ``tx`` from each entity's state (``states[entity]``) as of ``as_of_ms``.

        This is the only place a feature vector is computed: the scorer, replay and the CLI call it
        (or :meth:`build_many` / :meth:`build_array`, the same computation for a batch).
        """
        return self.build_array([states], [tx], [as_of_ms])[0].tolist()

    def build_many(
        self,
        states: Sequence[Mapping[str, EntityState | None]],
        txs: Sequence[Transaction],
        as_of: Sequence[int],
    ) -> list[list[float]]:
        """:meth:`build` for a batch."""
        return self.build_array(states, txs, as_of).tolist()

    def build_array(
        self,
        states: Sequence[Mapping[str, EntityState | None]],
        txs: Sequence[Transaction],
        as_of: Sequence[int],
    ) -> np.ndarray:
        """:meth:`build_many` as a float64 array: each feature is computed for the whole batch at once."""
        columns = {e: layout.state_columns([s.get(e) for s in states]) for e, layout in self.layouts.items()}
        return self.build_columns(columns, txs, as_of)

    def build_columns(
        self,
        states: Mapping[str, StateColumns],
        txs: Sequence[Transaction],
        as_of: Sequence[int],
    ) -> np.ndarray:
        """:meth:`build_array` from the states by entity type, side by side
        (``Layout.state_columns``, or as the store reads them: ``FeatureStore.load_columns``).

        An entity type missing from ``states`` reads as no state for every row (a degraded score).
        """
        out = np.empty((len(txs), len(self.names)), dtype=np.float64)
        if not txs:
            return out
        t = np.asarray(as_of, dtype=np.int64)
        parts = {e: states.get(e) or layout.empty_columns(len(txs)) for e, layout in self.layouts.items()}
        self._read.read(
            np.concatenate([p.tiles for p in parts.values()], axis=1),
            [values for p in parts.values() for values in p.distinct],
            np.concatenate([p.last for p in parts.values()], axis=1),
            t,
            out,
        )
        for entity, p in parts.items():
            if not p.present.all():  # an entity with no state reads as its features' defaults
                absent = np.flatnonzero(~p.present)
                out[absent[:, None], self.columns[entity]] = self.layouts[entity].defaults
        last_seen = {
            name: layout.last_seen(parts[layout.entity], feature, [getattr(tx, field) for tx in txs])
            for name, layout, feature, field in self.novelty
        }
        self.fill_request(
            out,
            np.array([tx.amount for tx in txs], dtype=np.float64),
            np.array([tx.event_time for tx in txs], dtype=np.int64),
            [tx.channel for tx in txs],
            t,
            last_seen,
        )
        return out

    def fill_request(
        self,
        out: np.ndarray,
        amount: np.ndarray,
        event_time: np.ndarray,
        channels: Sequence[str],
        as_of: np.ndarray,
        last_seen: Mapping[str, np.ndarray],
    ) -> None:
        """The request-time features into ``out``, whose stored-feature columns are filled already.

        ``last_seen[name]``, for each ``is_new`` feature (see :attr:`novelty`): when the entity last
        saw the transaction's value, ``NEVER`` if it did not. Replay calls this with columns of its
        own; :meth:`build_array` with what it finds in the states.
        """
        names = np.empty(len(channels), dtype=object)  # compared in C, once per channel feature
        names[:] = channels
        for column, rf in self._request:
            kind = rf.kind
            if kind == "amount":
                out[:, column] = amount
            elif kind == "log_amount":
                out[:, column] = np.log1p(amount)
            elif kind == "amount_to_mean":
                mean = out[:, self._column[rf.arg]]  # type: ignore[index]
                out[:, column] = np.where(mean > 0, amount / np.where(mean > 0, mean, 1.0), 1.0)
            elif kind == "hour_of_day":
                out[:, column] = (event_time % _DAY_MS) // _HOUR_MS
            elif kind == "is_weekend":
                out[:, column] = (event_time // _DAY_MS + _THURSDAY) % 7 >= 5
            elif kind == "channel_is":
                out[:, column] = names == rf.arg
            elif kind == "is_new":
                tile_ms = self._stored[rf.arg].tile_ms  # type: ignore[index]
                out[:, column] = ~in_window(last_seen[rf.name], as_of, tile_ms)
            else:
                raise ValueError(f"unknown request feature kind {kind!r}")
