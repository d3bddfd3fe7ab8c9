"""`stream-ml worker score`: every payment of the log scored once into `predictions`, bad records
dead-lettered, and a restarted member goes on from its commit (real broker, Redis, processes)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

from helpers import REPO, read_topic, settings_env

from stream_ml.config import Settings
from stream_ml.events import Transaction, encode_transaction
from stream_ml.events.deadletter import reason_of
from stream_ml.events.prediction import decode_prediction
from stream_ml.features import feature_set
from stream_ml.kafka import producer
from stream_ml.serving.model import default_model
from stream_ml.stack import kafka_bootstrap

T0 = 1_780_000_000_000


def _payments(first: int, n: int) -> list[Transaction]:
    return [
        Transaction(f"s{i}", T0 + i * 1000, f"c{i % 17}", f"m{i % 5}", 10.0 + i, "EUR", "FR", "ecom", None)
        for i in range(first, first + n)
    ]


def _publish(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    async def send() -> None:
        kafka = producer(bootstrap)
        await kafka.start()
        try:
            for key, value in records:
                await kafka.send(topic, value, key=key)
            await kafka.flush()
        finally:
            await kafka.stop()

    asyncio.run(send())


def _start(settings: Settings, registry: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "stream_ml", "worker", "score", "--metrics-port", "0", "--batch-size", "50"],
        env=settings_env(settings, STREAM_ML_REGISTRY=str(registry)),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _stop(worker: subprocess.Popen[str]) -> None:
    worker.send_signal(signal.SIGTERM)
    _, err = worker.communicate(timeout=60)
    assert worker.returncode == 0, err[-3000:]


def test_every_payment_is_scored_once_and_a_restart_goes_on_from_the_commit(topics: Settings, tmp_path: Path):
    bootstrap = kafka_bootstrap(topics)
    first = _payments(0, 120)
    _publish(
        bootstrap,
        topics.topic_transactions,
        [(t.card_id.encode(), encode_transaction(t)) for t in first] + [(b"c1", b"\xc1 not an event")],
    )
    worker = _start(topics, tmp_path / "registry")
    try:
        predicted = [decode_prediction(r.value) for r in read_topic(bootstrap, topics.topic_predictions, 120)]
    finally:
        _stop(worker)
    assert sorted(p.event_id for p in predicted) == sorted(t.event_id for t in first)
    version = default_model(feature_set(topics.feature_set)).version
    assert {(p.model_version, p.variant, p.degraded) for p in predicted} == {(version, "production", False)}
    assert all(len(p.features) == len(feature_set(topics.feature_set).names) for p in predicted)
    (dead,) = read_topic(bootstrap, topics.topic_dead_letter, 1)
    assert "not msgpack or JSON" in (reason_of(dead.headers) or "")

    second = _payments(1000, 30)
    _publish(
        bootstrap, topics.topic_transactions, [(t.card_id.encode(), encode_transaction(t)) for t in second]
    )
    worker = _start(topics, tmp_path / "registry")
    try:
        predicted = [decode_prediction(r.value) for r in read_topic(bootstrap, topics.topic_predictions, 150)]
    finally:
        _stop(worker)
    # The first 120 were committed: they are not scored again.
    assert sorted(p.event_id for p in predicted) == sorted(t.event_id for t in first + second)
