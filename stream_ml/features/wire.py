"""The feature store's own Redis connection: commands pipelined in order, replies parsed by hiredis.

redis-py's asyncio client cost 98–132 µs of CPU an MGET here (a pool, a lock, a StreamReader, its
parser's wrappers), where a scorer's whole batch of one costs ~700 µs; this connection 42–59.
Replies come back in the order the commands went, so commands of several callers share the
connection without waiting for each other's round trip.

Failures are redis-py's exceptions, so callers handle one set: ``ConnectionError`` when Redis
cannot be reached or the connection drops, ``TimeoutError`` after the client's
``socket_timeout``, and error replies as redis-py parses them (``NoScriptError``...). A command
whose caller gives up (a timeout, a cancellation) closes the connection, as redis-py does: a Redis
that stopped answering would otherwise hold a growing line of commands nobody waits for. The next
command connects again.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis._parsers.base import BaseParser  # redis-py's own reading of error replies


class _Replies(asyncio.Protocol):
    """The replies of one connection, handed to the commands waiting for them, first come first served."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(
            protocolError=redis.exceptions.InvalidResponse, replyError=BaseParser.parse_error
        )
        self.waiting: deque[tuple[asyncio.Future[list[Any]], int, list[Any]]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        try:
            while (reply := self.reader.gets()) is not False:
                future, count, replies = waiting[0]
                replies.append(reply)
                if len(replies) == count:
                    waiting.popleft()
                    if not future.done():
                        future.set_result(replies)
        except (redis.exceptions.InvalidResponse, IndexError) as exc:  # garbled, or a reply nobody asked for
            self.close(redis.exceptions.ConnectionError(f"Redis sent what cannot be read: {exc!r}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(redis.exceptions.ConnectionError(f"the connection to Redis closed ({exc or 'by Redis'})"))

    def time_out(self, seconds: float) -> None:
        self.close(redis.exceptions.TimeoutError(f"Redis did not answer within {seconds} s"))

    def close(self, error: Exception) -> None:
        """Fail every waiting command with ``error`` and close; later commands connect again."""
        self.lost = self.lost or error
        while self.waiting:
            future, _, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.close()


class Wire:
    """Commands to the Redis server of a redis-py client, on a connection of their own.

    Takes the client's address, database, credentials and timeouts. For TLS, whose handshake and
    certificate options are redis-py's, :meth:`of` returns None: use the client.
    """

    def __init__(self, settings: dict[str, Any]) -> None:
        self._settings = settings
        self._timeout: float | None = settings.get("socket_timeout")
        self._connect_timeout: float | None = settings.get("socket_connect_timeout") or self._timeout
        self._conn: _Replies | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Future[_Replies] | None = None

    @classmethod
    def of(cls, client: aioredis.Redis) -> Wire | None:
        pool = client.connection_pool
        plain = (aioredis.Connection, aioredis.UnixDomainSocketConnection)
        return cls(dict(pool.connection_kwargs)) if pool.connection_class in plain else None

    async def call(self, *args: str | bytes | int | float) -> Any:
        """One command's reply; an error reply is raised."""
        return raise_errors(await self.pipeline([args]))[0]

    async def pipeline(self, commands: list[tuple]) -> list[Any]:
        """The replies of ``commands``, sent in one write; error replies are in the list, not raised."""
        conn = self._conn
        if conn is None or conn.lost is not None or self._loop is None or self._loop.is_closed():
            conn = await self._connect()
        future: asyncio.Future[list[Any]] = self._loop.create_future()  # type: ignore[union-attr]
        conn.waiting.append((future, len(commands), []))
        conn.transport.write(b"".join([hiredis.pack_command(c) for c in commands]))  # type: ignore[union-attr]
        timer = self._loop.call_later(self._timeout, conn.time_out, self._timeout) if self._timeout else None  # type: ignore[union-attr]
        try:
            return await future
        except asyncio.CancelledError:
            conn.close(redis.exceptions.ConnectionError("a command was cancelled before its reply"))
            raise
        finally:
            if timer is not None:
                timer.cancel()

    async def _connect(self) -> _Replies:
        """The open connection, or a new one (one at a time: concurrent callers share it)."""
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._open())
            # read here, so that a failure whose callers were all cancelled is not reported unread
            self._connecting.add_done_callback(lambda f: f.cancelled() or f.exception())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Replies:
        loop = asyncio.get_running_loop()
        s = self._settings
        host, port = s.get("host", "localhost"), s.get("port", 6379)
        try:
            async with asyncio.timeout(self._connect_timeout):
                if "path" in s:
                    _, conn = await loop.create_unix_connection(_Replies, s["path"])
                else:
                    _, conn = await loop.create_connection(_Replies, host, port)
        except (OSError, TimeoutError) as exc:
            where = s.get("path") or f"{host}:{port}"
            raise redis.exceptions.ConnectionError(f"cannot connect to Redis at {where}: {exc!r}") from None
        self._conn, self._loop = conn, loop
        hello: list[tuple] = []
        if s.get("password"):
            user = s.get("username")
            hello.append(("AUTH", user, s["password"]) if user else ("AUTH", s["password"]))
        if s.get("db"):
            hello.append(("SELECT", s["db"]))
        if hello:
            try:
                raise_errors(await self.pipeline(hello))
            except redis.exceptions.RedisError as exc:
                conn.close(exc)
                raise
        return conn


def raise_errors(replies: list[Any]) -> list[Any]:
    """``replies`` of :meth:`Wire.pipeline`, or the first error among them raised."""
    for reply in replies:
        if isinstance(reply, Exception):  # an error reply, as redis-py parses it
            raise reply
    return replies
