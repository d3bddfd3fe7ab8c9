"""Replay: events per second of one process, from Kafka and in memory, measured in one run.

    python loadtests/bench_replay.py [--events 200000] [--rate 200] [--terminals 0]

Starts an embedded stack on free ports, publishes ``--events`` synthetic events (transactions and
their labels, 20k cards), then measures:

1. read only: consume every record of both topics; then read + decode (the floor replay cannot
   go under);
2. compute only: the same events fed to the point-in-time engine from memory (state, vectors),
   with the garbage collector paused as replay pauses it, decoded from their records first, as
   replay has them (the generator's own objects share their strings, hashes already computed:
   before one code per value, compute measured ~10 % faster on them than on decoded events);
3. replay: `replay()` end to end, Kafka to an in-memory dataset (what `stream-ml replay` does,
   less the Parquet write); then again with the dataset written (``-o``), as a user runs it.

Prints events/s for each and the ratios. Absolute figures move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

from aiokafka import TopicPartition

from stream_ml import collector
from stream_ml.config import Settings
from stream_ml.events import Transaction, decode_label, decode_transaction, encode_label, encode_transaction
from stream_ml.events.publish import publish
from stream_ml.events.sources.synthetic import SyntheticConfig, SyntheticStream
from stream_ml.features import feature_set
from stream_ml.kafka import consumer
from stream_ml.stack import kafka_bootstrap, local
from stream_ml.stack.processes import free_port
from stream_ml.stack.topics import ensure_topics
from stream_ml.training.pointintime import PointInTime
from stream_ml.training.replay import ReplayOptions, replay

START = 1_793_491_200_000


async def _read_only(settings: Settings, decode: bool) -> int:
    """Records read (and decoded) until every partition's end; no idle wait at the end is timed."""
    kafka = consumer(kafka_bootstrap(settings), group_id=None, max_partition_fetch_bytes=8 << 20)
    await kafka.start()
    n = 0
    try:
        await kafka.topics()
        tps = [
            TopicPartition(t, p)
            for t in (settings.topic_transactions, settings.topic_labels)
            for p in sorted(kafka.partitions_for_topic(t) or ())
        ]
        kafka.assign(tps)
        ends = await kafka.end_offsets(tps)
        for tp in tps:
            kafka.seek(tp, 0)
        live = {tp for tp in tps if ends[tp] > 0}
        while live:
            fetched = await kafka.getmany(*live, timeout_ms=200, max_records=20_000)
            for tp, records in fetched.items():
                if decode:
                    decoder = decode_transaction if tp.topic == settings.topic_transactions else decode_label
                    for r in records:
                        decoder(r.value)
                n += len(records)
                if records[-1].offset + 1 >= ends[tp]:
                    live.discard(tp)
    finally:
        await kafka.stop()
    return n


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000, help="events to publish (about half labels)")
    parser.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="payments per second of event time (200: the log spans minutes; 0.5: a week)",
    )
    parser.add_argument(
        "--terminals",
        type=int,
        default=0,
        help="put every payment on one of this many devices shared by all cards (shop terminals "
        "that see thousands of cards a day: a skew the synthetic stream does not have)",
    )
    args = parser.parse_args()
    fs = feature_set("fraud")
    state = Path(tempfile.mkdtemp(prefix="bench-replay-"))
    base = Settings.from_env({}, state_dir=state, kafka_port=free_port(), redis_port=free_port())
    local.up(base)
    try:
        tag = uuid.uuid4().hex[:6]
        settings = replace(base, topic_transactions=f"rtx-{tag}", topic_labels=f"rlab-{tag}")
        asyncio.run(ensure_topics(kafka_bootstrap(settings), settings.topics(), settings.partitions))
        config = SyntheticConfig(seed=1, start_ms=START, rate=args.rate)
        terminals = random.Random(1)
        items = []
        for item in SyntheticStream(config).items():
            if args.terminals and isinstance(item, Transaction):
                item = replace(item, device_id=f"t{terminals.randrange(args.terminals)}")
            items.append(item)
            if len(items) >= args.events:
                break
        asyncio.run(publish(settings, kafka_bootstrap(settings), iter(items), progress=False))
        n = len(items)

        rates = {}
        for name, decode in (("read only", False), ("read + decode", True)):
            t = time.perf_counter()
            rates[name] = asyncio.run(_read_only(settings, decode)) / (time.perf_counter() - t)

        items = [
            decode_transaction(encode_transaction(e))
            if isinstance(e, Transaction)
            else decode_label(encode_label(e))
            for e in items
        ]
        pit = PointInTime(fs, ["t", "l"])
        t = time.perf_counter()
        with collector.paused():  # as replay runs it
            for start in range(0, n, 20_000):  # as replay feeds them: a batch per partition, then a release
                fed = list(enumerate(items[start : start + 20_000], start))
                txs = [(i, e) for i, e in fed if isinstance(e, Transaction)]
                labels = [(i, e) for i, e in fed if not isinstance(e, Transaction)]
                pit.add_transactions([e for _, e in txs], "t", [i for i, _ in txs])
                pit.add_labels([e for _, e in labels], "l", [i for i, _ in labels])
                pit.release()
            pit.release(final=True)
        compute_s = time.perf_counter() - t

        result = asyncio.run(replay(settings, fs, kafka_bootstrap(settings), ReplayOptions(progress=False)))
        written = asyncio.run(
            replay(
                settings,
                fs,
                kafka_bootstrap(settings),
                ReplayOptions(output=state / "dataset", progress=False),
            )
        )
        replayed = result.counts["transactions"] + result.counts["labels"]
        print(f"{n:,} events published ({result.counts['transactions']:,} transactions)")
        for name, rate in rates.items():
            print(f"{name:<24} {rate:>10,.0f} events/s")
        print(f"{'compute only (memory)':<24} {n / compute_s:>10,.0f} events/s")
        print(f"{'replay, end to end':<24} {result.events_per_s:>10,.0f} events/s ({replayed:,} events)")
        print(f"{'  + dataset written':<24} {written.events_per_s:>10,.0f} events/s (Parquet, as `-o` does)")
        print(f"replay / read + decode ratio {result.events_per_s / rates['read + decode']:.2f}")
    finally:
        local.down(base)


if __name__ == "__main__":
    main()
