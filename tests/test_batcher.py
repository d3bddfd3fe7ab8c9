"""The micro-batcher's admission: refuse what queued work makes late, never an idle call."""

from __future__ import annotations

import asyncio
import time

import pytest

from stream_ml.serving.batcher import MicroBatcher, Overloaded


def _batcher(run_s: float) -> MicroBatcher[int, int]:
    async def run(items: list[int]) -> list[int]:
        await asyncio.sleep(run_s)
        return [i * 2 for i in items]

    return MicroBatcher(run, max_batch=4)


def test_an_idle_scorer_tries_a_call_even_after_a_slow_spell() -> None:
    async def scenario() -> int:
        b = _batcher(0.001)
        b.start()
        for _ in range(200):  # a spell of 1 s batches: every prediction is now far past 50 ms
            b.cost.observe(1, 1.0)
        assert b.cost.predict(1) > 0.5
        try:
            return await b.submit(21, time.monotonic() + 0.05)
        finally:
            await b.stop()

    assert asyncio.run(scenario()) == 42


def test_the_cost_model_forgets_a_slow_spell_once_calls_run_fast_again() -> None:
    async def scenario() -> float:
        b = _batcher(0.001)
        b.start()
        for _ in range(200):
            b.cost.observe(1, 1.0)
        for i in range(400):
            await b.submit(i, time.monotonic() + 0.05)
        await b.stop()
        return b.cost.predict(1)

    assert asyncio.run(scenario()) < 0.05


def test_a_call_that_queued_work_would_make_late_is_refused_at_once() -> None:
    async def scenario() -> None:
        b = _batcher(0.05)
        b.start()
        for _ in range(50):
            b.cost.observe(4, 0.05)
        try:
            queued = [asyncio.ensure_future(b.submit(i, time.monotonic() + 10)) for i in range(12)]
            await asyncio.sleep(0.01)  # the first batch runs, the rest queue
            with pytest.raises(Overloaded) as refused:
                await b.submit(99, time.monotonic() + 0.06)
            assert refused.value.retry_after_s > 0.06
            assert await asyncio.gather(*queued) == [i * 2 for i in range(12)]
        finally:
            await b.stop()

    asyncio.run(scenario())
