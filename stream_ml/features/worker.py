"""The feature worker: transactions and labels in, entity window state in Redis out.

One consumer-group member runs two stages per fetched batch:

1. **route** (topics ``transactions``, ``labels``): validate (bad messages to ``dead-letter``),
   drop events later than the allowed lateness behind their partition's watermark (to
   ``dead-letter``, with the reason), index transactions by event id, find each label's
   transaction, and send each entity's update to the owner of the entity's partition of its
   topic (``<group>-card``, ``-merchant``, ``-device``, keyed by entity id): so every entity has
   exactly one writer however many workers run. An update whose entity partition this worker
   owns goes straight to stage 2 in the same batch; the others are published to the entity topic.
2. **apply** (the updates kept, and those fetched from the entity topics): apply them to the
   states of the entities this worker owns (kept in memory, read from Redis once when their
   partition is assigned) and write the changed states back in one round trip.

A batch's labels go through both stages after its transactions' updates are applied: their
transactions' entities are looked up in the store's event index meanwhile.

Keeping its own updates saves the round trip through Kafka, which was most of an update's
latency and a third of the work; one worker alone never publishes one. It is safe because a
state's per-source offsets need each source's updates in order: after each rebalance, the worker
consumes no source until it has applied its entity partitions up to their end offsets at
assignment (what the previous owners published), and from then on an owned partition receives
this worker's updates only directly.

Offsets are committed after both, every ``COMMIT_INTERVAL_S`` (as Kafka Streams does), in the
background: a commit per batch was a third of the broker's work and held up the next write. Each
state remembers the last offset it applied per source partition, so a batch replayed after a
crash (even one written half-way, or written but not yet committed) changes nothing twice.
Updates travel many to a Kafka record (one record per entity partition and batch): the Kafka
cost per event stays a few microseconds. A batch is written while the next one is computed,
never more than one in flight. If Redis or the broker fails, the worker stops with the
error (Redis: after a 10 s socket timeout); restarted, it resumes from its last commit.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import msgpack
from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import ConsumerRecord

from stream_ml import collector
from stream_ml.config import Settings
from stream_ml.events.consume import split_valid
from stream_ml.events.deadletter import Rejected
from stream_ml.events.label import Label, decode_label
from stream_ml.events.transaction import decode_transaction
from stream_ml.features import metrics
from stream_ml.features.definitions import ENTITIES, FeatureSet
from stream_ml.features.state import EntityState, field_getter
from stream_ml.features.store import LABEL_HORIZON_S, EntityKey, FeatureStore, PreparedWrite
from stream_ml.kafka import BatchPublisher, consumer, fetch_or_stop, observe_lag, producer
from stream_ml.stack import connect_redis
from stream_ml.stack.topics import ensure_topics

log = logging.getLogger(__name__)

SOURCE_CODES = {"transactions": 0, "labels": 1}
SOURCE_NAMES = {v: k for k, v in SOURCE_CODES.items()}
UPDATES_PER_RECORD = 2000
COMMIT_INTERVAL_S = 0.1  # at most this much is consumed again after a crash
_NO_WATERMARK = -(1 << 62)

# (entity id, source code, source partition tag, source offset, event time, *field values)
Update = list


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    group_id: str = "stream-ml-features"
    label_horizon_s: int = LABEL_HORIZON_S  # how long a transaction waits for its label
    label_wait_s: float = 30.0  # how long a label waits for its transaction to be indexed
    max_records: int = 20_000
    max_cached_entities: int = 1_000_000


class FeatureWorker:
    def __init__(
        self,
        settings: Settings,
        feature_set: FeatureSet,
        bootstrap: str,
        redis_url: str,
        options: WorkerOptions = WorkerOptions(),
        on_visible: Callable[[list[int], float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.feature_set = feature_set
        self.bootstrap = bootstrap
        self.redis_url = redis_url
        self.options = options
        self.lateness_ms = feature_set.allowed_lateness_s * 1000
        self.entity_topics = {e: f"{options.group_id}-{e}" for e in feature_set.entities()}
        self._topic_entity = {t: e for e, t in self.entity_topics.items()}
        self._on_visible = on_visible  # benchmarks: called with the event times made visible
        self._watermarks: dict[TopicPartition, int] = {}
        self._pending_labels: dict[TopicPartition, deque[tuple[ConsumerRecord, Label, float]]] = {}
        self._label_entities: dict[str, tuple[str, str, str | None]] = {}  # of waiting labels' events
        self._fetched_end: dict[TopicPartition, int] = {}
        # States of the entities of the partitions this worker owns: it is their only writer, so
        # they need no read from Redis until the partition moves (then they are dropped).
        self._owned: dict[TopicPartition, dict[str, EntityState]] = {}
        self._cached = 0
        self._dropped_unwritten = False
        self._freezer = collector.Freezer()  # the cached states, out of the full collections' scans
        self._writing: asyncio.Future | None = None  # the write of the last batch
        self._committing: asyncio.Future | None = None
        self._uncommitted: dict[TopicPartition, int] = {}  # written, to commit
        self._commit_due = 0.0
        self._partition_of_id: dict[str, dict[str, int]] = {}  # entity topic -> entity id -> partition
        # After a rebalance: the entity partitions' end offsets to reach before sources are read.
        self._catching_up: dict[TopicPartition, int] = {}
        self.processed = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` is set (or forever)."""
        stop = stop or asyncio.Event()
        await ensure_topics(self.bootstrap, list(self.entity_topics.values()), self.settings.partitions)
        self._redis = await connect_redis(self.redis_url)
        self.store = FeatureStore(self._redis, self.feature_set, self.options.label_horizon_s)
        self._layouts = self.store.layouts
        self._getters = {
            (entity, source): field_getter(layout.fields.get(source, ()))
            for entity, layout in self._layouts.items()
            for source in SOURCE_CODES
        }
        # linger 0: a batch of routed updates is flushed at once; waiting to fill it only adds latency
        self._kafka_out = producer(self.bootstrap, linger_ms=0)
        await self._kafka_out.start()
        self._out = BatchPublisher(self._kafka_out)
        for topic in [*self.entity_topics.values(), self.settings.topic_dead_letter]:
            await self._out.open_topic(topic)
        topics = [self.settings.topic_transactions, self.settings.topic_labels, *self.entity_topics.values()]
        self._consumer = consumer(
            self.bootstrap, group_id=self.options.group_id, max_partition_fetch_bytes=4 * 1024 * 1024
        )
        self._consumer.subscribe(topics, listener=_Rebalance(self))
        await self._consumer.start()
        # What start-up made (modules, clients) lives as long as the process: out of the full
        # collections' scans from now on, as the cached states will be.
        gc.collect()
        gc.freeze()
        try:
            while not stop.is_set():
                for task in (self._writing, self._committing):
                    if task is not None and task.done():
                        task.result()  # a failed write or commit stops the worker: a restart redoes it
                fetched = await fetch_or_stop(self._consumer, stop, self.options.max_records)
                if fetched is None:
                    break
                with collector.paused():
                    finish = await self._compute(fetched)
                # One batch is written while the next is computed: never more, so
                # a slow Redis or broker slows the consumption instead of piling batches up.
                if self._writing is not None:
                    await self._writing
                self._writing = asyncio.ensure_future(finish)
            await self.flushed()
        finally:
            for task in (self._writing, self._committing):
                if task is None:
                    continue
                if task.done():
                    task.exception()  # already raised or reported: mark it retrieved
                else:
                    task.cancel()
            await self._consumer.stop()
            await self._kafka_out.stop()
            await self._redis.aclose()

    @property
    def ready(self) -> bool:
        """Partitions assigned and caught up: what is published now is applied at once."""
        consumer = getattr(self, "_consumer", None)
        return bool(consumer and consumer.assignment()) and not self._catching_up

    # -- one batch ------------------------------------------------------------------------

    async def process(self, fetched: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """One batch, start to end: computed, written, committed."""
        await (await self._compute(fetched))
        await self.flushed()

    async def flushed(self) -> None:
        """Wait until every computed batch is written and committed."""
        if self._writing is not None:
            await self._writing
        if self._committing is not None:
            await self._committing
        if self._uncommitted:
            await self._commit()

    def _commit_soon(self) -> None:
        """Commit what is written, in the background, once the interval is up.

        An idle worker still finishes an empty batch after each fetch's timeout (100 ms), so
        its last offsets are committed then.
        """
        idle = self._committing is None or self._committing.done()
        if self._uncommitted and idle and time.monotonic() >= self._commit_due:
            self._committing = asyncio.ensure_future(self._commit())

    async def _commit(self) -> None:
        offsets, self._uncommitted = self._uncommitted, {}
        self._commit_due = time.monotonic() + COMMIT_INTERVAL_S
        await self._consumer.commit(offsets)

    async def _compute(
        self, fetched: dict[TopicPartition, list[ConsumerRecord]]
    ) -> Coroutine[Any, Any, None]:
        """Route and apply a batch in memory; returns the coroutine that writes and commits it."""
        s = self.settings
        commit: dict[TopicPartition, int] = {}
        updates: dict[str, list[Update]] = defaultdict(list)  # entity topic -> updates, in order
        events: dict[str, tuple[str, str, str | None]] = {}
        rejected: list[Rejected] = []
        applied: list[tuple[str, TopicPartition, list[Update]]] = []
        for tp, records in fetched.items():
            if tp.topic == s.topic_labels:
                valid, bad = split_valid(records, decode_label)
                rejected += bad
                now = time.monotonic()
                self._pending_labels.setdefault(tp, deque()).extend((r, label, now) for r, label in valid)
                self._fetched_end[tp] = records[-1].offset + 1
        # The labels' transactions are looked up now and read once the transactions are applied:
        # Redis is often still running the last batch's write (~40 ms for 5,000 events), and a
        # lookup sent later waited that out with nothing else to do.
        lookup = None
        if not self._catching_up and self._pending_labels:  # labels held in a rebalance wait too
            lookup = asyncio.ensure_future(self._lookup_labels())
            await asyncio.sleep(0)  # one turn of the loop: the lookup's command goes out now
        try:
            for tp, records in fetched.items():
                if tp.topic == s.topic_transactions:
                    rejected += self._route_transactions(tp, records, updates, events)
                    commit[tp] = records[-1].offset + 1
                elif tp.topic != s.topic_labels:
                    entity = self._topic_entity[tp.topic]
                    applied += [(entity, tp, msgpack.unpackb(r.value, raw=False)) for r in records]
                    commit[tp] = records[-1].offset + 1
            states, times = await self._route_and_apply(updates, applied)
            if lookup is not None:
                await lookup
                updates = defaultdict(list)
                rejected += self._route_labels(updates, events, commit)
                labelled, label_times = await self._route_and_apply(updates, [])
                for entity, by_id in labelled.items():
                    states.setdefault(entity, {}).update(by_id)
                times += label_times
        finally:
            if lookup is not None and not lookup.done():
                lookup.cancel()
        n = sum(len(records) for records in fetched.values())
        metrics.BATCH_EVENTS.observe(n)
        for r in rejected:
            self._out.add(s.topic_dead_letter, r.record.key, r.record.value or b"", None, r.headers())
        await self._check_caught_up(fetched)
        self._bound_cache()
        write = self.store.prepare(states, events, self._watermark_entries(commit))
        return self._finish(self._writing, write, commit, times, n, fetched)

    async def _route_and_apply(
        self, updates: dict[str, list[Update]], applied: list[tuple[str, TopicPartition, list[Update]]]
    ) -> tuple[dict[str, dict[str, EntityState]], list[int]]:
        """Route ``updates`` (kept, or queued for their entity topic), then apply what is kept and
        ``applied``: the states changed, by entity type and id, and the event times applied."""
        for topic, entity_updates in updates.items():
            await self._route_updates(topic, entity_updates, applied)
        return await self._apply(applied) if applied else ({}, [])

    async def _finish(
        self,
        previous: asyncio.Future | None,
        write: PreparedWrite | None,
        commit: dict[TopicPartition, int],
        times: list[int],
        n: int,
        fetched: dict[TopicPartition, list[ConsumerRecord]],
    ) -> None:
        """Write one batch, strictly after the batch before it, and commit it soon."""
        if previous is not None:
            await previous
        # The routed updates and dead letters are acknowledged before the commit, so a crash
        # replays their sources rather than losing them.
        await self._out.flush()
        started = time.perf_counter()
        await self.store.write(write)
        metrics.REDIS_WRITE_SECONDS.observe(time.perf_counter() - started)
        if times:
            self._observe_freshness(times)
        self._uncommitted.update(commit)
        self._commit_soon()
        self.processed += n
        observe_lag(self._consumer, fetched, metrics.CONSUMER_LAG_EVENTS)

    # -- stage 1: route -------------------------------------------------------------------

    def _route_transactions(
        self,
        tp: TopicPartition,
        records: list[ConsumerRecord],
        updates: dict[str, list[Update]],
        events: dict,
    ) -> list[Rejected]:
        valid, rejected = split_valid(records, decode_transaction)
        src = f"{tp.topic}:{tp.partition}"  # the topic too: a state never confuses two logs
        watermark = self._watermarks.get(tp, _NO_WATERMARK)
        plan = [
            (self.entity_topics[e], ENTITIES[e], self._getters[(e, "transactions")])
            for e, layout in self._layouts.items()
            if "transactions" in layout.fields
        ]
        applied = 0
        for record, tx in valid:
            t = tx.event_time
            if t < watermark - self.lateness_ms:
                rejected.append(Rejected(record, self._late_reason(t, watermark)))
                metrics.EVENTS.labels(tp.topic, "late").inc()
                continue
            if t > watermark:
                watermark = t
            for topic, id_field, values in plan:
                entity_id = getattr(tx, id_field)
                if entity_id is not None:
                    updates[topic].append([entity_id, 0, src, record.offset, t, *values(tx)])
            events[tx.event_id] = (tx.card_id, tx.merchant_id, tx.device_id)
            applied += 1
        self._watermarks[tp] = watermark
        metrics.EVENTS.labels(tp.topic, "applied").inc(applied)
        metrics.EVENTS.labels(tp.topic, "dead_letter").inc(len(rejected))
        return rejected

    async def _lookup_labels(self) -> None:
        """Find the waiting labels' transactions in the store's event index (those not found yet)."""
        found = self._label_entities
        wanted = {label.event_id for q in self._pending_labels.values() for _, label, _ in q} - found.keys()
        found.update(await self.store.lookup_events(sorted(wanted)))

    def _route_labels(
        self, updates: dict[str, list[Update]], events: dict, commit: dict[TopicPartition, int]
    ) -> list[Rejected]:
        """Labels, in partition order; a label whose transaction is not indexed yet waits (bounded).

        A label's transaction is one of this batch's ``events``, else one the event index had.
        What the index gave is kept until the label leaves: a label held behind one that waits is
        not looked up again at every batch (it was two lookups in three).
        """
        rejected: list[Rejected] = []
        found = self._label_entities
        plan = [
            (self.entity_topics[e], list(ENTITIES).index(e), self._getters[(e, "labels")])
            for e, layout in self._layouts.items()
            if "labels" in layout.fields
        ]
        now = time.monotonic()
        for tp, queue in self._pending_labels.items():
            src = f"{tp.topic}:{tp.partition}"
            watermark = self._watermarks.get(tp, _NO_WATERMARK)
            last_done = None
            routed = 0
            while queue:
                record, label, arrived = queue[0]
                entities = events.get(label.event_id) or found.get(label.event_id)
                if entities is None and now - arrived < self.options.label_wait_s:
                    break  # wait for the transaction; later labels of this partition wait behind it
                queue.popleft()
                found.pop(label.event_id, None)
                last_done = record.offset
                t = label.label_time
                if entities is None:
                    rejected.append(
                        Rejected(
                            record,
                            f"label for unknown event {label.event_id!r}: its "
                            f"transaction was not seen within {self.options.label_wait_s:g} s "
                            "or is older than the label horizon",
                        )
                    )
                    metrics.EVENTS.labels(tp.topic, "dead_letter").inc()
                    continue
                if t < watermark - self.lateness_ms:
                    rejected.append(Rejected(record, self._late_reason(t, watermark)))
                    metrics.EVENTS.labels(tp.topic, "late").inc()
                    continue
                watermark = max(watermark, t)
                for topic, position, values in plan:
                    entity_id = entities[position]
                    if entity_id is not None:
                        updates[topic].append([entity_id, 1, src, record.offset, t, *values(label)])
                routed += 1
            metrics.EVENTS.labels(tp.topic, "applied").inc(routed)
            self._watermarks[tp] = watermark
            if not queue and tp in self._fetched_end:
                commit[tp] = self._fetched_end.pop(tp)  # all fetched, dead letters included, is done
            elif last_done is not None:
                commit[tp] = last_done + 1
            if queue:
                self._consumer.pause(tp)  # bounded memory while the head waits
            elif not self._catching_up:
                self._consumer.resume(tp)
        return rejected

    async def _route_updates(
        self, topic: str, entity_updates: list[Update], kept: list[tuple[str, TopicPartition, list[Update]]]
    ) -> None:
        """Keep the updates of the entity partitions this worker owns; publish the others."""
        by_partition: dict[int, list[Update]] = defaultdict(list)
        known = self._partition_of_id.setdefault(topic, {})
        for u in entity_updates:
            partition = known.get(u[0])
            if partition is None:
                if len(known) > 1_000_000:
                    known.clear()
                partition = known[u[0]] = self._out.partition_of(topic, u[0].encode())
            by_partition[partition].append(u)
        entity = self._topic_entity[topic]
        for partition, items in by_partition.items():
            tp = TopicPartition(topic, partition)
            if tp in self._owned:
                kept.append((entity, tp, items))
                continue
            for i in range(0, len(items), UPDATES_PER_RECORD):
                chunk = msgpack.packb(items[i : i + UPDATES_PER_RECORD], use_bin_type=True)
                if self._out.add(topic, None, chunk, None, partition=partition):
                    await self._out.send_full()

    def _late_reason(self, t: int, watermark: int) -> str:
        behind = (watermark - t) / 1000
        return (
            f"late event: {behind:,.0f} s behind its partition's watermark, more than the allowed "
            f"lateness of {self.feature_set.allowed_lateness_s:,} s"
        )

    # -- stage 2: apply -------------------------------------------------------------------

    async def _apply(
        self, applied: list[tuple[str, TopicPartition, list[Update]]]
    ) -> tuple[dict[str, dict[str, EntityState]], list[int]]:
        """Apply entity updates; states come from this worker's cache of the partitions it owns.

        Returns the states changed, by entity type and id, and the event times applied.
        """
        batches: list[tuple[str, dict[str, EntityState], list[Update]]] = []
        missing: dict[EntityKey, dict[str, EntityState]] = {}
        for entity, tp, items in applied:
            owned = self._owned[tp]
            batches.append((entity, owned, items))
            for u in items:
                if u[0] not in owned:
                    missing[(entity, u[0])] = owned
        if missing:  # first sight since this worker got the partition: what the store holds
            if self._dropped_unwritten and self._writing is not None:
                await self._writing  # a dropped state read back before its last write would be stale
            self._dropped_unwritten = False
            for (entity, entity_id), state in (await self.store.load(missing, writable=True)).items():
                missing[(entity, entity_id)][entity_id] = state or self._layouts[entity].new()
            self._cached += len(missing)
        changed: dict[str, dict[str, EntityState]] = {}
        times: list[int] = []
        for entity, owned, items in batches:
            apply = self._layouts[entity].apply_update
            states = changed.setdefault(entity, {})
            count = 0
            for u in items:
                entity_id = u[0]
                state = owned[entity_id]
                if apply(state, SOURCE_NAMES[u[1]], u):
                    states[entity_id] = state
                    count += 1
                    times.append(u[4])
            metrics.UPDATES.labels(entity).inc(count)
        return changed, times

    def _bound_cache(self) -> None:
        """Past ``max_cached_entities``, drop every cached state (rare): reloaded on next sight."""
        if self._cached > self.options.max_cached_entities:
            for owned in self._owned.values():
                owned.clear()
            self._cached = 0
            self._dropped_unwritten = True  # their last changes are in writes not done yet
        self._freezer.grown_to(self._cached)

    def _observe_freshness(self, times: list[int]) -> None:
        now = time.time()
        if self._on_visible is not None:
            self._on_visible(times, now)
        now_ms = now * 1000
        for t in times[::8]:  # a sample keeps the histogram cheap on the hot path
            metrics.FRESHNESS_SECONDS.observe(max(now_ms - t, 0.0) / 1000)

    # -- bookkeeping ----------------------------------------------------------------------

    def _watermark_key(self, tp: TopicPartition) -> str:
        return f"sm:wm:{self.options.group_id}:{{{tp.topic}:{tp.partition}}}"

    def _watermark_entries(self, commit: dict[TopicPartition, int]) -> dict[str, int]:
        """The watermarks of the source partitions in this batch, stored with the state they produced."""
        sources = {self.settings.topic_transactions, self.settings.topic_labels}
        return {
            self._watermark_key(tp): self._watermarks[tp]
            for tp in commit
            if tp.topic in sources and tp in self._watermarks
        }

    async def load_watermarks(self, tps: set[TopicPartition]) -> None:
        sources = {self.settings.topic_transactions, self.settings.topic_labels}
        wanted = sorted((tp for tp in tps if tp.topic in sources), key=lambda tp: (tp.topic, tp.partition))
        if not wanted:
            return
        values = await self._redis.mget([self._watermark_key(tp) for tp in wanted])
        for tp, value in zip(wanted, values, strict=True):
            self._watermarks[tp] = int(value) if value is not None else _NO_WATERMARK

    def forget(self, tps: set[TopicPartition]) -> None:
        self._label_entities.clear()  # the labels still waiting are looked up again
        for tp in tps:
            self._watermarks.pop(tp, None)
            self._pending_labels.pop(tp, None)
            self._fetched_end.pop(tp, None)
            self._cached -= len(self._owned.pop(tp, {}))

    async def catch_up(self, assigned: set[TopicPartition]) -> None:
        """Hold the sources until the entity partitions are applied up to their end offsets now.

        What the previous owners published is in the entity topics; applied after this worker's
        own newer updates of the same source, it would be skipped as already seen.
        """
        entity_tps = {tp for tp in assigned if tp.topic in self._topic_entity}
        for tp in entity_tps:
            self._owned.setdefault(tp, {})
        ends = await self._consumer.end_offsets(list(entity_tps)) if entity_tps else {}
        self._catching_up = {tp: end for tp, end in ends.items() if end > 0}
        sources = [tp for tp in assigned if tp.topic not in self._topic_entity]
        if self._catching_up and sources:
            self._consumer.pause(*sources)

    async def _check_caught_up(self, fetched: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        # Not from the rebalance listener: a position may need the committed offsets, which the
        # consumer fetches only after the listener has returned.
        if not self._catching_up:
            return
        for tp in list(self._catching_up):
            records = fetched.get(tp)
            position = records[-1].offset + 1 if records else await self._consumer.position(tp)
            if position >= self._catching_up[tp]:
                del self._catching_up[tp]
        if not self._catching_up:
            held = {tp for tp in self._consumer.assignment() if tp.topic not in self._topic_entity}
            self._consumer.resume(*(tp for tp in held if not self._pending_labels.get(tp)))


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: FeatureWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.flushed()  # commit what was done before the partitions move
        self.worker.forget(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.worker.load_watermarks(set(assigned))
        await self.worker.catch_up(set(assigned))
