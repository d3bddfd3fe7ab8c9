"""The label ⨝ prediction join: its logic on its own, then its state in a real Redis."""

from __future__ import annotations

import asyncio
import random
import uuid

import redis.asyncio as aioredis

from stream_ml.config import Settings
from stream_ml.events import Label
from stream_ml.events.prediction import Prediction, encode_prediction
from stream_ml.feedback.join import Clocks, Entry, JoinLogic, JoinStore, PartitionBatch
from stream_ml.stack import redis_url

T0 = 1_781_000_000_000
TTL = 60_000


def _prediction(event_id: str, t: int, variant: str = "production", score: float = 0.1) -> tuple:
    p = Prediction(event_id, t - 5, score, "approve", "v1", variant, "fs", [1.0, float("nan")], t)
    return p, encode_prediction(p)


def _label(event_id: str, t: int, is_fraud: bool = False) -> Label:
    return Label(event_id, is_fraud, t, "chargeback")


def _run(logic: JoinLogic, batches: list[tuple[list, list]]) -> tuple[list, dict]:
    """Feed batches through the logic with an in-memory store; the joins and the outcome counts."""
    store: dict = {}
    joined, outcomes, clocks = [], {}, Clocks()
    for predictions, labels in batches:
        ids = {p.event_id for p, _ in predictions} | {lb.event_id for lb in labels}
        result = logic.step({i: store.get(i) for i in ids}, predictions, labels, clocks)
        clocks = result.clocks
        for event_id, entry in result.entries.items():
            if entry is None:
                store.pop(event_id, None)
            else:
                store[event_id] = entry
        for event_id, entry in list(store.items()):  # the sweep JoinStore does in Redis
            if entry.expires < clocks.bound(entry.kind()) and event_id not in ids:
                kind = entry.kind()
                if kind in "lp":
                    key = "expired_label" if kind == "l" else "expired_prediction"
                    outcomes[key] = outcomes.get(key, 0) + 1
                del store[event_id]
        joined += result.joined
        for k, v in result.outcomes.items():
            outcomes[k] = outcomes.get(k, 0) + v
    return joined, outcomes


def test_a_label_joins_its_prediction_whichever_comes_first():
    logic = JoinLogic(TTL)
    joined, outcomes = _run(
        logic,
        [
            ([_prediction("a", T0)], [_label("b", T0 + 10, True)]),  # a: prediction first; b: label first
            ([_prediction("b", T0 + 20)], [_label("a", T0 + 30, True)]),
        ],
    )
    assert sorted(j.event_id for j in joined) == ["a", "b"]
    assert all(j.label.is_fraud and j.served().features[0] == 1.0 for j in joined)
    assert outcomes == {"prediction_waiting": 1, "label_waiting": 1, "joined": 2}


def test_every_variant_served_is_joined_production_first():
    logic = JoinLogic(TTL)
    joined, outcomes = _run(
        logic,
        [
            ([_prediction("a", T0, "shadow", 0.7), _prediction("a", T0 + 1, "production", 0.2)], []),
            ([_prediction("a", T0 + 2, "production", 0.9)], [_label("a", T0 + 100)]),  # a duplicate
            ([_prediction("a", T0 + 200, "challenger")], []),  # after the join: late
        ],
    )
    (j,) = joined
    assert [p.variant for p in j.predictions] == ["production", "shadow"]
    assert j.served().score == 0.2  # the first production prediction, not the duplicate
    assert outcomes["duplicate_prediction"] == 1 and outcomes["late_prediction"] == 1


def test_duplicate_labels_count_once():
    logic = JoinLogic(TTL)
    joined, outcomes = _run(
        logic,
        [
            ([], [_label("a", T0), _label("a", T0 + 1)]),  # both before the prediction
            ([_prediction("a", T0 + 2)], [_label("a", T0 + 3)]),  # and one after the join
        ],
    )
    assert len(joined) == 1
    assert outcomes["duplicate_label"] == 2


