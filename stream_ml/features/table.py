"""Many entities' states of one type as columns: the form bulk work (replay) keeps them in.

One row per entity: its tiles in one 2-D array (each row laid out as :attr:`EntityState.tiles`),
its latest event times in arrays, and the distinct values of each counted field as sorted
(row, value) pairs with the time each was last seen. Events are applied many at once
(:meth:`Layout.apply_columns` for the tiles); :meth:`states` gives the :class:`EntityState`
objects the stream worker stores, so a replay can be written to Redis.

>>> from stream_ml.features.definitions import Feature, FeatureSet
>>> fs = FeatureSet("doc", (Feature("n_1h", "card", "count", 3600),))
>>> table = StateTable(Layout.of(fs, "card"))
>>> rows = table.rows_of(["c1", "c2", "c1"])
>>> rows.tolist()
[0, 1, 0]
>>> table.apply(rows, "transactions", np.array([1_000, 2_000, 3_000]), {})
>>> table.layout.read(table.states()["c1"], 3_000)
[2.0]
"""

from __future__ import annotations

import itertools
from array import array
from collections.abc import Mapping, Sequence

import numpy as np

from stream_ml.features.definitions import ENTITIES
from stream_ml.features.state import NEVER, EntityState, Layout, in_window, window_bounds

_VALUE_BITS = 31  # a (row, value) pair is one int64: row << 31 | value code
_SMALL_SET = 32  # values; a larger set is counted by binary searches (DistinctValues.counts)


