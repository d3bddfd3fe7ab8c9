"""Test helpers: free ports, running the CLI as a user would, reading topics back."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.structs import ConsumerRecord

from stream_ml.config import ENV_PREFIX, Settings

REPO = Path(__file__).parent.parent


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """Environment for a `stream-ml` subprocess that uses ``settings``' stack and topics."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(
        {
            "STREAM_ML_STATE_DIR": str(settings.state_dir),
            "STREAM_ML_TOPIC_TRANSACTIONS": settings.topic_transactions,
            "STREAM_ML_TOPIC_LABELS": settings.topic_labels,
            "STREAM_ML_TOPIC_PREDICTIONS": settings.topic_predictions,
            "STREAM_ML_TOPIC_DRIFT": settings.topic_drift,
            "STREAM_ML_TOPIC_DEAD_LETTER": settings.topic_dead_letter,
        }
    )
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str], timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m stream_ml ARGS` as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, "-m", "stream_ml", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def read_topic(bootstrap: str, topic: str, expected: int, timeout_s: float = 30.0) -> list[ConsumerRecord]:
    """Every record of ``topic`` from the beginning: waits for ``expected`` of them, then a bit more."""

    async def read() -> list[ConsumerRecord]:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
        )
        await consumer.start()
        try:
            await consumer.topics()  # fetches the metadata that partitions_for_topic reads
            partitions = [
                TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])
            ]
            assert partitions, f"topic {topic} does not exist"
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            records: list[ConsumerRecord] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout_s
            quiet_until = None
            while loop.time() < deadline:
                batch = await consumer.getmany(timeout_ms=200)
                for part in batch.values():
                    records.extend(part)
                if len(records) >= expected:
                    # linger briefly: more than expected is a failure the caller should see
                    quiet_until = quiet_until or loop.time() + 0.5
                    if loop.time() >= quiet_until:
                        break
            return records
        finally:
            await consumer.stop()

    return asyncio.run(read())
