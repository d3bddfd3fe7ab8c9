"""Point in time: the event log run through the feature state in event-time order, in process.

Each transaction gets the feature vector *as of just before it*: built from the transactions and
labels (by the time a label arrived) that came before it and nothing after, by the stream
worker's state code (`Layout.apply_update`) and the scorer's vector code
(`VectorBuilder.build_many`). There is no second implementation of any feature.

Order. Each source partition is read in log order and the worker's lateness rule decides, per
partition, what is dropped: an event more than the allowed lateness behind its partition's
watermark. What is kept is merged into one event-time order. An event is released once every
partition's watermark minus the allowed lateness has passed it (nothing read later can come
before it), so memory holds about one allowed lateness of events. At the same millisecond,
transactions come before labels, then by source partition and offset.

The final state does not depend on the order events were applied in (a tile slot keeps the
newest tile it has seen, its sums, counts, minima and maxima commute; distinct values keep their
latest time), so replayed state equals the stream worker's state for the same events.

>>> from stream_ml.events import Label, Transaction
>>> from stream_ml.features import FRAUD_FEATURES
>>> pit = PointInTime(FRAUD_FEATURES, ["transactions:0", "labels:0"])
>>> t0 = 1_700_000_000_000
>>> for i in range(3):
...     tx = Transaction(f"e{i}", t0 + i * 1000, "c1", "m1", 10.0, "EUR", "FR", "pos", "d1")
...     _ = pit.add_transaction(tx, "transactions:0", i)
>>> _ = pit.add_label(Label("e0", True, t0 + 1500, "chargeback"), "labels:0", 0)
>>> chunk = pit.release(final=True)
>>> col = FRAUD_FEATURES.names.index("card_tx_count_10m")
>>> [row[col] for row in chunk.features.tolist()]  # each payment sees the ones before it only
[0.0, 1.0, 2.0]
>>> chunk.event_ids, pit.labels["e0"]
(['e0', 'e1', 'e2'], (True, 1700000001500))
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from stream_ml.events.label import Label
from stream_ml.events.transaction import Transaction
from stream_ml.features.definitions import ENTITIES, FeatureSet
from stream_ml.features.state import EntityState, copy_state, field_getter
from stream_ml.features.vector import VectorBuilder

_TX, _LABEL = 0, 1
_NOTHING_YET = -(1 << 62)
_REPLAY_SRC = "replay"  # the state's own offset check is bypassed: replay applies in time order


@dataclass(slots=True)
class Chunk:
    """Feature vectors of consecutive transactions (in event-time order)."""

    event_ids: list[str]
    event_times: np.ndarray  # int64 ms
    card_ids: list[str]
    features: np.ndarray  # float32, one row per transaction, columns in the feature set's order
    # per row: the time of the latest earlier event of any of its entities (-1: none), which tells
    # the consistency check whether a difference can be an event still in flight at serving time
    latest_before: np.ndarray  # int64 ms


@dataclass(slots=True)
class Counts:
    transactions: int = 0
    labels: int = 0
    late: int = 0  # dropped by the lateness rule, as the stream worker dead-letters them
    labels_unknown: int = 0  # label of a transaction not in the replayed log (or its horizon)
    invalid: int = 0  # records that fail validation (the worker dead-letters them)
    rows: int = 0
    by_partition: dict[str, list[int]] = field(default_factory=dict)  # tag -> [first, last] offset


class PointInTime:
    """Feed events per source partition in log order; take the vectors with :meth:`release`.

    ``rows_from``/``rows_to`` (ms) select the transactions that get a vector: the ones before
    ``rows_from`` only build the state (the warm-up). Labels that arrived by ``label_cutoff``
    are collected in :attr:`labels` (the latest one per event).
    """

    def __init__(
        self,
        feature_set: FeatureSet,
        partitions: Iterable[str],
        *,
        rows_from: int | None = None,
        rows_to: int | None = None,
        label_cutoff: int | None = None,
        label_horizon_ms: int = 30 * 86_400_000,
        track_offsets: bool = False,
        chunk_size: int = 1024,
    ) -> None:
        self.builder = VectorBuilder(feature_set)
        self.layouts = self.builder.layouts
        self.lateness_ms = feature_set.allowed_lateness_s * 1000
        self.rows_from = rows_from if rows_from is not None else _NOTHING_YET
        self.rows_to = rows_to if rows_to is not None else 1 << 62
        self.label_cutoff = label_cutoff if label_cutoff is not None else 1 << 62
        self.label_horizon_ms = label_horizon_ms
        self.chunk_size = chunk_size
        self.states: dict[str, dict[str, EntityState]] = {e: {} for e in self.layouts}
        # per entity id: the real (source partition -> last offset) of its state, for a backfill
        self.offsets: dict[str, dict[str, dict[str, int]]] | None = (
            {e: {} for e in self.layouts} if track_offsets else None
        )
        self.labels: dict[str, tuple[bool, int]] = {}
        self.counts = Counts()
        self._watermarks = {tag: _NOTHING_YET for tag in partitions}
        self._live = set(self._watermarks)
        self._heap: list[tuple] = []
        self._seq = 0  # the state's offset for replay: strictly increasing, so nothing is skipped
        self._tx_entities: dict[str, tuple[int, tuple[str | None, ...]]] = {}
        self._pinned: set[int] = set()  # ids of the states the pending vectors read
        self._entity_fields = [(e, self.states[e], ENTITIES[e]) for e in self.layouts]
        self._latest: dict[tuple[str, str], int] = {}  # (entity, id) -> time of its latest event
        self._plans = {
            source: [
                (
                    entity,
                    ENTITIES[entity],
                    list(ENTITIES).index(entity),
                    layout.apply_update,
                    field_getter(layout.fields[source]),
                )
                for entity, layout in self.layouts.items()
                if source in layout.fields
            ]
            for source in ("transactions", "labels")
        }

    # -- feeding, per source partition in log order ---------------------------------------

    def add_transaction(self, tx: Transaction, tag: str, offset: int) -> int:
        """Feed a transaction read at ``offset`` of source partition ``tag``; returns its time."""
        if self._admit(tx.event_time, tag, offset):
            heapq.heappush(self._heap, (tx.event_time, _TX, tag, offset, tx))
        return tx.event_time

    def add_label(self, label: Label, tag: str, offset: int) -> int:
        """Feed a label (it counts at the time it arrived); returns that time."""
        if self._admit(label.label_time, tag, offset):
            heapq.heappush(self._heap, (label.label_time, _LABEL, tag, offset, label))
        return label.label_time

    def finish_partition(self, tag: str) -> None:
        """Nothing more will come from ``tag``: it no longer holds events back."""
        self._live.discard(tag)

    def _admit(self, t: int, tag: str, offset: int) -> bool:
        span = self.counts.by_partition.get(tag)
        if span is None:
            self.counts.by_partition[tag] = [offset, offset]
        else:
            span[1] = offset
        watermark = self._watermarks[tag]
        if t < watermark - self.lateness_ms:  # the stream worker's rule: dead-lettered there
            self.counts.late += 1
            return False
        if t > watermark:
            self._watermarks[tag] = t
        return True

    # -- computing ------------------------------------------------------------------------

    def release(self, final: bool = False) -> Chunk:
        """Apply every event no later read can precede, and return the vectors computed."""
        frontier = min((self._watermarks[t] for t in self._live), default=1 << 62) - self.lateness_ms
        if final:
            frontier = 1 << 62
        done: list[Transaction] = []
        vectors: list[np.ndarray] = []
        snaps: list[dict[str, EntityState | None]] = []
        txs: list[Transaction] = []
        latest: list[int] = []
        heap = self._heap
        while heap and heap[0][0] < frontier:
            t, kind, tag, offset, event = heapq.heappop(heap)
            if kind == _TX:
                if self.rows_from <= t < self.rows_to:
                    snaps.append(self._snapshot(event))  # before the payment itself is applied
                    txs.append(event)
                    latest.append(self._latest_of(event))
                self._apply_transaction(event, tag, offset)
            else:
                self._apply_label(event, tag, offset)
            if len(txs) >= self.chunk_size or (txs and not (heap and heap[0][0] < frontier)):
                # one batched read for many vectors: the snapshots keep each one's moment
                vectors.append(self.builder.build_array(snaps, txs, [tx.event_time for tx in txs]))
                self._pinned.clear()
                done += txs
                snaps, txs = [], []
        self._forget_old_transactions()
        self.counts.rows += len(done)
        return Chunk(
            [tx.event_id for tx in done],
            np.array([tx.event_time for tx in done], dtype=np.int64),
            [tx.card_id for tx in done],
            np.concatenate(vectors).astype(np.float32)
            if vectors
            else np.empty((0, len(self.builder.names)), dtype=np.float32),
            np.array(latest, dtype=np.int64),
        )

    def _snapshot(self, tx: Transaction) -> dict[str, EntityState | None]:
        """The states a vector reads, pinned: a pinned state is copied before it next changes."""
        snap: dict[str, EntityState | None] = {}
        for entity, by_id, id_field in self._entity_fields:
            state = by_id.get(getattr(tx, id_field))
            if state is not None:
                self._pinned.add(id(state))
            snap[entity] = state
        return snap

    def _latest_of(self, tx: Transaction) -> int:
        latest = self._latest
        return max(latest.get((e, getattr(tx, f)), -1) for e, _, f in self._entity_fields)

    def _apply_transaction(self, tx: Transaction, tag: str, offset: int) -> None:
        self.counts.transactions += 1
        t = tx.event_time
        for entity, id_field, _, apply, values in self._plans["transactions"]:
            entity_id = getattr(tx, id_field)
            if entity_id is not None:
                update = [entity_id, 0, tag, offset, t, *values(tx)]
                self._apply(entity, entity_id, apply, "transactions", update)
        self._tx_entities[tx.event_id] = (t, (tx.card_id, tx.merchant_id, tx.device_id))

    def _apply_label(self, label: Label, tag: str, offset: int) -> None:
        self.counts.labels += 1
        if label.label_time <= self.label_cutoff:
            held = self.labels.get(label.event_id)
            if held is None or held[1] <= label.label_time:
                self.labels[label.event_id] = (label.is_fraud, label.label_time)
        known = self._tx_entities.get(label.event_id)
        if known is None:
            self.counts.labels_unknown += 1
            return
        ids = known[1]
        t = label.label_time
        for entity, _, position, apply, values in self._plans["labels"]:
            entity_id = ids[position]
            if entity_id is not None:
                update = [entity_id, 1, tag, offset, t, *values(label)]
                self._apply(entity, entity_id, apply, "labels", update)

    def _apply(
        self,
        entity: str,
        entity_id: str,
        apply: Callable[[EntityState, str, list], bool],
        source: str,
        update: list,
    ) -> None:
        states = self.states[entity]
        state = states.get(entity_id)
        if state is None:
            state = states[entity_id] = self.layouts[entity].new()
        elif id(state) in self._pinned:  # a vector still has to read it as it is: change a copy
            state = states[entity_id] = copy_state(state)
        if self.offsets is not None:
            held = self.offsets[entity].setdefault(entity_id, {})
            if update[3] > held.get(update[2], -1):
                held[update[2]] = update[3]
        self._latest[(entity, entity_id)] = update[4]
        self._seq += 1
        update[2], update[3] = _REPLAY_SRC, self._seq
        apply(state, source, update)

    def _forget_old_transactions(self) -> None:
        """Transactions older than the label horizon can no longer be labelled (as in the worker)."""
        if not self._tx_entities:
            return
        newest = max(self._watermarks.values())
        oldest = newest - self.label_horizon_ms
        entities = self._tx_entities
        for event_id in list(entities):  # insertion order is time order: stop at the first young one
            if entities[event_id][0] >= oldest:
                break
            del entities[event_id]

    def final_states(self) -> dict[str, dict[str, EntityState]]:
        """The replayed states, with their real applied offsets (when tracked), as the store keeps them."""
        for entity, by_id in self.states.items():
            for entity_id, state in by_id.items():
                state.offsets = dict(self.offsets[entity].get(entity_id, {})) if self.offsets else {}
        return self.states