def pair_key(rows: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """One sortable int64 per (row, value code) pair: by row, then by value."""
    return (rows << _VALUE_BITS) | codes


class Codes:
    """Values to small integers, in the order first seen (-1 for None)."""

    def __init__(self) -> None:
        self.code: dict[str, int] = {}
        self.values: list[str] = []

    def known(self, values: Sequence[str | None]) -> np.ndarray:
        """The code of each value, -1 for a value never given one."""
        return np.fromiter(
            map(self.code.get, values, itertools.repeat(-1)), dtype=np.int64, count=len(values)
        )

    def of(self, values: Sequence[str | None]) -> np.ndarray:
        """The code of each value; a new value gets the next one."""
        out = self.known(values)
        unknown = np.flatnonzero(out < 0)
        if len(unknown):
            code = self.code
            for i in unknown.tolist():
                value = values[i]
                if value is not None:
                    if value not in code:
                        code[value] = len(self.values)
                        self.values.append(value)
                    out[i] = code[value]
        return out


class DistinctValues:
    """One counted field of many entities: (row, value) pairs, sorted, each with its last time seen."""

    def __init__(self, codes: Codes | None = None) -> None:
        self.codes = codes if codes is not None else Codes()
        self.keys = np.empty(0, dtype=np.int64)
        self.times = np.empty(0, dtype=np.int64)

    def lookup(self, rows: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """When each row last saw each value (``NEVER``: not, or the code is -1)."""
        key = pair_key(rows, np.maximum(codes, 0))
        at = np.minimum(np.searchsorted(self.keys, key), max(len(self.keys) - 1, 0))
        out = np.full(len(rows), NEVER, dtype=np.int64)
        if len(self.keys):
            hit = (self.keys[at] == key) & (codes >= 0)
            out[hit] = self.times[at[hit]]
        return out

    def counts(self, rows: np.ndarray, t: np.ndarray, tiles_ms: Sequence[int]) -> np.ndarray:
        """``counts[i, k]``: how many values ``rows[i]`` last saw inside the window of ``TILES``
        tiles of ``tiles_ms[k]`` ending at ``t[i]``.

        A read of a small set compares each of its values. The values of a large set (a shop's
        terminal sees thousands of cards a day) are put in time order once, and each read of it
        is two binary searches: comparing them all at every read made such a replay 2.5x slower.
        """
        out = np.zeros((len(rows), len(tiles_ms)), dtype=np.int64)
        start = np.searchsorted(self.keys, pair_key(rows, 0))
        lengths = np.searchsorted(self.keys, pair_key(rows + 1, 0)) - start
        small = lengths <= _SMALL_SET
        reader = np.flatnonzero(small & (lengths > 0))
        if len(reader):
            owner, times = self._values_of(reader, start[reader], lengths[reader])
            for k, tile_ms in enumerate(tiles_ms):
                inside = in_window(times, t[owner], tile_ms)
                out[:, k] = np.bincount(owner[inside], minlength=len(rows))
        reader = np.flatnonzero(~small)
        if len(reader):
            _, one, which = np.unique(rows[reader], return_index=True, return_inverse=True)
            segment, times = self._values_of(np.arange(len(one)), start[reader[one]], lengths[reader[one]])
            clock = np.unique(times)  # times by rank: (segment, time) is one int64 whatever the span
            width = len(clock) + 1
            key = np.sort(segment * width + np.searchsorted(clock, times))
            base = which * width
            for k, tile_ms in enumerate(tiles_ms):
                lo, hi = window_bounds(t[reader], tile_ms)
                out[reader, k] = np.searchsorted(key, base + np.searchsorted(clock, hi)) - np.searchsorted(
                    key, base + np.searchsorted(clock, lo)
                )
        return out

    def _values_of(
        self, owners: np.ndarray, start: np.ndarray, lengths: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The pairs ``[start[i], start[i] + lengths[i])`` flattened: (their ``owners[i]``, times)."""
        owner = np.repeat(owners, lengths)
        offset = np.repeat(np.cumsum(lengths) - lengths, lengths)
        return owner, self.times[np.repeat(start, lengths) + np.arange(len(owner)) - offset]

    def update(self, rows: np.ndarray, codes: np.ndarray, times: np.ndarray) -> None:
        """Events seeing ``codes`` (-1: no value) at ``times``: each pair keeps its latest time."""
        seen = codes >= 0
        key = pair_key(rows[seen], codes[seen])
        # one stable pass by pair, then each pair's latest time: the events come in (row, time)
        # order from replay, nearly sorted pairs, where a lexsort by (pair, time) took two passes
        order = np.argsort(key, kind="stable")
        key, t = key[order], times[seen][order]
        first = np.ones(len(key), dtype=bool)
        first[1:] = key[1:] != key[:-1]
        starts = np.flatnonzero(first)
        key = key[starts]
        t = np.maximum.reduceat(t, starts) if len(starts) else t
        at = np.searchsorted(self.keys, key)
        held = at < len(self.keys)
        held[held] = self.keys[at[held]] == key[held]
        self.times[at[held]] = np.maximum(self.times[at[held]], t[held])
        self.keys = np.insert(self.keys, at[~held], key[~held])
        self.times = np.insert(self.times, at[~held], t[~held])

    def forget(self, t: int, tiles_ms: Sequence[int]) -> None:
        """Drop the pairs out of every window (of ``tiles_ms``) of every read at ``t`` or later.

        Reads only count values inside their window, so these can never count again; kept, they
        made every read of their rows slower as the log grew (a shop's terminal sees thousands
        of cards a day).
        """
        if not len(self.times) or not tiles_ms:
            return
        keep = np.zeros(len(self.times), dtype=bool)
        for tile_ms in set(tiles_ms):
            keep |= in_window(self.times, t, tile_ms)
        if not keep.all():
            self.keys, self.times = self.keys[keep], self.times[keep]

    def maps(self, n_rows: int) -> list[dict[str, int]]:
        """Each row's values with their times, as an :class:`EntityState` holds them."""
        out: list[dict[str, int]] = [{} for _ in range(n_rows)]
        values = self.codes.values
        mask = (1 << _VALUE_BITS) - 1
        for key, t in zip(self.keys.tolist(), self.times.tolist(), strict=True):
            out[key >> _VALUE_BITS][values[key & mask]] = t
        return out


class StateTable:
    """The states of the entities of one layout, a row each, grown as ids are first seen.

    ``vocabulary`` (field -> :class:`Codes`) lets tables share their codes: the row of merchant
    ``m`` is then also its code among the merchants a card counts, so a batch of events looks
    each value up once for every table (looking values up was a fifth of replay's compute).
    """

    def __init__(
        self, layout: Layout, track_offsets: bool = False, vocabulary: Mapping[str, Codes] | None = None
    ) -> None:
        self.layout = layout
        vocabulary = vocabulary or {}
        ids = vocabulary.get(ENTITIES[layout.entity])
        self.ids = ids if ids is not None else Codes()  # entity id -> row
        self._empty = np.frombuffer(layout.empty_tiles, dtype=np.float64)
        self._last_index = layout.last_sources()
        self.tiles = np.empty((0, len(self._empty)))
        self.last = np.empty((0, len(self._last_index)), dtype=np.int64)  # per source, -1: none
        self.latest = np.empty(0, dtype=np.int64)  # the latest event of any source, -1: none
        # per distinct index (the layout's), with the source and field it counts
        self.distinct = {
            index: DistinctValues(vocabulary.get(field)) for _, field, index in layout.distinct_series()
        }
        self.counted = {index: (source, field) for source, field, index in layout.distinct_series()}
        # per row: source partition -> the last offset applied (kept for a backfill only)
        self.offsets: list[dict[str, int]] | None = [] if track_offsets else None

    def __len__(self) -> int:
        return len(self.ids.values)

    def rows_of(self, ids: Sequence[str | None]) -> np.ndarray:
        """The row of each id (-1 for None), new ids getting a row with an empty state."""
        rows = self.ids.of(ids)
        self.fit()
        return rows

    def fit(self) -> None:
        """Rows for every id given a code (by this table or another sharing its codes)."""
        if len(self) > len(self.tiles):  # doubling: rows are added a chunk at a time, copied rarely
            capacity = max(len(self), 2 * len(self.tiles), 1024)
            tiles = np.empty((capacity, len(self._empty)))
            tiles[: len(self.tiles)] = self.tiles
            tiles[len(self.tiles) :] = self._empty
            self.tiles = tiles
            last = np.full((capacity, self.last.shape[1]), -1, dtype=np.int64)
            last[: len(self.last)] = self.last
            self.last = last
            latest = np.full(capacity, -1, dtype=np.int64)
            latest[: len(self.latest)] = self.latest
            self.latest = latest
        if self.offsets is not None:
            self.offsets += [{} for _ in range(len(self) - len(self.offsets))]

    def apply(
        self,
        rows: np.ndarray,
        source: str,
        t: np.ndarray,
        values: Mapping[str, np.ndarray],
        partitions: Sequence[str] | None = None,
        offsets: Sequence[int] | None = None,
    ) -> None:
        """Apply events of ``source`` (any order): event ``i`` to ``rows[i]`` at ``t[i]``.

        ``values[field]`` holds the fields the layout reads: numbers, and for counted fields
        their codes (:attr:`DistinctValues.codes`). ``partitions`` and ``offsets`` say where
        each event was read, kept when the table tracks offsets.
        """
        if not len(rows):
            return
        self.layout.apply_columns(self.tiles[: len(self)], rows, source, t, values)
        for index, (counted_source, field) in self.counted.items():
            if counted_source == source:
                self.distinct[index].update(rows, values[field], t)
        if source in self._last_index:
            np.maximum.at(self.last[:, self._last_index[source]], rows, t)
        np.maximum.at(self.latest, rows, t)
        if self.offsets is not None and partitions is not None and offsets is not None:
            held = self.offsets
            for r, src_partition, offset in zip(rows.tolist(), partitions, offsets, strict=True):
                if offset > held[r].get(src_partition, -1):
                    held[r][src_partition] = offset

    def forget_before(self, t: int) -> None:
        """Forget the distinct values no read at ``t`` or later can count (:meth:`DistinctValues.forget`)."""
        for index, distinct in self.distinct.items():
            distinct.forget(t, [tile_ms for _, tile_ms in self.layout.distinct_reads(index)])

    def states(self) -> dict[str, EntityState]:
        """Each entity's :class:`EntityState`, as the stream worker would store it."""
        maps = {index: d.maps(len(self)) for index, d in self.distinct.items()}
        return {
            entity_id: EntityState(
                array("d", self.tiles[row].tobytes()),
                [maps[index][row] for index in sorted(maps)],
                self.last[row].tolist(),
                dict(self.offsets[row]) if self.offsets is not None else {},
            )
            for row, entity_id in enumerate(self.ids.values)
        }
