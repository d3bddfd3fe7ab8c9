"""The feature store's own Redis connection (``stream_ml/features/wire.py``) against a real Redis
server of the test's own: replies to the right callers, redis-py's errors, credentials and
database from the URL, and a bounded, recovering behaviour when Redis stops answering or dies."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis

from stream_ml.features.wire import Wire
from stream_ml.stack import binaries
from stream_ml.stack.processes import free_port

PASSWORD = "s3cret"


@pytest.fixture
def server() -> Iterator[tuple[subprocess.Popen, int]]:
    """A Redis server that wants a password, on a free port; stopped (and resumed) by the test."""
    port = free_port()
    proc = _redis(port)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            assert time.monotonic() < deadline, "the test's Redis did not start"
            time.sleep(0.05)
    try:
        yield proc, port
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def _redis(port: int) -> subprocess.Popen:
    argv = [binaries.redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--requirepass", PASSWORD]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL)


def _wire(port: int, db: int = 3, password: str = PASSWORD, timeout: float = 0.5) -> Wire:
    client = aioredis.Redis.from_url(
        f"redis://:{password}@127.0.0.1:{port}/{db}", socket_timeout=timeout, socket_connect_timeout=timeout
    )
    wire = Wire.of(client)
    assert wire is not None
    return wire


def test_concurrent_commands_get_their_own_replies_in_the_database_of_the_url(server) -> None:
    _, port = server

    async def run() -> None:
        wire = _wire(port)
        await asyncio.gather(*[wire.call("SET", f"k{i}", f"v{i}") for i in range(300)])
        replies = await asyncio.gather(*[wire.call("GET", f"k{i}") for i in range(300)])
        assert replies == [f"v{i}".encode() for i in range(300)]
        mget, incr = await wire.pipeline([("MGET", "k1", "nope", "k2"), ("INCR", "k1")])
        assert mget == [b"v1", None, b"v2"]
        assert isinstance(incr, redis.exceptions.ResponseError) and "not an integer" in str(incr)

    asyncio.run(run())
    assert redis.Redis(port=port, password=PASSWORD, db=3).get("k7") == b"v7"
    assert redis.Redis(port=port, password=PASSWORD, db=0).get("k7") is None


def test_error_replies_are_raised_as_redis_py_reads_them(server) -> None:
    _, port = server

    async def run() -> None:
        wire = _wire(port)
        with pytest.raises(redis.exceptions.NoScriptError):
            await wire.call("EVALSHA", "0" * 40, 0)
        assert await wire.call("PING") is not None  # the connection goes on after an error reply

    asyncio.run(run())


def test_wrong_credentials_are_an_error_that_says_so(server) -> None:
    _, port = server

    async def run() -> None:
        with pytest.raises(redis.exceptions.AuthenticationError):
            await _wire(port, password="wrong").call("PING")

    asyncio.run(run())


def test_a_stopped_redis_times_out_within_the_socket_timeout_and_the_connection_recovers(server) -> None:
    proc, port = server

    async def run() -> None:
        wire = _wire(port, timeout=0.3)
        await wire.call("SET", "x", "1")
        proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        results = await asyncio.gather(*[wire.call("GET", "x") for _ in range(5)], return_exceptions=True)
        took = time.monotonic() - started
        assert all(isinstance(r, redis.exceptions.TimeoutError) for r in results), results
        assert 0.25 < took < 1.5
        # a caller's own shorter timeout (the scorer's) cancels; the late reply answers nobody
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await wire.call("GET", "x")
        proc.send_signal(signal.SIGCONT)
        assert await wire.call("GET", "x") == b"1"
        assert await wire.call("INCR", "x") == 2

    asyncio.run(run())


def test_a_dead_redis_is_a_connection_error_naming_it_and_a_restarted_one_is_used_again(server) -> None:
    proc, port = server

    async def run() -> None:
        wire = _wire(port)
        await wire.call("SET", "x", "1")
        proc.kill()
        proc.wait(10)
        with pytest.raises(redis.exceptions.ConnectionError):
            await wire.call("GET", "x")
        with pytest.raises(redis.exceptions.ConnectionError, match=f"127.0.0.1:{port}"):
            await wire.call("GET", "x")
        restarted = _redis(port)
        try:
            for _ in range(100):
                try:
                    assert await wire.call("GET", "x") is None  # a new, empty server
                    break
                except redis.exceptions.ConnectionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("the wire never reached the restarted Redis")
        finally:
            restarted.kill()
            restarted.wait(10)

    asyncio.run(run())


def test_a_tls_client_is_left_to_redis_py() -> None:
    assert Wire.of(aioredis.Redis.from_url("rediss://127.0.0.1:1/0")) is None
    assert Wire.of(aioredis.Redis.from_url("unix:///tmp/redis.sock?db=2")) is not None
