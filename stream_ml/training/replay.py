"""`stream-ml replay`: the log read back from Kafka, run through the feature code, point in time.

Reads ``transactions`` and ``labels`` (and, for the consistency check, ``predictions``) from
every partition, from the start of the warm-up (the longest window plus the allowed lateness
before ``--from``) to the end of the log *as it was when the replay started* (the high
watermark of each partition's first fetch), so a replay is a snapshot even while producers
write. Events run through :class:`~stream_ml.training.pointintime.PointInTime` (the worker's
state code, the scorer's vector code) without Redis.

Outputs: a dataset (Parquet + manifest, see `dataset.py`) with one row per transaction in
[from, to) and its label as known at the cutoff; and/or, with ``materialize``, the replayed
states written to the online store (a backfill), carrying their source offsets so that a feature
worker that reads the same log afterwards applies nothing twice.

Where to start reading: Kafka's offsets-for-times, checked (the record before the offset found
must be older than the time asked, the one at it not); a broker whose answer fails the check
(the embedded Tansu answers offset 0 for every time) is read from the beginning, which gives the
same rows, only slower.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

import numpy as np
import redis.asyncio as aioredis
import uvloop
from aiokafka import AIOKafkaConsumer, TopicPartition
from tqdm import tqdm

from stream_ml import collector
from stream_ml.config import Settings
from stream_ml.events.label import decode_label
from stream_ml.events.prediction import Prediction, decode_prediction
from stream_ml.events.transaction import decode_transaction
from stream_ml.features.definitions import FeatureSet
from stream_ml.features.store import FeatureStore
from stream_ml.kafka import consumer
from stream_ml.training.dataset import DatasetWriter
from stream_ml.training.pointintime import Chunk, PointInTime

_FAR = 1 << 62
_IDLE_POLLS = 3  # empty fetches in a row before a partition with nothing left counts as read
_MATERIALIZE_BATCH = 5_000


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    rows_from: int | None = None  # ms: transactions before it only warm the state up
    rows_to: int | None = None  # ms: exclusive
    label_cutoff: int | None = None  # ms: a label counts if it arrived by then (default: all read)
    output: Path | None = None  # dataset folder
    overwrite: bool = False
    materialize: bool = False  # write the replayed state into Redis
    predictions: bool = False  # also read the predictions topic (consistency)
    progress: bool = True


@dataclass(slots=True)
class ReplayResult:
    counts: dict[str, int]
    sources: dict[str, dict[str, list[int]]]  # topic -> partition -> [first, last] offset read
    seconds: float
    manifest: dict[str, Any] | None = None
    # Left out of the repr: asyncio's runner formats the main task, result included, on the way
    # out (signal.getsignal of its SIGINT handler): 58 ms for a replay of 200,000 events.
    chunks: list[Chunk] = dataclasses.field(default_factory=list, repr=False)  # when there is no output file
    labels: dict[str, tuple[bool, int]] = dataclasses.field(default_factory=dict, repr=False)
    predictions: dict[str, Prediction] = dataclasses.field(default_factory=dict, repr=False)
    materialized: int = 0  # entity states written to the store
    kept: int = 0  # entity states the store had further along, left as they were
    start: str = "beginning"  # how the first offsets were found

    @property
    def events_per_s(self) -> float:
        return (self.counts["transactions"] + self.counts["labels"]) / max(self.seconds, 1e-9)


async def replay(
    settings: Settings,
    feature_set: FeatureSet,
    bootstrap: str,
    options: ReplayOptions,
    redis_url: str | None = None,
) -> ReplayResult:
    """Replay the log; see the module docstring. ``redis_url`` is needed for ``materialize`` only."""
    if options.materialize and redis_url is None:
        raise ValueError(
            "--materialize writes to Redis: set STREAM_ML_REDIS_URL or start `stream-ml stack up`"
        )
    started = time.perf_counter()
    warmup_ms = feature_set.longest_window_ms() + feature_set.allowed_lateness_s * 1000
    lateness_ms = feature_set.allowed_lateness_s * 1000
    rows_to = options.rows_to if options.rows_to is not None else _FAR
    cutoff = options.label_cutoff if options.label_cutoff is not None else _FAR
    # A partition is read until its events are later than anything that can still matter.
    stop_after = {
        settings.topic_transactions: rows_to + lateness_ms if rows_to < _FAR else _FAR,
        settings.topic_labels: max(rows_to, cutoff) + lateness_ms if max(rows_to, cutoff) < _FAR else _FAR,
        settings.topic_predictions: _FAR,
    }
    topics = [settings.topic_transactions, settings.topic_labels]
    if options.predictions:
        topics.append(settings.topic_predictions)

    kafka = consumer(bootstrap, group_id=None, max_partition_fetch_bytes=8 * 1024 * 1024)
    await kafka.start()
    try:
        tps = await _partitions(kafka, topics)
        feeding = [tp for tp in tps if tp.topic != settings.topic_predictions]
        pit = PointInTime(
            feature_set,
            [f"{tp.topic}:{tp.partition}" for tp in feeding],
            rows_from=options.rows_from,
            rows_to=options.rows_to,
            label_cutoff=options.label_cutoff,
            track_offsets=options.materialize,
        )
        kafka.assign(tps)
        start = "beginning"
        if options.rows_from is not None:
            start = await _seek_to_time(kafka, feeding, options.rows_from - warmup_ms)
        else:
            for tp in tps:
                kafka.seek(tp, 0)
        result = ReplayResult({}, {}, 0.0, start=start)
        # The collector is paused for the whole read: the replay keeps its events until their
        # vectors are computed, and collections would scan them over and over (measured: a third).
        with collector.paused():
            chunks = await _read(kafka, tps, settings, pit, stop_after, result, options.progress)
    finally:
        await kafka.stop()

    result.labels = pit.labels
    result.counts = dataclasses.asdict(pit.counts)
    result.counts.pop("by_partition")
    result.sources = _sources(pit.counts.by_partition)
    if options.output is not None:
        result.manifest = _write_dataset(options, feature_set, chunks, pit, result.sources)
    else:
        result.chunks = chunks
    if options.materialize:
        result.materialized, result.kept = await _materialize(feature_set, redis_url, pit)  # type: ignore[arg-type]
    result.seconds = time.perf_counter() - started
    return result


async def _partitions(kafka: AIOKafkaConsumer, topics: list[str]) -> list[TopicPartition]:
    await kafka.topics()
    tps = []
    for topic in topics:
        partitions = kafka.partitions_for_topic(topic)
        if not partitions:
            raise LookupError(
                f"topic {topic!r} does not exist: nothing to replay (is this the right broker?)"
            )
        tps += [TopicPartition(topic, p) for p in sorted(partitions)]
    return tps


async def _seek_to_time(kafka: AIOKafkaConsumer, tps: list[TopicPartition], t: int) -> str:
    """Seek to the first record at or after ``t``; the beginning where the broker's answer fails a check."""
    found = await kafka.offsets_for_times({tp: max(t, 0) for tp in tps})
    checked = True
    for tp in tps:
        hit = found.get(tp)
        offset = hit.offset if hit is not None else None
        if offset is None or not await _check_offset(kafka, tp, offset, t):
            checked = False
            break
    for tp in tps:
        hit = found.get(tp)
        kafka.seek(tp, hit.offset if checked and hit is not None else 0)
    return "offsets-for-times" if checked else "beginning (the broker's offsets-for-times failed a check)"


