"""Feature worker: throughput per process and freshness, measured in one run on the embedded stack.

    python loadtests/bench_features.py [--events 300000] [--rate 5000] [--seconds 20]

1. Throughput: publishes ``--events`` synthetic transactions (and their labels) first, then starts
   one worker process (`stream-ml worker features`) and times it from its first write until its
   consumer group has committed every record published (counted: a worker alone publishes nothing
   to its entity topics): consume -> Redis write -> commit, end to end. The records the group
   has committed when the clock starts are not counted; those written but not committed yet (at
   most 100 ms of work) are, without their time. Meanwhile another Redis client reads a key every
   2 ms: its latency is what a scorer's feature read waits while the worker catches up.
2. Freshness: a worker runs in this process while a producer process publishes transactions at a
   fixed ``--rate`` with the event time set to the moment of sending; each update's freshness is
   the time from its event time to the moment the Redis pipeline that made it visible returned.

Prints a table. Absolute figures move with the machine's load: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis
from aiokafka import AIOKafkaConsumer, TopicPartition

from stream_ml.config import Settings
from stream_ml.events.publish import publish
from stream_ml.events.sources.synthetic import SyntheticConfig, SyntheticStream
from stream_ml.events.transaction import encode_transaction
from stream_ml.features import feature_set
from stream_ml.features.worker import FeatureWorker, WorkerOptions
from stream_ml.kafka import BatchPublisher, producer
from stream_ml.stack import kafka_bootstrap, local, redis_url
from stream_ml.stack.processes import free_port
from stream_ml.stack.topics import ensure_topics

REPO = Path(__file__).resolve().parent.parent


def _fresh_topics(settings: Settings) -> Settings:
    tag = uuid.uuid4().hex[:6]
    run = replace(
        settings,
        topic_transactions=f"bench-tx-{tag}",
        topic_labels=f"bench-labels-{tag}",
        topic_dead_letter=f"bench-dlq-{tag}",
    )
    asyncio.run(ensure_topics(kafka_bootstrap(settings), run.topics(), settings.partitions))
    return run


def _probe_redis(url: str, stop: Any, out: Any) -> None:
    """Another client's GET latency while the worker writes (what a scorer's feature read waits)."""
    client = redis.Redis.from_url(url)
    latencies = []
    while not stop.is_set():
        started = time.perf_counter()
        client.get("sm:probe")
        latencies.append(time.perf_counter() - started)
        time.sleep(0.002)
    latencies.sort()
    out.send((latencies[int(len(latencies) * 0.99)], latencies[-1]))


def throughput(settings: Settings, events: int, batch_size: int) -> tuple[float, int, float, tuple]:
    run = _fresh_topics(settings)
    bootstrap = kafka_bootstrap(settings)
    stream = SyntheticStream(
        SyntheticConfig(seed=1, start_ms=int(time.time() * 1000), rate=2000.0, label_delay_s=30.0)
    )
    report = asyncio.run(publish(run, bootstrap, itertools.islice(stream, events), progress=False))
    group = f"bench-{uuid.uuid4().hex[:6]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAM_ML_")}
    env |= {
        "STREAM_ML_STATE_DIR": str(settings.state_dir),
        "STREAM_ML_TOPIC_TRANSACTIONS": run.topic_transactions,
        "STREAM_ML_TOPIC_LABELS": run.topic_labels,
        "STREAM_ML_TOPIC_DEAD_LETTER": run.topic_dead_letter,
    }
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stream_ml",
            "worker",
            "features",
            "--group",
            group,
            "--metrics-port",
            "0",
            "--batch-size",
            str(batch_size),
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # The clock starts at the worker's first commit (after start-up and the group join).
        client = redis.Redis.from_url(redis_url(settings))
        while not client.keys(f"sm:wm:{group}:*"):
            if worker.poll() is not None:
                raise RuntimeError("the worker exited")
            time.sleep(0.01)
        started = time.monotonic()
        stop_probe = multiprocessing.Event()
        probe_result, probe_out = multiprocessing.Pipe(duplex=False)
        probe = multiprocessing.Process(
            target=_probe_redis, args=(redis_url(settings), stop_probe, probe_out), daemon=True
        )
        probe.start()
        # What it had committed by then is not counted: its first write can come after several
        # batches (labels waiting for their payments), which once made a run look 2.6x faster.
        sources = [run.topic_transactions, run.topic_labels]
        done_before = asyncio.run(_committed(bootstrap, group, sources))
        # Done when the group has committed every record published: counted, not inferred from a
        # fetch that found nothing in 100 ms (a busy broker answering late once ended a run
        # early, at 2.4x the other runs' rate). One worker publishes no entity-topic record.
        done, progress_at = done_before, time.monotonic()
        while done < report.events:
            if worker.poll() is not None:
                raise RuntimeError("the worker exited")
            if time.monotonic() - progress_at > 60:
                raise RuntimeError(f"the worker stalled: {done:,} of {report.events:,} records committed")
            time.sleep(0.05)
            now_done = asyncio.run(_committed(bootstrap, group, sources))
            if now_done > done:
                done, progress_at = now_done, time.monotonic()
        elapsed = time.monotonic() - started
        stop_probe.set()
        probe_p99, probe_max = probe_result.recv()
        probe.join()
    finally:
        worker.terminate()
        worker.wait(10)
    n = report.events - done_before
    return n / elapsed, n, elapsed, (probe_p99, probe_max)


async def _committed(bootstrap: str, group: str, topics: list[str]) -> int:
    """The records of ``topics`` that ``group`` has committed (their offsets start at 0)."""
    view = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await view.start()
    try:
        await view.topics()
        tps = [TopicPartition(t, p) for t in topics for p in sorted(view.partitions_for_topic(t) or ())]
        return sum([await view.committed(tp) or 0 for tp in tps])
    finally:
        await view.stop()


def _produce_live(bootstrap: str, topic: str, rate: float, seconds: float) -> None:
    # Drawn before the clock starts, and frozen out of the garbage collector's scans: a producer
    # elsewhere does not share this box's two cores with the worker it feeds. Labels are due at
    # once and skipped (held for their usual 5 minutes, they grew the heap into 100 ms pauses).
    config = SyntheticConfig(seed=2, start_ms=int(time.time() * 1000), rate=rate, label_delay_s=0.0)
    items = (x for x in SyntheticStream(config) if hasattr(x, "card_id"))  # labels skipped
    txs = list(itertools.islice(items, int(rate * seconds) + 1))
    gc.collect()
    gc.freeze()

    async def go() -> None:
        kafka = producer(bootstrap, linger_ms=0)
        await kafka.start()
        out = BatchPublisher(kafka)
        await out.open_topic(topic)
        start = time.monotonic()
        sent = 0
        while sent < len(txs):
            due = min(int((time.monotonic() - start) * rate), len(txs))
            now_ms = int(time.time() * 1000)
            while sent < due:
                tx = txs[sent]
                tx.event_time = now_ms  # freshness is measured from the moment of sending
                out.add(topic, tx.card_id.encode(), encode_transaction(tx), now_ms)
                sent += 1
            await out.send_open()
            # Sent every 5 ms, as a producer with Kafka's default linger.ms of 5 does: a request
            # per partition each millisecond took this box's second core from the worker.
            await asyncio.sleep(0.005)
        await out.flush()
        await kafka.stop()

    asyncio.run(go())


def freshness(settings: Settings, rate: float, seconds: float) -> tuple[float, float, int]:
    run = _fresh_topics(settings)
    bootstrap = kafka_bootstrap(settings)
    samples: list[float] = []

    def visible(times: list[int], now: float) -> None:
        now_ms = now * 1000
        samples.extend(now_ms - t for t in times)

    worker = FeatureWorker(
        run,
        feature_set(settings.feature_set),
        bootstrap,
        redis_url(settings),
        WorkerOptions(group_id=f"bench-{uuid.uuid4().hex[:6]}"),
        on_visible=visible,
    )

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(worker.run(stop))
        while not worker.ready:  # the group joined (Tansu answers a join after ~5 s)
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        samples.clear()
        proc = multiprocessing.Process(
            target=_produce_live, args=(bootstrap, run.topic_transactions, rate, seconds)
        )
        proc.start()
        while proc.is_alive():
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        stop.set()
        await task

    import uvloop

    uvloop.run(go())
    samples.sort()
    p50 = statistics.median(samples)
    p99 = samples[int(len(samples) * 0.99)]
    return p50, p99, len(samples)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=300_000, help="events for the throughput run")
    parser.add_argument("--batch-size", type=int, default=5000, help="the worker's --batch-size")
    parser.add_argument("--rate", type=float, default=5000.0, help="events/s for the freshness run")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the freshness run")
    args = parser.parse_args()

    settings = Settings.from_env()
    own_stack = settings.kafka_bootstrap is None
    if own_stack:
        settings = replace(
            settings,
            state_dir=Path(tempfile.mkdtemp(prefix="stream-ml-bench-")),
            kafka_port=free_port(),
            redis_port=free_port(),
        )
        local.up(settings)
    try:
        rate, n, elapsed, (probe_p99, probe_max) = throughput(settings, args.events, args.batch_size)
        p50, p99, samples = freshness(settings, args.rate, args.seconds)
    finally:
        if own_stack:
            local.down(settings)
    print(
        f"\n| measure | result |\n|---|---|\n"
        f"| throughput, one worker process (consume -> Redis -> commit) | {rate:,.0f} events/s "
        f"({n:,} events, {elapsed:.1f} s) |\n"
        f"| meanwhile, another client's Redis GET every 2 ms, p99 / max | {probe_p99 * 1000:.1f} ms / "
        f"{probe_max * 1000:.1f} ms |\n"
        f"| freshness at {args.rate:,.0f} events/s, p50 | {p50:.1f} ms |\n"
        f"| freshness at {args.rate:,.0f} events/s, p99 | {p99:.1f} ms ({samples:,} entity updates) |"
    )


if __name__ == "__main__":
    main()
