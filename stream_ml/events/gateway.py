"""A payment gateway: each payment is scored over HTTP, then published; labels follow when due.

The order is the production one: the gateway asks the scorer before it lets a payment through,
and the payment reaches the log afterwards, so the features a payment is scored with never
include itself. A payment whose call fails (timeout, 5xx) is still published: it happened, the
gateway only decided without a score.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from stream_ml.config import Settings
from stream_ml.events.label import Label, encode_label
from stream_ml.events.metrics import PRODUCED, SCORED_BY_GATEWAY
from stream_ml.events.publish import Schedule
from stream_ml.events.transaction import Transaction, encode_transaction
from stream_ml.kafka import BatchPublisher, producer

_SEND_EVERY_S = 0.05  # publish what the calls have let through at least this often
_PACE_EVERY = 16
# Calls kept for latency percentiles: a day of `produce --score-url` must not keep every call.
KEPT_CALLS = 1_000_000


@dataclass(slots=True)
class Call:
    """One /score call: when it was made (s since the gateway started), how it went."""

    at_s: float  # when the answer came, on the gateway's clock
    latency_ms: float
    status: int  # HTTP status; 0 when no answer came (connection error, client timeout)
    model_version: str | None


@dataclass(slots=True)
class Traffic:
    """What the gateway did so far; read by the status line while it runs."""

    calls: deque[Call] = field(default_factory=lambda: deque(maxlen=KEPT_CALLS))  # the latest ones
    payments: int = 0
    labels: int = 0
    frauds: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    last_version: str | None = None
    first_answer: dict[str, float] = field(default_factory=dict)  # model version -> its first answer's at_s
    errors: Counter[int] = field(default_factory=Counter)

    def latencies_ms(self, since_s: float = 0.0) -> np.ndarray:
        return np.array([c.latency_ms for c in self.calls if c.at_s >= since_s and c.status == 200])

    def describe(self) -> str:
        lat = self.latencies_ms()
        scored = sum(self.versions.values())
        if not scored:
            return f"no payment was scored: {dict(self.errors)} (HTTP status: count; 0: no answer)"
        failed = sum(self.errors.values())
        return (
            f"scored {scored:,}: p50 {np.percentile(lat, 50):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms"
            + (
                f"; {failed:,} calls failed {dict(self.errors)} (HTTP status: count; 0: no answer)"
                if failed
                else ""
            )
        )

    def errors_between(self, start_s: float, end_s: float) -> int:
        return sum(1 for c in self.calls if start_s <= c.at_s < end_s and c.status != 200)


class Gateway:
    """Scores payments on ``score_url`` with ``api_key`` and publishes them to Kafka.

    Calls run concurrently (at most ``concurrency`` in flight), each bounded by ``timeout_s``.
    """

    def __init__(
        self,
        settings: Settings,
        bootstrap: str,
        score_url: str,
        api_key: str,
        *,
        concurrency: int = 64,
        timeout_s: float = 2.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.settings = settings
        self.bootstrap = bootstrap
        self.score_url = score_url
        self.api_key = api_key
        self.traffic = Traffic()
        self._slots = asyncio.Semaphore(concurrency)
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        started = time.monotonic()
        self.clock = clock or (lambda: time.monotonic() - started)  # a call's `at_s`

    async def run(self, items: Iterable[Transaction | Label], schedule: Schedule | None) -> None:
        """Send ``items`` in order, each when ``schedule`` says (all at once without one)."""
        kafka = producer(self.bootstrap)
        await kafka.start()
        out = BatchPublisher(kafka)
        tx_topic, label_topic = self.settings.topic_transactions, self.settings.topic_labels
        await out.open_topic(tx_topic)
        await out.open_topic(label_topic)
        pending: set[asyncio.Task[None]] = set()
        stop_sending = asyncio.Event()
        sender = asyncio.create_task(self._send_loop(out, stop_sending))
        try:
            async with aiohttp.ClientSession(
                headers={"X-API-Key": self.api_key, "Content-Type": "application/json"},
                timeout=self._timeout,
            ) as session:
                for i, item in enumerate(items):
                    if type(item) is Transaction:
                        t = item.event_time
                        await self._slots.acquire()
                        task = asyncio.create_task(self._pay(session, out, item))
                        pending.add(task)
                        task.add_done_callback(pending.discard)
                    else:
                        t = item.label_time
                        out.add(label_topic, item.event_id.encode(), encode_label(item), t)
                        PRODUCED.labels(label_topic).inc()
                        self.traffic.labels += 1
                        self.traffic.frauds += item.is_fraud
                    if schedule is not None and i % _PACE_EVERY == 0:
                        wait = schedule(i, t) - time.monotonic()
                        if wait > 0:
                            await asyncio.sleep(wait)
                if pending:
                    await asyncio.wait(pending)
        finally:
            stop_sending.set()
            await sender
            await out.flush()
            await kafka.stop()

    async def _pay(self, session: aiohttp.ClientSession, out: BatchPublisher, tx: Transaction) -> None:
        try:
            started = time.monotonic()
            status, version = 0, None
            try:
                async with session.post(self.score_url, data=json.dumps(tx.to_dict())) as response:
                    status = response.status
                    if status == 200:
                        version = (await response.json())["model_version"]
                    else:
                        await response.read()
            except (TimeoutError, aiohttp.ClientError):
                status = 0
            latency_ms = (time.monotonic() - started) * 1000.0
            traffic = self.traffic
            call = Call(self.clock(), latency_ms, status, version)
            traffic.calls.append(call)
            if version is not None:
                traffic.first_answer.setdefault(version, call.at_s)
                traffic.versions[version] += 1
                traffic.last_version = version
            else:
                traffic.errors[status] += 1
            SCORED_BY_GATEWAY.labels(str(status)).inc()
            out.add(
                self.settings.topic_transactions, tx.card_id.encode(), encode_transaction(tx), tx.event_time
            )
            PRODUCED.labels(self.settings.topic_transactions).inc()
            traffic.payments += 1
        finally:
            self._slots.release()

    async def _send_loop(self, out: BatchPublisher, stop: asyncio.Event) -> None:
        # The only task that awaits the publisher; the calls only append (add() never awaits).
        while not stop.is_set():
            await out.send_open()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), _SEND_EVERY_S)