async def _check_offset(kafka: AIOKafkaConsumer, tp: TopicPartition, offset: int, t: int) -> bool:
    async def timestamp_at(o: int) -> int | None:
        kafka.seek(tp, o)
        records = (await kafka.getmany(tp, timeout_ms=1000, max_records=1)).get(tp, [])
        return records[0].timestamp if records and records[0].offset == o else None

    at = await timestamp_at(offset)
    if at is None or at < t:
        return False
    return offset == 0 or ((before := await timestamp_at(offset - 1)) is not None and before < t)


async def _read(
    kafka: AIOKafkaConsumer,
    tps: list[TopicPartition],
    settings: Settings,
    pit: PointInTime,
    stop_after: dict[str, int],
    result: ReplayResult,
    progress: bool,
) -> list[Chunk]:
    ends: dict[TopicPartition, int] = {}
    live = set(tps)
    chunks: list[Chunk] = []
    invalid = 0
    idle = 0
    bar = tqdm(desc="replay", unit=" events", disable=not (progress and sys.stderr.isatty()), smoothing=0.1)

    def finish(tp: TopicPartition) -> None:
        live.discard(tp)
        kafka.pause(tp)
        if tp.topic != settings.topic_predictions:
            pit.finish_partition(f"{tp.topic}:{tp.partition}")

    decoders: dict[str, tuple[Callable, Callable[[Any], int], Callable]] = {
        settings.topic_transactions: (decode_transaction, attrgetter("event_time"), pit.add_transactions),
        settings.topic_labels: (decode_label, attrgetter("label_time"), pit.add_labels),
    }
    while live:
        fetched = await kafka.getmany(*live, timeout_ms=200, max_records=20_000)
        idle = 0 if fetched else idle + 1
        n = 0
        for tp, records in fetched.items():
            if tp not in live:
                continue
            end = ends.setdefault(tp, kafka.highwater(tp) or 0)  # the log as it was when we came
            done = records[-1].offset + 1 >= end
            if records[-1].offset >= end:
                records = [r for r in records if r.offset < end]
            if tp.topic == settings.topic_predictions:
                invalid += sum(_prediction(result.predictions, r) is None for r in records)
            else:
                decode, time_of, add = decoders[tp.topic]
                events, offsets = _decoded(decode, records)
                stop = stop_after[tp.topic]
                late_enough = next((j for j, t in enumerate(map(time_of, events)) if t > stop), None)
                if late_enough is not None:  # the first event after what can matter: the last one read
                    del events[late_enough + 1 :], offsets[late_enough + 1 :]
                    records = [r for r in records if r.offset <= offsets[-1]]
                    done = True
                invalid += len(records) - len(events)
                add(events, f"{tp.topic}:{tp.partition}", offsets)
            n += len(records)
            if done:
                finish(tp)
        if idle >= _IDLE_POLLS:  # nothing came back: partitions at their end (or empty) are done
            for tp in list(live):
                highwater = kafka.highwater(tp)
                if highwater is None or await kafka.position(tp) >= ends.get(tp, highwater):
                    finish(tp)
        chunk = pit.release()
        if chunk.event_ids:
            chunks.append(chunk)
        bar.update(n)
    chunk = pit.release(final=True)
    if chunk.event_ids:
        chunks.append(chunk)
    bar.close()
    pit.counts.invalid += invalid
    return chunks


