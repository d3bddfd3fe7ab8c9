"""`stream-ml worker features` and `stream-ml features list | get | vector`."""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import redis.asyncio as aioredis

from stream_ml import runner
from stream_ml.config import Settings, add_arguments
from stream_ml.events.sources.files import parse_time_ms
from stream_ml.events.transaction import validate_transaction
from stream_ml.features import feature_set
from stream_ml.features.definitions import AGGREGATIONS, ENTITIES, REQUEST_FEATURES
from stream_ml.features.store import FeatureStore
from stream_ml.features.vector import VectorBuilder
from stream_ml.features.worker import WorkerOptions
from stream_ml.stack import redis_url


def register_worker(topologies: argparse._SubParsersAction) -> None:
    features = topologies.add_parser(
        "features",
        help="transactions and labels into entity window state in Redis",
        description="Consume transactions and labels, keep each card's, merchant's and device's "
        "window state in Redis (exactly-once effect), dead-letter bad and late events. Run more "
        "of them with the same --group to share the partitions.",
    )
    defaults = WorkerOptions()
    features.add_argument("--group", default=defaults.group_id, help="consumer group id")
    features.add_argument("--metrics-port", type=int, default=9108, help="Prometheus /metrics port (0: off)")
    features.add_argument(
        "--label-horizon",
        type=int,
        default=defaults.label_horizon_s,
        help="seconds a transaction is remembered for its label (default 30 days)",
    )
    features.add_argument(
        "--label-wait",
        type=float,
        default=defaults.label_wait_s,
        help="seconds a label waits for its transaction before it is dead-lettered",
    )
    features.add_argument(
        "--batch-size",
        type=int,
        default=defaults.max_records,
        help="most records handled in one batch (one Redis round trip per batch)",
    )
    features.add_argument(
        "--max-cached-entities",
        type=int,
        default=defaults.max_cached_entities,
        help="entity states kept in memory (a few KB each) before the cache is dropped and read back "
        f"from Redis as needed (default {defaults.max_cached_entities:,})",
    )
    add_arguments(features)
    features.set_defaults(run=_worker_features)


def register(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser("features", help="inspect feature definitions and the online store")
    sub = cmd.add_subparsers(dest="features_command", required=True, metavar="COMMAND")
    listing = sub.add_parser("list", help="the features of the feature set, in model-input order")
    add_arguments(listing)
    listing.set_defaults(run=_list)
    get = sub.add_parser(
        "get",
        help="an entity's feature values as JSON",
        description="Print the stored features of one entity, as of now or --at.",
    )
    get.add_argument("entity", choices=sorted(ENTITIES), help="entity type")
    get.add_argument("id", help="entity id, e.g. a card id")
    get.add_argument("--at", default=None, help="as-of time: ISO 8601 or epoch ms (default: now)")
    add_arguments(get)
    get.set_defaults(run=_get)
    vector = sub.add_parser(
        "vector",
        help="the model input vector of a transaction, with names",
        description="Print the full model input for a transaction (JSON), as of its event time or --at.",
    )
    vector.add_argument("--event", required=True, help="the transaction as JSON, e.g. '{\"event_id\": ...}'")
    vector.add_argument("--at", default=None, help="as-of time: ISO 8601 or epoch ms (default: event time)")
    add_arguments(vector)
    vector.set_defaults(run=_vector)


def _worker_features(args: argparse.Namespace, settings: Settings) -> int:
    from topologies import features

    runner.configure_logging()
    options = WorkerOptions(
        group_id=args.group,
        label_horizon_s=args.label_horizon,
        label_wait_s=args.label_wait,
        max_records=args.batch_size,
        max_cached_entities=args.max_cached_entities,
    )
    worker = features.build(settings, options)
    runner.serve_metrics(args.metrics_port)
    runner.log.info(
        "feature worker: group %s, feature set %s, Kafka %s, Redis %s",
        options.group_id,
        worker.feature_set.version,
        worker.bootstrap,
        worker.redis_url,
    )
    return runner.run_worker(worker)


def _list(args: argparse.Namespace, settings: Settings) -> int:
    fs = feature_set(settings.feature_set)
    print(f"feature set {fs.version}: {len(fs.names)} inputs\n")
    for f in fs.features:
        what = AGGREGATIONS[f.agg].replace("FIELD", f.field or "")
        print(f"  {f.name:<28} {f.entity:<9} {f.source:<13} {_window(f.window_s):>5}  {what}")
    for rf in fs.request_features:
        what = REQUEST_FEATURES[rf.kind].replace("ARG", rf.arg or "").replace("FIELD", rf.field or "")
        print(f"  {rf.name:<28} {'request':<9} {'':<13} {'':>5}  {what}")
    return 0


def _window(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _as_of(text: str | None, default_ms: int) -> int:
    return default_ms if text is None else int(parse_time_ms(text, "--at"))


def _get(args: argparse.Namespace, settings: Settings) -> int:
    fs = feature_set(settings.feature_set)
    at = _as_of(args.at, int(time.time() * 1000))

    async def read() -> dict:
        client = aioredis.Redis.from_url(redis_url(settings), socket_timeout=5.0)
        try:
            store = FeatureStore(client, fs)
            if args.entity not in store.layouts:
                raise LookupError(f"feature set {fs.name} has no {args.entity} features")
            state = (await store.load([(args.entity, args.id)]))[(args.entity, args.id)]
            layout = store.layouts[args.entity]
            values = layout.read(state, at)
            return {
                "entity": args.entity,
                "id": args.id,
                "as_of": at,
                "feature_set": fs.version,
                "found": state is not None,
                "features": dict(zip([f.name for f in layout.features], values, strict=True)),
            }
        finally:
            await client.aclose()

    print(json.dumps(asyncio.run(read()), indent=2))
    return 0


def _vector(args: argparse.Namespace, settings: Settings) -> int:
    fs = feature_set(settings.feature_set)
    try:
        fields = json.loads(args.event)
    except ValueError as exc:
        raise ValueError(f"--event is not JSON: {exc}") from None
    tx = validate_transaction(fields)
    at = _as_of(args.at, tx.event_time)
    builder = VectorBuilder(fs)

    async def read() -> list[float]:
        client = aioredis.Redis.from_url(redis_url(settings), socket_timeout=5.0)
        try:
            store = FeatureStore(client, fs)
            states = await store.entity_states(builder.entity_ids(tx))
            return builder.build(states, tx, at)
        finally:
            await client.aclose()

    values = asyncio.run(read())
    print(
        json.dumps(
            {
                "event_id": tx.event_id,
                "as_of": at,
                "feature_set": fs.version,
                "vector": dict(zip(builder.names, values, strict=True)),
            },
            indent=2,
        )
    )
    return 0
