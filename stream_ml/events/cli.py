"""`stream-ml produce synthetic | file`: transaction and label streams into Kafka."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from stream_ml import runner
from stream_ml.config import Settings, add_arguments, env_name
from stream_ml.events.label import Label
from stream_ml.events.publish import event_time_schedule, publish, rate_schedule
from stream_ml.events.sources import files
from stream_ml.events.sources.synthetic import SHIFT_KINDS, Shift, SyntheticConfig, SyntheticStream
from stream_ml.events.transaction import Transaction
from stream_ml.stack import kafka_bootstrap


def register(commands: argparse._SubParsersAction) -> None:
    produce = commands.add_parser(
        "produce",
        help="publish transactions and labels to Kafka",
        description="Publish transaction events (keyed by card) and label "
        "events (keyed by event id) to their topics.",
    )
    sub = produce.add_subparsers(dest="produce_command", required=True, metavar="SOURCE")

    syn = sub.add_parser(
        "synthetic",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="a realistic fraud-like stream, deterministic for a seed",
        description="Cards with spending habits and favourite merchants, traffic that follows the "
        "time of day,\nand fraud campaigns (stolen cards, compromised merchants, large amounts). Every "
        "payment is\nlabelled --label-delay seconds (event time, ±50%) later on the labels topic.\n\n"
        "Event time runs --time-scale times faster than the wall clock. --rate holds in the start\n"
        "hour; later hours follow the day (nights are quieter). --max-speed publishes the same\n"
        "events without waiting.\n\n"
        "shifts (--shift KIND=FACTOR, from --shift-at on):\n"
        + "".join(f"  {k:<8} {v}\n" for k, v in SHIFT_KINDS.items()),
    )
    syn.add_argument("--rate", type=float, default=1000.0, help="transactions per second (default 1000)")
    syn.add_argument("--duration", type=float, default=60.0, help="seconds of wall time (default 60)")
    syn.add_argument("--events", type=int, default=None, help="stop after this many events instead")
    syn.add_argument("--seed", type=int, default=None, help="random seed (default: a new one, printed)")
    syn.add_argument("--start", default="now", help="event time of the start: now, ISO 8601 or epoch ms")
    syn.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="event-time seconds per wall second (default 1: real time)",
    )
    syn.add_argument("--max-speed", action="store_true", help="do not wait for event time: publish flat out")
    syn.add_argument("--cards", type=int, default=20_000, help="number of cards (default 20000)")
    syn.add_argument("--merchants", type=int, default=2_000, help="number of merchants (default 2000)")
    syn.add_argument("--fraud-rate", type=float, default=0.003, help="share of fraud (default 0.003)")
    syn.add_argument(
        "--label-delay",
        type=float,
        default=300.0,
        help="seconds of event time until a payment's label (default 300)",
    )
    syn.add_argument(
        "--drain-labels", action="store_true", help="at the end, also publish the labels that are not due yet"
    )
    syn.add_argument(
        "--shift",
        action="append",
        default=[],
        metavar="KIND=FACTOR",
        help="shift a distribution (see above); repeatable",
    )
    syn.add_argument(
        "--shift-at",
        default=None,
        help="when shifts begin: +SECONDS after the start, ISO 8601 or epoch ms (default: half-way)",
    )
    syn.add_argument(
        "--score-url",
        default=None,
        metavar="URL",
        help="as a payment gateway: score each payment on this scorer (e.g. http://127.0.0.1:8000/score) "
        f"before publishing it, with the first key of {env_name('api_keys')}; the scorer logs the "
        "predictions that the feedback worker joins with the labels",
    )
    syn.add_argument("--quiet", action="store_true", help="no progress bar")
    syn.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port")
    add_arguments(syn)
    syn.set_defaults(run=_synthetic)

    fil = sub.add_parser(
        "file",
        help="publish a CSV, JSON-lines or Parquet file in event-time order",
        description="Read transactions from a file, sort them by event time and publish them; with "
        "--label-column, publish a label per row --label-delay seconds after its payment. Columns that "
        "no field names ride along as extra fields.",
    )
    fil.add_argument("path", type=Path, help="the file (.csv, .tsv, .jsonl, .parquet)")
    fil.add_argument("--format", choices=files.FORMATS, default=None, help="default: from the extension")
    fil.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="FIELD=COLUMN",
        help="read FIELD from COLUMN (e.g. amount=amt); repeatable",
    )
    fil.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a constant for a field the file lacks (e.g. currency=EUR); repeatable",
    )
    fil.add_argument("--label-column", default=None, help="column holding the fraud flag (1/0, true/false)")
    fil.add_argument(
        "--label-delay",
        type=float,
        default=0.0,
        help="seconds of event time from a payment to its label (default 0)",
    )
    fil.add_argument("--rate", type=float, default=0.0, help="events per second (default 0: flat out)")
    fil.add_argument("--strict", action="store_true", help="publish nothing if any row is invalid")
    fil.add_argument("--quiet", action="store_true", help="no progress bar")
    fil.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port")
    add_arguments(fil)
    fil.set_defaults(run=_file)


def _synthetic(args: argparse.Namespace, settings: Settings) -> int:
    bootstrap = kafka_bootstrap(settings)
    runner.serve_metrics(args.metrics_port)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000)
    start_ms = int(time.time() * 1000) if args.start == "now" else _time_arg(args.start, "--start")
    span_ms = int(args.duration * args.time_scale * 1000)
    shifts = _shifts(args.shift, args.shift_at, start_ms, span_ms)
    cfg = SyntheticConfig(
        seed=seed,
        start_ms=start_ms,
        rate=args.rate / args.time_scale,
        cards=args.cards,
        merchants=args.merchants,
        fraud_rate=args.fraud_rate,
        label_delay_s=args.label_delay,
        shifts=shifts,
    )
    stream = SyntheticStream(cfg)
    end_ms = start_ms + span_ms
    items = _until(stream, end_ms, args.events, args.drain_labels)
    schedule = None if args.max_speed else event_time_schedule(start_ms, args.time_scale)
    print(
        f"synthetic stream: seed {seed}, start {start_ms} ms, {args.rate:g} tx/s for {args.duration:g} s "
        f"{'(max speed) ' if args.max_speed else ''}into {bootstrap}",
        file=sys.stderr,
    )
    if args.score_url:
        keys = [k.strip() for k in (settings.api_keys or "").split(",") if k.strip()]
        if not keys:
            raise ValueError(f"--score-url needs an API key of the scorer: set {env_name('api_keys')}=KEY")
        from stream_ml.events.gateway import Gateway  # aiohttp: 130 ms of every command's start-up

        gateway = Gateway(settings, bootstrap, args.score_url, keys[0])
        started = time.monotonic()
        asyncio.run(gateway.run(items, schedule))
        t = gateway.traffic
        print(
            f"published {t.payments:,} transactions and {t.labels:,} labels ({t.frauds:,} fraud) in "
            f"{time.monotonic() - started:.2f} s ({_seed_and_share(seed, stream)}); {t.describe()}"
        )
        return 0
    report = asyncio.run(
        publish(settings, bootstrap, items, schedule=schedule, total=args.events, progress=not args.quiet)
    )
    print(f"{report.summary()} ({_seed_and_share(seed, stream)})")
    return 0


def _seed_and_share(seed: int, stream: SyntheticStream) -> str:
    return f"seed {seed}, fraud share {stream.frauds / max(stream.transactions, 1):.4f}"


def _until(
    stream: SyntheticStream, end_ms: int, max_events: int | None, drain: bool
) -> Iterator[Transaction | Label]:
    items = stream.items(until_ms=end_ms)
    if drain:
        items = itertools.chain(items, stream.pending_labels())
    return itertools.islice(items, max_events) if max_events is not None else items


def _shifts(specs: list[str], at: str | None, start_ms: int, span_ms: int) -> tuple[Shift, ...]:
    if not specs:
        return ()
    at_ms = (
        start_ms + span_ms // 2
        if at is None
        else (start_ms + int(float(at[1:]) * 1000) if at.startswith("+") else _time_arg(at, "--shift-at"))
    )
    return tuple(Shift.parse(spec, at_ms) for spec in specs)


def _time_arg(text: str, flag: str) -> int:
    try:
        return int(files.parse_time_ms(text, flag))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{flag} {text!r}: {exc}") from None


def _pairs(specs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {spec!r}: expected NAME=VALUE")
        out[key.strip()] = value.strip()
    return out


def _file(args: argparse.Namespace, settings: Settings) -> int:
    bootstrap = kafka_bootstrap(settings)
    runner.serve_metrics(args.metrics_port)
    if not args.path.is_file():
        raise FileNotFoundError(f"{args.path}: no such file")
    loaded = files.load(
        args.path,
        fmt=args.format,
        mapping=_pairs(args.map, "--map"),
        defaults=_pairs(args.set, "--set"),
        label_column=args.label_column,
        label_delay_s=args.label_delay,
    )
    for row, reason in loaded.rejected[:10]:
        print(f"row {row}: {reason}", file=sys.stderr)
    if loaded.rejected:
        more = len(loaded.rejected) - 10
        print(
            f"{len(loaded.rejected):,} invalid rows{f' ({more:,} more not shown)' if more > 0 else ''}",
            file=sys.stderr,
        )
        if args.strict or not loaded.transactions:
            print("nothing published: fix the rows above (or drop --strict to skip them)", file=sys.stderr)
            return 1
    schedule = rate_schedule(args.rate) if args.rate > 0 else None
    report = asyncio.run(
        publish(
            settings,
            bootstrap,
            loaded.in_log_order(),
            schedule=schedule,
            total=len(loaded.transactions) + len(loaded.labels),
            progress=not args.quiet,
        )
    )
    print(report.summary() + (f"; skipped {len(loaded.rejected):,} invalid rows" if loaded.rejected else ""))
    return 0
