"""Shared fixtures: one real embedded stack (Tansu + Redis) per session, on free ports.

The stack is started and stopped by the project's own `stack` code, by PID. Tests that need
topics get fresh ones per test, so they never see each other's messages.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest

from stream_ml.config import ENV_PREFIX, Settings
from stream_ml.stack import kafka_bootstrap, local
from stream_ml.stack.processes import free_port
from stream_ml.stack.topics import ensure_topics

# The user's own STREAM_ML_* settings must not leak into the tests.
for _name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
    del os.environ[_name]


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings pointing at a running embedded stack (its state dir, so commands find it)."""
    settings = Settings.from_env(
        {},
        state_dir=tmp_path_factory.mktemp("stack"),
        kafka_port=free_port(),
        redis_port=free_port(),
    )
    local.up(settings)
    try:
        yield settings
    finally:
        stopped = local.down(settings)
        assert {p.name for p in stopped} == {"kafka", "redis"}


@pytest.fixture
def topics(stack: Settings) -> Settings:
    """The session stack with this test's own, freshly created topics."""
    tag = uuid.uuid4().hex[:8]
    settings = replace(
        stack,
        topic_transactions=f"transactions-{tag}",
        topic_labels=f"labels-{tag}",
        topic_predictions=f"predictions-{tag}",
        topic_drift=f"drift-{tag}",
        topic_dead_letter=f"dead-letter-{tag}",
    )
    asyncio.run(ensure_topics(kafka_bootstrap(stack), settings.topics(), settings.partitions))
    return settings
