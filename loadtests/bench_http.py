"""The scorer's HTTP path in process: time a ``POST /score`` call without its batch, optionally
against other code.

    python loadtests/bench_http.py                           # this tree alone
    python loadtests/bench_http.py --against /tmp/before     # this tree against another

What a call costs here: the connection's parse (uvicorn's httptools protocol with the scorer's
route), the key, the rate limit, the admission, the JSON body and its checks, the batcher's queue,
the answer's JSON and its write, the metrics. Not the system calls (the connections are in-process
transports that keep what is written) nor the batch: the model's batch is replaced by one that
answers a fixed score at once (``bench_score_batch.py`` times the batch). Each round sends one call
on each of 64 connections and waits for the 64 answers, as a loaded scorer's turn of the loop does.

``--against`` takes another checkout (``git worktree add /tmp/before <commit>``); the two trees run
in processes of their own and take turns, round after round, as in ``bench_score_batch.py``; the
median of the rounds' ratios is printed with its range.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
CONNECTIONS = 64
CALLS_PER_TURN = 100 * CONNECTIONS


class _Transport:
    """What a connection writes, kept; the rest of a transport's surface, as a socket's."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, chunks: list[bytes]) -> None:
        self.written.extend(chunks)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _worker() -> None:
    """Serve turns on stdin (a number of rounds per line; an empty line ends): µs a call per turn.
    Runs in the tree under test (its working directory), with that tree's code."""
    sys.path.insert(0, os.getcwd())
    import uvicorn
    import uvloop
    from uvicorn.server import ServerState

    from stream_ml.features import feature_set
    from stream_ml.serving.app import Scored, Scorer, create_app
    from stream_ml.serving.http import protocol
    from stream_ml.serving.options import ServeOptions

    logging.disable(logging.WARNING)  # the store is not there, on purpose: the batch never reads it
    key = "bench"
    body = json.dumps(
        {
            "event_id": "e-123456",
            "event_time": int(time.time() * 1000),
            "card_id": "card-0001",
            "merchant_id": "m-0042",
            "amount": 42.5,
            "currency": "EUR",
            "country": "FR",
            "channel": "pos",
            "device_id": "d-77",
        }
    ).encode()
    call = (
        f"POST /score HTTP/1.1\r\nHost: scorer\r\nX-API-Key: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def serve() -> None:
        options = ServeOptions(api_keys=(key,), rate_per_key=1e9, redis_timeout_ms=50)
        scorer = Scorer(feature_set("fraud"), "redis://127.0.0.1:1", options)
        await scorer.start()
        scored = Scored(0.1234, "approve", [("amount", 42.5), ("card_tx_count_1h", 3.0)], "bench", False)

        async def batch(txs: list) -> list[Scored]:
            return [scored] * len(txs)

        scorer.batcher._run_batch = batch
        scorer.batcher.cost.prior(1e-6, 1e-5)  # that batch's cost, not the absent store's timeout
        app, route = create_app(scorer)
        config = uvicorn.Config(app, http=protocol(route), log_level="warning", access_log=False)
        config.load()
        state = ServerState()
        loop = asyncio.get_running_loop()
        connections = []
        for _ in range(CONNECTIONS):
            connection = config.http_protocol_class(
                config=config, server_state=state, app_state={}, _loop=loop
            )
            transport = _Transport()
            connection.connection_made(transport)  # type: ignore[arg-type]
            connections.append((connection, transport))
        while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            rounds = []
            for _ in range(int(line)):
                for _, transport in connections:
                    transport.written.clear()
                started = time.perf_counter()
                for connection, _ in connections:
                    connection.data_received(call)
                while not all(transport.written for _, transport in connections):
                    await asyncio.sleep(0)
                rounds.append((time.perf_counter() - started) / CONNECTIONS * 1e6)
                for _, transport in connections:
                    if not b"".join(transport.written).startswith(b"HTTP/1.1 200 "):
                        raise RuntimeError(f"not scored: {b''.join(transport.written)[:200]!r}")
            print(statistics.median(rounds), flush=True)
        await scorer.stop()

    uvloop.run(serve())


def main() -> None:
    sys.path.insert(0, str(HERE.parent))
    from bench_score_batch import close, lockstep

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", type=Path, help="another checkout of the repository to compare with")
    parser.add_argument("--rounds", type=int, default=30, help="turns of each tree")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker()
        return
    trees = {"this tree": HERE.parent.parent} | ({"other": args.against.resolve()} if args.against else {})
    workers = {
        name: subprocess.Popen(
            [sys.executable, str(HERE), "--worker"],
            cwd=tree,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, tree in trees.items()
    }
    turn = str(CALLS_PER_TURN // CONNECTIONS)
    try:
        times = {name: figures for (name, _), figures in lockstep(workers, args.rounds, [turn]).items()}
    finally:
        close(workers)
    mine = times["this tree"]
    print(f"this tree: {statistics.median(mine):.1f} µs a call (median of {len(mine)} rounds)")
    if args.against:
        other = times["other"]
        ratios = sorted(o / m for o, m in zip(other, mine, strict=True))
        print(
            f"{args.against}: {statistics.median(other):.1f} µs a call; ratio other / this "
            f"{statistics.median(ratios):.3f} ({ratios[0]:.2f}–{ratios[-1]:.2f})"
        )


if __name__ == "__main__":
    main()
