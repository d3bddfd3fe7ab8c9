"""`stream-ml`: the one command of the system; each station adds its subcommands here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from stream_ml import __version__, config
from stream_ml.demo import cli as demo_cli
from stream_ml.events import cli as events_cli
from stream_ml.features import cli as features_cli
from stream_ml.feedback import cli as feedback_cli
from stream_ml.monitoring import cli as monitoring_cli
from stream_ml.registry import cli as registry_cli
from stream_ml.serving import cli as serving_cli
from stream_ml.stack import cli as stack_cli
from stream_ml.training import cli as training_cli
from stream_ml.training import replay_cli

# Errors that are the user's to fix: printed as one line that says what to do, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    config.ConfigError,
    ConnectionError,
    FileNotFoundError,
    LookupError,
    RuntimeError,
    TimeoutError,
    ValueError,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stream-ml",
        description="Streaming-first, real-time fraud scoring: Kafka events, Redis features, "
        "a micro-batched PyTorch scorer, and labels fed back for learning and drift.",
    )
    parser.add_argument("--version", action="version", version=f"stream-ml {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    stack_cli.register(commands)
    events_cli.register(commands)
    worker = commands.add_parser("worker", help="run a stream topology (a consumer-group member)")
    topologies = worker.add_subparsers(dest="topology", required=True, metavar="TOPOLOGY")
    features_cli.register_worker(topologies)
    feedback_cli.register_worker(topologies)
    serving_cli.register_worker(topologies)
    features_cli.register(commands)
    serving_cli.register(commands)
    replay_cli.register(commands)
    training_cli.register(commands)
    registry_cli.register(commands)
    monitoring_cli.register(commands)
    demo_cli.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = config.from_arguments(args)
        return int(args.run(args, settings) or 0)
    except KeyboardInterrupt:
        print("stream-ml: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"stream-ml: error: {exc}", file=sys.stderr)
        return 2
