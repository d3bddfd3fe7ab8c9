"""The feedback worker: labels ⨝ predictions → online learning and windowed drift detection.

One consumer-group member, per fetched batch:

1. **validate** ``labels`` and ``predictions`` (bad messages to ``dead-letter`` with the reason);
2. **drift**: the production model's served predictions go into event-time windows, compared with
   the model's reference distributions (see :mod:`stream_ml.feedback.watch`); each closed window
   is published to ``drift`` (one message per feature, one for the score, one summary);
3. **join** each partition's labels with its predictions (:mod:`stream_ml.feedback.join`), the
   join state and the partition's offsets written to Redis in one transaction;
4. **learn**: every joined example (the features *as served*, so no leakage) is predicted, then
   learnt, by each online model; the served models' scores are scored against the label too, and
   ADWIN watches the production model's error. The online logistic model is registered in the
   model registry every ``snapshot_every_s`` as a candidate for the shadow or challenger stage,
   and restored from there on start.

``labels`` and ``predictions`` must have as many partitions: both are keyed by event id, and the
range assignor gives partition *p* of both to the same member. Offsets live in Redis with the join
state; on assignment the worker seeks there, so after a crash no record is joined twice. What is in
memory only is rebuilt or lost on a restart, boundedly: the online models come back from their last
snapshot (examples joined since are not learnt again), a drift window in progress starts over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.structs import ConsumerRecord

from stream_ml import collector
from stream_ml.config import Settings
from stream_ml.events.consume import split_valid
from stream_ml.events.deadletter import Rejected
from stream_ml.events.drift import Record
from stream_ml.events.label import decode_label
from stream_ml.events.prediction import decode_prediction
from stream_ml.features.definitions import FeatureSet
from stream_ml.feedback import metrics, snapshot
from stream_ml.feedback.join import Joined, JoinStore, PartitionBatch
from stream_ml.feedback.online import Example, OnlineLearner
from stream_ml.feedback.options import FeedbackOptions
from stream_ml.feedback.watch import DriftWatch
from stream_ml.kafka import BatchPublisher, consumer, fetch_or_stop, observe_lag, producer
from stream_ml.registry import Registry
from stream_ml.stack import connect_redis
from stream_ml.stack.topics import ensure_topics

log = logging.getLogger(__name__)


class FeedbackWorker:
    def __init__(
        self,
        settings: Settings,
        feature_set: FeatureSet,
        bootstrap: str,
        redis_url: str,
        registry: Registry,
        options: FeedbackOptions = FeedbackOptions(),
    ) -> None:
        self.settings = settings
        self.feature_set = feature_set
        self.bootstrap = bootstrap
        self.redis_url = redis_url
        self.registry = registry
        self.options = options
        self.learner = OnlineLearner(
            feature_set.names, window=options.metrics_window, review_threshold=options.review_threshold
        )
        self.watch = DriftWatch(registry, feature_set, options.watch)
        self.processed = 0
        self.joined = 0
        self._busy: asyncio.Future | None = None
        self._snapshot_at = time.monotonic()
        self._snapshot_examples = 0

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` is set (or forever)."""
        stop = stop or asyncio.Event()
        s = self.settings
        self._redis = await connect_redis(self.redis_url)
        self.join = JoinStore(self._redis, self.options.group_id, self.options.join_ttl_s * 1000)
        if self.options.learn:
            restored = await asyncio.to_thread(
                snapshot.restore, self.registry, self.feature_set, group=self.options.group_id
            )
            if restored is not None:
                self.learner.logistic = restored
                self._snapshot_examples = self.learner.examples
                log.info("online logistic model restored from its last snapshot in the registry")
        await self._check_copartitioned()
        self._kafka_out = producer(self.bootstrap)
        await self._kafka_out.start()
        self._out = BatchPublisher(self._kafka_out)
        for topic in (s.topic_drift, s.topic_dead_letter):
            await self._out.open_topic(topic)
        self._consumer = consumer(
            self.bootstrap,
            group_id=self.options.group_id,
            partition_assignment_strategy=(RangePartitionAssignor,),  # partition p of both topics together
        )
        try:
            self._consumer.subscribe([s.topic_labels, s.topic_predictions], listener=_Rebalance(self))
            await self._consumer.start()
            while not stop.is_set():
                fetched = await fetch_or_stop(self._consumer, stop, self.options.max_records)
                if fetched is None:
                    break
                fetched = {tp: records for tp, records in fetched.items() if records}
                if fetched:
                    self._busy = asyncio.ensure_future(self.process(fetched))
                    await self._busy
                await self._maybe_snapshot()
            await self._publish_drift(self.watch.flush())
        finally:
            await self._consumer.stop()
            await self._kafka_out.stop()
            await self._redis.aclose()

    async def _check_copartitioned(self) -> None:
        s = self.settings
        topics = [s.topic_labels, s.topic_predictions, s.topic_drift, s.topic_dead_letter]
        counts = {r.name: r.partitions for r in await ensure_topics(self.bootstrap, topics, s.partitions)}
        if counts[s.topic_labels] != counts[s.topic_predictions]:
            raise RuntimeError(
                f"the join needs {s.topic_labels!r} and {s.topic_predictions!r} co-partitioned (both are "
                f"keyed by event id), but they have {counts[s.topic_labels]} and "
                f"{counts[s.topic_predictions]} partitions: give them the same number"
            )

    # -- one batch ------------------------------------------------------------------------

    async def process(self, fetched: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        """One batch, start to end: validated, watched for drift, joined, learnt, committed."""
        with collector.paused():
            await self._process(fetched)

    async def _process(self, fetched: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        started = time.perf_counter()
        s = self.settings
        batches: dict[int, PartitionBatch] = {}
        rejected: list[Rejected] = []
        served = []
        for tp, records in fetched.items():
            batch = batches.setdefault(tp.partition, PartitionBatch(tp.partition))
            batch.next_offsets[tp.topic] = records[-1].offset + 1
            if tp.topic == s.topic_predictions:
                valid, bad = split_valid(records, decode_prediction)
                batch.predictions += [(p, r.value) for r, p in valid]
                served += [p for _, p in valid]
            else:
                valid, bad = split_valid(records, decode_label)
                batch.labels += [label for _, label in valid]
            rejected += bad
            metrics.RECORDS.labels(tp.topic, "valid").inc(len(valid))
            metrics.RECORDS.labels(tp.topic, "dead_letter").inc(len(bad))
        for r in rejected:
            self._out.add(s.topic_dead_letter, r.record.key, r.record.value or b"", None, r.headers())

        await self._publish_drift(await asyncio.to_thread(self.watch.add, served))
        await self._out.flush()  # dead letters and drift reports acknowledged before the offsets move

        results = await self.join.apply_all(list(batches.values()))
        joined: list[Joined] = []
        for result in results:
            joined += result.joined
            for outcome, n in result.outcomes.items():
                metrics.JOIN.labels(outcome).inc(n)
        if joined:
            await self._learn(joined)
        await self._consumer.commit({tp: records[-1].offset + 1 for tp, records in fetched.items()})
        self.processed += sum(len(r) for r in fetched.values())
        observe_lag(self._consumer, fetched, metrics.CONSUMER_LAG_EVENTS)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)

    async def _learn(self, joined: list[Joined]) -> None:
        examples: list[Example] = []
        performance = []
        # read once: the feature set's version and names are hashed out of it on every access
        version, width = self.feature_set.version, len(self.feature_set.names)
        for j in joined:
            p = j.served()
            metrics.LABEL_DELAY_SECONDS.observe(max(j.label.label_time - p.event_time, 0) / 1000)
            if p.degraded:  # request-only features: not what the model sees normally
                metrics.SKIPPED.labels("degraded").inc()
                continue
            if p.feature_set != version or len(p.features) != width:
                metrics.SKIPPED.labels("other_feature_set").inc()
                continue
            served = {f"{q.variant}:{q.model_version}": q.score for q in j.predictions}
            examples.append(Example(p.features, j.label.is_fraud, p.event_time, served))
            if p.variant == "production":
                performance.append((j.label.is_fraud, p.score, p.event_time, p.model_version))
        self.joined += len(joined)
        if self.options.learn and examples:
            await asyncio.to_thread(self.learner.learn_many, examples)
            self.learner.export_gauges()
        changes = [r for args in performance for r in self.watch.performance(*args)]
        await self._publish_drift(changes)

    async def _publish_drift(self, records: list[Record]) -> None:
        """Drift reports onto the ``drift`` topic, acknowledged before the batch's offsets move."""
        for key, value, timestamp_ms in records:
            if self._out.add(self.settings.topic_drift, key, value, timestamp_ms):
                await self._out.send_full()
        if records:
            await self._out.flush()

    async def _maybe_snapshot(self) -> None:
        o = self.options
        if not o.learn or time.monotonic() - self._snapshot_at < o.snapshot_every_s:
            return
        self._snapshot_at = time.monotonic()
        if self.learner.examples - self._snapshot_examples < o.snapshot_min_examples:
            return
        await self.save_snapshot()

    async def save_snapshot(self) -> str:
        """Register the online logistic model now; returns its version."""
        about = {"source": "feedback", "group": self.options.group_id, "examples": self.learner.examples}
        mv = await asyncio.to_thread(
            snapshot.save,
            self.learner,
            self.registry,
            self.feature_set,
            group=self.options.group_id,
            about=about,
        )
        self._snapshot_examples = self.learner.examples
        metrics.SNAPSHOTS.inc()
        log.info("online model registered as %s (%s examples)", mv.version, f"{self.learner.examples:,}")
        return mv.version

    def progress(self) -> str:
        """One line for the log: joins, and the online models' rolling ROC AUC."""
        aucs = ", ".join(
            f"{name} {m['roc_auc']:.3f}" for name, m in self.learner.metrics().items() if m["examples"]
        )
        return f"{self.joined:,} joined" + (f"; rolling ROC AUC: {aucs}" if aucs else "")

    # -- bookkeeping ----------------------------------------------------------------------

    async def seek_to_stored(self, assigned: set[TopicPartition]) -> None:
        """Resume each assigned partition where the join state says, not where Kafka's commit does."""
        for partition in sorted({tp.partition for tp in assigned}):
            stored = await self.join.offsets(partition)
            for tp in assigned:
                if tp.partition == partition and tp.topic in stored:
                    self._consumer.seek(tp, stored[tp.topic])

    async def finished(self) -> None:
        if self._busy is not None:
            with contextlib.suppress(Exception):  # its error surfaces in the run loop
                await self._busy


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, worker: FeedbackWorker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.worker.finished()  # the batch in hand is written before the partitions move

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.worker.seek_to_stored(set(assigned))
