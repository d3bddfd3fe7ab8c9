"""The dead-letter topic: where a message that fails validation goes, with the reason.

A bad message never stops a consumer: it is republished, original key and bytes untouched, with
headers that say why and where it came from, and the consumer moves on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from stream_ml.kafka import BatchPublisher

HEADER_REASON = "x-error-reason"
HEADER_TOPIC = "x-source-topic"
HEADER_PARTITION = "x-source-partition"
HEADER_OFFSET = "x-source-offset"
HEADER_FAILED_AT = "x-failed-at-ms"


class Record(Protocol):
    """What aiokafka's ConsumerRecord and faust's Message both have."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any


@dataclass(frozen=True, slots=True)
class Rejected:
    record: Record
    reason: str

    def headers(self) -> list[tuple[str, bytes]]:
        r = self.record
        original = [(k, v) for k, v in (r.headers or ()) if not k.startswith("x-")]
        return [
            *original,
            (HEADER_REASON, self.reason.encode()),
            (HEADER_TOPIC, r.topic.encode()),
            (HEADER_PARTITION, str(r.partition).encode()),
            (HEADER_OFFSET, str(r.offset).encode()),
            (HEADER_FAILED_AT, str(int(time.time() * 1000)).encode()),
        ]


async def dead_letter(publisher: BatchPublisher, topic: str, rejected: list[Rejected]) -> None:
    """Publish ``rejected`` to the dead-letter ``topic`` and wait for the broker's ack.

    Callers commit their source offsets only after this returns, so a crash in between
    re-delivers the bad message rather than losing it.
    """
    for r in rejected:
        await publisher.publish(topic, r.record.key, r.record.value or b"", None, r.headers())
    await publisher.flush()


def reason_of(headers: Any) -> str | None:
    for key, value in headers or ():
        if key == HEADER_REASON:
            return bytes(value).decode(errors="replace")
    return None
