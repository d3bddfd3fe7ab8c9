"""The scorer's connection sends an answer's head and body in one write, and answers the calls its
route takes without the app: at once, or once their body is in (see tests/test_serving.py for the
same protocol under the real scorer)."""

from __future__ import annotations

import asyncio
import contextlib

import uvicorn
import uvloop
from uvicorn.server import ServerState

from stream_ml.serving.http import Answer, OnBody, RawHeaders, Reply, _WritesPerTurn, protocol


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


def _route(method: bytes, target: bytes, headers: RawHeaders) -> Answer | OnBody | None:
    if method == b"POST" and target == b"/refuse":
        return 503, [(b"content-length", b"4"), (b"retry-after", b"1")], b"busy"
    if method == b"POST" and target == b"/later":  # answered from a later callback, as a batch is

        def on_body(body: bytes, reply: Reply) -> None:
            answer = b"took " + body
            asyncio.get_running_loop().call_later(
                0.05, reply, 200, [(b"content-length", str(len(answer)).encode())], answer
            )

        return on_body
    return None


def _exchange(*steps: tuple[bytes | None, int]) -> tuple[list[bytes], list[tuple[str, bytes]]]:
    """Each step's bytes sent on one connection to a real server with :func:`_route`, then its
    number of answers read back (bytes None: the caller hangs up, and calls again 0.1 s later);
    returns the answers and the calls the app saw."""
    seen: list[tuple[str, bytes]] = []

    async def app(scope, receive, send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        seen.append((scope["path"], body))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    async def scenario() -> list[bytes]:
        config = uvicorn.Config(app, http=protocol(_route), lifespan="off", log_level="warning")
        config.load()
        state = ServerState()
        state.default_headers = [(b"server", b"test")]  # as uvicorn's server sets them (date too)
        server = await asyncio.get_running_loop().create_server(
            lambda: config.http_protocol_class(config=config, server_state=state, app_state={}),
            "127.0.0.1",
            0,
        )
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        got: list[bytes] = []
        for raw, answers in steps:
            if raw is None:
                writer.close()
                await asyncio.sleep(0.1)
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            writer.write(raw)
            got += await _answers(reader, answers)
        with contextlib.suppress(TimeoutError):  # the server closed it, or keeps it open
            got += [b"<closed>"] if await asyncio.wait_for(reader.read(1), 0.2) == b"" else []
        writer.close()
        server.close()
        return got

    return uvloop.run(scenario()), seen


async def _answers(reader: asyncio.StreamReader, n: int) -> list[bytes]:
    got: list[bytes] = []
    while len(got) < n:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        if head.startswith(b"HTTP/1.1 100 "):  # an interim answer: no body, the final one follows
            continue
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        got.append(head + await asyncio.wait_for(reader.readexactly(length), 5))
    return got


def test_a_call_answered_early_skips_the_app_and_its_body_and_the_connection_serves_on() -> None:
    refused = b"POST /refuse HTTP/1.1\r\nhost: x\r\ncontent-length: 11\r\n\r\nnot a call!"
    passed = b"POST /ok HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"

    answers, seen = _exchange((refused + passed, 2), (refused, 1))

    assert answers[0].startswith(b"HTTP/1.1 503") and answers[0].endswith(b"\r\n\r\nbusy")
    assert b"\r\nretry-after: 1\r\n" in answers[0] and b"\r\nserver: test\r\n" in answers[0]
    assert answers[1].startswith(b"HTTP/1.1 200") and answers[1].endswith(b"ok")
    assert answers[2].startswith(b"HTTP/1.1 503")
    assert seen == [("/ok", b"abc")]  # the refused bodies were skipped, not read as calls


def test_calls_the_connection_cannot_answer_early_go_to_the_app() -> None:
    """HTTP/1.0, or a body held back for a 100 Continue: the app answers, as without the hook."""
    old = b"POST /refuse HTTP/1.0\r\ncontent-length: 1\r\n\r\nx"
    answers, seen = _exchange((old, 1))
    assert answers[0].startswith(b"HTTP/1.1 200") and seen == [("/refuse", b"x")]

    waiting = b"POST /refuse HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n"
    answers, seen = _exchange((waiting + b"y", 1))
    assert answers[0].startswith(b"HTTP/1.1 200") and seen == [("/refuse", b"y")]


def test_a_call_taken_for_its_body_is_answered_later_and_a_pipelined_call_waits_its_turn() -> None:
    later = b"POST /later HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhello"
    passed = b"POST /ok HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc"

    answers, seen = _exchange((later + passed, 2), (later, 1))

    assert answers[0].startswith(b"HTTP/1.1 200") and answers[0].endswith(b"\r\n\r\ntook hello")
    assert b"\r\nserver: test\r\n" in answers[0]
    assert answers[1].endswith(b"ok") and answers[2].endswith(b"took hello")  # in the order sent
    assert seen == [("/ok", b"abc")]


def test_a_taken_call_that_asks_to_close_is_answered_then_closed() -> None:
    closing = b"POST /later HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi"
    answers, seen = _exchange((closing, 1))
    assert b"\r\nconnection: close\r\n" in answers[0] and answers[0].endswith(b"took hi")
    assert answers[1:] == [b"<closed>"] and seen == []


def test_a_caller_gone_before_its_answer_leaves_the_server_serving() -> None:
    later = b"POST /later HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nx"
    # hung up with the answer still due (in 0.05 s): it is dropped, and the server serves on
    answers, seen = _exchange((later, 0), (None, 0), (later, 1))
    assert len(answers) == 1 and answers[0].endswith(b"took x") and seen == []


def test_an_idle_connection_closes_after_the_keep_alive_timeout_and_a_busy_one_stays_open() -> None:
    """One timer per connection (not one per answer): calls closer together than the timeout keep
    the connection open past it; then, idle for the timeout, it is closed. An answer carries the
    server's default headers as they are when it is sent (uvicorn replaces them each second)."""
    later = b"POST /later HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\nx"

    async def scenario() -> tuple[list[bytes], bytes, float]:
        config = uvicorn.Config(
            lambda scope, receive, send: None,
            http=protocol(_route),
            lifespan="off",
            log_level="warning",
            timeout_keep_alive=0.3,  # type: ignore[arg-type]  # seconds; a float works as well
        )
        config.load()
        state = ServerState()
        state.default_headers = [(b"server", b"test")]
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: config.http_protocol_class(config=config, server_state=state, app_state={}),
            "127.0.0.1",
            0,
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", server.sockets[0].getsockname()[1])
        got: list[bytes] = []
        for pause in (0.2, 0.2, 0.2, 0.0):  # 0.6 s in all, never 0.3 s idle
            writer.write(later)
            got += await _answers(reader, 1)
            state.default_headers = [(b"server", b"test"), (b"date", str(len(got)).encode())]
            await asyncio.sleep(pause)
        idle_from = loop.time()
        closed = await asyncio.wait_for(reader.read(1), 2)
        idle = loop.time() - idle_from
        writer.close()
        server.close()
        return got, closed, idle

    got, closed, idle = uvloop.run(scenario())
    assert [a.endswith(b"took x") for a in got] == [True] * 4
    assert b"\r\ndate:" not in got[0] and b"\r\ndate: 1\r\n" in got[1] and b"\r\ndate: 3\r\n" in got[3]
    assert closed == b"" and 0.2 < idle < 1.0  # closed by the server, 0.3 s after its last answer
