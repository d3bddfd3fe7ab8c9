"""Turn raw records into typed events; route the ones that fail to the dead-letter topic."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer

from stream_ml.config import Settings
from stream_ml.events.codec import InvalidMessage
from stream_ml.events.deadletter import Record, Rejected, dead_letter
from stream_ml.events.label import decode_label
from stream_ml.events.prediction import decode_prediction
from stream_ml.events.transaction import decode_transaction
from stream_ml.kafka import BatchPublisher

T = TypeVar("T")
Decoder = Callable[[bytes], Any]


def decoders(settings: Settings) -> dict[str, Decoder]:
    """The decoder of each event topic, by the topic's configured name."""
    return {
        settings.topic_transactions: decode_transaction,
        settings.topic_labels: decode_label,
        settings.topic_predictions: decode_prediction,
    }


def split_valid(
    records: Iterable[Record], decode: Callable[[bytes], T]
) -> tuple[list[tuple[Record, T]], list[Rejected]]:
    """Decode each record; the valid ones in order, and the rejected ones with their reason."""
    valid: list[tuple[Record, T]] = []
    rejected: list[Rejected] = []
    for record in records:
        try:
            if record.value is None:
                raise InvalidMessage("empty message (null value)")
            valid.append((record, decode(record.value)))
        except InvalidMessage as exc:
            rejected.append(Rejected(record, str(exc)))
        except Exception as exc:  # a decoder bug must not stall the partition either
            rejected.append(Rejected(record, f"decoder error: {type(exc).__name__}: {exc}"))
    return valid, rejected


async def validated_batches(
    consumer: AIOKafkaConsumer,
    decode_by_topic: dict[str, Decoder],
    publisher: BatchPublisher,
    dead_letter_topic: str,
    timeout_ms: int = 200,
    max_records: int = 10_000,
) -> AsyncIterator[list[tuple[Record, Any]]]:
    """Yield batches of valid ``(record, event)``; dead-letter the rest before yielding.

    The caller commits after it has applied a batch, so a crash never loses an event.
    """
    while True:
        fetched = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
        batch: list[tuple[Record, Any]] = []
        rejected: list[Rejected] = []
        for tp, records in fetched.items():
            valid, bad = split_valid(records, decode_by_topic[tp.topic])
            batch.extend(valid)
            rejected.extend(bad)
        if rejected:
            await dead_letter(publisher, dead_letter_topic, rejected)
        if batch or rejected:
            yield batch
