"""`stream-ml demo`: every station of the loop, started, driven and checked in one command."""

from __future__ import annotations

import argparse
from pathlib import Path

from stream_ml.config import Settings, add_arguments
from stream_ml.demo.options import DemoOptions
from stream_ml.events.sources.synthetic import SHIFT_KINDS


def register(commands: argparse._SubParsersAction) -> None:
    d = DemoOptions()
    demo = commands.add_parser(
        "demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="run the whole loop on this machine: stream, score, learn, drift, retrain, switch",
        description="Start the stack (unless STREAM_ML_KAFKA_BOOTSTRAP / STREAM_ML_REDIS_URL name servers), "
        "a feature worker,\na feedback worker and the scorer; publish --history payments; then stream "
        "payments for --duration\nseconds, each scored over HTTP and then published, with their labels "
        "--label-delay later.\nHalf-way a distribution shift starts (--shift). At --retrain-at, replay "
        "the log into a dataset,\ntrain a model on it and promote it: the scorer switches to it while "
        "the calls go on.\nA status line every few seconds; at the end the drift report, a summary "
        "with a check per station\n(exit code 1 if one failed) and OUTPUT/summary.json. Ctrl-C stops "
        "everything the demo started.\n\nshifts:\n"
        + "".join(f"  {k:<8} {v}\n" for k, v in SHIFT_KINDS.items()),
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=d.duration_s,
        help=f"seconds of live traffic (default {d.duration_s:g}); a retrain in progress may add up to 90",
    )
    demo.add_argument("--rate", type=float, default=d.rate, help=f"payments per second (default {d.rate:g})")
    demo.add_argument(
        "--time-scale",
        type=float,
        default=d.time_scale,
        help=f"event-time seconds per second (default {d.time_scale:g})",
    )
    demo.add_argument(
        "--history",
        type=int,
        default=d.history,
        help=f"payments published before the live part (default {d.history})",
    )
    demo.add_argument("--cards", type=int, default=d.cards, help=f"number of cards (default {d.cards})")
    demo.add_argument(
        "--merchants", type=int, default=d.merchants, help=f"number of merchants (default {d.merchants})"
    )
    demo.add_argument(
        "--fraud-rate", type=float, default=d.fraud_rate, help=f"share of fraud (default {d.fraud_rate})"
    )
    demo.add_argument(
        "--label-delay",
        type=float,
        default=d.label_delay_s,
        help=f"event-time seconds to a label (default {d.label_delay_s:g})",
    )
    demo.add_argument(
        "--shift",
        default=d.shift,
        metavar="KIND=FACTOR",
        help=f"the drift injected (default {d.shift}; empty: none)",
    )
    demo.add_argument(
        "--shift-at",
        type=float,
        default=d.shift_at,
        help=f"when, as a share of --duration (default {d.shift_at})",
    )
    demo.add_argument(
        "--retrain-at",
        type=float,
        default=d.retrain_at,
        help=f"when to replay and retrain, as a share of --duration (default {d.retrain_at})",
    )
    demo.add_argument(
        "--window-events",
        type=int,
        default=d.window_events,
        help=f"predictions per drift window (default {d.window_events})",
    )
    demo.add_argument(
        "--reference-rows",
        type=int,
        default=d.reference_rows,
        help="first predictions that make the untrained model's drift reference "
        f"(default {d.reference_rows})",
    )
    demo.add_argument(
        "--status-every",
        type=float,
        default=d.status_every_s,
        help=f"seconds between status lines (default {d.status_every_s:g})",
    )
    demo.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")
    demo.add_argument(
        "--output",
        "-o",
        type=Path,
        default=d.output,
        help=f"folder for logs, registry, dataset, report (default ./{d.output})",
    )
    add_arguments(demo)
    demo.set_defaults(run=_demo)


def _demo(args: argparse.Namespace, settings: Settings) -> int:
    options = DemoOptions(
        output=args.output,
        duration_s=args.duration,
        rate=args.rate,
        time_scale=args.time_scale,
        history=args.history,
        cards=args.cards,
        merchants=args.merchants,
        fraud_rate=args.fraud_rate,
        label_delay_s=args.label_delay,
        shift=args.shift,
        shift_at=args.shift_at,
        retrain_at=args.retrain_at,
        window_events=args.window_events,
        reference_rows=args.reference_rows,
        status_every_s=args.status_every,
        seed=args.seed,
    )
    from stream_ml.demo.run import Demo, describe

    summary = Demo(settings, options, out=lambda line: print(line, flush=True)).run()
    print(describe(summary))
    return 0 if all(summary["checks"].values()) else 1
