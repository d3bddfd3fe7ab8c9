"""The stack's state file: what `stack up` started, and where every other command finds it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.asyncio as aioredis

from stream_ml.config import Settings, env_name
from stream_ml.stack.processes import Process

STATE_FILE = "stack.json"


class NotConfigured(RuntimeError):
    pass


@dataclass(slots=True)
class StackState:
    kafka_bootstrap: str
    redis_url: str
    processes: list[Process] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "kafka_bootstrap": self.kafka_bootstrap,
            "redis_url": self.redis_url,
            "processes": [p.to_json() for p in self.processes],
        }

    def running(self) -> list[Process]:
        return [p for p in self.processes if p.is_running()]


def read(state_dir: Path) -> StackState | None:
    try:
        raw = json.loads((state_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise NotConfigured(
            f"{state_dir / STATE_FILE} is unreadable ({exc}); remove it and run `stream-ml stack up` again"
        ) from None
    procs = [Process.from_json(p) for p in raw.get("processes", [])]
    return StackState(raw["kafka_bootstrap"], raw["redis_url"], procs)


def write(state_dir: Path, state: StackState) -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2))
    os.replace(tmp, state_dir / STATE_FILE)  # readers never see half a file


def remove(state_dir: Path) -> None:
    (state_dir / STATE_FILE).unlink(missing_ok=True)


def kafka_bootstrap(settings: Settings) -> str:
    """The Kafka to talk to: the setting if given, else the running embedded stack's."""
    if settings.kafka_bootstrap:
        return settings.kafka_bootstrap
    state = read(settings.state_dir)
    if state is not None and state.kafka_bootstrap:
        return state.kafka_bootstrap
    raise NotConfigured(
        f"no Kafka broker configured: run `stream-ml stack up`, or set {env_name('kafka_bootstrap')}"
        "=host:port (or pass --kafka-bootstrap)"
    )


def redis_url(settings: Settings) -> str:
    """The Redis to talk to: the setting if given, else the running embedded stack's."""
    if settings.redis_url:
        return settings.redis_url
    state = read(settings.state_dir)
    if state is not None and state.redis_url:
        return state.redis_url
    raise NotConfigured(
        f"no Redis configured: run `stream-ml stack up`, or set {env_name('redis_url')}"
        "=redis://host:port/0 (or pass --redis-url)"
    )


async def connect_redis(url: str, socket_timeout: float = 10.0) -> aioredis.Redis:
    """A client of the Redis at ``url`` that has answered a PING; ConnectionError says what to do."""
    client = aioredis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=5.0)
    try:
        await client.ping()
    except redis.exceptions.RedisError as exc:
        await client.aclose()
        raise ConnectionError(
            f"Redis at {url} does not answer ({exc}): start it (`stream-ml stack up`) "
            "or fix STREAM_ML_REDIS_URL"
        ) from None
    return client
