"""`stream-ml serve`: the scorer, serving the registry's production model (or the default one)."""

from __future__ import annotations

import argparse
import logging
import socket
from typing import TYPE_CHECKING

from stream_ml.config import Settings, add_arguments, env_name
from stream_ml.features import feature_set
from stream_ml.serving.options import ServeOptions
from stream_ml.stack import NotConfigured, kafka_bootstrap, redis_url

if TYPE_CHECKING:
    from stream_ml.serving.limits import RateLimiter

log = logging.getLogger("stream_ml.serve")


def register(commands: argparse._SubParsersAction) -> None:
    d = ServeOptions()
    serve = commands.add_parser(
        "serve",
        help="the HTTP scorer (POST /score)",
        description="Score transactions over HTTP: features from Redis, a micro-batched PyTorch model "
        f"(GPU when there is one). Callers send an API key from {env_name('api_keys')}.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--max-batch", type=int, default=d.max_batch, help="largest model batch")
    serve.add_argument(
        "--deadline-ms",
        type=float,
        default=d.deadline_ms,
        help="answer within this (a call may ask for less with X-Deadline-Ms)",
    )
    serve.add_argument("--review-threshold", type=float, default=d.review_threshold, help="score for review")
    serve.add_argument(
        "--decline-threshold", type=float, default=d.decline_threshold, help="score for decline"
    )
    serve.add_argument(
        "--redis-timeout-ms",
        type=float,
        default=d.redis_timeout_ms,
        help="longest wait for features; then the answer is degraded (request features only)",
    )
    serve.add_argument("--no-degraded", action="store_true", help="answer 503 instead of a degraded score")
    serve.add_argument(
        "--max-body-bytes", type=int, default=d.max_body_bytes, help="request body limit (413)"
    )
    serve.add_argument(
        "--rate-limit", type=float, default=d.rate_per_key, help="requests/s per API key (429)"
    )
    serve.add_argument(
        "--no-auth", action="store_true", help="accept calls without an API key (local tests only)"
    )
    serve.add_argument(
        "--prediction-buffer",
        type=int,
        default=d.prediction_buffer,
        help="predictions held for the log while the broker is slow; then dropped and counted",
    )
    serve.add_argument(
        "--model-poll-s",
        type=float,
        default=d.model_poll_s,
        help="seconds between reads of the registry's production and shadow pointers (default 1)",
    )
    serve.add_argument(
        "--allow-feature-set-mismatch",
        action="store_true",
        help="serve registry models trained on another feature set (same number of inputs only)",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        help="scorer processes on the port (default 1; about one per core: each has its own batcher "
        "and model, the rate limit and /metrics are shared)",
    )
    _add_torch_threads(serve, d)
    add_arguments(serve)
    serve.set_defaults(run=_serve)


def register_worker(topologies: argparse._SubParsersAction) -> None:
    d = ServeOptions()
    cmd = topologies.add_parser(
        "score",
        help="stream scoring: transactions in, predictions out (the scorer without HTTP)",
        description="Score every transaction of the transactions topic with the scorer's features, "
        "micro-batcher and model (the registry's production version, followed as it changes; the "
        "shadow too), publish the predictions and commit after the broker has them: at least once. "
        "A consumer-group member: run more with the same --group to share the partitions. The "
        "feature worker applies the same payments meanwhile, so a payment may be scored with itself "
        "in its card's windows; score over HTTP before publishing where that matters.",
    )
    cmd.add_argument("--group", default="stream-ml-score", help="consumer group id")
    cmd.add_argument("--metrics-port", type=int, default=9112, help="Prometheus /metrics port (0: off)")
    cmd.add_argument(
        "--batch-size",
        type=int,
        default=2_000,
        help=f"most records read at once (at most {d.max_queue}, the batcher's queue)",
    )
    cmd.add_argument("--max-batch", type=int, default=d.max_batch, help="largest model batch")
    cmd.add_argument("--review-threshold", type=float, default=d.review_threshold, help="score for review")
    cmd.add_argument("--decline-threshold", type=float, default=d.decline_threshold, help="score for decline")
    cmd.add_argument(
        "--model-poll-s", type=float, default=d.model_poll_s, help="seconds between reads of the registry"
    )
    _add_torch_threads(cmd, d)
    add_arguments(cmd)
    cmd.set_defaults(run=_stream)


