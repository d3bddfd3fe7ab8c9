"""Producer throughput: `produce synthetic` vs the broker's raw ceiling, measured in one run.

    python loadtests/bench_produce.py [--events 200000] [--rounds 3]

Starts its own embedded stack on free ports (unless STREAM_ML_KAFKA_BOOTSTRAP is set), then per
round publishes (a) pre-encoded 200-byte records through the same batch publisher: what the broker
and client take at most, and (b) the synthetic generator end to end (generate, encode, publish).
Prints events/s for each, their medians, and (b)/(a) as a ratio: the ratio is what to compare
between machines and commits, the absolute figures move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

from stream_ml.config import Settings
from stream_ml.events.publish import publish
from stream_ml.events.sources.synthetic import SyntheticConfig, SyntheticStream
from stream_ml.kafka import BatchPublisher, producer
from stream_ml.stack import kafka_bootstrap, local
from stream_ml.stack.processes import free_port
from stream_ml.stack.topics import ensure_topics

START_MS = 1_780_000_000_000


async def raw_ceiling(bootstrap: str, topic: str, n: int) -> float:
    kafka = producer(bootstrap)
    await kafka.start()
    try:
        out = BatchPublisher(kafka)
        await out.open_topic(topic)
        value = b"x" * 200
        keys = [f"c{i}".encode() for i in range(20_000)]
        started = time.perf_counter()
        for i in range(n):
            if out.add(topic, keys[i % 20_000], value, START_MS + i):
                await out.send_full()
        await out.flush()
        return n / (time.perf_counter() - started)
    finally:
        await kafka.stop()


def synthetic(settings: Settings, bootstrap: str, n: int, seed: int) -> float:
    stream = SyntheticStream(SyntheticConfig(seed=seed, start_ms=START_MS, rate=1000.0, label_delay_s=30.0))
    report = asyncio.run(publish(settings, bootstrap, itertools.islice(stream, n), progress=False))
    return report.events_per_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000, help="events per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    settings = Settings.from_env()
    own_stack = settings.kafka_bootstrap is None
    if own_stack:
        state = Path(tempfile.mkdtemp(prefix="stream-ml-bench-"))
        settings = replace(settings, state_dir=state, kafka_port=free_port(), redis_port=free_port())
        local.up(settings)
    try:
        bootstrap = kafka_bootstrap(settings)
        raw, syn = [], []
        for r in range(args.rounds):
            tag = uuid.uuid4().hex[:6]
            run = replace(settings, topic_transactions=f"bench-tx-{tag}", topic_labels=f"bench-labels-{tag}")
            asyncio.run(
                ensure_topics(bootstrap, [run.topic_transactions, run.topic_labels], settings.partitions)
            )
            raw.append(asyncio.run(raw_ceiling(bootstrap, run.topic_transactions, args.events)))
            syn.append(synthetic(run, bootstrap, args.events, seed=r))
            print(f"round {r + 1}: raw {raw[-1]:>9,.0f} ev/s   synthetic {syn[-1]:>9,.0f} ev/s")
        raw_m, syn_m = statistics.median(raw), statistics.median(syn)
        print(
            f"median: raw ceiling {raw_m:,.0f} ev/s, produce synthetic {syn_m:,.0f} ev/s "
            f"({syn_m / raw_m:.2f} of the ceiling; {args.events:,} events a measurement, "
            f"{settings.partitions} partitions)"
        )
    finally:
        if own_stack:
            local.down(settings)


if __name__ == "__main__":
    main()