def _decoded(decode: Callable[[bytes], Any], records: list[Any]) -> tuple[list[Any], list[int]]:
    """The valid records' events and offsets; an invalid record is skipped (the worker
    dead-lettered it). One loop over the records, where there were four list passes."""
    events: list[Any] = []
    offsets: list[int] = []
    for record in records:
        try:
            event = decode(record.value)
        except Exception:  # InvalidMessage, or a decoder bug: an invalid record here as in the worker
            continue
        events.append(event)
        offsets.append(record.offset)
    return events, offsets


def _prediction(into: dict[str, Prediction], record: Any) -> int | None:
    try:
        p = decode_prediction(record.value)
    except Exception:
        return None
    if p.variant == "production":  # what callers were answered with
        into[p.event_id] = p
    return p.event_time


def _sources(by_partition: dict[str, list[int]]) -> dict[str, dict[str, list[int]]]:
    sources: dict[str, dict[str, list[int]]] = {}
    for tag, span in sorted(by_partition.items()):
        topic, partition = tag.rsplit(":", 1)
        sources.setdefault(topic, {})[partition] = list(span)
    return sources


def label_columns(event_ids: list[str], labels: dict[str, tuple[bool, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The label (1, 0, or -1 when none arrived by the cutoff) and label time of each event."""
    known = [labels.get(e) for e in event_ids]
    label = np.array([-1 if k is None else int(k[0]) for k in known], dtype=np.int8)
    label_time = np.array([-1 if k is None else k[1] for k in known], dtype=np.int64)
    return label, label_time


def _write_dataset(
    options: ReplayOptions,
    feature_set: FeatureSet,
    chunks: list[Chunk],
    pit: PointInTime,
    sources: dict[str, dict[str, list[int]]],
) -> dict[str, Any]:
    names = feature_set.names
    with DatasetWriter(options.output, names, overwrite=options.overwrite) as writer:  # type: ignore[arg-type]
        for chunk in chunks:
            label, label_time = label_columns(chunk.event_ids, pit.labels)
            columns: dict[str, Any] = {
                "event_id": chunk.event_ids,
                "event_time": chunk.event_times,
                "card_id": chunk.card_ids,
                "label": label,
                "label_time": label_time,
            }
            for j, name in enumerate(names):
                columns[name] = chunk.features[:, j]
            writer.append(columns)
        return writer.close(
            {
                "feature_set": feature_set.version,
                "feature_names": names,
                "from_ms": options.rows_from,
                "to_ms": options.rows_to,
                "label_cutoff_ms": options.label_cutoff,
                "sources": sources,
                "replay_counts": {
                    k: v for k, v in dataclasses.asdict(pit.counts).items() if k != "by_partition"
                },
            }
        )


async def _materialize(feature_set: FeatureSet, redis_url: str, pit: PointInTime) -> tuple[int, int]:
    """Write the replayed states into the online store, a batch of entities per round trip.

    An entity whose stored state has applied more of some source partition than the replay (a
    worker ran past the replay's snapshot of the log) keeps its state: it is counted, not
    overwritten. Returns (written, kept).
    """
    client = aioredis.Redis.from_url(redis_url, socket_timeout=10.0, socket_connect_timeout=5.0)
    store = FeatureStore(client, feature_set)
    written = kept = 0
    try:
        for entity, by_id in pit.final_states().items():
            items = list(by_id.items())
            for i in range(0, len(items), _MATERIALIZE_BATCH):
                batch = dict(items[i : i + _MATERIALIZE_BATCH])
                held = await store.load([(entity, entity_id) for entity_id in batch])
                for (_, entity_id), stored in held.items():
                    ours = batch[entity_id].offsets
                    if stored is not None and any(o > ours.get(src, -1) for src, o in stored.offsets.items()):
                        del batch[entity_id]
                        kept += 1
                await store.write(store.prepare({entity: batch}))
                written += len(batch)
    finally:
        await client.aclose()
    return written, kept


def run(
    settings: Settings,
    feature_set: FeatureSet,
    bootstrap: str,
    options: ReplayOptions,
    redis_url: str | None = None,
) -> ReplayResult:
    """:func:`replay` on a uvloop event loop, for the CLI."""
    return uvloop.run(replay(settings, feature_set, bootstrap, options, redis_url))