def _add_torch_threads(parser: argparse.ArgumentParser, d: ServeOptions) -> None:
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=d.torch_threads,
        help=f"CPU threads of the model (default {d.torch_threads}: more spin between small batches' "
        "operations and take the cores that HTTP and Redis need)",
    )


def _stream(args: argparse.Namespace, settings: Settings) -> int:
    from stream_ml import runner
    from topologies import score

    d = ServeOptions()
    if not 0 < args.batch_size <= d.max_queue:
        raise ValueError(f"--batch-size must be between 1 and {d.max_queue}, got {args.batch_size}")
    options = ServeOptions(
        max_batch=args.max_batch,
        review_threshold=args.review_threshold,
        decline_threshold=args.decline_threshold,
        degraded_ok=False,  # a stream can wait for the store; a degraded score would be logged for good
        model_poll_s=args.model_poll_s,
        torch_threads=args.torch_threads,
    )
    runner.configure_logging()
    worker = score.build(settings, options, args.group, args.batch_size)
    runner.serve_metrics(args.metrics_port)
    runner.log.info(
        "stream scorer: group %s, model %s, %s → %s",
        args.group,
        worker.scorer.model.version,
        settings.topic_transactions,
        settings.topic_predictions,
    )
    return runner.run_worker(worker)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    from stream_ml.serving import workers
    from stream_ml.serving.limits import RateLimiter

    keys = tuple(k.strip() for k in (settings.api_keys or "").split(",") if k.strip())
    if not keys and not args.no_auth:
        raise ValueError(
            f"no API keys: set {env_name('api_keys')}=key1,key2 (or pass --no-auth for a local test)"
        )
    options = ServeOptions(
        api_keys=keys,
        auth=not args.no_auth,
        max_batch=args.max_batch,
        deadline_ms=args.deadline_ms,
        review_threshold=args.review_threshold,
        decline_threshold=args.decline_threshold,
        redis_timeout_ms=args.redis_timeout_ms,
        degraded_ok=not args.no_degraded,
        max_body_bytes=args.max_body_bytes,
        rate_per_key=args.rate_limit,
        prediction_buffer=args.prediction_buffer,
        model_poll_s=args.model_poll_s,
        allow_feature_set_mismatch=args.allow_feature_set_mismatch,
        torch_threads=args.torch_threads,
    )
    if args.model_poll_s <= 0:
        raise ValueError(f"--model-poll-s must be above 0, got {args.model_poll_s}")
    if args.workers < 1:
        raise ValueError(f"--workers must be at least 1, got {args.workers}")
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if args.workers > 1:
        fmt = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt)
    sock = workers.listen(args.host, args.port)
    limiter = RateLimiter(options.rate_per_key, options.api_keys)  # before the fork: one for all

    def serve(worker: int) -> None:
        _serve_one(sock, args, settings, options, limiter, worker)

    if args.workers == 1:
        serve(0)
        return 0
    with workers.shared_metrics():
        return workers.supervise(args.workers, serve)


def _serve_one(
    sock: socket.socket,
    args: argparse.Namespace,
    settings: Settings,
    options: ServeOptions,
    limiter: RateLimiter,
    worker: int,
) -> None:
    """One scorer process, on the socket ``_serve`` opened: loads the model, then serves."""
    import uvicorn

    from stream_ml.registry import Registry
    from stream_ml.serving.app import Scorer, create_app
    from stream_ml.serving.http import protocol
    from stream_ml.serving.model import production_model
    from stream_ml.serving.predictions import PredictionLog

    fs = feature_set(settings.feature_set)
    registry = Registry(settings.registry_path())
    model = production_model(registry, fs, allow_feature_set_mismatch=args.allow_feature_set_mismatch)
    try:
        predictions = PredictionLog(
            kafka_bootstrap(settings), settings.topic_predictions, args.prediction_buffer
        )
    except NotConfigured as exc:
        log.warning("no prediction log: %s", exc)
        predictions = None
    scorer = Scorer(fs, redis_url(settings), options, model=model, predictions=predictions, registry=registry)
    log.info(
        "scoring on http://%s:%d with model %s on %s (registry %s)",
        args.host,
        args.port,
        scorer.model.version,
        scorer.model.device,
        registry.root,
    )
    app, route = create_app(scorer, limiter, worker)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http=protocol(route),
        log_level="warning",
        access_log=False,
    )
    # uvicorn starts to listen once the lifespan (the warm-up) is done: calls are refused until then
    uvicorn.Server(config).run(sockets=[sock])
