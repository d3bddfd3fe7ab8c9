"""`stream-ml worker feedback`: the feedback topology from the command line."""

from __future__ import annotations

import argparse

from stream_ml import runner
from stream_ml.config import Settings, add_arguments
from stream_ml.feedback.options import FeedbackOptions, WatchOptions


def register_worker(topologies: argparse._SubParsersAction) -> None:
    d, w = FeedbackOptions(), WatchOptions()
    cmd = topologies.add_parser(
        "feedback",
        help="labels joined with predictions: online learning and drift detection",
        description="Join each label with the predictions served for its event (whichever comes "
        "first waits, in Redis, up to --join-ttl), learn online from the features as served, and "
        "compare each event-time window of served features and scores with the production model's "
        "reference distributions (PSI, KS, chi-squared) into the drift topic and /metrics. The "
        "online logistic model is registered in the model registry every --snapshot-every seconds, "
        "as a candidate for the shadow or challenger stage. Run more with the same --group to "
        "share the partitions.",
    )
    cmd.add_argument("--group", default=d.group_id, help="consumer group id")
    cmd.add_argument("--metrics-port", type=int, default=9110, help="Prometheus /metrics port (0: off)")
    cmd.add_argument(
        "--join-ttl",
        type=int,
        default=d.join_ttl_s,
        help="seconds a prediction waits for its label, and a label for its prediction (default 1 day); "
        "Redis holds about 450 bytes per prediction waiting",
    )
    cmd.add_argument(
        "--window", type=int, default=w.window_s, help="drift window length in seconds of event time"
    )
    cmd.add_argument(
        "--window-events",
        type=int,
        default=w.window_events,
        help="drift windows of this many predictions instead of --window seconds",
    )
    cmd.add_argument(
        "--reference-rows",
        type=int,
        default=w.bootstrap_rows,
        help="when the production model has no reference distributions (the untrained default), "
        "its first this many predictions become the reference",
    )
    cmd.add_argument(
        "--review-threshold",
        type=float,
        default=d.review_threshold,
        help="score at which the scorer asks for review: recall is reported at it",
    )
    cmd.add_argument(
        "--snapshot-every",
        type=float,
        default=d.snapshot_every_s,
        help="seconds between registrations of the online model in the registry",
    )
    cmd.add_argument("--no-learn", dest="learn", action="store_false", help="join and watch drift only")
    cmd.add_argument(
        "--batch-size", type=int, default=d.max_records, help="most records handled in one batch"
    )
    add_arguments(cmd)
    cmd.set_defaults(run=_run)


def _run(args: argparse.Namespace, settings: Settings) -> int:
    from topologies import feedback

    runner.configure_logging()
    options = FeedbackOptions(
        group_id=args.group,
        join_ttl_s=args.join_ttl,
        watch=WatchOptions(
            window_s=args.window, window_events=args.window_events, bootstrap_rows=args.reference_rows
        ),
        review_threshold=args.review_threshold,
        snapshot_every_s=args.snapshot_every,
        learn=args.learn,
        max_records=args.batch_size,
    )
    worker = feedback.build(settings, options)
    runner.serve_metrics(args.metrics_port)
    runner.log.info(
        "feedback worker: group %s, feature set %s, Kafka %s, Redis %s, registry %s",
        options.group_id,
        worker.feature_set.version,
        worker.bootstrap,
        worker.redis_url,
        worker.registry.root,
    )
    return runner.run_worker(worker, worker.progress)
