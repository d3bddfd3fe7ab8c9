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
from typing import Any, NamedTuple

import hiredis
import msgpack
import redis
import redis.asyncio as aioredis

from stream_ml.features.definitions import FeatureSet
from stream_ml.features.state import STATE_FORMAT, EntityState, Layout, StateColumns, layouts
from stream_ml.features.wire import Wire, raise_errors

EntityKey = tuple[str, str]  # (entity type, id)
SCRIPT_KEYS = 500  # keys set by one script: ~2 ms of Redis, which serves no other client meanwhile


class PreparedWrite(NamedTuple):
    """What :meth:`FeatureStore.write` sends: states' keys first, then event index entries, then
    plain keys, with their values in the same order."""

    keys: list[str]
    values: list[bytes | str | int]
    n_states: int
    n_events: int


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
        self._wire_made: Wire | bool | None = False  # made at the first command (False: not yet)

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
        found = await self._fetch(ids)
        loaded: dict[EntityKey, EntityState | None] = {}
        for entity, by_id in found.items():
            decoded = self.layouts[entity].decode_many([b for b in by_id.values() if b is not None], writable)
            states = iter(decoded)
            loaded.update(((entity, i), None if b is None else next(states)) for i, b in by_id.items())
        return loaded

    async def load_columns(self, ids: Mapping[str, Sequence[str | None]]) -> dict[str, StateColumns]:
        """Per entity type, the states that ``ids[entity]`` reads, to read: one MGET for all.

        No state where an id is None or its entity has none yet. An id listed many times (a busy
        merchant in a batch) is fetched and decoded once.
        """
        columns: dict[str, StateColumns] = {}
        for entity, by_id in (await self._fetch(ids)).items():
            held = {i: n for n, i in enumerate(i for i, b in by_id.items() if b is not None)}
            which = [held.get(i, -1) if i is not None else -1 for i in ids[entity]]  # type: ignore[arg-type]
            blobs = [b for b in by_id.values() if b is not None]
            columns[entity] = self.layouts[entity].decode_columns(blobs, which)
        return columns

    async def _fetch(self, ids: Mapping[str, Sequence[str | None]]) -> dict[str, dict[str, bytes | None]]:
        """Per entity type, each distinct id of ``ids[entity]`` and its blob (None: no state)."""
        wanted = {e: list(dict.fromkeys(i for i in column if i is not None)) for e, column in ids.items()}
        keys = [self.key(entity, i) for entity, unique in wanted.items() for i in unique]
        blobs: list = await self._call("MGET", *keys) if keys else []  # type: ignore[assignment]
        found: dict[str, dict[str, bytes | None]] = {}
        at = 0
        for entity, unique in wanted.items():
            found[entity] = dict(zip(unique, blobs[at : at + len(unique)], strict=True))
            at += len(unique)
        return found

    def prepare(
        self,
        states: Mapping[str, Mapping[str, EntityState]],
        events: Mapping[str, tuple[str, str, str | None]] | None = None,
        plain: Mapping[str, bytes | str | int] | None = None,
    ) -> PreparedWrite | None:
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
        return PreparedWrite(keys, values, n_states, len(events))

    async def write(self, prepared: PreparedWrite | None) -> None:
        """Send a write made by :meth:`prepare`: one round trip, server-side scripts.

        A script sets its keys with their TTLs: a pipeline of SET commands costs redis-py ~50 µs a
        command, this costs a few µs a key. Each script sets at most ``SCRIPT_KEYS`` keys, so
        Redis serves its other clients (the scorer) between them: one script for a batch of
        5,000 events held them up to 60–90 ms. Each state carries its applied offsets, so a write
        cut between two scripts is made whole by the replay that follows. (On Redis Cluster the
        keys of a script must share a slot: a cluster client must group them by slot first.)
        """
        if prepared is None:
            return
        keys, values, n_states, n_events = prepared
        calls = []
        for start in range(0, len(keys), SCRIPT_KEYS):
            end = min(start + SCRIPT_KEYS, len(keys))
            states = max(0, min(end, n_states) - start)
            events = max(0, min(end, n_states + n_events) - max(start, n_states))
            head = (end - start, *keys[start:end], states, events, self.ttl_ms, self.label_horizon_ms)
            calls.append((*head, *values[start:end]))
        try:
            await self._pipeline([("EVALSHA", _SAVE_SHA, *call) for call in calls])
        except redis.exceptions.NoScriptError:  # a new or restarted Redis: the same again is harmless
            await self._call("SCRIPT", "LOAD", _SAVE_SCRIPT)
            await self._pipeline([("EVALSHA", _SAVE_SHA, *call) for call in calls])

    async def lookup_events(self, event_ids: list[str]) -> dict[str, tuple[str, str, str | None]]:
        """The (card, merchant, device) of each known event id."""
        if not event_ids:
            return {}
        blobs = await self._call("MGET", *[self._event_prefix + "{" + e + "}" for e in event_ids])
        return {e: tuple(msgpack.unpackb(b)) for e, b in zip(event_ids, blobs, strict=True) if b is not None}

    async def _pipeline(self, commands: list[tuple]) -> list[object]:
        """Commands in one round trip; the first error reply is raised once all are read."""
        wire = self._wire()
        if wire is None:
            return await self._pooled(commands)
        return raise_errors(await wire.pipeline(commands))

    async def _call(self, *args: str | bytes | int) -> object:
        """One command: on the store's own connection (``wire.py``), or redis-py's over TLS."""
        wire = self._wire()
        return await (wire.call(*args) if wire is not None else self._pooled([args], one=True))

    def _wire(self) -> Wire | None:
        if self._wire_made is False:
            self._wire_made = Wire.of(self.client)
        return self._wire_made

    async def _pooled(self, commands: list[tuple], one: bool = False) -> Any:
        """:meth:`_pipeline` by a connection of redis-py's pool (commands packed by hiredis: redis-py's
        own packing costs ~2 µs an argument); ``one``: the only command's reply."""
        pool = self.client.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(b"".join([hiredis.pack_command(c) for c in commands]))
            replies: list[object] = []
            error: Exception | None = None
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except redis.exceptions.ResponseError as exc:
                    error = error or exc
            if error is not None:
                raise error
            return replies[0] if one else replies
        finally:
            await pool.release(conn)

    async def entity_states(self, ids: Mapping[str, str | None]) -> dict[str, EntityState | None]:
        """States by entity type for one request (``ids``: entity type -> id)."""
        wanted = [(e, i) for e, i in ids.items() if i is not None and e in self.layouts]
        loaded = await self.load(wanted)
        return {e: loaded.get((e, i)) if i is not None else None for e, i in ids.items()}
