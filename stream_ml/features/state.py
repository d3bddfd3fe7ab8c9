"""One entity's window state: tiles per window, distinct values, last event time, applied offsets.

The state is what is stored (one compact blob per entity); feature values are derived from it at
read time for the read time, so a window's value falls as time passes without new events.

Writes are idempotent: the state keeps, per source partition, the last offset applied to it, and
an event at or below that offset is skipped. A worker that crashed and reprocesses a batch cannot
count an event twice, even if it had written only part of the batch.

>>> from stream_ml.features.definitions import Feature, FeatureSet
>>> fs = FeatureSet("doc", (Feature("n_1h", "card", "count", 3600),))
>>> layout = Layout.of(fs, "card")
>>> s = layout.new()
>>> layout.apply(s, "transactions", 1_000_000, (), "t0", 7)
True
>>> layout.apply(s, "transactions", 1_000_000, (), "t0", 7)  # the same offset again: skipped
False
>>> layout.read(s, 1_000_000), layout.read(s, 1_000_000 + 3_600_000)
([1.0], [0.0])
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, ItemsView, Iterator, Mapping, MutableMapping, Sequence, ValuesView
from dataclasses import dataclass
from operator import attrgetter
from types import MappingProxyType
from typing import Any, NamedTuple

import msgpack
import numpy as np

from stream_ml.features.definitions import TILES, Feature, FeatureSet

SLOT = 5  # tile index, count, sum, min, max
STATE_FORMAT = 6
DISTINCT_CAP = 1024  # distinct counts saturate here: the state of a busy entity stays small
# A set over the cap is cut back to its newest DISTINCT_CAP values once it is this large, not at
# every new value (a sort of the set each time); counts read the same, as they saturate.
_TRIM_ABOVE = DISTINCT_CAP + DISTINCT_CAP // 8
_PRUNE_ABOVE = 16
# An update, as the worker carries it: [entity id, source code, source partition ("transactions:3"),
# offset, event time, *values in the order of Layout.fields[source]]: the values start at this index.
UPDATE_VALUES = 5
_INF = math.inf
NEVER = -(1 << 62)  # the time of what was never seen: outside every window


_NOTHING_SEEN: Mapping[str, int] = MappingProxyType({})  # the distinct values of an entity with no state
_SEP = b"\xff"  # between stored distinct values: a byte that UTF-8 never contains
# Sets of distinct values up to this size are stored as msgpack maps, cheapest to write and read
# while small; larger ones (a shop terminal's cards) as StoredValues, which reading never unpacks.
_PACK_ABOVE = 32


class StoredValues(Mapping[str, int]):
    """A large set of distinct values as stored (value -> last seen), read without building a dict.

    The values are UTF-8 strings, each followed by ``0xFF`` (a byte no UTF-8 text contains, so a
    match of ``0xFF value 0xFF`` is exactly one value), and their times an int64 array in the
    same order. Unpacking a shop terminal's hundreds of cards into a dict was the largest cost of
    a scoring call; counting and looking up one value need neither the dict nor its strings.

    >>> v = StoredValues.of({"m1": 5, "m2": 7})
    >>> len(v), v.get("m2"), v.get("m"), dict(v) == {"m1": 5, "m2": 7}
    (2, 7, None, True)
    """

    __slots__ = ("joined", "times")

    def __init__(self, joined: bytes, times: bytes) -> None:
        self.joined = joined  # _SEP, then each value followed by _SEP
        self.times = times  # int64, native order

    @classmethod
    def of(cls, values: Mapping[str, int]) -> StoredValues:
        if isinstance(values, StoredValues):
            return values
        if not values:
            return cls(_SEP, b"")
        # One join and one encode: "\udcff" encodes to the byte 0xFF under surrogateescape (twice
        # as fast as encoding value by value, which the worker does for every state it writes).
        joined = "\udcff".join(values).encode("utf-8", "surrogateescape")
        if joined.count(_SEP) != len(values) - 1:  # a value with a lone surrogate: refused as before
            joined = _SEP.join([v.encode() for v in values])
        return cls(_SEP + joined + _SEP, array("q", values.values()).tobytes())

    def __len__(self) -> int:
        return len(self.times) // 8

    def _index(self, value: str) -> int:
        at = self.joined.find(_SEP + value.encode() + _SEP)
        return -1 if at < 0 else self.joined.count(_SEP, 0, at)

    def get(self, value: str, default: int | None = None) -> int | None:  # type: ignore[override]
        index = self._index(value)
        return default if index < 0 else array("q", self.times[index * 8 : index * 8 + 8])[0]

    def __getitem__(self, value: str) -> int:
        found = self.get(value)
        if found is None:
            raise KeyError(value)
        return found

    def __iter__(self) -> Iterator[str]:
        return iter([v.decode() for v in self.joined[1:-1].split(_SEP)] if len(self) else [])

    def copy(self) -> dict[str, int]:
        """A dict of the same values, to change (as the worker does)."""
        return dict(zip(self, array("q", self.times), strict=True))

    def items(self) -> ItemsView[str, int]:
        return self.copy().items()

    def values(self) -> ValuesView[int]:
        return self.copy().values()

    def __repr__(self) -> str:
        return f"StoredValues({self.copy()!r})"


class WritableValues(MutableMapping[str, int]):
    """A large set of distinct values to change, kept in the form :class:`StoredValues` reads.

    A busy merchant's or device's set is written at every batch that sees it; rebuilding the
    stored form from a dict each time (a join of hundreds of strings) and finding its oldest value
    were a fifth of the feature worker's time. Here a new value is appended, a time set in place,
    and storing is a copy of two buffers.

    >>> v = WritableValues({"m1": 5})
    >>> v["m2"] = 9; v["m1"] = 7
    >>> dict(v), v.newest, v.stored() == [StoredValues.of({"m1": 7, "m2": 9}).joined, v.times]
    ({'m1': 7, 'm2': 9}, 9, True)
    """

    __slots__ = ("_at", "_joined", "_oldest", "_times", "newest")

    def __init__(self, values: Mapping[str, int]) -> None:
        stored = StoredValues.of(values)  # refuses what StoredValues refuses (lone surrogates)
        self._joined = bytearray(stored.joined)
        self._times = array("q", stored.times)
        self._at = {v: i for i, v in enumerate(values)}
        self.newest = max(self._times, default=NEVER)
        self._oldest = min(self._times, default=NEVER)  # a lower bound: raising a time leaves it

    def get(self, value: str, default: int | None = None) -> int | None:  # type: ignore[override]
        i = self._at.get(value)
        return default if i is None else self._times[i]

    def __getitem__(self, value: str) -> int:
        return self._times[self._at[value]]

    def __setitem__(self, value: str, t: int) -> None:
        i = self._at.get(value)
        if i is None:
            encoded = value.encode()
            self._at[value] = len(self._times)
            self._joined += encoded
            self._joined += _SEP
            self._times.append(t)
        else:
            self._times[i] = t
        self.newest = max(self.newest, t)
        self._oldest = min(self._oldest, t)

    def __delitem__(self, value: str) -> None:
        kept = self.copy()
        del kept[value]
        self.__init__(kept)  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self._at)

    def __iter__(self) -> Iterator[str]:
        return iter(self._at)

    def oldest(self) -> int:
        """The oldest time held (refreshes the lower bound kept as values are seen again)."""
        self._oldest = min(self._times, default=NEVER)
        return self._oldest

    def oldest_bound(self) -> int:
        """A time at or before the oldest held, found without a scan."""
        return self._oldest

    @property
    def times(self) -> bytes:
        return self._times.tobytes()

    def stored(self) -> list[bytes]:
        return [bytes(self._joined), self._times.tobytes()]

    def copy(self) -> dict[str, int]:
        return dict(zip(self._at, self._times, strict=True))


def _stored_form(values: Mapping[str, int]) -> dict[str, int] | list[bytes]:
    if type(values) is WritableValues:
        return values.stored()
    if type(values) is dict and len(values) <= _PACK_ABOVE:
        return values
    stored = StoredValues.of(values)
    return [stored.joined, stored.times]


def _times_of(values: Mapping[str, int]) -> bytes:
    """The last-seen times of distinct ``values`` (any of their three forms) as int64 bytes."""
    if type(values) is StoredValues or type(values) is WritableValues:
        return values.times
    return array("q", values.values()).tobytes()


@dataclass(slots=True)
class EntityState:
    tiles: array  # per numeric series, TILES slots of SLOT doubles
    # per distinct field: value -> the last event time it was seen (where the worker changes it: a
    # dict, or WritableValues once large; StoredValues where it was read from the store to read)
    distinct: list[dict[str, int]] | list[Mapping[str, int]]
    last: list[int]  # per source with a since_last feature: latest event time (ms), -1 if none
    offsets: dict[str, int]  # source partition ("transactions:3", "labels:0") -> last offset applied


@dataclass(slots=True)
class StateColumns:
    """The states a batch of reads reads, side by side: what :meth:`Layout.read_columns` takes.

    One entry per read; a read whose entity has no state holds an empty one (``present`` False)
    and gets the features' defaults. The scorer decodes its blobs straight into this form
    (:meth:`Layout.decode_columns`): no state object per entity, and the tiles of the whole
    batch are one array from the start.
    """

    present: np.ndarray  # bool, per read: whether its entity has a state
    tiles: np.ndarray  # float64, (reads, len(Layout.empty_tiles)): EntityState.tiles
    distinct: list[list[Mapping[str, int]]]  # per set of distinct values, per read: EntityState.distinct
    last: np.ndarray  # int64, (reads, since-last sources): EntityState.last


class WindowStats(NamedTuple):
    """Per read and numeric series: what the window holds (count 0: nothing, and then min inf)."""

    count: np.ndarray
    total: np.ndarray
    low: np.ndarray
    high: np.ndarray


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """The numpy operations that read stored features out of states, and the columns they fill.

    A layout's plan fills its features' columns. Plans merged side by side (:meth:`merged`)
    read the states of several entity types in one pass: a numpy call costs a few µs, and a
    pass makes the same few dozen calls whatever the batch size, so a scorer's batch of a few
    calls paid them once per entity type.
    """

    tile_ms: np.ndarray  # int64, per numeric series: the width of its tiles
    min_series: np.ndarray  # intp: the series whose minima a feature reads
    max_series: np.ndarray  # ... and maxima
    numeric: tuple[tuple[str, np.ndarray, np.ndarray, np.ndarray], ...]  # (agg, columns, series, defaults)
    distinct: tuple[np.ndarray, np.ndarray, np.ndarray]  # columns, tile_ms, set of values counted
    since_last: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # columns, source, cap (s), default

    def read(
        self,
        tiles: np.ndarray,
        distinct: list[list[Mapping[str, int]]],
        last: np.ndarray,
        t: np.ndarray,
        out: np.ndarray,
    ) -> None:
        """Every feature of the plan into its column of ``out``, as of ``t`` (see
        :class:`StateColumns` for the other arguments, one row per read)."""
        if len(self.tile_ms):
            self.fill_numeric(out, self.window_stats(tiles, t))
        if len(self.distinct[0]):
            out[:, self.distinct[0]] = self.distinct_counts(distinct, t)
        columns, source, cap, default = self.since_last
        if len(columns):
            out[:, columns] = since_last(last[:, source], t[:, None], cap, default)

    def window_stats(self, tiles: np.ndarray, t: np.ndarray) -> WindowStats:
        """Count, sum, min and max of each numeric series over the window ending at ``t``.

        ``tiles``: one row per read (an :class:`EntityState`'s tiles, or several side by side).
        Returns four arrays of shape (reads, series).
        """
        tiles = tiles.reshape(len(t), len(self.tile_ms), TILES, SLOT)
        k = t[:, None] // self.tile_ms[None, :]  # each row's tile, per series
        held = tiles[..., 0]
        inside = (held > (k - TILES)[..., None]) & (held <= k[..., None])
        weight = inside.astype(np.float64)  # a product and sum in one pass: ~3x np.where(...).sum()
        count = np.einsum("nsk,nsk->ns", tiles[..., 1], weight)
        total = np.einsum("nsk,nsk->ns", tiles[..., 2], weight)
        # minima and maxima only of the series a feature reads them of (one of the card's five)
        low = np.full(count.shape, _INF)
        high = np.full(count.shape, -_INF)
        if len(self.min_series):
            at = self.min_series
            low[:, at] = np.where(inside[:, at], tiles[..., 3][:, at], _INF).min(-1)
        if len(self.max_series):
            at = self.max_series
            high[:, at] = np.where(inside[:, at], tiles[..., 4][:, at], -_INF).max(-1)
        return WindowStats(count, total, low, high)

    def fill_numeric(self, out: np.ndarray, stats: WindowStats) -> None:
        """The count, sum, mean, min and max features from :meth:`window_stats`, into ``out``.

        ``out``: one row per read of ``stats``; its other columns are left as they are.
        """
        count, total, low, high = stats
        for agg, columns, series, defaults in self.numeric:
            c = count[:, series]
            if agg == "count":
                out[:, columns] = c
                continue
            if agg == "sum":
                values = total[:, series]
            elif agg == "mean":
                values = total[:, series] / np.maximum(c, 1.0)
            else:
                values = (low if agg == "min" else high)[:, series]
            out[:, columns] = np.where(c > 0, values, defaults)

    def distinct_counts(self, sets: list[list[Mapping[str, int]]], t: np.ndarray) -> np.ndarray:
        """Each read's distinct features as of ``t[read]`` (in the order of ``self.distinct``).

        ``sets[index][read]``: the values of set ``index`` the read's entity has seen, with when.
        One comparison per value and feature counting its set, for every set and read at once.
        """
        columns, tile_ms, counted = self.distinct
        reads = len(t)
        maps = [m for each in sets for m in each]  # set by set, read by read
        sizes = [len(m) for m in maps]
        last_seen = np.frombuffer(b"".join([_times_of(m) for m in maps]), dtype=np.int64)
        owner = (np.arange(reads * len(sets)) % reads).repeat(sizes)
        held_in = np.arange(len(sets)).repeat(reads).repeat(sizes)
        # (value, feature) pairs: each value with each feature counting its set (a terminal's
        # thousand cards are compared with one window, not with every distinct feature's)
        per_set = np.bincount(counted, minlength=len(sets))
        by_set = np.argsort(counted, kind="stable")  # the features, set by set
        reps = per_set[held_in]
        value = np.arange(len(held_in)).repeat(reps)
        nth = np.arange(len(value)) - (np.cumsum(reps) - reps).repeat(reps)  # among its value's pairs
        feature = by_set[(np.cumsum(per_set) - per_set)[held_in].repeat(reps) + nth]
        start, end = window_bounds(t[:, None], tile_ms[None, :])  # per read and feature, not per value
        row, seen = owner[value], last_seen[value]
        inside = (seen >= start[row, feature]) & (seen < end[row, feature])
        cells = (row * len(columns) + feature)[inside]
        counts = np.bincount(cells, minlength=reads * len(columns)).reshape(reads, len(columns))
        return saturated(counts.astype(np.float64))

    @classmethod
    def merged(cls, plans: Sequence[tuple[ReadPlan, np.ndarray, int, int]]) -> ReadPlan:
        """``(plan, columns, sets, sources)`` side by side: plan ``i``'s column ``c`` becomes
        ``columns[c]``, and its series, sets of distinct values (``sets`` of them) and since-last
        sources (``sources``) come after those of the plans before it, as in
        ``np.concatenate([tiles...], axis=1)``, the sets' lists added, the ``last`` columns
        concatenated."""
        series = set_base = source_base = 0
        numeric: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {}
        tile_ms, low, high, distinct, since = [], [], [], [], []
        for plan, columns, sets, sources in plans:
            tile_ms.append(plan.tile_ms)
            low.append(plan.min_series + series)
            high.append(plan.max_series + series)
            for agg, cols, at, defaults in plan.numeric:
                numeric.setdefault(agg, []).append((columns[cols], at + series, defaults))
            cols, widths, counted = plan.distinct
            distinct.append((columns[cols], widths, counted + set_base))
            cols, source, cap, default = plan.since_last
            since.append((columns[cols], source + source_base, cap, default))
            series += len(plan.tile_ms)
            set_base += sets
            source_base += sources
        return cls(
            np.concatenate(tile_ms),
            np.concatenate(low),
            np.concatenate(high),
            tuple((agg, *map(np.concatenate, zip(*parts, strict=True))) for agg, parts in numeric.items()),
            tuple(map(np.concatenate, zip(*distinct, strict=True))),  # type: ignore[arg-type]
            tuple(map(np.concatenate, zip(*since, strict=True))),  # type: ignore[arg-type]
        )


def _arrays(rows: Sequence[tuple], dtypes: tuple) -> tuple[np.ndarray, ...]:
    """The columns of ``rows`` as arrays of ``dtypes`` (empty ones where there are no rows)."""
    return tuple(np.array([r[i] for r in rows], dtype) for i, dtype in enumerate(dtypes))


def since_last(last: np.ndarray, t: np.ndarray, cap: Any, default: Any) -> np.ndarray:
    """Seconds since each latest event time (-1: none, then ``default``), capped at ``cap``."""
    since = np.minimum(np.maximum(t - last, 0) / 1000.0, cap)
    return np.where(last < 0, default, since)


@dataclass(frozen=True, slots=True)
class _Numeric:
    source: str
    field: str | None
    tile_ms: int
    base: int  # index of the series' first slot in EntityState.tiles


@dataclass(frozen=True, slots=True)
class _Distinct:
    """The values of one field, each with the time it was last seen; every window of it reads them."""

    source: str
    field: str
    window_ms: int  # the longest window reading it: older values are pruned
    index: int


class Layout:
    """How the features of one entity type map onto an :class:`EntityState`."""

    def __init__(self, entity: str, features: list[Feature]) -> None:
        self.entity = entity
        self.features = features
        numeric: dict[tuple, _Numeric] = {}
        distinct: dict[tuple, _Distinct] = {}
        last: dict[str, int] = {}
        series: dict[str, _Numeric] = {}  # feature name -> the tiles it reads
        # Fields first: a count then reads the tiles of any field with its source and window.
        for f in sorted(features, key=lambda f: f.agg == "count"):
            if f.agg == "distinct":
                key = (f.source, f.field)
                held = distinct.get(key)
                index = held.index if held else len(distinct)
                window = max(f.window_ms, held.window_ms if held else 0)
                distinct[key] = _Distinct(f.source, f.field, window, index)  # type: ignore[arg-type]
            elif f.agg == "since_last":
                last.setdefault(f.source, len(last))
            else:
                shared = [s for s in numeric.values() if (s.source, s.tile_ms) == (f.source, f.tile_ms)]
                key = (f.source, f.field, f.tile_ms)
                if f.agg == "count" and shared:
                    series[f.name] = shared[0]
                    continue
                base = len(numeric) * TILES * SLOT
                series[f.name] = numeric.setdefault(key, _Numeric(f.source, f.field, f.tile_ms, base))
        self._numeric = list(numeric.values())
        self._distinct = list(distinct.values())
        self._last = last
        # The event fields each source must provide, in order (what a repartitioned record carries).
        self.fields: dict[str, tuple[str, ...]] = {}
        for source in {f.source for f in features}:
            needed = [s.field for s in self._numeric if s.source == source and s.field]
            needed += [s.field for s in self._distinct if s.source == source]
            self.fields[source] = tuple(dict.fromkeys(needed))
        self._series = series
        self._series_aggs = {
            s.base: {f.agg for f in features if series.get(f.name) is s} for s in numeric.values()
        }
        self._plan = {source: self._plan_for(source) for source in self.fields}
        self._empty = array("d", [-1.0, 0.0, 0.0, _INF, -_INF]) * (len(self._numeric) * TILES)
        self._defaults = np.array([f.default for f in features], dtype=np.float64)
        self._no_last = [-1] * len(last)
        # The numeric reads (column, series position, default) grouped by aggregation: a read is then
        # a few numpy operations per kind, however many features (at a batch of one call, each
        # operation costs more than its data).
        position = {id(s): n for n, s in enumerate(self._numeric)}
        grouped: dict[str, list[tuple[int, int, float]]] = {}
        for column, f in enumerate(features):
            if f.name in series:
                grouped.setdefault(f.agg, []).append((column, position[id(series[f.name])], f.default))
        numeric_reads = []
        for agg, reads in grouped.items():
            columns, positions, defaults = zip(*reads, strict=True)
            numeric_reads.append(
                (agg, np.array(columns, np.intp), np.array(positions, np.intp), np.array(defaults))
            )
        # distinct counts, grouped by the values they read; since-last reads
        self._distinct_reads: dict[int, list[tuple[int, int]]] = {}
        self._distinct_index: dict[str, int] = {}
        self._since_last_reads: list[tuple[int, int, float, float]] = []
        for column, f in enumerate(features):
            if f.agg == "distinct":
                index = distinct[(f.source, f.field)].index
                self._distinct_reads.setdefault(index, []).append((column, f.tile_ms))
                self._distinct_index[f.name] = index
            elif f.agg == "since_last":
                self._since_last_reads.append((column, last[f.source], float(f.window_s), f.default))
        self._since_last_by_column = {read[0]: read for read in self._since_last_reads}
        # the series whose minima or maxima a feature reads (positions in self._numeric)
        min_series, max_series = (
            np.array([n for n, s in enumerate(self._numeric) if agg in self._series_aggs[s.base]], np.intp)
            for agg in ("min", "max")
        )
        counted = [(c, w, index) for index, reads in self._distinct_reads.items() for c, w in reads]
        self.read_plan = ReadPlan(
            np.array([s.tile_ms for s in self._numeric], dtype=np.int64),
            min_series,
            max_series,
            tuple(numeric_reads),
            _arrays(counted, (np.intp, np.int64, np.intp)),  # type: ignore[arg-type]
            _arrays(self._since_last_reads, (np.intp, np.intp, np.float64, np.float64)),  # type: ignore[arg-type]
        )

    # What bulk code (replay's columnar states) needs to know of the layout.
    @property
    def empty_tiles(self) -> array:
        """The tiles of an entity with no event."""
        return self._empty

    def numeric_series(self) -> list[tuple[str, str | None, int]]:
        """(source, field, tile_ms) of each numeric series, in the order of :meth:`window_stats`."""
        return [(s.source, s.field, s.tile_ms) for s in self._numeric]

    def distinct_series(self) -> list[tuple[str, str, int]]:
        """(source, field, index) of each set of distinct values."""
        return [(d.source, d.field, d.index) for d in self._distinct]

    def distinct_reads(self, index: int) -> list[tuple[int, int]]:
        """(column, tile_ms) of each distinct feature counting the values ``index``."""
        return self._distinct_reads.get(index, [])

    def since_last_reads(self) -> list[tuple[int, str, int]]:
        """(column, source, index into EntityState.last) of each since-last feature."""
        source = {index: s for s, index in self._last.items()}
        return [(column, source[index], index) for column, index, _, _ in self._since_last_reads]

    def last_sources(self) -> dict[str, int]:
        """Source -> index into EntityState.last, for the sources a since-last feature reads."""
        return dict(self._last)

    @classmethod
    def of(cls, feature_set: FeatureSet, entity: str) -> Layout:
        return cls(entity, [f for f in feature_set.features if f.entity == entity])

    def new(self) -> EntityState:
        return EntityState(array("d", self._empty), [{} for _ in self._distinct], [-1] * len(self._last), {})

    def _plan_for(self, source: str) -> tuple[list, list, int | None]:
        fields = self.fields[source]
        numeric = []
        for s in self._numeric:
            if s.source == source:
                aggs = self._series_aggs[s.base]
                fi = UPDATE_VALUES + fields.index(s.field) if s.field else None
                numeric.append((s.base, s.tile_ms, fi, "min" in aggs, "max" in aggs))
        distinct = [
            (s.index, UPDATE_VALUES + fields.index(s.field)) for s in self._distinct if s.source == source
        ]
        return numeric, distinct, self._last.get(source)

    # -- writing --------------------------------------------------------------------------

    def apply(self, state: EntityState, source: str, t: int, values: tuple, src: str, offset: int) -> bool:
        """Apply one event (``values`` in the order of ``self.fields[source]``); False if already applied."""
        return self.apply_update(state, source, [None, None, src, offset, t, *values])

    def apply_update(self, state: EntityState, source: str, update: list) -> bool:
        """:meth:`apply` for an update as the worker carries it (see ``UPDATE_VALUES``).

        The worker's hot path: the values are read in place, no per-event tuple is built.
        """
        src = update[2]
        offset = update[3]
        offsets = state.offsets
        if offset <= offsets.get(src, -1):
            return False
        offsets[src] = offset
        t = update[4]
        numeric, distinct, last = self._plan[source]
        tiles = state.tiles
        for base, tile_ms, fi, need_min, need_max in numeric:
            k = t // tile_ms
            i = base + (k % TILES) * SLOT
            v = update[fi] if fi is not None else 0.0
            held = tiles[i]
            if held == k:
                tiles[i + 1] += 1.0
                if fi is not None:
                    tiles[i + 2] += v
                    if need_min and v < tiles[i + 3]:
                        tiles[i + 3] = v
                    if need_max and v > tiles[i + 4]:
                        tiles[i + 4] = v
            elif k > held:  # the slot's tile is over: this event opens the slot's next tile
                tiles[i] = k
                tiles[i + 1] = 1.0
                tiles[i + 2] = v
                tiles[i + 3] = v
                tiles[i + 4] = v
            # else: a full window older than the slot's tile, outside every window
        for index, fi in distinct:
            value = update[fi]
            if value is not None:
                seen = state.distinct[index]
                held = seen.get(value)
                if held is None:
                    seen[_shared(value)] = t
                elif held < t:
                    seen[value] = t
        if last is not None and t > state.last[last]:
            state.last[last] = t
        return True

    def apply_columns(
        self,
        tiles: np.ndarray,
        rows: np.ndarray,
        source: str,
        t: np.ndarray,
        values: Mapping[str, np.ndarray],
    ) -> None:
        """The tiles part of :meth:`apply_update` for many events at once (bulk work: replay).

        ``tiles`` holds one entity per row (an :class:`EntityState`'s tiles); event ``i`` goes to
        row ``rows[i]`` at time ``t[i]`` with ``values[field][i]``. The order of the events does
        not matter: each slot ends holding its newest tile, with what that tile's events add up
        to. The minimum and maximum of a series that no feature reads are left unset.
        """
        flat = tiles.reshape(-1)  # a view: written in place
        width = tiles.shape[1]
        for s in self._numeric:
            if s.source != source or not len(t):
                continue
            k = t // s.tile_ms
            slot, inverse = np.unique(rows * width + s.base + (k % TILES) * SLOT, return_inverse=True)
            newest = np.full(len(slot), -_INF)
            # k as doubles, the slots' type: ufunc.at casting int64 to float64 takes numpy's slow
            # path (measured 730 µs against 23 µs for 13,000 events)
            np.maximum.at(newest, inverse, k.astype(np.float64))
            opened = newest > flat[slot]  # a newer tile than the slot's: it starts afresh
            fresh = slot[opened]
            flat[fresh] = newest[opened]
            flat[fresh + 1] = flat[fresh + 2] = 0.0
            flat[fresh + 3], flat[fresh + 4] = _INF, -_INF
            adds = k == flat[slot][inverse]  # events of older tiles are outside every window
            at = slot[inverse[adds]]
            v = values[s.field][adds] if s.field else None
            np.add.at(flat, at + 1, 1.0)
            if v is not None:
                np.add.at(flat, at + 2, v)
                aggs = self._series_aggs[s.base]
                if "min" in aggs:
                    np.minimum.at(flat, at + 3, v)
                if "max" in aggs:
                    np.maximum.at(flat, at + 4, v)

    # -- reading --------------------------------------------------------------------------

    def read(self, state: EntityState | None, t: int) -> list[float]:
        """The entity's feature values as of ``t`` (ms), in the order of ``self.features``."""
        return self.read_many([state], [t])[0]

    def read_many(self, states: Sequence[EntityState | None], times: Sequence[int]) -> list[list[float]]:
        """:meth:`read` for many entities at once: the one implementation of every stored feature."""
        return self.read_array(states, times).tolist()

    def read_array(self, states: Sequence[EntityState | None], times: Sequence[int]) -> np.ndarray:
        """:meth:`read_many` as a float64 array (rows: states, columns: ``self.features``)."""
        return self.read_columns(self.state_columns(states), np.asarray(times, dtype=np.int64))

    def state_columns(self, states: Sequence[EntityState | None]) -> StateColumns:
        """``states`` (None: no state) side by side, for :meth:`read_columns`."""
        return StateColumns(
            np.array([s is not None for s in states], dtype=bool),
            np.frombuffer(
                b"".join([self._empty if s is None else s.tiles for s in states]), dtype=np.float64
            ).reshape(len(states), len(self._empty)),
            [[_NOTHING_SEEN if s is None else s.distinct[d.index] for s in states] for d in self._distinct],
            np.array([self._no_last if s is None else s.last for s in states], dtype=np.int64).reshape(
                len(states), len(self._last)
            ),
        )

    def empty_columns(self, reads: int) -> StateColumns:
        """No state for any of ``reads`` reads."""
        return StateColumns(
            np.zeros(reads, dtype=bool),
            np.frombuffer(self._empty, dtype=np.float64)[None, :].repeat(reads, axis=0),
            [[_NOTHING_SEEN] * reads for _ in self._distinct],
            np.full((reads, len(self._last)), -1, dtype=np.int64),
        )

    def read_columns(self, states: StateColumns, times: np.ndarray) -> np.ndarray:
        """The features of each read as of ``times[read]`` (int64 ms), from the states it reads.

        Every feature is a few numpy operations over the whole batch, not a Python loop per tile
        or per distinct value: measured ~6 µs a 3-entity vector at a batch of 4,096 (replay),
        against ~125 µs with the tiles summed per state and distinct values counted in Python.
        """
        # ndarray.repeat, not np.tile: the wrapper costs ~5 µs, a batch of one call pays it in full
        out = self._defaults[None, :].repeat(len(times), axis=0)
        self.read_plan.read(states.tiles, states.distinct, states.last, times, out)
        if not states.present.all():
            out[~states.present] = self._defaults
        return out

    @property
    def defaults(self) -> np.ndarray:
        """Each feature's value for an entity with no state."""
        return self._defaults

    # The parts of :meth:`read_columns`, also called by replay over its columnar states, so that
    # each feature's value is computed by this code only.

    def window_stats(self, tiles: np.ndarray, t: np.ndarray) -> WindowStats:
        """Count, sum, min and max of each numeric series over the window ending at ``t`` (see
        :meth:`ReadPlan.window_stats`; ``tiles``: ``len(self.empty_tiles)`` doubles a row)."""
        return self.read_plan.window_stats(tiles, t)

    def fill_numeric(self, out: np.ndarray, stats: WindowStats) -> None:
        """The count, sum, mean, min and max features from :meth:`window_stats`, into ``out``."""
        self.read_plan.fill_numeric(out, stats)

    def since_last(self, column: int, last: np.ndarray, t: np.ndarray) -> np.ndarray:
        """The since-last feature of ``column`` from each row's latest event time (-1: none)."""
        _, _, cap, default = self._since_last_by_column[column]
        return since_last(last, t, cap, default)

    def last_seen(self, states: StateColumns, feature: Feature, values: Sequence[str | None]) -> np.ndarray:
        """When each read's entity last saw ``values[read]`` of the distinct ``feature``'s field
        (int64; ``NEVER``: not seen, or no state, or no value)."""
        maps = states.distinct[self.distinct_index(feature)]
        return np.array(
            [NEVER if v is None else m.get(v, NEVER) for m, v in zip(maps, values, strict=True)],
            dtype=np.int64,
        )

    def distinct_index(self, feature: Feature) -> int:
        """Where the values of the distinct ``feature`` are kept (``EntityState.distinct[index]``)."""
        index = self._distinct_index.get(feature.name)
        if index is None:
            raise KeyError(f"{feature.name} is not a distinct feature of {self.entity}")
        return index

    # -- storing --------------------------------------------------------------------------

    def encode(self, state: EntityState) -> bytes:
        """The stored blob (distinct values out of every window pruned now and then)."""
        return self.encode_many([state])[0]

    def encode_many(self, states: list[EntityState]) -> list[bytes]:
        """The blobs of ``states``, as :meth:`encode` would make them one by one.

        A numpy call costs ~1.7 µs here: finding the used slots of each state separately cost
        ~20 µs a state; over the whole batch at once, the per-state work is two slices and a pack.
        """
        if not states:
            return []
        for state in states:
            self._prune(state)
        # Most slots of most entities are empty: only the used ones are stored.
        n_slots = len(self._empty) // SLOT
        slots = np.frombuffer(b"".join([s.tiles for s in states]), dtype=np.float64)
        slots = slots.reshape(len(states), n_slots, SLOT)
        used = slots[:, :, 0] >= 0.0
        indices = np.nonzero(used)[1].astype(np.uint16).tobytes()  # row-major: state by state
        values = slots[used].tobytes()
        ends = np.cumsum(used.sum(axis=1)).tolist()
        pack = msgpack.Packer(use_bin_type=True).pack  # reused: faster than packb; one a call: thread-safe
        width = SLOT * 8
        blobs = []
        start = 0
        for state, end in zip(states, ends, strict=True):
            blobs.append(
                pack(
                    [
                        STATE_FORMAT,
                        indices[start * 2 : end * 2],
                        values[start * width : end * width],
                        [_stored_form(values) for values in state.distinct],
                        state.last,
                        state.offsets,
                    ]
                )
            )
            start = end
        return blobs

    def _prune(self, state: EntityState) -> None:
        """Drop distinct values out of every window, once there are some (stale values cost only bytes).

        They are dropped an eighth of the window late: a busy entity's set is rebuilt about eight
        times a window, not at every write (it was a fifth of the worker's time at 5,000 events/s).
        Large sets are kept as :class:`WritableValues` from then on.
        """
        for d in self._distinct:
            seen = state.distinct[d.index]
            if len(seen) <= _PRUNE_ABOVE:
                continue
            late = d.window_ms + d.window_ms // 8
            if type(seen) is WritableValues:
                newest = seen.newest
                recent = seen.oldest_bound() > newest - late or seen.oldest() > newest - late
            else:
                times = seen.values()
                newest = max(times)
                recent = min(times) > newest - late
            if not recent or len(seen) > _TRIM_ABOVE:
                oldest = newest - d.window_ms  # older is outside every window of the field
                seen = {v: ts for v, ts in seen.items() if ts > oldest}
                if len(seen) > DISTINCT_CAP:
                    seen = dict(sorted(seen.items(), key=lambda kv: kv[1])[-DISTINCT_CAP:])
            if len(seen) > _PACK_ABOVE and type(seen) is not WritableValues:
                seen = WritableValues(seen)
            state.distinct[d.index] = seen

    def decode(self, blob: bytes, writable: bool = False) -> EntityState:
        return self.decode_many([blob], writable)[0]

    def decode_many(self, blobs: Sequence[bytes], writable: bool = False) -> list[EntityState]:
        """The states of stored ``blobs``, as :meth:`encode_many` made them.

        Large sets of distinct values come as :class:`StoredValues`, to read; ``writable``: as
        :class:`WritableValues`, to change (small ones are dicts either way).
        """
        fields = _unpacked(blobs)
        if not fields:
            return []
        data = self._slots(fields).tobytes()
        size = len(self._empty) * 8
        states = []
        for i, f in enumerate(fields):
            distinct = [StoredValues(*d) if type(d) is list else d for d in f[3]]
            if writable:
                distinct = [WritableValues(d) if type(d) is StoredValues else d for d in distinct]
            states.append(EntityState(array("d", data[i * size : (i + 1) * size]), distinct, f[4], f[5]))
        return states

    def decode_columns(self, blobs: Sequence[bytes], which: Sequence[int]) -> StateColumns:
        """The states read by a batch, to read: read ``r`` reads ``blobs[which[r]]`` (-1: none).

        A blob many reads share (a busy merchant) is decoded once. Nothing is built per state
        but its sets of distinct values.
        """
        fields = _unpacked(blobs)
        # one empty state after the blobs' states: the one a read of none (-1) finds
        tiles = self._slots(fields, spare=1).reshape(len(fields) + 1, len(self._empty))
        last = np.array([f[4] for f in fields] + [self._no_last], dtype=np.int64)
        distinct = [[f[3][d.index] for f in fields] + [_NOTHING_SEEN] for d in self._distinct]
        for sets in distinct:
            for i, d in enumerate(sets):
                if type(d) is list:
                    sets[i] = StoredValues(*d)
        which = list(which)
        if which == list(range(len(fields))):  # each blob read once, in order: no copy
            return StateColumns(
                np.ones(len(which), dtype=bool), tiles[:-1], [d[:-1] for d in distinct], last[:-1]
            )
        return StateColumns(
            np.array(which) >= 0, tiles[which], [[d[i] for i in which] for d in distinct], last[which]
        )

    def _slots(self, fields: list[list], spare: int = 0) -> np.ndarray:
        """The tiles of unpacked blobs, (blobs × slots, SLOT), then ``spare`` empty states' tiles:
        the used slots of all put in place by one numpy assignment (numpy calls per blob cost
        ~15 µs; this, one copy)."""
        n_slots = len(self._empty) // SLOT
        empty = np.frombuffer(self._empty, dtype=np.float64)[None, :]
        slots = empty.repeat(len(fields) + spare, axis=0).reshape(-1, SLOT)
        used = np.frombuffer(b"".join([f[1] for f in fields]), dtype=np.uint16).astype(np.intp)
        counts = [len(f[1]) // 2 for f in fields]
        used += (np.arange(len(fields), dtype=np.intp) * n_slots).repeat(counts)
        slots[used] = np.frombuffer(b"".join([f[2] for f in fields]), dtype=np.float64).reshape(-1, SLOT)
        return slots


def _unpacked(blobs: Sequence[bytes]) -> list[list]:
    """The fields of stored blobs (see :meth:`Layout.encode_many`), their format checked."""
    unpack = msgpack.unpackb
    fields = [unpack(blob, raw=False, strict_map_key=False) for blob in blobs]
    for f in fields:
        if f[0] != STATE_FORMAT:
            raise ValueError(f"state format {f[0]} is not {STATE_FORMAT}: rebuild the store with a replay")
    return fields


def saturated(counts: np.ndarray) -> np.ndarray:
    """Distinct counts as every path reports them: at most ``DISTINCT_CAP``.

    A stored set keeps its newest ``DISTINCT_CAP`` values, so the store can count no further;
    replay, which keeps every value, and a state not stored yet say the same.
    """
    return np.minimum(counts, DISTINCT_CAP)


def window_bounds(t: Any, tile_ms: int) -> tuple[Any, Any]:
    """[start, end) in ms of the window of ``TILES`` tiles of ``tile_ms`` ending at ``t``: the
    tiles up to the one holding ``t``. Scalars or numpy arrays: the one statement of the window
    rule for distinct values.

    >>> window_bounds(1_000_250, 100)
    (999100, 1000300)
    """
    k = t // tile_ms
    return (k - TILES + 1) * tile_ms, (k + 1) * tile_ms


def in_window(times: Any, t: Any, tile_ms: int) -> Any:
    """Whether events at ``times`` are inside the window of ``TILES`` tiles of ``tile_ms`` ending at ``t``."""
    start, end = window_bounds(t, tile_ms)
    return (times >= start) & (times < end)


_SHARED: dict[str, str] = {}
_SHARED_LIMIT = 1_000_000


def _shared(value: str) -> str:
    """One string object per distinct value, whichever event brought it.

    A merchant seen by a thousand cards is then one object in their thousand sets, not a thousand
    copies spread over the heap: writing a batch of states reads every key of their sets, and
    those reads were cache misses, ~60 % of the cost of packing a card's sets.
    """
    held = _SHARED.get(value)
    if held is None:
        if len(_SHARED) >= _SHARED_LIMIT:
            _SHARED.clear()
        held = _SHARED[value] = value
    return held


def copy_state(state: EntityState) -> EntityState:
    """A copy to read later, whatever happens to ``state`` meanwhile (applied offsets not kept)."""
    return EntityState(state.tiles[:], [d.copy() for d in state.distinct], state.last[:], {})


def layouts(feature_set: FeatureSet) -> dict[str, Layout]:
    return {entity: Layout.of(feature_set, entity) for entity in feature_set.entities()}


def field_getter(fields: tuple[str, ...]) -> Callable[[Any], tuple]:
    """The values a layout needs from an event (``Layout.fields[source]``), as a tuple in that order."""
    if not fields:
        return lambda _event: ()
    if fields == ("is_fraud",):
        return lambda label: (1.0 if label.is_fraud else 0.0,)  # type: ignore[union-attr]
    get = attrgetter(*fields)
    if len(fields) == 1:
        return lambda event: (get(event),)
    return get  # type: ignore[return-value]
