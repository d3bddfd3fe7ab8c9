"""The feature worker end to end: real broker, real Redis, worker processes as a user runs them.

One dataset (synthetic payments with out-of-order and too-late copies, and their labels) is
published once; each test runs workers in its own consumer group and Redis database and compares
the store with the brute-force oracle (tests/feature_oracle.py): one clean worker, a worker
SIGKILLed and restarted several times, two workers sharing the partitions, and partitions that
move while updates wait in them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from aiokafka.partitioner import DefaultPartitioner
from feature_oracle import Oracle
from helpers import REPO, read_topic, run_cli, settings_env

from stream_ml.config import Settings
from stream_ml.events import Label, Transaction, encode_label, encode_transaction
from stream_ml.events.deadletter import reason_of
from stream_ml.events.sources.synthetic import SyntheticConfig, SyntheticStream
from stream_ml.features import FRAUD_FEATURES
from stream_ml.features import store as store_module
from stream_ml.features.store import FeatureStore
from stream_ml.kafka import BatchPublisher, group_caught_up, producer
from stream_ml.stack import kafka_bootstrap, redis_url
from stream_ml.stack.processes import free_port
from stream_ml.stack.topics import ensure_topics

START = 1_780_000_000_000  # 2026-05-28 20:26:40 UTC
HOUR = 3_600_000


@dataclass
class Dataset:
    settings: Settings
    oracle: Oracle
    entities: list[tuple[str, str]]
    read_times: list[int]
    late: int
    items: list  # what was published, in order


def _partition(key: str, partitions: int) -> int:
    ids = list(range(partitions))
    return DefaultPartitioner()(key.encode(), ids, ids)


@pytest.fixture(scope="module")
def dataset(stack: Settings) -> Dataset:
    return make_dataset(stack)


def make_dataset(stack: Settings) -> Dataset:
    """Publish the dataset to fresh topics of ``stack``."""
    rng = random.Random(7)
    tag = uuid.uuid4().hex[:8]
    from dataclasses import replace

    settings = replace(
        stack,
        topic_transactions=f"fw-tx-{tag}",
        topic_labels=f"fw-labels-{tag}",
        topic_dead_letter=f"fw-dlq-{tag}",
    )
    bootstrap = kafka_bootstrap(stack)
    asyncio.run(ensure_topics(bootstrap, settings.topics(), settings.partitions))

    stream = SyntheticStream(
        SyntheticConfig(
            seed=11, start_ms=START, rate=1.5, cards=150, merchants=30, fraud_rate=0.05, label_delay_s=900
        )
    )
    items: list[Transaction | Label] = []
    for item in stream.items(until_ms=START + 3 * HOUR):
        items.append(item)
        if isinstance(item, Transaction) and rng.random() < 0.06:  # a copy that arrives out of order
            lag = (
                rng.randrange(60_000, 50 * 60_000)
                if rng.random() < 0.7
                else rng.randrange(2 * HOUR, 3 * HOUR)
            )
            copy = Transaction(
                item.event_id + "-copy",
                item.event_time - lag,
                item.card_id,
                item.merchant_id,
                item.amount + 1,
                item.currency,
                item.country,
                item.channel,
                item.device_id,
            )
            items.append(copy)
    txs = {i.event_id: i for i in items if isinstance(i, Transaction)}

    oracle = Oracle(FRAUD_FEATURES)
    for item in items:
        if isinstance(item, Transaction):
            oracle.transaction(item, _partition(item.card_id, settings.partitions))
        else:
            oracle.label(item, txs[item.event_id], _partition(item.event_id, settings.partitions))
    assert oracle.dropped, "the dataset must hold events later than the allowed lateness"

    async def publish() -> None:
        kafka = producer(bootstrap)
        await kafka.start()
        try:
            out = BatchPublisher(kafka)
            for item in items:
                if isinstance(item, Transaction):
                    await out.publish(
                        settings.topic_transactions,
                        item.card_id.encode(),
                        encode_transaction(item),
                        item.event_time,
                    )
                else:
                    await out.publish(
                        settings.topic_labels, item.event_id.encode(), encode_label(item), item.label_time
                    )
            await out.flush()
        finally:
            await kafka.stop()

    asyncio.run(publish())
    entities = [(e, i) for e, ids in oracle.events.items() for i in ids]
    end = max(t for ids in oracle.events.values() for events in ids.values() for _, t, _ in events)
    read_times = [
        end,
        end + 5 * 60_000,
        end + 2 * HOUR,
        end + 26 * HOUR,
        end + 8 * 24 * HOUR,
        end + 31 * 24 * HOUR,
    ]
    read_times += [end + rng.randrange(31 * 24 * HOUR) for _ in range(4)]
    return Dataset(settings, oracle, entities, read_times, len(oracle.dropped), items)


def _redis_db(settings: Settings, db: int) -> str:
    url = redis_url(settings).rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


def _start(ds: Dataset, group: str, url: str, *extra: str, metrics_port: int = 0) -> subprocess.Popen:
    argv = [
        "worker",
        "features",
        "--group",
        group,
        "--metrics-port",
        str(metrics_port),
        "--batch-size",
        "400",
    ]
    return subprocess.Popen(
        [sys.executable, "-m", "stream_ml", *argv, *extra],
        env=settings_env(ds.settings, STREAM_ML_REDIS_URL=url),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _watermarks(group: str, url: str) -> dict[bytes, bytes]:
    client = redis.Redis.from_url(url)
    keys = client.keys(f"sm:wm:{group}:*")
    return dict(zip(keys, client.mget(keys), strict=True)) if keys else {}


def _wait_written(group: str, url: str, before: dict[bytes, bytes] | None = None) -> None:
    """Until the group's workers have written a batch (another than what ``before`` holds)."""
    deadline = time.monotonic() + 60
    while _watermarks(group, url) == (before or {}) and time.monotonic() < deadline:
        time.sleep(0.02)


