"""The prediction log: every served prediction, with the vector it used, onto ``predictions``.

Answers never wait for it: predictions go into a bounded buffer that a background task publishes
every few milliseconds. When the broker is slow or down the buffer fills, and what does not fit
is dropped and counted (``stream_ml_score_predictions_dropped_total``), rather than holding up
scoring or growing without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Protocol

from aiokafka.errors import KafkaError

from stream_ml.events.prediction import Prediction, encode_prediction
from stream_ml.kafka import BatchPublisher, producer
from stream_ml.serving import metrics

log = logging.getLogger(__name__)
FLUSH_EVERY_S = 0.005
RETRY_CONNECT_S = 2.0


class PredictionSink(Protocol):
    """Where the scorer puts each prediction: the log (HTTP), or the stream scorer's batch."""

    def offer(self, prediction: Prediction) -> None: ...

    def start(self) -> None: ...

    async def stop(self) -> None: ...


class PredictionLog:
    def __init__(self, bootstrap: str, topic: str, max_buffer: int = 10_000) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.max_buffer = max_buffer
        self._buffer: deque[Prediction] = deque()
        self._task: asyncio.Task | None = None

    def offer(self, prediction: Prediction) -> None:
        if len(self._buffer) >= self.max_buffer:
            metrics.PREDICTIONS_DROPPED.inc()
            return
        self._buffer.append(prediction)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:  # (re)connect, then publish until the broker fails
            kafka = producer(self.bootstrap, request_timeout_ms=5_000)
            sent = 0
            try:
                await kafka.start()
                out = BatchPublisher(kafka)
                await out.open_topic(self.topic)
                log.info("prediction log: publishing to %s on %s", self.topic, self.bootstrap)
                while True:
                    await asyncio.sleep(FLUSH_EVERY_S)
                    sent = 0
                    while self._buffer:
                        p = self._buffer.popleft()
                        if out.add(self.topic, p.event_id.encode(), encode_prediction(p), p.served_at):
                            await out.send_full()
                        sent += 1
                    if sent:
                        await out.flush()
                        metrics.PREDICTIONS_LOGGED.inc(sent)
            except (KafkaError, OSError, LookupError) as exc:
                metrics.PREDICTIONS_DROPPED.inc(sent)  # taken from the buffer, never acknowledged
                log.warning(
                    "prediction log: %s; retrying in %.0f s (predictions buffer, then drop)",
                    exc,
                    RETRY_CONNECT_S,
                )
            finally:
                with contextlib.suppress(Exception):
                    await kafka.stop()
            await asyncio.sleep(RETRY_CONNECT_S)
