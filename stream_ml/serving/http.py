"""The HTTP connection: uvicorn's httptools protocol, with a response's head and body sent together,
and a route the connection answers itself, without an ASGI task.

uvicorn writes a response's status line and headers at ``http.response.start`` and its body at
``http.response.body``: two ``send()`` system calls per answer, as uvloop writes at once when its
buffer is empty. A system call costs ~10 µs in the sandbox these figures come from, and a scoring
call made three of them (one read, two writes). Here the writes of one turn of the event loop
are held and leave in one call at the next, as a TCP cork would send them.

A call through ASGI costs a scope, a task, a coroutine per layer and four messages; on this box
that is more than the scorer's share of a batch. A :data:`Route` sees each call's method, target
and headers once they are in, and may take the call: answer it at once (a refusal: the body that
follows is dropped), or read its body and answer it later through a :data:`Reply`, from any
callback of the loop. Calls it does not take go to the app as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

RawHeaders = list[tuple[bytes, bytes]]  # as ASGI carries them: lower-case names, latin-1 values
Answer = tuple[int, RawHeaders, bytes]  # status, headers (content-length included), body
Reply = Callable[[int, RawHeaders, bytes], None]
# Called once the body is in, with the reply to call once, then or later.
OnBody = Callable[[bytes, Reply], None]
# (method, target, headers) -> None: the app's call; an Answer: sent now; OnBody: the body is read for it.
Route = Callable[[bytes, bytes, RawHeaders], Answer | OnBody | None]


class _WritesPerTurn:
    """A transport whose writes leave together at the next turn of the loop; all else is the transport's."""

    __slots__ = ("_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._held:
            self._loop.call_soon(self.flush)
        self._held.append(data)

    def flush(self) -> None:
        held, self._held = self._held, []
        if held and not self._transport.is_closing():
            self._transport.writelines(held)  # one writev for them all

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.flush()
        self._transport.set_protocol(protocol)

    def abort(self) -> None:
        self._held = []
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _NoEvent:
    def set(self) -> None:
        pass


class _Taken:
    """The cycle of a call the route took: what uvicorn's callbacks read and set on a cycle.

    While incomplete, the body gathers here and a pipelined call behind it waits, as behind an
    ASGI call; once answered, what is left of the body is dropped.
    """

    __slots__ = ("body", "disconnected", "keep_alive", "on_body", "protocol", "response_complete")
    message_event = _NoEvent()  # set by uvicorn when body arrives or the connection is lost

    def __init__(self, protocol: HttpProtocol, keep_alive: bool, on_body: OnBody | None) -> None:
        self.protocol = protocol
        self.keep_alive = keep_alive  # uvicorn's shutdown() clears it: close after the answer
        self.on_body = on_body
        self.body = bytearray()
        self.disconnected = False
        self.response_complete = False

    def message_complete(self) -> None:
        on_body, self.on_body = self.on_body, None
        if on_body is not None:
            on_body(bytes(self.body), self.reply)

    def reply(self, status: int, headers: RawHeaders, body: bytes) -> None:
        if self.response_complete:
            raise RuntimeError("a call answered twice")
        self.response_complete = True
        protocol = self.protocol
        transport = protocol.transport
        if transport.is_closing():
            return  # the caller has gone: nobody to answer
        content = [STATUS_LINE[status], _server_headers(protocol.server_state)]
        for name, value in headers:
            content += [name, b": ", value, b"\r\n"]
        if not self.keep_alive:
            content.append(b"connection: close\r\n")
        content += [b"\r\n", body]
        transport.write(b"".join(content))
        if not self.keep_alive:
            transport.close()
        protocol.on_response_complete()  # as an ASGI cycle's last send: keep-alive timer, next call


_joined: tuple[object, bytes] = (None, b"")  # uvicorn's default headers, and them as they go out


def _server_headers(state: ServerState) -> bytes:
    """The headers uvicorn adds to every answer (date, server), joined once for all the answers
    until uvicorn replaces them (each second, for the date)."""
    global _joined
    held, joined = _joined
    if held is not state.default_headers:
        joined = b"".join([name + b": " + value + b"\r\n" for name, value in state.default_headers])
        _joined = (state.default_headers, joined)
    return joined


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol, sending each answer in one system call, with ``route``
    answering the calls it takes (``http=`` of uvicorn; see :func:`protocol`)."""

    route: Route | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_WritesPerTurn(transport, self.loop))  # type: ignore[arg-type]

    def on_message_begin(self) -> None:
        # uvicorn makes each call's ASGI scope here: only the calls the route does not take need one
        self.url = b""
        self.expect_100_continue = False
        self.headers = []

    def on_headers_complete(self) -> None:
        if self.route is not None and self._may_take():
            taken = self.route(self.parser.get_method(), self.url, self.headers)
            if taken is not None:
                on_body = taken if callable(taken) else None
                self.cycle = cycle = _Taken(self, self.parser.should_keep_alive(), on_body)  # type: ignore[assignment]
                if on_body is None:
                    cycle.reply(*taken)  # type: ignore[misc]
                return
        url, headers, expect_100_continue = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()  # the scope, as uvicorn makes it; then what its parse gathered
        self.url, self.headers, self.expect_100_continue = url, headers, expect_100_continue
        self.scope["headers"] = headers
        super().on_headers_complete()

    # uvicorn arms a keep-alive timer as each answer ends and cancels it when the next call comes:
    # two timer operations a call. Here a connection's timer is armed once, and when it fires it
    # closes the connection only if no call came since the last answer; if one did, it fires again
    # when the connection will have been idle for the timeout.
    _idle_from: float | None = None  # the loop's time at the last answer; None while a call is in

    def _unset_keepalive_if_required(self) -> None:
        self._idle_from = None

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_from = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._idle_timeout)

    def _idle_timeout(self) -> None:
        self.timeout_keep_alive_task = None
        if self._idle_from is None:
            return  # a call is in: its answer arms the timer again
        left = self._idle_from + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._idle_timeout)
        else:
            self.timeout_keep_alive_handler()

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if type(cycle) is _Taken:
            cycle.message_complete()
        else:
            super().on_message_complete()

    def _may_take(self) -> bool:
        # Only where the answer can go when ready: no answer of an earlier pipelined call pending,
        # HTTP/1.1, and no body held back for a 100 Continue.
        return (
            (self.cycle is None or self.cycle.response_complete)
            and not self.expect_100_continue
            and self.parser.get_http_version() == "1.1"
            and not self.parser.should_upgrade()
        )


def protocol(route: Route | None) -> type[HttpProtocol]:
    """:class:`HttpProtocol` with ``route`` (uvicorn takes a class, and makes one per connection)."""
    if route is None:
        return HttpProtocol
    return type("HttpProtocol", (HttpProtocol,), {"route": staticmethod(route)})