def test_a_label_past_the_ttl_does_not_join_and_is_counted():
    logic = JoinLogic(TTL)
    joined, outcomes = _run(
        logic,
        [
            ([_prediction("a", T0), _prediction("b", T0)], []),
            ([], [_label("a", T0 + TTL + 1)]),  # a's prediction expired before its label came
            ([], [_label("zz", T0 + 3 * TTL)]),  # the labels' clock passes b: unlabelled; zz waits
            ([], [_label("late", T0 + 5 * TTL)]),  # the predictions' clock has not moved: all wait
            ([_prediction("other", T0 + 6 * TTL)], []),  # now it has: a's label and zz expire unmatched
        ],
    )
    assert joined == []
    assert outcomes["expired_prediction"] == 2
    assert outcomes["expired_label"] == 2  # not late's: it expires at the clock, not before


def test_batching_does_not_change_the_joins():
    rng = random.Random(3)
    records, expected = [], set()
    for i in range(300):
        t = T0 + i * 1000
        records.append(("p", _prediction(f"e{i}", t)))
        if rng.random() < 0.9:  # most get a label, some before their prediction, some past the TTL
            delay = rng.choice([-500, 2_000, 30_000, TTL + 5_000])
            records.append(("l", _label(f"e{i}", t + delay, rng.random() < 0.1)))
            if delay < TTL:
                expected.add(f"e{i}")
    records.sort(key=lambda r: r[1][0].served_at if r[0] == "p" else r[1].label_time)

    def batched(size: int) -> list:
        out = []
        for i in range(0, len(records), size):
            chunk = records[i : i + size]
            out.append(([r for k, r in chunk if k == "p"], [r for k, r in chunk if k == "l"]))
        return out

    one_by_one, counts_1 = _run(JoinLogic(TTL), batched(1))
    big, counts_big = _run(JoinLogic(TTL), batched(97))
    assert sorted(j.event_id for j in one_by_one) == sorted(j.event_id for j in big)
    # Which side waited depends on the order within a batch; every final outcome does not.
    waiting = {"prediction_waiting", "label_waiting"}
    assert {k: v for k, v in counts_1.items() if k not in waiting} == {
        k: v for k, v in counts_big.items() if k not in waiting
    }
    assert {j.event_id for j in big} == expected


def test_join_state_in_redis_survives_a_new_store_and_stores_offsets(stack: Settings):
    async def run() -> None:
        client = aioredis.Redis.from_url(redis_url(stack))
        group = f"join-{uuid.uuid4().hex[:6]}"
        try:
            first = JoinStore(client, group, TTL)
            assert await first.offsets(2) == {}
            batch = PartitionBatch(2, [_prediction("a", T0), _prediction("b", T0)], [_label("c", T0 + 1)])
            batch.next_offsets = {"predictions": 2, "labels": 1}
            result = await first.apply(batch)
            assert result.joined == [] and (await first.pending(2)) == {"p": 2, "l": 1}

            second = JoinStore(client, group, TTL)  # a restarted worker
            assert await second.offsets(2) == {"predictions": 2, "labels": 1}
            batch = PartitionBatch(2, [_prediction("c", T0 + 2)], [_label("a", T0 + 3, True)])
            batch.next_offsets = {"predictions": 3, "labels": 2}
            result = await second.apply(batch)
            assert sorted(j.event_id for j in result.joined) == ["a", "c"]
            assert (await second.pending(2)) == {"p": 1, "j": 2}

            # Both clocks pass: b swept, counted as unlabelled; the tombstones go too.
            batch = PartitionBatch(2, [_prediction("y", T0 + 2 * TTL)], [_label("x", T0 + 2 * TTL)])
            batch.next_offsets = {"predictions": 4, "labels": 3}
            result = await second.apply(batch)
            assert result.outcomes["expired_prediction"] == 1
            assert (await second.pending(2)) == {"l": 1, "p": 1}
            assert await second.offsets(2) == {"predictions": 4, "labels": 3}
            keys = await client.keys(f"sm:fb:{{{group}:2}}:e:*")
            assert sorted(k.decode().rsplit(":", 1)[1] for k in keys) == ["x", "y"]
        finally:
            await client.aclose()

    asyncio.run(run())


def test_entry_encoding_round_trips():
    _, raw = _prediction("a", T0)
    entry = Entry(T0 + TTL, {"production": raw}, None, False)
    assert Entry.decode(entry.encode()) == entry
