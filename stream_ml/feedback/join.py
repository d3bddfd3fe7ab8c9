"""The label ⨝ prediction join: whichever arrives first waits, in Redis, for the other.

``labels`` and ``predictions`` are both keyed by event id, so when they have as many partitions,
partition *p* of one holds the same events as partition *p* of the other; a worker that owns *p*
of both (range assignment) joins them on its own. Per partition, every key shares one Redis
Cluster hash tag, so a batch's changes and the partition's offsets are written in one
MULTI/EXEC: after a crash the worker seeks to the stored offsets and no record changes the join
twice.

Keys of partition *p* (``{ns}:fb:{<group>:<p>}:…``):

- ``e:<event id>``: the entry of one event: the predictions waiting for their label (one per
  variant, as published: features as served), or the label waiting for its prediction, or, once
  joined, a tombstone that recognises a duplicate label;
- ``exp:p``, ``exp:l``, ``exp:j``: the waiting predictions, waiting labels and tombstones by
  expiry (sorted sets);
- ``off``: the next offset of each topic, and the partition's two clocks.

Each input has its own clock, in event time: the largest served-at time of the predictions, the
largest label time of the labels. An entry expires ``ttl`` after its first record (a tombstone:
after its label), once the *other* input's clock has passed that: a waiting prediction expires
(unlabelled) when the labels have moved past it, a waiting label (unmatched) when the
predictions have, a tombstone when both have. So a consumer far behind on one topic (a backlog,
a replay) never expires what the other topic's records are still coming for.

>>> from stream_ml.events.prediction import encode_prediction
>>> t, j = 1_700_000_000_000, JoinLogic(ttl_ms=60_000)
>>> p = Prediction("e1", t, 0.2, "approve", "v1", "production", "fs", [1.0], t + 10)
>>> out = j.step({}, [(p, encode_prediction(p))], [])
>>> out.outcomes["prediction_waiting"], out.joined
(1, [])
>>> out = j.step(out.entries, [], [Label("e1", True, t + 500, "chargeback")])
>>> [(x.event_id, x.label.is_fraud, x.predictions[0].model_version) for x in out.joined]
[('e1', True, 'v1')]
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgpack
import redis.asyncio as aioredis

from stream_ml.events.label import Label, decode_label, encode_label
from stream_ml.events.prediction import Prediction, decode_stored_prediction

NAMESPACE = "sm"
OUTCOMES = (
    "joined",  # a label met its predictions
    "prediction_waiting",  # a prediction stored until its label comes
    "label_waiting",  # a label stored until its prediction comes (replays, or a slow scorer log)
    "duplicate_label",  # a second label of an event: the first one counts
    "duplicate_prediction",  # a second prediction of the same variant: the first one counts
    "late_prediction",  # a prediction of an event already joined (another variant, late)
    "expired_label",  # no prediction came within the TTL: unmatched
    "expired_prediction",  # no label came within the TTL: unlabelled
)
_NO_TIME = -(1 << 62)
_KINDS = ("p", "l", "j")  # waiting predictions, waiting labels, tombstones of joined events
_CLOCK_PREDICTIONS, _CLOCK_LABELS = "clock:predictions", "clock:labels"


@dataclass(slots=True)
class Entry:
    expires: int  # ms of event time
    predictions: dict[str, bytes] = field(default_factory=dict)  # variant -> encoded Prediction
    label: bytes | None = None  # encoded Label
    joined: bool = False

    def kind(self) -> str:
        return "j" if self.joined else ("l" if self.label is not None else "p")

    def encode(self) -> bytes:
        return msgpack.packb([self.expires, self.predictions, self.label, self.joined], use_bin_type=True)

    @classmethod
    def decode(cls, blob: bytes) -> Entry:
        expires, predictions, label, joined = msgpack.unpackb(blob, raw=False)
        return cls(expires, predictions, label, joined)


@dataclass(frozen=True, slots=True)
class Joined:
    """A labelled prediction: every variant that was served for the event, and its label."""

    event_id: str
    label: Label
    predictions: list[Prediction]  # production first when present

    def served(self) -> Prediction:
        """The prediction whose features were served to the caller (production when there is one)."""
        return self.predictions[0]


@dataclass(frozen=True, slots=True)
class Clocks:
    """The latest time each input of a partition has shown (ms; none yet: far in the past)."""

    predictions: int = _NO_TIME
    labels: int = _NO_TIME

    def bound(self, kind: str) -> int:
        """Entries of ``kind`` expiring before this are expired: the other input has passed them."""
        if kind == "p":
            return self.labels
        if kind == "l":
            return self.predictions
        return min(self.predictions, self.labels)


@dataclass(slots=True)
class StepResult:
    entries: dict[str, Entry | None]  # the entries changed: None = deleted
    joined: list[Joined]
    outcomes: Counter
    clocks: Clocks


class JoinLogic:
    """The join of one partition, on entries in memory: no I/O, so it is tested on its own."""

    def __init__(self, ttl_ms: int) -> None:
        self.ttl_ms = ttl_ms

    def step(
        self,
        entries: dict[str, Entry | None],
        predictions: Iterable[tuple[Prediction, bytes]],
        labels: Iterable[Label],
        clocks: Clocks = Clocks(),
    ) -> StepResult:
        """Apply a batch's predictions, then its labels, to ``entries`` (event id -> entry or None).

        ``entries`` must hold every event id of the batch (None where Redis has no entry).
        Returns the changed entries, the joins, the outcome counts and the partition's new clocks.
        """
        entries = dict(entries)
        changed: dict[str, Entry | None] = {}
        joined: list[Joined] = []
        outcomes: Counter = Counter()

        prediction_clock, label_clock = clocks.predictions, clocks.labels

        def current(event_id: str, t: int) -> Entry | None:
            entry = entries.get(event_id)
            # A record at t of one input: the entries it has passed are gone before it comes.
            if entry is not None and entry.expires < t:
                self._count_expiry(entry, outcomes)
                entries[event_id] = changed[event_id] = None
                return None
            return entry

        for p, raw in predictions:
            t = p.served_at
            prediction_clock = max(prediction_clock, t)
            entry = current(p.event_id, t)
            if entry is None:
                entry = entries[p.event_id] = changed[p.event_id] = Entry(t + self.ttl_ms)
            if entry.joined:
                outcomes["late_prediction"] += 1
            elif p.variant in entry.predictions:
                outcomes["duplicate_prediction"] += 1
            elif entry.label is not None:
                joined.append(Joined(p.event_id, decode_label(entry.label), [p]))
                outcomes["joined"] += 1
                # the label's expiry (kept): a tombstone's does not depend on which came first
                entries[p.event_id] = changed[p.event_id] = Entry(entry.expires, joined=True)
            else:
                entry.predictions[p.variant] = raw
                changed[p.event_id] = entry
                outcomes["prediction_waiting"] += 1

        for label in labels:
            t = label.label_time
            label_clock = max(label_clock, t)
            entry = current(label.event_id, t)
            if entry is None:
                entry = Entry(t + self.ttl_ms, label=encode_label(label))
                entries[label.event_id] = changed[label.event_id] = entry
                outcomes["label_waiting"] += 1
            elif entry.joined or entry.label is not None:
                outcomes["duplicate_label"] += 1
            else:
                # stored once validated: decoded without the checks
                served = [decode_stored_prediction(raw) for raw in entry.predictions.values()]
                if len(served) > 1:
                    served.sort(key=_production_first)
                joined.append(Joined(label.event_id, label, served))
                outcomes["joined"] += 1
                tombstone = Entry(t + self.ttl_ms, joined=True)
                entries[label.event_id] = changed[label.event_id] = tombstone

        # What this batch touched and the clocks have passed expires now, as the sweep would.
        clocks = Clocks(prediction_clock, label_clock)
        for event_id, entry in list(changed.items()):
            if entry is not None and entry.expires < clocks.bound(entry.kind()):
                self._count_expiry(entry, outcomes)
                changed[event_id] = None
        return StepResult(changed, joined, outcomes, clocks)

    @staticmethod
    def _count_expiry(entry: Entry, outcomes: Counter) -> None:
        kind = entry.kind()
        if kind == "l":
            outcomes["expired_label"] += 1
        elif kind == "p":
            outcomes["expired_prediction"] += 1


def _production_first(p: Prediction) -> bool:
    return p.variant != "production"


@dataclass(slots=True)
class PartitionBatch:
    """One partition's records of a fetched batch, and the offsets to store once applied."""

    partition: int
    predictions: list[tuple[Prediction, bytes]] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    next_offsets: dict[str, int] = field(default_factory=dict)  # topic -> next offset to read


