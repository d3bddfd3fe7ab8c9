"""`stream-ml consistency` (do the served feature vectors equal what replay computes?) and
`stream-ml drift report` (which features moved, and when)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import uvloop

from stream_ml.config import Settings, add_arguments
from stream_ml.events.sources.files import parse_time_ms
from stream_ml.features import feature_set
from stream_ml.monitoring.consistency import check, describe
from stream_ml.stack import kafka_bootstrap


def register(commands: argparse._SubParsersAction) -> None:
    cmd = commands.add_parser(
        "consistency",
        help="compare the feature vectors the scorer served with replay's (online/offline skew)",
        description="Replay transactions and labels with the predictions log, and compare, feature "
        "by feature, each vector the scorer served with the vector replay computes for the same "
        "event as of the same time. Exits 1 when the share of skewed predictions is above "
        "--tolerance. Differences explained by an event less than --in-flight-ms before the "
        "payment (not yet in the store when it was scored) are counted apart.",
    )
    cmd.add_argument(
        "--tolerance",
        type=float,
        default=0.001,
        help="largest share of skewed predictions that passes (default 0.001)",
    )
    cmd.add_argument(
        "--in-flight-ms",
        type=int,
        default=2_000,
        help="an entity event this recent before a payment may not have been visible (default 2000)",
    )
    cmd.add_argument("--json", action="store_true", help="print the report as JSON")
    cmd.add_argument("--quiet", action="store_true", help="no progress bar")
    add_arguments(cmd)
    cmd.set_defaults(run=_consistency)
    _register_drift(commands)


def _consistency(args: argparse.Namespace, settings: Settings) -> int:
    report = uvloop.run(
        check(
            settings,
            feature_set(settings.feature_set),
            kafka_bootstrap(settings),
            in_flight_ms=args.in_flight_ms,
            progress=not args.quiet,
        )
    )
    if args.json:
        print(json.dumps(report.to_dict() | {"tolerance": args.tolerance}, indent=2))
    else:
        print(describe(report, args.tolerance))
    return 0 if report.skew_rate <= args.tolerance else 1


def _register_drift(commands: argparse._SubParsersAction) -> None:
    drift = commands.add_parser(
        "drift",
        help="drift of the served features and scores against the model's reference",
        description="Drift reports: the feedback worker (`stream-ml worker feedback`) compares every "
        "window of served predictions with the production model's reference distributions and "
        "publishes one message per feature, one for the score and a summary to the drift topic.",
    )
    actions = drift.add_subparsers(dest="drift_command", required=True, metavar="ACTION")
    cmd = actions.add_parser(
        "report",
        help="write an HTML report (with PNG charts) of the drift topic",
        description="Read the drift topic from the beginning and write DIR/index.html with its "
        "charts: the features sorted by worst severity with the first window at warning and at "
        "critical, a severity map of features by window, PSI over time per feature (thresholds "
        "0.1 and 0.2), and reference-against-current histograms of every feature that drifted "
        "(its window of highest PSI) and of the score. Times are ISO 8601 (UTC when no zone is "
        "given) or epoch milliseconds; a window is kept when its span overlaps [--from, --to).",
    )
    cmd.add_argument("--from", dest="from_time", metavar="TIME", help="first time (default: the beginning)")
    cmd.add_argument("--to", dest="to_time", metavar="TIME", help="end time, excluded (default: the end)")
    cmd.add_argument(
        "--output",
        type=Path,
        default=Path("drift-report"),
        metavar="DIR",
        help="folder to write index.html and the PNGs to (default: ./drift-report)",
    )
    add_arguments(cmd)
    cmd.set_defaults(run=_drift_report)


def _drift_report(args: argparse.Namespace, settings: Settings) -> int:
    from_ms = parse_time_ms(args.from_time, "--from")
    to_ms = parse_time_ms(args.to_time, "--to")
    if from_ms is not None and to_ms is not None and to_ms <= from_ms:
        raise ValueError("--to must be after --from")
    from stream_ml.monitoring import drift_report  # matplotlib: loaded only by the command that draws

    files = drift_report.report(kafka_bootstrap(settings), settings.topic_drift, args.output, from_ms, to_ms)
    print(f"drift report: {files.summary}")
    print(f"wrote {files.index} ({len(files.images)} charts)")
    return 0
