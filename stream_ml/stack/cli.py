"""`stream-ml stack up | down | status`."""

from __future__ import annotations

import argparse
import json

from stream_ml.config import Settings, add_arguments, env_name
from stream_ml.stack import local


def register(commands: argparse._SubParsersAction) -> None:
    stack = commands.add_parser(
        "stack",
        help="run the embedded local stack (Kafka-compatible broker + Redis)",
        description="The embedded local stack: Tansu (Kafka wire protocol, log kept in memory) and "
        "Redis, as background processes tracked by PID under --state-dir.",
    )
    sub = stack.add_subparsers(dest="stack_command", required=True, metavar="COMMAND")
    up = sub.add_parser(
        "up",
        help="start the stack and create the topics",
        description="Start the broker and Redis (unless already running, or pointed "
        "elsewhere by STREAM_ML_KAFKA_BOOTSTRAP / STREAM_ML_REDIS_URL), wait until they "
        "answer, and create the topics. Safe to run twice.",
    )
    add_arguments(up)
    up.set_defaults(run=_up)
    down = sub.add_parser(
        "down",
        help="stop what `stack up` started",
        description="Stop exactly the processes `stack up` started, by PID. The "
        "embedded broker's log is in memory: this discards it.",
    )
    add_arguments(down)
    down.set_defaults(run=_down)
    status = sub.add_parser(
        "status", help="show what runs and where", description="Show the stack's endpoints and processes."
    )
    status.add_argument(
        "--json", action="store_true", help='print {"kafka_bootstrap", "redis_url", "processes"} as JSON'
    )
    add_arguments(status)
    status.set_defaults(run=_status)


def _up(args: argparse.Namespace, settings: Settings) -> int:
    report = local.up(settings)
    for p in report.state.processes:
        how = "started" if p.name in report.started else "already running"
        print(f"{p.name:<6} {how:<16} pid {p.pid:<8} port {p.port:<6} log {p.log}")
    for name in report.external:
        variable = env_name("kafka_bootstrap" if name == local.KAFKA else "redis_url")
        print(f"{name:<6} {'external':<16} (from {variable}; nothing started)")
    for t in report.topics:
        print(f"topic  {t.name:<16} {t.partitions} partitions{' (created)' if t.created else ''}")
    print(f"\nKafka bootstrap: {report.state.kafka_bootstrap}\nRedis URL:       {report.state.redis_url}")
    if "kafka" not in report.external:
        print("The embedded broker keeps its log in memory: `stream-ml stack down` discards it.")
    print(
        "Other stream-ml commands find this stack by themselves. For other tools:\n"
        f"  export {env_name('kafka_bootstrap')}={report.state.kafka_bootstrap} "
        f"{env_name('redis_url')}={report.state.redis_url}"
    )
    return 0


def _down(args: argparse.Namespace, settings: Settings) -> int:
    stopped = local.down(settings)
    if not stopped:
        print("nothing to stop: no stack started from", settings.state_dir)
    for p in stopped:
        print(f"stopped {p.name} (pid {p.pid})")
    return 0


def _status(args: argparse.Namespace, settings: Settings) -> int:
    state = local.status(settings)
    if args.json:
        print(
            json.dumps(
                state.to_json() if state else {"kafka_bootstrap": None, "redis_url": None, "processes": []}
            )
        )
        return 0 if state and all(p.is_running() for p in state.processes) else 1
    if state is None:
        print(f"no stack: run `stream-ml stack up` (state dir {settings.state_dir})")
        return 1
    print(f"Kafka bootstrap: {state.kafka_bootstrap}\nRedis URL:       {state.redis_url}")
    for p in state.processes:
        print(
            f"{p.name:<6} {'running' if p.is_running() else 'NOT RUNNING':<12} pid {p.pid:<8} "
            f"port {p.port:<6} log {p.log}"
        )
    return 0 if all(p.is_running() for p in state.processes) else 1