class JoinStore:
    """The join's state in Redis: read a batch's entries, write its changes with the offsets."""

    def __init__(self, client: aioredis.Redis, group: str, ttl_ms: int, namespace: str = NAMESPACE) -> None:
        self.client = client
        self.group = group
        self.logic = JoinLogic(ttl_ms)
        self.namespace = namespace
        # Kept in memory between batches; the stored copy is read once per assignment.
        self.clocks: dict[int, Clocks] = {}

    def prefix(self, partition: int) -> str:
        return f"{self.namespace}:fb:{{{self.group}:{partition}}}:"

    async def offsets(self, partition: int) -> dict[str, int]:
        """The stored next offsets of ``partition`` by topic; also loads the partition's clocks."""
        stored = await self.client.hgetall(self.prefix(partition) + "off")
        values = {k.decode(): int(v) for k, v in stored.items()}
        self.clocks[partition] = Clocks(
            values.pop(_CLOCK_PREDICTIONS, _NO_TIME), values.pop(_CLOCK_LABELS, _NO_TIME)
        )
        return values

    async def apply(self, batch: PartitionBatch) -> StepResult:
        """Join one partition's records and store the outcome atomically with its offsets."""
        prefix = self.prefix(batch.partition)
        ids = list(
            dict.fromkeys([p.event_id for p, _ in batch.predictions] + [lb.event_id for lb in batch.labels])
        )
        clocks = self.clocks.get(batch.partition, Clocks())
        blobs = await self.client.mget([prefix + "e:" + i for i in ids]) if ids else []
        entries = {i: (Entry.decode(b) if b is not None else None) for i, b in zip(ids, blobs, strict=True)}
        result = self.logic.step(entries, batch.predictions, batch.labels, clocks)

        # Entries of other events that the clocks have now passed: the sweep.
        swept: dict[str, list[str]] = {}
        batch_ids = set(ids)
        for kind in _KINDS:
            bound = result.clocks.bound(kind)
            if bound > clocks.bound(kind):
                found = await self.client.zrangebyscore(f"{prefix}exp:{kind}", "-inf", f"({bound}")
                swept[kind] = [m.decode() for m in found if m.decode() not in batch_ids]
        result.outcomes["expired_label"] += len(swept.get("l", ()))
        result.outcomes["expired_prediction"] += len(swept.get("p", ()))

        # One command per kind of change, not three per entry: the same writes, in one MULTI/EXEC
        # (each event's old expiry is removed before its new one is added).
        unlisted: dict[str, list[str]] = {}  # kind -> event ids whose stored entry was of that kind
        listed: dict[str, dict[str, int]] = {}  # kind -> event id -> expiry, of the entries written
        written: dict[str, bytes] = {}
        deleted: list[str] = []
        for event_id, entry in result.entries.items():
            old = entries.get(event_id)
            if old is not None:
                unlisted.setdefault(old.kind(), []).append(event_id)
            if entry is None:
                deleted.append(prefix + "e:" + event_id)
            else:
                written[prefix + "e:" + event_id] = entry.encode()
                listed.setdefault(entry.kind(), {})[event_id] = entry.expires
        async with self.client.pipeline(transaction=True) as pipe:
            for kind, gone in unlisted.items():
                pipe.zrem(f"{prefix}exp:{kind}", *gone)
            if deleted:
                pipe.delete(*deleted)
            if written:
                pipe.mset(written)
            for kind, expiries in listed.items():
                pipe.zadd(f"{prefix}exp:{kind}", expiries)
            for kind, gone in swept.items():
                if gone:
                    pipe.zrem(f"{prefix}exp:{kind}", *gone)
                    pipe.delete(*[prefix + "e:" + i for i in gone])
            mapping: dict[str, int] = dict(batch.next_offsets)
            mapping[_CLOCK_PREDICTIONS] = result.clocks.predictions
            mapping[_CLOCK_LABELS] = result.clocks.labels
            pipe.hset(prefix + "off", mapping=mapping)
            await pipe.execute()
        self.clocks[batch.partition] = result.clocks
        return result

    async def apply_all(self, batches: list[PartitionBatch]) -> list[StepResult]:
        """Each partition in its own transaction (its own slot on a cluster), concurrently."""
        return list(await asyncio.gather(*(self.apply(b) for b in batches)))

    async def pending(self, partition: int) -> Counter:
        """How many entries of each kind a partition holds: p(redictions), l(abels), j(oined)."""
        prefix = self.prefix(partition)
        counts = Counter({kind: await self.client.zcard(f"{prefix}exp:{kind}") for kind in _KINDS})
        return +counts
