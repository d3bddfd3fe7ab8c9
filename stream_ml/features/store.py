"""The online store in Redis: one blob per entity, read and written one round trip per batch.

Keys are ``{namespace}:{feature set version}.s{state format}:{<entity>:<id>}``: the braces are a Redis Cluster
hash tag, so each entity lives in one slot and the keys of a batch spread over the cluster. Keys
expire after the longest window plus the allowed lateness, so the store does not grow without
bound. The event index (``{namespace}:ev:{<event id>}``) lets a label find its transaction's
card, merchant and device; it expires after the label horizon.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

import hiredis
import msgpack
import redis
import redis.asyncio as aioredis

from stream_ml.features.definitions import FeatureSet
from stream_ml.features.state import STATE_FORMAT, EntityState, Layout, layouts

EntityKey = tuple[str, str]  # (entity type, id)
# KEYS: states, then event index entries, then plain keys; ARGV: their counts, TTLs, then values.
_SAVE_SCRIPT = """
local n_states, n_events = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 1, #KEYS do
  if i <= n_states then
    redis.call('SET', KEYS[i], ARGV[i + 4], 'PX', ARGV[3])
  elseif i <= n_states + n_events then
    redis.call('SET', KEYS[i], ARGV[i + 4], 'PX', ARGV[4])
  else
    redis.call('SET', KEYS[i], ARGV[i + 4])
  end
end
return #KEYS
"""
_SAVE_SHA = hashlib.sha1(_SAVE_SCRIPT.encode()).hexdigest()
NAMESPACE = "sm"
LABEL_HORIZON_S = 30 * 86400


class FeatureStore:
    def __init__(
        self,
        client: aioredis.Redis,
        feature_set: FeatureSet,
        label_horizon_s: int = LABEL_HORIZON_S,
        namespace: str = NAMESPACE,
    ) -> None:
        self.client = client
        self.feature_set = feature_set
        self.layouts: dict[str, Layout] = layouts(feature_set)
        # A new state format starts a new key space; the old one expires with its TTL.
        self._prefix = f"{namespace}:{feature_set.version}.s{STATE_FORMAT}:"
        self._event_prefix = f"{namespace}:ev:"
        self.ttl_ms = feature_set.longest_window_ms() + feature_set.allowed_lateness_s * 1000
        self.label_horizon_ms = label_horizon_s * 1000

    def key(self, entity: str, entity_id: str) -> str:
        return f"{self._prefix}{{{entity}:{entity_id}}}"

    async def load(
        self, keys: Iterable[EntityKey], writable: bool = False
    ) -> dict[EntityKey, EntityState | None]:
        """The states of ``keys`` in one MGET (None where an entity has none yet).

        ``writable``: states to change (see ``Layout.decode_many``); otherwise to read.
        """
        ids: dict[str, list[str]] = {}
        for entity, entity_id in keys:
            ids.setdefault(entity, []).append(entity_id)
        columns = await self.load_columns(ids, writable)
        return {(e, i): s for e, column in ids.items() for i, s in zip(column, columns[e], strict=True)}

    async def load_columns(
        self, ids: Mapping[str, Sequence[str | None]], writable: bool = False
    ) -> dict[str, list[EntityState | None]]:
        """Per entity type, the state of each of ``ids[entity]``, in order: one MGET for all.

        None where an id is None or its entity has no state yet. An id listed many times (a busy
        merchant in a batch) is fetched and decoded once.
        """
        wanted = {e: list(dict.fromkeys(i for i in column if i is not None)) for e, column in ids.items()}
        keys = [self.key(entity, i) for entity, unique in wanted.items() for i in unique]
        blobs: list = await self._call("MGET", *keys) if keys else []  # type: ignore[assignment]
        columns: dict[str, list[EntityState | None]] = {}
        at = 0
        for entity, unique in wanted.items():
            mine = blobs[at : at + len(unique)]
            at += len(unique)
            found = [(i, b) for i, b in zip(unique, mine, strict=True) if b is not None]
            decoded = self.layouts[entity].decode_many([b for _, b in found], writable)
            by_id = dict(zip([i for i, _ in found], decoded, strict=True))
            columns[entity] = [by_id.get(i) for i in ids[entity]]  # type: ignore[arg-type]
        return columns

    def prepare(
        self,
        states: Mapping[str, Mapping[str, EntityState]],
        events: Mapping[str, tuple[str, str, str | None]] | None = None,
        plain: Mapping[str, bytes | str | int] | None = None,
    ) -> tuple | None:
        """Encode a write now (a snapshot: the states may change after), for :meth:`write` later."""
        events = events or {}
        plain = plain or {}
        keys: list[str] = []
        values: list[bytes | str | int] = []
        for entity, by_id in states.items():
            prefix = f"{self._prefix}{{{entity}:"
            keys += [prefix + i + "}" for i in by_id]
            values += self.layouts[entity].encode_many(list(by_id.values()))
        n_states = len(keys)
        event_prefix = self._event_prefix + "{"
        keys += [event_prefix + e + "}" for e in events]
        keys += list(plain)
        if not keys:
            return None
        pack = msgpack.Packer().pack  # reused for the batch: cheaper than packb per entry
        values += [pack(entities) for entities in events.values()]
        values += list(plain.values())
        return (len(keys), *keys, n_states, len(events), self.ttl_ms, self.label_horizon_ms, *values)

    async def write(self, prepared: tuple | None) -> None:
        """Send a write made by :meth:`prepare`: one round trip, one server-side script.

        The script sets every key with its TTL: a pipeline of SET commands costs redis-py ~50 µs a
        command, this costs a few µs a key. (On Redis Cluster the keys of a script must share a
        slot: a cluster client must group them by slot first.)
        """
        if prepared is None:
            return
        try:
            await self._call("EVALSHA", _SAVE_SHA, *prepared)
        except redis.exceptions.NoScriptError:
            await self._call("EVAL", _SAVE_SCRIPT, *prepared)

    async def lookup_events(self, event_ids: list[str]) -> dict[str, tuple[str, str, str | None]]:
        """The (card, merchant, device) of each known event id."""
        if not event_ids:
            return {}
        blobs = await self._call("MGET", *[self._event_prefix + "{" + e + "}" for e in event_ids])
        return {e: tuple(msgpack.unpackb(b)) for e, b in zip(event_ids, blobs, strict=True) if b is not None}

    async def _call(self, *args: str | bytes | int) -> object:
        """One command, packed by hiredis: redis-py's own packing costs ~2 µs per argument."""
        pool = self.client.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(hiredis.pack_command(args))
            return await conn.read_response()
        finally:
            await pool.release(conn)

    async def entity_states(self, ids: Mapping[str, str | None]) -> dict[str, EntityState | None]:
        """States by entity type for one request (``ids``: entity type -> id)."""
        wanted = [(e, i) for e, i in ids.items() if i is not None and e in self.layouts]
        loaded = await self.load(wanted)
        return {e: loaded.get((e, i)) if i is not None else None for e, i in ids.items()}
