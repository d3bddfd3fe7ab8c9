"""`stream-ml replay`: a point-in-time dataset from the log, and/or a backfill of the online store."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stream_ml.config import Settings, add_arguments
from stream_ml.events.sources.files import parse_time_ms
from stream_ml.features import feature_set
from stream_ml.stack import kafka_bootstrap, redis_url
from stream_ml.training.replay import ReplayOptions, ReplayResult, run


def register(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser(
        "replay",
        help="read the log back: point-in-time training data, or a backfill of Redis",
        description="Read transactions and labels back from Kafka and run the streaming feature "
        "code over them in event-time order, in this process. Every transaction in [--from, --to) "
        "gets its feature vector as of just before it, and its label as known at --label-cutoff "
        "(a label counts only if it arrived by then). --output writes them as a dataset for "
        "`stream-ml train`; --materialize writes the replayed state into the online store.",
        epilog="Times are ISO 8601 (2026-11-01T00:00:00Z) or epoch milliseconds. The warm-up before "
        "--from (the longest window plus the allowed lateness) is read too, so the first rows see "
        "their full history.",
    )
    cmd.add_argument("--from", dest="rows_from", default=None, help="first event time to make rows for")
    cmd.add_argument("--to", dest="rows_to", default=None, help="event time to stop at (exclusive)")
    cmd.add_argument(
        "--label-cutoff",
        default=None,
        help="labels that arrived after this time are not known (default: every label in the log)",
    )
    cmd.add_argument("--output", "-o", type=Path, default=None, help="dataset folder to write")
    cmd.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    cmd.add_argument(
        "--materialize",
        action="store_true",
        help="write the replayed entity states into Redis (backfill; entities the store has further "
        "along are left as they are)",
    )
    cmd.add_argument("--json", action="store_true", help="print the summary as JSON")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    add_arguments(cmd)
    cmd.set_defaults(run=_replay)


def _time(value: str | None, flag: str) -> int | None:
    return None if value is None else int(parse_time_ms(value, flag))


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    if args.output is None and not args.materialize:
        raise ValueError("nothing to do: give --output DIR (a dataset) and/or --materialize (a backfill)")
    options = ReplayOptions(
        rows_from=_time(args.rows_from, "--from"),
        rows_to=_time(args.rows_to, "--to"),
        label_cutoff=_time(args.label_cutoff, "--label-cutoff"),
        output=args.output,
        overwrite=args.overwrite,
        materialize=args.materialize,
        progress=not args.quiet,
    )
    if options.output is not None and options.output.exists() and not options.overwrite:
        raise ValueError(f"{options.output} exists: pass --overwrite to replace it, or another --output")
    fs = feature_set(settings.feature_set)
    result = run(
        settings,
        fs,
        kafka_bootstrap(settings),
        options,
        redis_url(settings) if options.materialize else None,
    )
    print(json.dumps(summary(result), indent=2) if args.json else describe(result, options.output))
    return 0


def summary(result: ReplayResult) -> dict:
    return {
        "counts": result.counts,
        "seconds": round(result.seconds, 3),
        "events_per_s": round(result.events_per_s),
        "start": result.start,
        "sources": result.sources,
        "manifest": result.manifest,
        "materialized": result.materialized,
        "kept": result.kept,
    }


def describe(result: ReplayResult, output: Path | None) -> str:
    c = result.counts
    lines = [
        f"replayed {c['transactions'] + c['labels']:,} events ({c['transactions']:,} transactions, "
        f"{c['labels']:,} labels) in {result.seconds:.1f} s: {result.events_per_s:,.0f} events/s",
        f"  skipped: {c['late']:,} late, {c['invalid']:,} invalid, {c['labels_unknown']:,} labels of "
        "transactions not in the log",
        f"  read from: {result.start}",
    ]
    m = result.manifest
    if m is not None:
        lines.append(
            f"dataset {output}: {m['rows']:,} rows: {m['positives']:,} fraud, {m['negatives']:,} "
            f"legitimate, {m['unlabelled']:,} unlabelled (data version {m['data_version']})"
        )
    if result.materialized or result.kept:
        lines.append(
            f"online store: {result.materialized:,} entity states written, {result.kept:,} left as they "
            "were (the store had applied more)"
        )
    if m is not None:
        lines.append(f"next: stream-ml train {output}")
    return "\n".join(lines)
