"""`stream-ml stack up | down | status`: a Kafka-compatible broker and Redis on this machine.

The broker is Tansu (Kafka wire protocol) with its in-memory log: `down` discards the log. The
durable deployment is docker-compose on Apache Kafka. Servers the user points us at with
``STREAM_ML_KAFKA_BOOTSTRAP`` / ``STREAM_ML_REDIS_URL`` are used as they are: nothing is started
for them (topics are still created on such a Kafka, idempotently).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis

from stream_ml.config import Settings, env_name
from stream_ml.stack import binaries, state
from stream_ml.stack.processes import Process, ensure_port_free, spawn, tail, wait_for_port
from stream_ml.stack.state import StackState
from stream_ml.stack.topics import TopicReport, ensure_topics

HOST = "127.0.0.1"
KAFKA = "kafka"
REDIS = "redis"
START_TIMEOUT_S = 30.0


@dataclass(slots=True)
class UpReport:
    state: StackState
    started: list[str]
    reused: list[str]
    external: list[str]
    topics: list[TopicReport]


def up(settings: Settings) -> UpReport:
    """Start what is not running yet, wait until it answers, create the topics. Idempotent."""
    previous = state.read(settings.state_dir)
    alive = {p.name: p for p in (previous.running() if previous else [])}
    started: list[str] = []
    external: list[str] = []
    procs: list[Process] = []

    if settings.kafka_bootstrap:
        kafka_bootstrap = settings.kafka_bootstrap
        external.append(KAFKA)
    elif KAFKA in alive:
        kafka_bootstrap = f"{HOST}:{alive[KAFKA].port}"
        procs.append(alive[KAFKA])
    else:
        procs.append(_start_kafka(settings))
        kafka_bootstrap = f"{HOST}:{settings.kafka_port}"
        started.append(KAFKA)

    if settings.redis_url:
        redis_url = settings.redis_url
        external.append(REDIS)
    elif REDIS in alive:
        redis_url = f"redis://{HOST}:{alive[REDIS].port}/0"
        procs.append(alive[REDIS])
    else:
        try:
            procs.append(_start_redis(settings))
        except BaseException:
            for p in procs:
                if p.name in started:
                    p.stop()
            raise
        redis_url = f"redis://{HOST}:{settings.redis_port}/0"
        started.append(REDIS)

    current = StackState(kafka_bootstrap, redis_url, procs)
    state.write(settings.state_dir, current)  # before waiting: `down` can stop a half-started stack
    _wait_for_redis(redis_url, procs)
    topics = asyncio.run(
        ensure_topics(kafka_bootstrap, settings.topics(), settings.partitions, START_TIMEOUT_S)
    )
    reused = [name for name in alive if name in {p.name for p in procs} and name not in started]
    return UpReport(current, started, reused, external, topics)


def down(settings: Settings) -> list[Process]:
    """Stop exactly the processes `up` started (by PID), and forget them."""
    current = state.read(settings.state_dir)
    if current is None:
        return []
    stopped = [p for p in current.processes if p.is_running()]
    for p in stopped:
        p.stop()
    state.remove(settings.state_dir)
    return stopped


def status(settings: Settings) -> StackState | None:
    """What the state file says, with each process's liveness checked now."""
    current = state.read(settings.state_dir)
    if current is None and (settings.kafka_bootstrap or settings.redis_url):
        return StackState(settings.kafka_bootstrap or "", settings.redis_url or "", [])
    return current


def _start_kafka(settings: Settings) -> Process:
    port = settings.kafka_port
    ensure_port_free(port, "Kafka broker", _port_hint("kafka_port", "kafka-port", port))
    url = f"tcp://{HOST}:{port}"
    argv = [
        binaries.kafka_broker(),
        "broker",
        "--listener-url",
        url,
        "--advertised-listener-url",
        url,
        "--storage-engine",
        "memory://tansu/",
    ]
    proc = spawn(KAFKA, argv, port, settings.state_dir / "logs" / "kafka.log")
    try:
        wait_for_port(proc, HOST, START_TIMEOUT_S)
    except BaseException:
        proc.stop()
        raise
    return proc


def _start_redis(settings: Settings) -> Process:
    port = settings.redis_port
    ensure_port_free(port, "Redis server", _port_hint("redis_port", "redis-port", port))
    data_dir = settings.state_dir / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    # The embedded store is rebuilt from the event log (replay), so it keeps nothing on disk.
    argv = [
        binaries.redis_server(),
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir),
        "--protected-mode",
        "yes",
    ]
    proc = spawn(REDIS, argv, port, settings.state_dir / "logs" / "redis.log")
    try:
        wait_for_port(proc, HOST, START_TIMEOUT_S)
    except BaseException:
        proc.stop()
        raise
    return proc


def _wait_for_redis(url: str, procs: list[Process]) -> None:
    client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            try:
                client.ping()
                return
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError as exc:
                dead = [p for p in procs if p.name == REDIS and not p.is_running()]
                if dead:
                    raise RuntimeError(f"Redis exited; its log ends with:\n{tail(dead[0].log)}") from None
                if time.monotonic() > deadline:
                    raise ConnectionError(
                        f"Redis at {url} did not answer within {START_TIMEOUT_S:.0f} s ({exc})"
                    ) from None
            time.sleep(0.05)
    finally:
        client.close()


def _port_hint(field: str, flag: str, port: int) -> str:
    external = env_name("kafka_bootstrap" if "kafka" in field else "redis_url")
    return (
        f"stop what listens on {port}, or choose another port with --{flag} or {env_name(field)}, "
        f"or use a server you already run with {external}"
    )
