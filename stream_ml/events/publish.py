"""Publish transactions, labels (and predictions) to Kafka, paced or as fast as the broker takes them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tqdm import tqdm

from stream_ml.config import Settings
from stream_ml.events.label import Label, encode_label
from stream_ml.events.metrics import PRODUCED
from stream_ml.events.prediction import Prediction, encode_prediction
from stream_ml.events.transaction import Transaction, encode_transaction
from stream_ml.kafka import BatchPublisher, producer

# When to send item number i (with emission time t_ms), in time.monotonic() seconds.
Schedule = Callable[[int, int], float]
_PACE_EVERY = 64
_PROGRESS_EVERY = 2048


@dataclass(slots=True)
class PublishReport:
    transactions: int = 0
    labels: int = 0
    predictions: int = 0
    frauds: int = 0
    seconds: float = 0.0

    @property
    def events(self) -> int:
        return self.transactions + self.labels + self.predictions

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"published {self.transactions:,} transactions and {self.labels:,} labels "
            f"({self.frauds:,} fraud) in {self.seconds:.2f} s: {self.events_per_s:,.0f} events/s"
        )


def event_time_schedule(start_ms: int, time_scale: float) -> Schedule:
    """Send each item when its own time comes, event time running ``time_scale`` × wall time."""
    wall0 = time.monotonic()
    return lambda _i, t_ms: wall0 + (t_ms - start_ms) / 1000.0 / time_scale


def rate_schedule(rate: float) -> Schedule:
    """Send ``rate`` items a second, whatever their times."""
    wall0 = time.monotonic()
    return lambda i, _t: wall0 + i / rate


async def publish(
    settings: Settings,
    bootstrap: str,
    items: Iterable[Transaction | Label | Prediction],
    *,
    schedule: Schedule | None = None,
    total: int | None = None,
    progress: bool = True,
) -> PublishReport:
    """Publish ``items`` in order: transactions keyed by card, labels and predictions by event id.

    Record timestamps are the event time (transactions), the label time (labels) and the time
    served (predictions), so a consumer can seek the log by time. Returns once the broker
    acknowledged everything.
    """
    report = PublishReport()
    kafka = producer(bootstrap)
    await kafka.start()
    bar = tqdm(
        total=total,
        unit="ev",
        unit_scale=True,
        disable=not progress,
        mininterval=0.5,
        desc="produce",
        leave=False,
    )
    started = time.monotonic()
    counted = PublishReport()
    try:
        out = BatchPublisher(kafka)
        tx_topic, label_topic = settings.topic_transactions, settings.topic_labels
        await out.open_topic(tx_topic)
        await out.open_topic(label_topic)
        for i, item in enumerate(items):
            if type(item) is Transaction:
                t = item.event_time
                full = out.add(tx_topic, item.card_id.encode(), encode_transaction(item), t)
                report.transactions += 1
            elif type(item) is Prediction:
                t = item.served_at
                full = await _add(out, settings.topic_predictions, item.event_id, encode_prediction(item), t)
                report.predictions += 1
            else:
                t = item.label_time
                full = out.add(label_topic, item.event_id.encode(), encode_label(item), t)
                report.labels += 1
                report.frauds += item.is_fraud
            if full:
                await out.send_full()
            if schedule is not None and i % _PACE_EVERY == 0:
                wait = schedule(i, t) - time.monotonic()
                if wait > 0:
                    await out.send_open()  # what is due goes now, not when a batch fills
                    await asyncio.sleep(wait)
            if i % _PROGRESS_EVERY == 0 and i:
                bar.update(_PROGRESS_EVERY)
                counted = _count(settings, report, counted)
        await out.flush()
    finally:
        _count(settings, report, counted)
        report.seconds = time.monotonic() - started
        bar.close()
        await kafka.stop()
    return report


def _count(settings: Settings, report: PublishReport, counted: PublishReport) -> PublishReport:
    # Counters move every few thousand events, not per event: this loop is the producer's hot path.
    for topic, now, before in (
        (settings.topic_transactions, report.transactions, counted.transactions),
        (settings.topic_labels, report.labels, counted.labels),
        (settings.topic_predictions, report.predictions, counted.predictions),
    ):
        if now > before:
            PRODUCED.labels(topic).inc(now - before)
    return PublishReport(report.transactions, report.labels, report.predictions)


async def _add(out: BatchPublisher, topic: str, key: str, value: bytes, t: int) -> bool:
    if not out.opened(topic):
        await out.open_topic(topic)  # only publishers of predictions need that topic to exist
    return out.add(topic, key.encode(), value, t)
