"""The micro-batcher's admission: refuse what queued work makes late, never an idle call."""

from __future__ import annotations

import asyncio
import time

import pytest

from stream_ml.serving import batcher
from stream_ml.serving.batcher import QUEUE_SHARE, MicroBatcher, Overloaded


def _batcher(run_s: float) -> MicroBatcher[int, int]:
    async def run(items: list[int]) -> list[int]:
        await asyncio.sleep(run_s)
        return [i * 2 for i in items]

    return MicroBatcher(run, max_batch=4)


def _started_at_50_ms_a_batch(run_s: float) -> MicroBatcher[int, int]:
    """A started batcher whose cost model predicts 50 ms for a batch of 4, whatever it runs in."""
    b = _batcher(run_s)
    b.start()
    for _ in range(50):
        b.cost.observe(4, 0.05)
    return b


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
        b = _started_at_50_ms_a_batch(0.05)
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


def test_a_call_gets_in_while_its_predicted_wait_is_within_its_share_of_its_time_left() -> None:
    # The rest of a call's time is for what the queue cannot see (the socket, the answer's write).
    async def scenario() -> None:
        b = _started_at_50_ms_a_batch(0.05)
        try:
            running = [asyncio.ensure_future(b.submit(i, time.monotonic() + 10)) for i in range(4)]
            await asyncio.sleep(0.01)  # one batch runs, nothing queued
            wait = b.expected_wait_s()
            assert wait > 0.05
            b.admit(time.monotonic() + wait / QUEUE_SHARE + 0.01)
            with pytest.raises(Overloaded):
                b.admit(time.monotonic() + wait / QUEUE_SHARE - 0.01)
            await asyncio.gather(*running)
        finally:
            await b.stop()

    asyncio.run(scenario())


def test_the_items_of_one_call_are_admitted_together() -> None:
    async def scenario() -> None:
        b = _started_at_50_ms_a_batch(0.001)  # 12 items queue 150 ms
        try:
            until = time.monotonic() + 0.2
            b.admit(until, 12)  # idle: the whole call is tried
            answers = await asyncio.gather(*(b.submit(i, until, admitted=True) for i in range(12)))
            assert answers == [i * 2 for i in range(12)]
            # one by one, the call's last items would be refused for the queue its first ones made
            until = time.monotonic() + 0.2
            alone = await asyncio.gather(*(b.submit(i, until) for i in range(12)), return_exceptions=True)
            assert any(isinstance(a, Overloaded) for a in alone)
        finally:
            await b.stop()

    asyncio.run(scenario())


def test_cost_model_prediction_is_the_fit_of_the_current_timings():
    """predict() reuses its fit until a timing or a prior changes it: the figures of a fresh fit."""
    from stream_ml.serving.batcher import CostModel

    def fresh(model: CostModel, n: int) -> float:
        w, sn, snn, sy, sny = (a + b for a, b in zip(model._sums, model._prior, strict=True))
        den = w * snn - sn * sn
        a = max((w * sny - sn * sy) / den, 0.0) if den > 1e-12 else 0.0
        return a * n + max((sy - a * sn) / w, 0.0)

    model = CostModel()
    for step, (n, seconds) in enumerate([(1, 0.003), (8, 0.004), (8, 0.005), (64, 0.02), (3, 0.001)]):
        model.observe(n, seconds)
        assert [model.predict(k) for k in (1, 7, 64)] == [fresh(model, k) for k in (1, 7, 64)]
        if step == 2:
            model.prior(0.0005, 0.004)
            assert model.predict(5) == fresh(model, 5)


def test_a_lagging_event_loop_refuses_calls_while_busy_and_forgets_the_lag() -> None:
    """Calls waiting unread in sockets are invisible to the queue: the loop's lag stands for them."""

    async def scenario() -> None:
        b = _batcher(0.2)
        b.start()
        try:
            running = asyncio.ensure_future(b.submit(1, time.monotonic() + 10))
            await asyncio.sleep(0.02)  # a batch runs: the batcher is busy, its queue empty
            b.admit(time.monotonic() + 0.05)  # no lag yet: admitted
            loop = asyncio.get_running_loop()
            loop.call_soon(time.sleep, 0.03)  # one long step: not a backlog
            await asyncio.sleep(0.01)
            b.admit(time.monotonic() + 0.05)
            for _ in range(4):  # the loop late again and again, as under a backlog of calls
                loop.call_soon(time.sleep, 0.02)
                await asyncio.sleep(0.001)
            assert b.lag.lag_s >= 0.015
            with pytest.raises(Overloaded):
                b.admit(time.monotonic() + 0.05)
            b.admit(time.monotonic() + 1.0)  # a call with time to spare still gets in
            await asyncio.sleep(0.05)  # no stall since: the lag is forgotten
            assert b.lag.lag_s < 0.005
            b.admit(time.monotonic() + 0.05)
            assert await running == 2
        finally:
            await b.stop()

    asyncio.run(scenario())


def test_calls_a_turn_of_the_loop_away_when_a_batch_ends_join_the_next_one(monkeypatch) -> None:
    # The loop of a loaded test machine may lag, which rightly skips the turns: not under test here.
    monkeypatch.setattr(batcher, "TURNS_UNTIL_LAG_S", 1.0)

    async def scenario() -> list[int]:
        sizes: list[int] = []
        later: list[asyncio.Future] = []

        async def run(items: list[int]) -> list[int]:
            sizes.append(len(items))
            if len(sizes) == 1:
                await asyncio.sleep(0.02)  # a call queues meanwhile
                # two more are read as the batch ends: their submissions run at the loop's next turn
                later.extend(asyncio.ensure_future(b.submit(i, time.monotonic() + 10)) for i in (2, 3))
            return items

        b: MicroBatcher[int, int] = MicroBatcher(run, max_batch=8)
        b.start()
        try:
            first = asyncio.ensure_future(b.submit(0, time.monotonic() + 10))
            await asyncio.sleep(0.01)
            queued = asyncio.ensure_future(b.submit(1, time.monotonic() + 10))
            assert await asyncio.gather(first, queued) == [0, 1]
            assert await asyncio.gather(*later) == [2, 3]
            return sizes
        finally:
            await b.stop()

    assert asyncio.run(scenario()) == [1, 3]  # without the turns: [1, 1, 2]
