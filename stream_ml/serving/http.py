"""The HTTP connection: uvicorn's httptools protocol, with a response's head and body sent together.

uvicorn writes a response's status line and headers at ``http.response.start`` and its body at
``http.response.body``: two ``send()`` system calls per answer, as uvloop writes at once when its
buffer is empty. A system call costs ~10 µs in the sandbox these figures come from, and a scoring
call made three of them (one read, two writes). Here the writes of one turn of the event loop
are held and leave in one call at the next, as a TCP cork would send them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol, sending each answer in one system call (``http=`` of uvicorn)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_WritesPerTurn(transport, self.loop))  # type: ignore[arg-type]