def _wait_done(ds: Dataset, group: str, workers: list[subprocess.Popen], timeout_s: float = 150.0) -> None:
    topics = [
        ds.settings.topic_transactions,
        ds.settings.topic_labels,
        *(f"{group}-{e}" for e in FRAUD_FEATURES.entities()),
    ]
    deadline = time.monotonic() + timeout_s
    stable = 0
    while time.monotonic() < deadline:
        for w in workers:
            assert w.poll() is None, f"a worker exited: {w.stderr.read()[-3000:]}"
        done = asyncio.run(group_caught_up(kafka_bootstrap(ds.settings), group, topics))
        stable = stable + 1 if done else 0
        if stable >= 3:  # the entity topics may still receive what the sources routed: be sure
            return
        time.sleep(0.3)
    raise AssertionError(f"group {group} did not catch up within {timeout_s} s")


def _stop(workers: list[subprocess.Popen]) -> None:
    for w in workers:
        w.send_signal(signal.SIGTERM)
    try:
        for w in workers:
            assert w.wait(20) == 0, w.stderr.read()[-3000:]
    finally:
        for w in workers:  # a worker that hangs must not outlive the test
            if w.poll() is None:
                w.kill()
                w.wait()


def _snapshot(ds: Dataset, url: str) -> dict[tuple[str, str, int], list[float]]:
    async def read() -> dict:
        client = aioredis.Redis.from_url(url)
        try:
            store = FeatureStore(client, FRAUD_FEATURES)
            states = await store.load(ds.entities)
            return {
                (e, i, t): store.layouts[e].read(states[(e, i)], t)
                for (e, i) in ds.entities
                for t in ds.read_times
            }
        finally:
            await client.aclose()

    return asyncio.run(read())


def _assert_matches_oracle(ds: Dataset, snapshot: dict) -> None:
    rng = random.Random(3)
    checked = 0
    for (entity, entity_id, t), values in snapshot.items():
        assert values is not None
        features = [f for f in FRAUD_FEATURES.features if f.entity == entity]
        if rng.random() > 0.6:  # a few hundred entities at random times, every feature of each
            continue
        for f, value in zip(features, values, strict=True):
            expected = ds.oracle.value(f, entity_id, t)
            assert value == pytest.approx(expected, rel=1e-9, abs=1e-9), (f.name, entity_id, t)
            checked += 1
    assert checked > 3000


def _assert_same(snapshot: dict, clean: dict | None) -> None:
    """Equal to the clean run's store (sums may differ in the last bits: updates interleave differently)."""
    if clean is None:
        return
    assert snapshot.keys() == clean.keys()
    for key, values in snapshot.items():
        assert values == pytest.approx(clean[key], rel=1e-12, abs=1e-9), key


def _assert_like_the_clean_run(ds: Dataset, url: str) -> None:
    snapshot = _snapshot(ds, url)
    _assert_matches_oracle(ds, snapshot)
    _assert_same(snapshot, getattr(ds, "clean", None))


def _dead_letters(ds: Dataset) -> list:
    return read_topic(kafka_bootstrap(ds.settings), ds.settings.topic_dead_letter, ds.late, timeout_s=10)


