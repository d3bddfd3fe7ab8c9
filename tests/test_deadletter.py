"""Invalid messages go to the dead-letter topic with their reason; the valid ones around them flow on."""

from __future__ import annotations

import asyncio
import json

import msgpack
from helpers import read_topic

from stream_ml.config import Settings
from stream_ml.events import Label, Transaction, encode_label, encode_transaction
from stream_ml.events.consume import decoders, validated_batches
from stream_ml.events.deadletter import (
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_TOPIC,
    reason_of,
)
from stream_ml.kafka import BatchPublisher, consumer, producer
from stream_ml.stack import kafka_bootstrap

T0 = 1_780_000_000_000


def _tx(i: int, card: str) -> Transaction:
    return Transaction(f"e{i}", T0 + i, card, "m1", 10.0 + i, "EUR", "FR", "pos", None)


def _good_tx(i: int, card: str) -> bytes:
    return encode_transaction(_tx(i, card))


# (description, raw bytes, a phrase the dead-letter reason must contain)
BAD_TRANSACTIONS = [
    ("garbage bytes", b"\xc1\xc1\xc1", "not msgpack or JSON"),
    (
        "JSON with a bad amount",
        json.dumps({**_tx(90, "c1").to_dict(), "amount": "abc"}).encode(),
        "field amount: expected number, got 'abc'",
    ),
    (
        "msgpack missing card",
        msgpack.packb({k: v for k, v in _tx(91, "c1").to_dict().items() if k != "card_id"}),
        "field card_id: required, missing",
    ),
    ("seconds, not ms", msgpack.packb({**_tx(92, "c1").to_dict(), "event_time": 1_780_000_000}), "seconds"),
    ("future schema", msgpack.packb({**_tx(93, "c1").to_dict(), "v": 99}), "schema version 99"),
    ("a list, not a map", msgpack.packb([1, 2, 3]), "expected a map"),
    ("empty", b"", "empty message"),
]


def test_invalid_messages_are_dead_lettered_and_valid_ones_delivered(topics: Settings):
    bootstrap = kafka_bootstrap(topics)
    card = b"c1"  # one key: one partition, so order is defined and every bad message sits between good ones
    sent: list[tuple[bytes, bool]] = []
    for i, (_, raw, _) in enumerate(BAD_TRANSACTIONS):
        sent.append((_good_tx(2 * i, "c1"), True))
        sent.append((raw, False))
    sent.append((_good_tx(999, "c1"), True))
    label_ok = encode_label(Label("e0", True, T0 + 5, "chargeback"))
    label_bad = msgpack.packb({"event_id": "e1", "is_fraud": "yes", "label_time": T0, "source": "x"})

    async def scenario() -> list:
        kafka = producer(bootstrap)
        await kafka.start()
        try:
            out = BatchPublisher(kafka)
            for raw, _ in sent:
                await out.publish(topics.topic_transactions, card, raw, None)
            await out.publish(topics.topic_labels, b"e0", label_ok, None)
            await out.publish(topics.topic_labels, b"e1", label_bad, None)
            await out.flush()

            source = consumer(bootstrap, topics.topic_transactions, topics.topic_labels, group_id="dlq-test")
            await source.start()
            delivered = []
            try:
                expected_valid = sum(ok for _, ok in sent) + 1
                batches = validated_batches(source, decoders(topics), out, topics.topic_dead_letter)
                async with asyncio.timeout(30):
                    async for batch in batches:
                        delivered.extend(batch)
                        await source.commit()
                        if len(delivered) >= expected_valid:
                            break
            finally:
                await source.stop()
            return delivered
        finally:
            await kafka.stop()

    delivered = asyncio.run(scenario())
    transactions = [event for record, event in delivered if record.topic == topics.topic_transactions]
    labels = [event for record, event in delivered if record.topic == topics.topic_labels]
    assert [t.event_id for t in transactions] == [f"e{2 * i}" for i in range(len(BAD_TRANSACTIONS))] + [
        "e999"
    ]
    assert labels == [Label("e0", True, T0 + 5, "chargeback")]

    dead = read_topic(bootstrap, topics.topic_dead_letter, expected=len(BAD_TRANSACTIONS) + 1)
    assert len(dead) == len(BAD_TRANSACTIONS) + 1
    by_value = {bytes(r.value): r for r in dead}
    source_records = read_topic(bootstrap, topics.topic_transactions, expected=len(sent))
    offsets = {bytes(r.value): (r.partition, r.offset) for r in source_records}
    for description, raw, phrase in BAD_TRANSACTIONS:
        record = by_value[raw]  # the original bytes, untouched
        headers = dict(record.headers)
        assert phrase in reason_of(record.headers), description
        assert record.key == card
        assert headers[HEADER_TOPIC] == topics.topic_transactions.encode()
        partition, offset = offsets[raw]
        assert headers[HEADER_PARTITION] == str(partition).encode()
        assert headers[HEADER_OFFSET] == str(offset).encode()
    label_reason = dict(by_value[label_bad].headers)[HEADER_REASON].decode()
    assert label_reason == "field is_fraud: expected true/false (or 0/1), got 'yes'"
