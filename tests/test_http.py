"""The scorer's connection sends an answer's head and body in one write (see tests/test_serving.py
for the same protocol under a real server)."""

from __future__ import annotations

import asyncio

import uvloop

from stream_ml.serving.http import _WritesPerTurn


class _Recorder:
    """What the protocol does to its socket: each system call it would make."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes]] = []
        self.closing = False

    def writelines(self, chunks: list[bytes]) -> None:
        self.calls.append(("send", b"".join(chunks)))

    def close(self) -> None:
        self.calls.append(("close", b""))
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str) -> str:
        return f"info:{name}"


def test_the_writes_of_one_turn_leave_in_one_send_in_order() -> None:
    async def scenario() -> list[tuple[str, bytes]]:
        sock = _Recorder()
        transport = _WritesPerTurn(sock, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b'{"score":0.1}')
        assert sock.calls == []  # held until the loop turns
        await asyncio.sleep(0)
        transport.write(b"next")
        await asyncio.sleep(0)
        return sock.calls

    assert uvloop.run(scenario()) == [("send", b'HTTP/1.1 200 OK\r\n\r\n{"score":0.1}'), ("send", b"next")]


def test_closing_sends_what_is_held_first_and_nothing_after() -> None:
    async def scenario() -> list[tuple[str, bytes]]:
        sock = _Recorder()
        transport = _WritesPerTurn(sock, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        transport.close()
        transport.write(b"late")  # the connection is gone: dropped, as the transport would drop it
        await asyncio.sleep(0)
        assert transport.get_extra_info("peername") == "info:peername"  # the rest is the transport's
        return sock.calls

    assert uvloop.run(scenario()) == [("send", b"HTTP/1.1 400 Bad Request\r\n\r\n"), ("close", b"")]