def test_one_worker_matches_the_oracle(dataset: Dataset):
    group, url = f"fw-clean-{uuid.uuid4().hex[:6]}", _redis_db(dataset.settings, 1)
    port = free_port()
    worker = _start(dataset, group, url, metrics_port=port)
    try:
        _wait_done(dataset, group, [worker])
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        _stop([worker])
    snapshot = _snapshot(dataset, url)
    _assert_matches_oracle(dataset, snapshot)
    assert len({(e, i) for e, i, _ in snapshot}) > 200

    late = [r for r in _dead_letters(dataset) if "late event" in (reason_of(r.headers) or "")]
    assert len(late) == dataset.late  # each too-late event dead-lettered once, with the reason
    late_metric = (
        f'stream_ml_feature_events_total{{outcome="late",topic="{dataset.settings.topic_transactions}"}}'
    )
    assert f"{late_metric} {float(dataset.late)}" in metrics
    assert "stream_ml_feature_freshness_seconds_bucket" in metrics
    dataset.clean = snapshot  # type: ignore[attr-defined]

    # The inspection commands read the same store.
    entity, entity_id, t = next(k for k in snapshot if k[0] == "card" and k[2] == dataset.read_times[2])
    env = settings_env(dataset.settings, STREAM_ML_REDIS_URL=url)
    got = run_cli("features", "get", "card", entity_id, "--at", str(t), env=env)
    assert got.returncode == 0, got.stderr
    features = json.loads(got.stdout)["features"]
    assert list(features.values()) == pytest.approx(snapshot[(entity, entity_id, t)])
    event = {
        "event_id": "probe",
        "event_time": t,
        "card_id": entity_id,
        "merchant_id": "m1",
        "amount": 10.0,
        "currency": "EUR",
        "country": "FR",
        "channel": "ecom",
        "device_id": None,
    }
    vec = run_cli("features", "vector", "--event", json.dumps(event), env=env)
    assert vec.returncode == 0, vec.stderr
    vector = json.loads(vec.stdout)["vector"]
    assert list(vector) == FRAUD_FEATURES.names
    assert vector["card_tx_count_24h"] == features["card_tx_count_24h"] and vector["channel_ecom"] == 1.0


def test_a_worker_whose_cache_is_dropped_at_every_batch_gives_the_same_state(dataset: Dataset):
    """States dropped from memory are read back from Redis, never before their last write is done."""
    group, url = f"fw-small-{uuid.uuid4().hex[:6]}", _redis_db(dataset.settings, 6)
    worker = _start(dataset, group, url, "--max-cached-entities", "20")
    try:
        _wait_done(dataset, group, [worker])
    finally:
        _stop([worker])
    _assert_like_the_clean_run(dataset, url)


