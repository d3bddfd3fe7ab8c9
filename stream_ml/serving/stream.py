"""Stream scoring: payments from `transactions` in, predictions out, for event-driven users.

The HTTP scorer's parts, without HTTP: the same :class:`~stream_ml.serving.app.Scorer` (feature
fetch, vector function, micro-batcher, model, registry following, shadow), fed by a consumer-group
member instead of calls. Each fetched batch:

1. invalid records go to the dead-letter topic with their reason;
2. the valid payments go through the batcher (the whole fetch at once: it cuts model batches);
3. their predictions (variant ``production``, and ``shadow`` ones when a shadow is set) are
   published to `predictions`, keyed by event id, and acknowledged by the broker;
4. then the offsets are committed.

At least once: a member killed between 3 and 4 publishes those predictions again when the batch is
read again; the feedback join counts them as duplicates. Nothing is scored degraded: with the
feature store down the batch fails and the worker stops, to resume from its last commit.

The features are the store's when the payment is read. The feature worker applies the same
payments concurrently, so a payment whose own update reached the store first is scored with
itself counted in its card's windows. Score over HTTP before publishing (as the payment gateway
does) where that matters.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from stream_ml.config import Settings
from stream_ml.events.consume import split_valid
from stream_ml.events.deadletter import dead_letter
from stream_ml.events.prediction import Prediction, encode_prediction
from stream_ml.events.transaction import decode_transaction
from stream_ml.kafka import BatchPublisher, consumer, fetch_or_stop, observe_lag, producer
from stream_ml.serving import metrics
from stream_ml.serving.app import HTTPError, Scorer

log = logging.getLogger(__name__)

GROUP = "stream-ml-score"
# No caller waits: the deadline only bounds a batch that could not be scored at all.
DEADLINE_S = 30.0


class Collected:
    """Where the scorer offers its predictions: kept for the worker to publish before it commits."""

    def __init__(self) -> None:
        self.items: list[Prediction] = []

    def offer(self, prediction: Prediction) -> None:
        self.items.append(prediction)

    def take(self) -> list[Prediction]:
        items, self.items = self.items, []
        return items

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass


class StreamScorer:
    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        scorer: Scorer,
        collected: Collected,
        group_id: str = GROUP,
        max_records: int = 2_000,
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.scorer = scorer
        self.collected = collected
        self.group_id = group_id
        self.max_records = max_records
        self.processed = 0

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Consume until ``stop`` is set (or forever)."""
        stop = stop or asyncio.Event()
        s = self.settings
        await self.scorer.start()
        kafka_out = producer(self.bootstrap)
        await kafka_out.start()
        out = BatchPublisher(kafka_out)
        kafka_in = consumer(self.bootstrap, s.topic_transactions, group_id=self.group_id)
        try:
            for topic in (s.topic_predictions, s.topic_dead_letter):
                await out.open_topic(topic)
            await kafka_in.start()
            while not stop.is_set():
                fetched = await fetch_or_stop(kafka_in, stop, self.max_records)
                if fetched is None:
                    break
                fetched = {tp: records for tp, records in fetched.items() if records}
                if fetched:
                    await self.process(kafka_in, out, fetched)
        finally:
            await kafka_in.stop()
            await kafka_out.stop()
            await self.scorer.stop()

    async def process(
        self,
        kafka_in: AIOKafkaConsumer,
        out: BatchPublisher,
        fetched: dict[TopicPartition, list[ConsumerRecord]],
    ) -> None:
        s = self.settings
        valid, rejected = split_valid(
            (r for records in fetched.values() for r in records), decode_transaction
        )
        if rejected:
            await dead_letter(out, s.topic_dead_letter, rejected)
            metrics.STREAM_EVENTS.labels("dead_letter").inc(len(rejected))
        if valid:
            until = time.monotonic() + DEADLINE_S
            try:
                await asyncio.gather(*(self.scorer.batcher.submit(tx, until) for _, tx in valid))
            except HTTPError as exc:  # the store is down: stop rather than publish degraded scores
                raise ConnectionError(f"{exc}; the stream scorer resumes from its last commit") from None
            metrics.STREAM_EVENTS.labels("scored").inc(len(valid))
        for p in self.collected.take():
            out.add(s.topic_predictions, p.event_id.encode(), encode_prediction(p), p.served_at)
        await out.flush()  # acknowledged before the commit: a crash re-scores, never loses
        await kafka_in.commit({tp: records[-1].offset + 1 for tp, records in fetched.items()})
        observe_lag(kafka_in, fetched, metrics.STREAM_LAG_EVENTS)
        self.processed += len(valid) + len(rejected)
