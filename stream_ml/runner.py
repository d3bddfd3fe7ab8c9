"""Running a stream worker from the command line: its metrics endpoint, signals, a progress line.

Every `stream-ml worker <topology>` runs the same way: Prometheus metrics on a port of its own, a
clean stop on SIGINT or SIGTERM (the batch in hand is finished and committed), a progress line
every few seconds, and a Redis failure turned into one line that says how to resume.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from typing import Protocol

import redis
import uvloop

log = logging.getLogger("stream_ml.worker")


class Worker(Protocol):
    processed: int  # records handled so far

    async def run(self, stop: asyncio.Event | None = None) -> None: ...


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def serve_metrics(port: int) -> None:
    """Prometheus /metrics on ``port`` (0: none). A taken port costs the metrics, not the worker."""
    if not port:
        return
    from prometheus_client import start_http_server

    try:
        start_http_server(port)
        log.info("metrics on :%d/metrics", port)
    except OSError as exc:  # a second worker on this machine: run on, without metrics
        log.warning("no metrics: port %d: %s (give each worker its own --metrics-port)", port, exc)


def run_worker(worker: Worker, progress: Callable[[], str] | None = None, every_s: float = 10.0) -> int:
    """Run ``worker`` until SIGINT or SIGTERM; log records/s (and ``progress()``) every ``every_s``."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reporter = asyncio.ensure_future(_report(worker, stop, progress, every_s))
        try:
            await worker.run(stop)
        finally:
            reporter.cancel()
        log.info("stopped after %s records", f"{worker.processed:,}")

    try:
        uvloop.run(main())
    except redis.exceptions.RedisError as exc:  # mid-run: one line that says what broke
        raise ConnectionError(
            f"Redis failed: {exc}; the worker resumes from its last commit when restarted"
        ) from None
    return 0


async def _report(
    worker: Worker, stop: asyncio.Event, progress: Callable[[], str] | None, every_s: float
) -> None:
    last, then = 0, time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(every_s)
        done, now = worker.processed, time.monotonic()
        extra = f"; {progress()}" if progress is not None else ""
        log.info("%s records (%s/s)%s", f"{done:,}", f"{(done - last) / (now - then):,.0f}", extra)
        last, then = done, now