def test_a_write_over_many_scripts_sets_every_key_with_its_ttl(stack: Settings, monkeypatch):
    # A batch is written by scripts of a few keys each (Redis serves other clients between them):
    # the cuts fall inside the states, between states and event entries, and among the plain keys.
    monkeypatch.setattr(store_module, "SCRIPT_KEYS", 7)
    namespace = f"scripts-{uuid.uuid4().hex[:8]}"

    async def go() -> None:
        client = aioredis.Redis.from_url(redis_url(stack))
        try:
            await client.script_flush()  # as in a new Redis: the script is loaded by the write
            store = FeatureStore(client, FRAUD_FEATURES, label_horizon_s=1000, namespace=namespace)
            card = store.layouts["card"]
            states = {}
            for i in range(23):
                states[f"c{i}"] = state = card.new()
                card.apply(state, "transactions", START, (float(i), "m1", None, "FR"), "transactions:0", i)
            events = {f"e{i}": (f"c{i}", "m1", None) for i in range(10)}
            plain = {f"{namespace}:plain:a": 5, f"{namespace}:plain:b": 6}
            await store.write(store.prepare({"card": states}, events, plain))

            loaded = await store.load([("card", i) for i in states])
            assert {i: card.read(loaded[("card", i)], START) for i in states} == {
                i: card.read(s, START) for i, s in states.items()
            }
            assert await store.lookup_events(list(events)) == events
            state_ttls = [await client.pttl(store.key("card", i)) for i in states]
            event_ttls = [await client.pttl(f"{namespace}:ev:{{{e}}}") for e in events]
            assert all(1_000_000 < ttl <= store.ttl_ms for ttl in state_ttls)
            assert all(0 < ttl <= 1_000_000 for ttl in event_ttls)
            assert await client.mget(list(plain)) == [b"5", b"6"]
            assert [await client.pttl(k) for k in plain] == [-1, -1]
        finally:
            keys = [k async for k in client.scan_iter(f"{namespace}:*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()

    asyncio.run(go())


def test_sigkill_and_restart_give_the_same_state(dataset: Dataset):
    group, url = f"fw-kill-{uuid.uuid4().hex[:6]}", _redis_db(dataset.settings, 2)
    rng = random.Random(5)
    kills = 0
    for _ in range(3):
        worker = _start(dataset, group, url)
        _wait_written(group, url)
        time.sleep(rng.uniform(0.0, 0.6))
        if worker.poll() is None:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait()
            kills += 1
    assert kills == 3
    worker = _start(dataset, group, url)
    try:
        _wait_done(dataset, group, [worker])
    finally:
        _stop([worker])
    _assert_like_the_clean_run(dataset, url)


def test_two_workers_equal_one(dataset: Dataset):
    """A third joins and leaves mid-stream: partitions move while updates travel to their owners."""
    group, url = f"fw-two-{uuid.uuid4().hex[:6]}", _redis_db(dataset.settings, 3)
    workers = [_start(dataset, group, url), _start(dataset, group, url)]
    try:
        _wait_written(group, url)
        third = _start(dataset, group, url)
        time.sleep(3)
        _stop([third])
        _wait_done(dataset, group, workers)
    finally:
        _stop(workers)
    _assert_like_the_clean_run(dataset, url)


class _Holder:
    """A group member that holds some of the entity partitions and never reads them.

    While it is there, the worker publishes the updates of those partitions and they wait in the
    entity topics, as they do on their way to another worker.
    """

    def __init__(self, ds: Dataset, group: str) -> None:
        self.topics = [f"{group}-{e}" for e in FRAUD_FEATURES.entities()]
        bootstrap = kafka_bootstrap(ds.settings)
        asyncio.run(ensure_topics(bootstrap, self.topics, ds.settings.partitions))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.consumer = self._call(self._join(bootstrap, group))

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    async def _join(self, bootstrap: str, group: str) -> AIOKafkaConsumer:
        consumer = AIOKafkaConsumer(
            *self.topics, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
        )
        await consumer.start()
        while not consumer.assignment():
            await asyncio.sleep(0.05)
        consumer.pause(*consumer.assignment())
        return consumer

    def leave(self) -> None:
        self._call(self.consumer.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def test_updates_waiting_in_a_moved_partition_are_applied_before_newer_ones(dataset: Dataset):
    """A worker that gains an entity partition applies what waits in it before its own newer updates.

    Its own updates skip Kafka, so without that order an older update from the same source would
    arrive after a newer one and be skipped as already applied.
    """
    group, url = f"fw-move-{uuid.uuid4().hex[:6]}", _redis_db(dataset.settings, 5)
    holder = _Holder(dataset, group)
    workers: list[subprocess.Popen] = []
    try:
        # Small batches: most of the sources are still to read once the holder has left.
        workers = [_start(dataset, group, url, "--batch-size", "10")]
        _wait_written(group, url)
    finally:
        holder.leave()  # the worker gains the partitions where its updates wait for the holder
    try:
        _wait_done(dataset, group, workers)
    finally:
        _stop(workers)
    _assert_like_the_clean_run(dataset, url)


def test_a_label_without_its_transaction_is_dead_lettered_after_the_wait(topics: Settings):
    bootstrap = kafka_bootstrap(topics)
    tx = Transaction("known", START, "c1", "m1", 10.0, "EUR", "FR", "pos", None)

    async def publish() -> None:
        kafka = producer(bootstrap)
        await kafka.start()
        try:
            out = BatchPublisher(kafka)
            await out.publish(topics.topic_transactions, b"c1", encode_transaction(tx), START)
            await out.publish(
                topics.topic_labels, b"orphan", encode_label(Label("orphan", True, START, "x")), START
            )
            await out.publish(
                topics.topic_labels, b"known", encode_label(Label("known", True, START + 1, "x")), START
            )
            await out.flush()
        finally:
            await kafka.stop()

    asyncio.run(publish())
    group, url = f"fw-orphan-{uuid.uuid4().hex[:6]}", _redis_db(topics, 4)
    ds = Dataset(topics, Oracle(FRAUD_FEATURES), [], [], 0, [])
    worker = _start(ds, group, url, "--label-wait", "1")
    try:
        _wait_done(ds, group, [worker], timeout_s=60)
    finally:
        _stop([worker])
    dead = read_topic(bootstrap, topics.topic_dead_letter, 1, timeout_s=5)
    assert [reason_of(r.headers).split(":")[0] for r in dead] == ["label for unknown event 'orphan'"]

    async def card() -> dict[str, float]:
        client = aioredis.Redis.from_url(url)
        try:
            store = FeatureStore(client, FRAUD_FEATURES)
            state = (await store.load([("card", "c1")]))[("card", "c1")]
            return dict(
                zip(
                    [f.name for f in store.layouts["card"].features],
                    store.layouts["card"].read(state, START + 2),
                    strict=True,
                )
            )
        finally:
            await client.aclose()

    assert asyncio.run(card())["card_frauds_30d"] == 1.0  # the label that waited behind it still counts
