"""`stream-ml consistency`: do the served feature vectors equal what replay computes?"""

from __future__ import annotations

import argparse
import json

import uvloop

from stream_ml.config import Settings, add_arguments
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
