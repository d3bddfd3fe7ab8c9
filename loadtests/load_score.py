"""Open-loop load on the scorer: Poisson arrivals at fixed rates, latency from the scheduled time.

    python loadtests/load_score.py [--rates 1000,2000,4000] [--seconds 10]

Starts its own embedded stack and a scorer process (`stream-ml serve`), fills the store with the
features of a synthetic stream, then for each rate sends POST /score calls at Poisson arrival
times over keep-alive connections. A call's latency runs from the moment it was *scheduled*, so a
stalled server shows up in the figures instead of slowing the generator (no coordinated
omission). Each rate is also run against GET /healthz, the server's no-op ceiling in the same run:
the generator shares this machine's cores, so compare the two columns, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import uvloop

from stream_ml.config import ENV_PREFIX, Settings
from stream_ml.events.sources.synthetic import SyntheticConfig, SyntheticStream
from stream_ml.events.transaction import Transaction
from stream_ml.stack import local, redis_url
from stream_ml.stack.processes import free_port

REPO = Path(__file__).resolve().parent.parent
KEY = "load-test-key"


class Connections:
    """Keep-alive HTTP/1.1 connections; one call in flight on each."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def call(self, request: bytes) -> int:
        conn = self.idle.pop() if self.idle else await asyncio.open_connection("127.0.0.1", self.port)
        reader, writer = conn
        writer.write(request)
        status_line = await reader.readline()
        if not status_line:  # the server closed an idle keep-alive connection: a new one
            writer.close()
            reader, writer = conn = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(request)
            status_line = await reader.readline()
        length = 0
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        await reader.readexactly(length)
        self.idle.append(conn)
        return int(status_line.split()[1])


def _request(method: str, path: str, body: bytes = b"") -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: scorer\r\nX-API-Key: {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def run_rate(port: int, rate: float, seconds: float, requests: list[bytes]) -> tuple[list[float], int]:
    conns = Connections(port)
    latencies: list[float] = []
    errors = 0
    rng = random.Random(1)
    tasks = []

    async def one(scheduled: float, request: bytes) -> None:
        nonlocal errors
        try:
            status = await conns.call(request)
        except OSError:
            status = 0
        if status != 200:
            errors += 1
        latencies.append(time.perf_counter() - scheduled)

    start = time.perf_counter() + 0.2
    t = start
    for request in itertools.cycle(requests):
        t += rng.expovariate(rate)
        if t - start > seconds:
            break
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(t, request)))
    await asyncio.gather(*tasks)
    return latencies, errors


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * q), len(ordered) - 1)] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="1000,2000,4000", help="calls per second, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each rate's run")
    args = parser.parse_args()

    settings = replace(
        Settings.from_env({}),
        state_dir=Path(tempfile.mkdtemp(prefix="stream-ml-load-")),
        kafka_port=free_port(),
        redis_port=free_port(),
    )
    local.up(settings)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env |= {"STREAM_ML_STATE_DIR": str(settings.state_dir), "STREAM_ML_API_KEYS": KEY}
    server = subprocess.Popen(
        [sys.executable, "-m", "stream_ml", "serve", "--port", str(port), "--rate-limit", "1000000"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _fill_store(settings)
        txs = [
            t
            for t in itertools.islice(
                SyntheticStream(SyntheticConfig(seed=3, start_ms=int(time.time() * 1000), rate=1000.0)), 5000
            )
            if isinstance(t, Transaction)
        ]
        score = [_request("POST", "/score", json.dumps(t.to_dict()).encode()) for t in txs]
        noop = [_request("GET", "/healthz")]
        _wait_ready(port)
        print("| rate (calls/s) | /score p50 | /score p99 | errors | no-op p50 | no-op p99 |")
        print("|---|---|---|---|---|---|")
        for rate in (float(r) for r in args.rates.split(",")):
            lat, err = uvloop.run(run_rate(port, rate, args.seconds, score))
            base, _ = uvloop.run(run_rate(port, rate, args.seconds, noop))
            print(
                f"| {rate:,.0f} | {_pct(lat, 0.5):.1f} ms | {_pct(lat, 0.99):.1f} ms | {err} | "
                f"{_pct(base, 0.5):.1f} ms | {_pct(base, 0.99):.1f} ms |",
                flush=True,
            )
    finally:
        server.terminate()
        server.wait(10)
        local.down(settings)


def _fill_store(settings: Settings) -> None:
    """The cards' and merchants' history, as the feature worker would have written it."""
    import redis.asyncio as aioredis

    from stream_ml.features import feature_set
    from stream_ml.features.definitions import ENTITIES
    from stream_ml.features.state import layouts
    from stream_ml.features.store import FeatureStore

    fs = feature_set(settings.feature_set)
    lays = layouts(fs)
    states: dict[str, dict] = {e: {} for e in lays}
    start = int(time.time() * 1000) - 3_600_000
    stream = SyntheticStream(SyntheticConfig(seed=3, start_ms=start, rate=50.0))
    for offset, tx in enumerate(t for t in itertools.islice(stream, 100_000) if isinstance(t, Transaction)):
        for entity, layout in lays.items():
            entity_id = getattr(tx, ENTITIES[entity])
            if entity_id is None or "transactions" not in layout.fields:
                continue
            state = states[entity].setdefault(entity_id, layout.new())
            layout.apply(
                state,
                "transactions",
                tx.event_time,
                tuple(getattr(tx, f) for f in layout.fields["transactions"]),
                "transactions:0",
                offset,
            )

    async def write() -> None:
        client = aioredis.Redis.from_url(redis_url(settings))
        store = FeatureStore(client, fs)
        await store.write(store.prepare(states))
        await client.aclose()

    asyncio.run(write())


def _wait_ready(port: int) -> None:
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the scorer did not become ready")


if __name__ == "__main__":
    main()
