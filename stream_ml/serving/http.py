"""The HTTP connection: uvicorn's httptools protocol, with a response's head and body sent together,
and calls the app refuses on sight answered before they become ASGI tasks.

uvicorn writes a response's status line and headers at ``http.response.start`` and its body at
``http.response.body``: two ``send()`` system calls per answer, as uvloop writes at once when its
buffer is empty. A system call costs ~10 µs in the sandbox these figures come from, and a scoring
call made three of them (one read, two writes). Here the writes of one turn of the event loop
are held and leave in one call at the next, as a TCP cork would send them.

Under overload most calls are refused, and a refusal made by the app costs what a no-op call costs
(a scope, a task, two ASGI messages): at twice its capacity the scorer spent its core refusing. An
``early_answer`` hook sees each call's method and path once its headers are in, and may answer it
there; the body that follows is read and dropped, and the call never reaches the app.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

RawHeaders = list[tuple[bytes, bytes]]  # as ASGI carries them: lower-case names, latin-1 values
# (method, path and query) -> None to let the call through, or (status, headers, body) to answer it.
EarlyAnswer = Callable[[bytes, bytes], tuple[int, RawHeaders, bytes] | None]


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


class _Answered:
    """The cycle of a call answered early: complete, so the parser's body callbacks drop its body."""

    response_complete = True
    keep_alive = True
    disconnected = False
    message_event = _NoEvent()  # what the connection sets when it is lost


_ANSWERED = _Answered()


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol, sending each answer in one system call (``http=`` of uvicorn)."""

    early_answer: EarlyAnswer | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_WritesPerTurn(transport, self.loop))  # type: ignore[arg-type]

    def on_headers_complete(self) -> None:
        if self.early_answer is None or not self._may_answer_early():
            super().on_headers_complete()
            return
        answer = self.early_answer(self.parser.get_method(), self.url)
        if answer is None:
            super().on_headers_complete()
            return
        status, headers, body = answer
        content = [STATUS_LINE[status]]
        for name, value in [*self.server_state.default_headers, *headers]:
            content += [name, b": ", value, b"\r\n"]
        content += [b"\r\n", body]
        self.cycle = _ANSWERED  # type: ignore[assignment]
        self.transport.write(b"".join(content))
        self.on_response_complete()  # as a cycle's last send does: keep-alive timer, next call

    def _may_answer_early(self) -> bool:
        # Only where the answer can go now and the connection stay as it is: no answer of an
        # earlier pipelined call pending, keep-alive HTTP/1.1, and no body held back for a 100.
        return (
            (self.cycle is None or self.cycle.response_complete)
            and not self.expect_100_continue
            and self.parser.get_http_version() == "1.1"
            and self.parser.should_keep_alive()
            and not self.parser.should_upgrade()
        )


def protocol(early_answer: EarlyAnswer | None) -> type[HttpProtocol]:
    """:class:`HttpProtocol` with ``early_answer`` (uvicorn takes a class, and makes one per connection)."""
    if early_answer is None:
        return HttpProtocol
    return type("HttpProtocol", (HttpProtocol,), {"early_answer": staticmethod(early_answer)})
