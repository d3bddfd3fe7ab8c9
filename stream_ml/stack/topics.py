"""Create the architecture's topics, idempotently, on any Kafka (embedded or real)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError

TOPIC_ALREADY_EXISTS = 36


@dataclass(frozen=True, slots=True)
class TopicReport:
    name: str
    partitions: int
    created: bool


async def ensure_topics(
    bootstrap: str, names: list[str], partitions: int, timeout_s: float = 20.0
) -> list[TopicReport]:
    """Create missing topics with ``partitions`` partitions; report what exists afterwards."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout_s * 1000))
    await _start_with_retry(admin, bootstrap, timeout_s)
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in names if n not in existing]
        created: set[str] = set()
        if missing:
            response = await admin.create_topics(
                [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in missing]
            )
            for topic, code, message in _topic_errors(response):
                if code == 0:
                    created.add(topic)
                elif code != TOPIC_ALREADY_EXISTS:  # a concurrent creator won the race: fine
                    raise RuntimeError(f"could not create topic {topic!r}: {message} (Kafka error {code})")
        described = await admin.describe_topics(names)
        counts = {d["topic"]: len(d["partitions"]) for d in described}
        return [TopicReport(n, counts.get(n, 0), n in created) for n in names]
    finally:
        await admin.close()


async def _start_with_retry(admin: AIOKafkaAdminClient, bootstrap: str, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            await admin.start()
            return
        except (KafkaConnectionError, KafkaError, OSError) as exc:
            if loop.time() > deadline:
                raise ConnectionError(
                    f"Kafka at {bootstrap} did not answer within {timeout_s:.0f} s ({exc}); is it running?"
                ) from None
            await asyncio.sleep(0.2)


def _topic_errors(response: object) -> list[tuple[str, int, str | None]]:
    return [(t[0], t[1], t[2] if len(t) > 2 else None) for t in response.topic_errors]  # type: ignore[attr-defined]
