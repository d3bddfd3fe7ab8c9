"""Point in time: the event log run through the feature state in event-time order, in process.

Each transaction gets the feature vector *as of just before it*: built from the transactions and
labels (by the time a label arrived) that came before it and nothing after.

Order. Each source partition is read in log order and the worker's lateness rule decides, per
partition, what is dropped: an event more than the allowed lateness behind its partition's
watermark. What is kept is merged into one event-time order. An event is released once every
partition's watermark minus the allowed lateness has passed it (nothing read later can come
before it), so memory holds about one allowed lateness of events. At the same millisecond,
transactions come before labels, then by source partition and offset.

Columns, a chunk at a time. The states are kept as columns (:class:`StateTable`), and a chunk of
released events is worked on as arrays, not event by event. A transaction's vector is the state
at the start of its chunk, read by the layout's own code (`Layout.window_stats`, `since_last`,
and `window_bounds` for distinct counts), merged with what the chunk's earlier events add to the
same windows, and finished by the scorer's code (`Layout.fill_numeric`,
`VectorBuilder.fill_request`). The merge is exact because a chunk's events are in time order: an
earlier event in a reader's window lands in one of the tiles of that window (it cannot have
displaced a tile the window holds), and it adds to counts and sums, and to minima and maxima, as
the state would. The chunk's events are then applied to the states, all at once, by
`Layout.apply_columns`: the final state does not depend on the order events are applied in (a
tile slot keeps the newest tile it has seen, its sums, counts, minima and maxima commute;
distinct values keep their latest time), so replayed state equals the stream worker's state for
the same events.

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

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter

import numpy as np

from stream_ml.events.label import Label
from stream_ml.events.transaction import Transaction
from stream_ml.features.definitions import ENTITIES, SOURCES, TILES, Feature, FeatureSet
from stream_ml.features.state import NEVER, EntityState, WindowStats, in_window, saturated
from stream_ml.features.table import Codes, StateTable, pair_key
from stream_ml.features.vector import VectorBuilder

_TX, _LABEL = 0, 1  # the source codes: also the order of events at the same millisecond
_NOTHING_YET = -(1 << 62)
_EVENT_TIME, _LABEL_TIME = attrgetter("event_time"), attrgetter("label_time")
_TX_ROWS = 1024  # the fewest rows of the transaction table (its rows are never fewer)
_MAX_PAIRS = 1 << 22  # distinct counts compare (reader, earlier event) pairs: at most this many at once


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


@dataclass(slots=True)
class _Events:
    """Admitted events as columns: what waits for the frontier, and what a chunk works on."""

    t: np.ndarray  # int64: event time (transactions), arrival time (labels)
    kind: np.ndarray  # int8: _TX or _LABEL
    tag: np.ndarray  # int32: source partition, its index in sorted order
    offset: np.ndarray  # int64
    event: np.ndarray  # object: the Transaction or Label
    codes: np.ndarray  # int64, one column per coded field (PointInTime._coded); -1 for labels

    def take(self, index: np.ndarray | slice) -> _Events:
        return _Events(
            self.t[index],
            self.kind[index],
            self.tag[index],
            self.offset[index],
            self.event[index],
            self.codes[index],
        )

    @staticmethod
    def concat(parts: list[_Events]) -> _Events:
        return _Events(*(np.concatenate([getattr(p, f) for p in parts]) for f in _Events.__slots__))


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
        chunk_size: int = 16_384,
    ) -> None:
        self.builder = VectorBuilder(feature_set)
        self.layouts = self.builder.layouts
        self.lateness_ms = feature_set.allowed_lateness_s * 1000
        self.rows_from = rows_from if rows_from is not None else _NOTHING_YET
        self.rows_to = rows_to if rows_to is not None else 1 << 62
        self.label_cutoff = label_cutoff if label_cutoff is not None else 1 << 62
        self.label_horizon_ms = label_horizon_ms
        self.chunk_size = chunk_size
        # One code per value of each field, shared by every table that keys or counts by it.
        self._entity_fields = [ENTITIES[e] for e in self.layouts]
        counted_fields = {f for layout in self.layouts.values() for _, f, _ in layout.distinct_series()}
        self._vocabulary = {f: Codes() for f in {*self._entity_fields, *counted_fields}}
        self.tables = {
            e: StateTable(layout, track_offsets, self._vocabulary) for e, layout in self.layouts.items()
        }
        self.labels: dict[str, tuple[bool, int]] = {}
        self.counts = Counts()
        self._tags = sorted(set(partitions))
        self._tag_code = {tag: code for code, tag in enumerate(self._tags)}
        self._watermarks = {tag: _NOTHING_YET for tag in self._tags}
        self._live = set(self._watermarks)
        self._held: list[_Events] = []  # blocks of admitted events, in the order read
        # events fed one at a time, gathered into a block per run of one kind and partition
        self._run: tuple[int, str] | None = None
        self._run_events: tuple[list, list[int], list[int]] = ([], [], [])  # events, times, offsets
        # Where a label's entities are: event id -> row of _tx_info, which holds the transaction's
        # time and its entity codes (in _entity_fields order) as int64 columns.
        self._tx_index: dict[str, int] = {}
        self._tx_info = np.zeros((_TX_ROWS, 1 + len(self._entity_fields)), dtype=np.int64)
        self._tx_rows = 0  # rows of _tx_info in use (rows of forgotten transactions included)
        # the fields each source's events carry to the states: numbers, and values to count
        self._numbers = {
            source: sorted(
                {
                    f
                    for layout in self.layouts.values()
                    for s, f, _ in layout.numeric_series()
                    if s == source and f
                }
            )
            for source in SOURCES
        }
        self._values = {
            source: sorted(
                {f for layout in self.layouts.values() for s, f, _ in layout.distinct_series() if s == source}
            )
            for source in SOURCES
        }
        # the fields coded from each transaction: its entities and the values counted of it
        self._coded = sorted({*self._entity_fields, *self._values[SOURCES[_TX]]})

    # -- feeding, per source partition in log order ---------------------------------------

    def add_transaction(self, tx: Transaction, tag: str, offset: int) -> int:
        """Feed a transaction read at ``offset`` of source partition ``tag``; returns its time."""
        self._add_one(tx, tx.event_time, _TX, tag, offset)
        return tx.event_time

    def add_label(self, label: Label, tag: str, offset: int) -> int:
        """Feed a label (it counts at the time it arrived); returns that time."""
        self._add_one(label, label.label_time, _LABEL, tag, offset)
        return label.label_time

    def add_transactions(self, txs: list[Transaction], tag: str, offsets: list[int]) -> None:
        """:meth:`add_transaction` for consecutive transactions of one source partition."""
        self._end_run()
        self._add(txs, list(map(_EVENT_TIME, txs)), _TX, tag, offsets)

    def add_labels(self, labels: list[Label], tag: str, offsets: list[int]) -> None:
        """:meth:`add_label` for consecutive labels of one source partition."""
        self._end_run()
        self._add(labels, list(map(_LABEL_TIME, labels)), _LABEL, tag, offsets)

    def finish_partition(self, tag: str) -> None:
        """Nothing more will come from ``tag``: it no longer holds events back."""
        self._live.discard(tag)

    def _add_one(self, event: Transaction | Label, t: int, kind: int, tag: str, offset: int) -> None:
        if self._run != (kind, tag):
            self._end_run()
            self._run = (kind, tag)
        events, times, offsets = self._run_events
        events.append(event)
        times.append(t)
        offsets.append(offset)

    def _end_run(self) -> None:
        if self._run is not None:
            kind, tag = self._run
            events, times, offsets = self._run_events
            self._add(events, times, kind, tag, offsets)
            self._run, self._run_events = None, ([], [], [])

    def _add(self, events: list, times: list[int], kind: int, tag: str, offsets: list[int]) -> None:
        if not events:
            return
        span = self.counts.by_partition.setdefault(tag, [offsets[0], offsets[0]])
        span[1] = offsets[-1]
        t = np.array(times, dtype=np.int64)
        # the stream worker's rule: an event more than the allowed lateness behind the latest
        # time its partition has shown (before it) is dead-lettered there
        watermarks = np.maximum.accumulate(np.concatenate(([self._watermarks[tag]], t)))
        self._watermarks[tag] = int(watermarks[-1])
        kept = t >= watermarks[:-1] - self.lateness_ms
        column = np.empty(len(events), dtype=object)
        column[:] = events
        at = np.array(offsets, dtype=np.int64)
        if not kept.all():
            self.counts.late += len(t) - int(kept.sum())
            t, column, at = t[kept], column[kept], at[kept]
            events = column.tolist()
        n = len(t)
        # Coded now, while the values are fresh in the cache: later, in a chunk, looking them
        # up cost twice as much (misses on both the values and the keys).
        codes = np.full((n, len(self._coded)), -1, dtype=np.int64)
        if kind == _TX:
            for j, f in enumerate(self._coded):
                codes[:, j] = self._vocabulary[f].of(list(map(attrgetter(f), events)))
        self._held.append(
            _Events(
                t,
                np.full(n, kind, dtype=np.int8),
                np.full(n, self._tag_code[tag], dtype=np.int32),
                at,
                column,
                codes,
            )
        )

    # -- computing ------------------------------------------------------------------------

    def release(self, final: bool = False) -> Chunk:
        """Apply every event no later read can precede, and return the vectors computed."""
        self._end_run()
        frontier = min((self._watermarks[t] for t in self._live), default=1 << 62) - self.lateness_ms
        if final:
            frontier = 1 << 62
        ready: list[_Events] = []
        held: list[_Events] = []
        for block in self._held:
            early = block.t < frontier
            if early.all():
                ready.append(block)
            elif early.any():
                ready.append(block.take(early))
                held.append(block.take(~early))
            else:
                held.append(block)
        self._held = held
        chunks: list[Chunk] = []
        if ready:
            events = _Events.concat(ready)
            events = events.take(_release_order(events, len(self._tags)))
            for start in range(0, len(events.t), self.chunk_size):
                chunks.append(self._chunk(events.take(slice(start, start + self.chunk_size))))
        self._forget_old_transactions()
        return _joined(chunks, len(self.builder.names))

    def _chunk(self, ev: _Events) -> Chunk:
        """Vectors of the chunk's transactions, then the chunk applied to the states."""
        is_tx = ev.kind == _TX
        at = {_TX: np.flatnonzero(is_tx), _LABEL: np.flatnonzero(~is_tx)}
        events = {kind: ev.event[where].tolist() for kind, where in at.items()}
        tx_codes = {f: ev.codes[at[_TX], j] for j, f in enumerate(self._coded)}
        entity_rows = self._entity_rows(ev, at, events, tx_codes)
        numbers, counted = self._fields(len(ev.t), at, events, tx_codes)
        read = (ev.t[at[_TX]] >= self.rows_from) & (ev.t[at[_TX]] < self.rows_to)
        readers = at[_TX][read]
        txs: list[Transaction] = [tx for tx, r in zip(events[_TX], read.tolist(), strict=True) if r]
        t_read = ev.t[readers]
        out = np.empty((len(readers), len(self.builder.names)))
        latest = np.full(len(readers), -1, dtype=np.int64)
        last_seen: dict[str, np.ndarray] = {}
        for entity, table in self.tables.items():
            table.fit()
            rows = entity_rows[ENTITIES[entity]]
            values = {
                name: numbers[name]
                for names in table.layout.fields.values()
                for name in names
                if name in numbers
            }
            values.update((name, counted[name]) for _, name in table.counted.values())
            reads = _EntityReads(table, rows, ev, values, readers)
            out[:, self.builder.columns[entity]] = reads.features()
            latest = np.maximum(latest, reads.latest_before())
            for name, layout, feature, tx_field in self.builder.novelty:
                if layout is table.layout:
                    if tx_field == feature.field:
                        codes = tx_codes[tx_field][read]
                    else:  # a value the counted field never had is one never seen
                        codes = self._vocabulary[feature.field].known(list(map(attrgetter(tx_field), txs)))
                    last_seen[name] = reads.last_seen(feature, codes)
            reads.apply(self._tags)
            table.forget_before(int(ev.t[-1]))  # every later read is at this time or after
        self.builder.fill_request(
            out,
            np.fromiter(map(attrgetter("amount"), txs), dtype=np.float64, count=len(txs)),
            t_read,
            list(map(attrgetter("channel"), txs)),
            t_read,
            last_seen,
        )
        self.counts.transactions += len(at[_TX])
        self.counts.labels += len(at[_LABEL])
        self.counts.rows += len(readers)
        return Chunk(
            list(map(attrgetter("event_id"), txs)),
            t_read,
            list(map(attrgetter("card_id"), txs)),
            out.astype(np.float32),
            latest,
        )

    def _entity_rows(
        self, ev: _Events, at: dict[int, np.ndarray], events: dict[int, list], tx_codes: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Per entity field, each of the chunk's events' entity code, its row in the entity's
        table (-1: none): a transaction's own, a label's its transaction's.

        A label finds its transaction among those applied before it, in the chunk's order.
        """
        txs, labels = events[_TX], events[_LABEL]
        fields = self._entity_fields
        tx_ids = list(map(attrgetter("event_id"), txs))
        label_ids = list(map(attrgetter("event_id"), labels))
        index = self._tx_index
        before = np.fromiter(map(index.get, label_ids, repeat(-1)), dtype=np.int64, count=len(label_ids))
        first = self._add_tx_info(ev.t[at[_TX]], [tx_codes[f] for f in fields])
        known = len(index)
        index.update(zip(tx_ids, range(first, first + len(tx_ids)), strict=True))
        t_label = ev.t[at[_LABEL]]
        if len(index) - known < len(tx_ids):  # an event id seen again: which one each label sees
            found = self._found_in_order(at, first, tx_ids, label_ids, before)
        else:
            # no id was seen again: a label found before is found there, the others look again
            found = before.copy()
            again = np.flatnonzero(before < 0)
            if len(again):
                ids = [label_ids[i] for i in again.tolist()]
                found[again] = np.fromiter(map(index.get, ids, repeat(-1)), dtype=np.int64, count=len(ids))
            # A transaction later than its label comes after it: the label sees what was before.
            later = (found >= 0) & (self._tx_info[np.maximum(found, 0), 0] > t_label)
            found[later] = before[later]
        self.counts.labels_unknown += int((found < 0).sum())
        times = t_label.tolist()
        counted = zip(label_ids, zip(map(attrgetter("is_fraud"), labels), times, strict=True), strict=True)
        if times and times[-1] > self.label_cutoff:
            counted = ((e, ft) for e, ft in counted if ft[1] <= self.label_cutoff)
        self.labels.update(counted)  # in time order: the latest label of an event wins
        rows = {}
        for p, f in enumerate(fields):
            column = rows[f] = np.empty(len(ev.t), dtype=np.int64)
            column[at[_TX]] = tx_codes[f]
            column[at[_LABEL]] = np.where(found >= 0, self._tx_info[np.maximum(found, 0), p + 1], -1)
        return rows

    def _add_tx_info(self, times: np.ndarray, codes: list[np.ndarray]) -> int:
        """Rows for transactions (time, entity codes); returns the first. Grows by doubling."""
        first, n = self._tx_rows, len(times)
        if first + n > len(self._tx_info):
            grown = np.zeros((max(2 * len(self._tx_info), first + n), self._tx_info.shape[1]), np.int64)
            grown[:first] = self._tx_info[:first]
            self._tx_info = grown
        self._tx_info[first : first + n, 0] = times
        for p, column in enumerate(codes):
            self._tx_info[first : first + n, p + 1] = column
        self._tx_rows = first + n
        return first

    def _found_in_order(
        self,
        at: dict[int, np.ndarray],
        first: int,
        tx_ids: list[str],
        label_ids: list[str],
        before: np.ndarray,
    ) -> np.ndarray:
        """Each label's transaction row, walking the chunk in order (an event id seen twice)."""
        walk = sorted(
            [(p, 0, i) for i, p in enumerate(at[_TX].tolist())]
            + [(p, 1, i) for i, p in enumerate(at[_LABEL].tolist())]
        )
        latest: dict[str, int] = {}
        found: list[int] = []
        for _, kind, i in walk:
            if kind == 0:
                latest[tx_ids[i]] = first + i
            else:
                found.append(latest.get(label_ids[i], int(before[i])))
        return np.array(found, dtype=np.int64)

    def _fields(
        self, n: int, at: dict[int, np.ndarray], events: dict[int, list], tx_codes: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """The fields the states read, as columns over the chunk: numbers (0 where absent), and
        the codes of the values to count (-1 where absent)."""
        numbers: dict[str, np.ndarray] = {}
        counted: dict[str, np.ndarray] = {}
        for kind, source in enumerate(SOURCES):
            where, picked = at[kind], events[kind]
            for name in self._numbers[source]:
                column = numbers.setdefault(name, np.zeros(n))
                column[where] = np.fromiter(
                    map(attrgetter(name), picked), dtype=np.float64, count=len(picked)
                )
            for name in self._values[source]:
                column = counted.setdefault(name, np.full(n, -1, dtype=np.int64))
                if kind == _TX:
                    column[where] = tx_codes[name]
                else:
                    column[where] = self._vocabulary[name].of(list(map(attrgetter(name), picked)))
        return numbers, counted

    def _forget_old_transactions(self) -> None:
        """Transactions older than the label horizon can no longer be labelled (as in the worker)."""
        index = self._tx_index
        if not index:
            return
        oldest = max(self._watermarks.values()) - self.label_horizon_ms
        times = self._tx_info[:, 0]
        stale = []
        for event_id, row in index.items():  # insertion order is time order: stop at the first young one
            if times[row] >= oldest:
                break
            stale.append(event_id)
        for event_id in stale:
            del index[event_id]
        if self._tx_rows > 2 * len(index) + _TX_ROWS:  # mostly forgotten rows: keep the live ones only
            live = np.fromiter(index.values(), dtype=np.int64, count=len(index))
            info = np.zeros((max(len(live), _TX_ROWS), self._tx_info.shape[1]), dtype=np.int64)
            info[: len(live)] = self._tx_info[live]
            self._tx_info = info
            self._tx_index = dict(zip(index, range(len(index)), strict=True))
            self._tx_rows = len(index)

    def final_states(self) -> dict[str, dict[str, EntityState]]:
        """The replayed states, with their real applied offsets (when tracked), as the store keeps them."""
        return {entity: table.states() for entity, table in self.tables.items()}


class _EntityReads:
    """One entity type's part of a chunk: its features as of each reader, then its state update.

    The chunk's events that touch this entity type are put in (row, position) order, so the
    earlier events of a reader's entity are a run just before the reader's place, and the ones
    inside a window are the end of that run (tiles never go down within a row).
    """

    def __init__(
        self,
        table: StateTable,
        rows: np.ndarray,
        ev: _Events,
        values: dict[str, np.ndarray],
        readers: np.ndarray,
    ) -> None:
        self.table = table
        self.layout = table.layout
        self.ev = ev
        self.values = values  # field -> numbers, or codes of counted values (-1: none), per event
        self.n = n = len(ev.t)
        sources = [code for code, name in enumerate(SOURCES) if name in self.layout.fields]
        touching = np.flatnonzero((rows >= 0) & np.isin(ev.kind, sources))
        self.order = touching[_stable_order(rows[touching])]
        self.rows = rows
        self.row_sorted = rows[self.order]
        self.key = self.row_sorted * (n + 1) + self.order
        self.n_readers = len(readers)
        mine = np.flatnonzero(rows[readers] >= 0)  # readers with an entity of this type
        # Readers in (row, position) order too: each search below then looks for sorted needles.
        place = np.searchsorted(self.key, rows[readers[mine]] * (n + 1) + readers[mine])
        by_place = _stable_order(place)
        self.slots = mine[by_place]  # where each reader's values go in the chunk's rows
        self.place = place[by_place]  # how many of the entity type's events come before it
        self.readers = readers[self.slots]
        self.r = rows[self.readers]
        self.t = ev.t[self.readers]
        kinds = ev.kind[self.order]
        self._subs: dict[tuple[int, str | None], np.ndarray] = {
            (code, None): np.flatnonzero(kinds == code) for code in range(len(SOURCES))
        }
        self._ends: dict[tuple[int, str | None], np.ndarray] = {}
        self._window_runs: dict[tuple[int, str | None, int], tuple[np.ndarray, np.ndarray]] = {}
        # the time of each reader's entity's latest earlier event, of any source (-1: none)
        self._latest = self._previous_time(None, table.latest[self.r])

    # -- reading --------------------------------------------------------------------------

    def features(self) -> np.ndarray:
        layout, table = self.layout, self.table
        defaults = np.array([f.default for f in layout.features])
        out = np.tile(defaults, (self.n_readers, 1))
        mine = np.tile(defaults, (len(self.r), 1))
        if layout.numeric_series():
            layout.fill_numeric(mine, self._with_chunk(self._stored_stats()))
        for index, distinct in table.distinct.items():
            reads = layout.distinct_reads(index)
            counts = distinct.counts(self.r, self.t, [tile_ms for _, tile_ms in reads])
            for k, (column, tile_ms) in enumerate(reads):
                mine[:, column] = saturated(counts[:, k] + self._new_distinct(index, tile_ms))
        for column, source, index in layout.since_last_reads():
            last = self._previous_time(SOURCES.index(source), table.last[self.r, index])
            mine[:, column] = layout.since_last(column, last, self.t)
        # an entity with no event before the reader has no state: its defaults, as in the store
        has_state = self._latest >= 0
        out[self.slots[has_state]] = mine[has_state]
        return out

    def _stored_stats(self) -> WindowStats:
        """The state's window stats as of each reader, computed once for the readers of one
        entity in the same tiles of every series (a busy merchant's readers in a chunk, mostly).

        Readers are in (row, time) order, so such readers are next to one another.
        """
        tiles_ms = np.array([tile_ms for _, _, tile_ms in self.layout.numeric_series()], dtype=np.int64)
        k = self.t[:, None] // tiles_ms[None, :]
        new = np.ones(len(self.r), dtype=bool)
        new[1:] = (self.r[1:] != self.r[:-1]) | (k[1:] != k[:-1]).any(axis=1)
        first = np.flatnonzero(new)
        # np.take copies whole rows: ~15 % faster than indexing for these 2.4 KB rows
        stats = self.layout.window_stats(np.take(self.table.tiles, self.r[first], axis=0), self.t[first])
        if len(first) == len(self.r):
            return stats
        which = np.cumsum(new) - 1
        return WindowStats(*(a[which] for a in stats))

    def latest_before(self) -> np.ndarray:
        """The time of the entity's latest earlier event (-1: none; and for readers without the entity)."""
        out = np.full(self.n_readers, -1, dtype=np.int64)
        out[self.slots] = self._latest
        return out

    def last_seen(self, feature: Feature, codes: np.ndarray) -> np.ndarray:
        """When each reader's entity last saw the value coded ``codes[i]`` (-1: none) of the
        distinct ``feature`` (NEVER: not)."""
        index = self.layout.distinct_index(feature)
        distinct = self.table.distinct[index]
        code = codes[self.slots]
        sub = self._sub(SOURCES.index(feature.source), feature.field)
        pos = self.order[sub]
        # the chunk's occurrences by (row, value, position): the reader's latest earlier one
        # (sub is in (row, position) order already: a stable sort by (row, value) keeps it)
        keys = pair_key(self.rows[pos], self.values[feature.field][pos])
        order = _stable_order(keys)
        pos, keys = pos[order], keys[order]
        first = np.ones(len(keys), dtype=bool)
        first[1:] = keys[1:] != keys[:-1]
        pairs, rank = keys[first], np.cumsum(first) - 1
        wanted = np.searchsorted(pairs, pair_key(self.r, np.maximum(code, 0)))
        known = (code >= 0) & (wanted < len(pairs))
        known[known] = pairs[wanted[known]] == pair_key(self.r[known], code[known])
        at = np.searchsorted(rank * (self.n + 1) + pos, wanted * (self.n + 1) + self.readers) - 1
        hit = known & (at >= 0)
        hit[hit] = rank[at[hit]] == wanted[hit]
        seen = distinct.lookup(self.r, code)  # the state's, where the chunk has none
        seen[hit] = self.ev.t[pos[at[hit]]]
        out = np.full(self.n_readers, NEVER, dtype=np.int64)
        out[self.slots] = seen
        return out

    def _sub(self, source: int, field: str | None = None) -> np.ndarray:
        """Indices into the (row, position) order of ``source``'s events (with a ``field`` value)."""
        key = (source, field)
        if key not in self._subs:
            sub = self._subs[(source, None)]
            self._subs[key] = sub[self.values[field][self.order[sub]] >= 0]  # type: ignore[index]
        return self._subs[key]

    def _end(self, source: int, field: str | None = None) -> np.ndarray:
        """Per reader, where its entity's earlier events of ``_sub(source, field)`` end."""
        key = (source, field)
        if key not in self._ends:
            self._ends[key] = np.searchsorted(self._sub(source, field), self.place)
        return self._ends[key]

    def _runs(self, source: int, field: str | None, tile_ms: int) -> tuple[np.ndarray, np.ndarray]:
        """Per reader, the run [start, end) of ``_sub(source, field)`` inside its window."""
        key = (source, field, tile_ms)
        if key in self._window_runs:
            return self._window_runs[key]
        sub, end = self._sub(source, field), self._end(source, field)
        tiles = self.ev.t[self.order[sub]] // tile_ms
        k = self.t // tile_ms
        both = np.concatenate((tiles, k))
        if not len(both):
            return end, end
        low = int(both.min()) - TILES
        span = int(both.max()) - low + 2
        first = np.searchsorted(
            self.row_sorted[sub] * span + (tiles - low), self.r * span + (k - TILES + 1 - low)
        )
        self._window_runs[key] = runs = (np.minimum(first, end), end)
        return runs

    def _with_chunk(self, stats: WindowStats) -> WindowStats:
        """The state's window stats plus what the chunk's earlier events add, per numeric series."""
        count, total, low, high = (a.copy() for a in stats)
        for j, (source, name, tile_ms) in enumerate(self.layout.numeric_series()):
            sub = self._sub(SOURCES.index(source))
            start, end = self._runs(SOURCES.index(source), None, tile_ms)
            count[:, j] += end - start
            if name is None:
                continue
            values = self.values[name][self.order[sub]]
            sums = np.concatenate(([0.0], np.cumsum(values)))
            total[:, j] += sums[end] - sums[start]
            low[:, j] = np.minimum(low[:, j], _range_reduce(values, start, end, np.minimum, np.inf))
            high[:, j] = np.maximum(high[:, j], _range_reduce(values, start, end, np.maximum, -np.inf))
        return WindowStats(count, total, low, high)

    def _new_distinct(self, index: int, tile_ms: int) -> np.ndarray:
        """Values the chunk's earlier events add to each reader's distinct count (not in the state's)."""
        source, name = self.table.counted[index]
        codes = self.values[name]
        sub = self._sub(SOURCES.index(source), name)
        start, end = self._runs(SOURCES.index(source), name, tile_ms)
        pos = self.order[sub]
        value, row = codes[pos], self.rows[pos]
        # the previous occurrence of the same (row, value) in the chunk, as an index into sub
        keys = pair_key(row, value)
        order = _stable_order(keys)
        previous = np.full(len(sub), -1)
        same = keys[order][1:] == keys[order][:-1]
        previous[order[1:][same]] = order[:-1][same]
        # a first occurrence counts only if the state did not hold the value inside the window
        stored = self.table.distinct[index].lookup(row, value)
        added = np.zeros(len(self.r))
        lengths = end - start
        for block in _blocks(lengths, _MAX_PAIRS):
            reader = np.repeat(block, lengths[block])
            first = np.repeat(np.cumsum(lengths[block]) - lengths[block], lengths[block])
            j = start[reader] + np.arange(len(reader)) - first
            new = previous[j] < start[reader]  # the first of its value inside the window
            new &= (previous[j] >= 0) | ~in_window(stored[j], self.t[reader], tile_ms)
            added += np.bincount(reader[new], minlength=len(self.r))
        return added

    def _previous_time(self, source: int | None, stored: np.ndarray) -> np.ndarray:
        """The time of each reader's entity's latest earlier event (of ``source``), else ``stored``."""
        if source is None:
            sub, end = np.arange(len(self.order)), self.place
        else:
            sub, end = self._sub(source), self._end(source)
        if not len(sub):
            return stored
        previous = np.maximum(end - 1, 0)
        has = (end > 0) & (self.row_sorted[sub[previous]] == self.r)
        return np.where(has, self.ev.t[self.order[sub[previous]]], stored)

    # -- writing --------------------------------------------------------------------------

    def apply(self, tags: list[str]) -> None:
        """The chunk's events applied to the states (after every read of the chunk)."""
        tracked = self.table.offsets is not None
        for code, source in enumerate(SOURCES):
            if source not in self.layout.fields:
                continue
            pos = self.order[self._sub(code)]
            self.table.apply(
                self.rows[pos],
                source,
                self.ev.t[pos],
                {name: self.values[name][pos] for name in self.layout.fields[source]},
                [tags[c] for c in self.ev.tag[pos].tolist()] if tracked else None,
                self.ev.offset[pos].tolist() if tracked else None,
            )


def _range_reduce(
    values: np.ndarray, start: np.ndarray, end: np.ndarray, ufunc: Callable, identity: float
) -> np.ndarray:
    """``ufunc.reduce(values[start[i]:end[i]])`` for every i (``identity`` where empty): a sparse table."""
    out = np.full(len(start), identity)
    length = end - start
    if not len(values) or not length.any():
        return out
    levels = [values]
    while (1 << len(levels)) <= length.max():
        half = 1 << (len(levels) - 1)
        levels.append(ufunc(levels[-1][:-half], levels[-1][half:]))
    level = np.zeros(len(length), dtype=np.int64)
    nonempty = length > 0
    level[nonempty] = np.floor(np.log2(length[nonempty])).astype(np.int64)
    for lv in np.unique(level[nonempty]).tolist():
        at = np.flatnonzero(nonempty & (level == lv))
        table = levels[lv]
        out[at] = ufunc(table[start[at]], table[end[at] - (1 << lv)])
    return out


def _release_order(events: _Events, n_tags: int) -> np.ndarray:
    """The order events are released in: by time, transactions before labels, then by source
    partition and offset.

    A source partition's events are held in the order read, which is offset order, so a stable
    sort by (time, kind, partition), one int64 key, is enough: one pass over blocks already in
    time order, where a lexsort of four keys took four.
    """
    if not len(events.t):
        return np.arange(0)
    low = int(events.t.min())
    if (int(events.t.max()) - low + 1) * 2 * n_tags >= 1 << 62:
        return np.lexsort((events.offset, events.tag, events.kind, events.t))
    key = ((events.t - low) * 2 + events.kind) * n_tags + events.tag
    return np.argsort(key, kind="stable")


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")``, the fastest way numpy has for these keys.

    Small non-negative keys (rows, places in a chunk) go through numpy's radix sort, which it
    uses for 16-bit keys only, so in 16-bit passes (46 µs against 601 µs for 13,000 rows).
    Others (pair keys, nearly in order: rows sorted, values not) go through its timsort, one pass
    where the ``np.lexsort`` of (row, value, position) it replaced took three (21 µs against
    1,250 µs for 13,000 events).
    """
    top = int(keys.max()) if len(keys) else 0
    if not len(keys) or keys.min() < 0 or top >= 1 << 32:
        return np.argsort(keys, kind="stable")
    order = np.argsort((keys & 0xFFFF).astype(np.uint16), kind="stable")
    if top >= 1 << 16:
        order = order[np.argsort((keys[order] >> 16).astype(np.uint16), kind="stable")]
    return order


def _blocks(lengths: np.ndarray, most: int) -> list[np.ndarray]:
    """Reader indices split so that each block's pairs (the sum of its lengths) stay near ``most``."""
    if not len(lengths):
        return []
    ends = np.cumsum(lengths)
    cuts = np.searchsorted(ends, np.arange(most, int(ends[-1]), most), side="right")
    return [b for b in np.split(np.arange(len(lengths)), np.unique(cuts)) if len(b)]


def _joined(chunks: list[Chunk], width: int) -> Chunk:
    if not chunks:
        empty = np.empty(0, dtype=np.int64)
        return Chunk([], empty, [], np.empty((0, width), dtype=np.float32), empty)
    if len(chunks) == 1:
        return chunks[0]
    return Chunk(
        [e for c in chunks for e in c.event_ids],
        np.concatenate([c.event_times for c in chunks]),
        [e for c in chunks for e in c.card_ids],
        np.concatenate([c.features for c in chunks]),
        np.concatenate([c.latest_before for c in chunks]),
    )
