"""The label ⨝ prediction join: its logic on its own, then its state in a real Redis."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import uuid

import msgpack
import pytest
import redis.asyncio as aioredis

from stream_ml.config import Settings
from stream_ml.events import Label
from stream_ml.events.codec import InvalidMessage
from stream_ml.events.prediction import (
    Prediction,
    decode_prediction,
    decode_stored_prediction,
    encode_prediction,
)
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


# -- the stored predictions: decoded without validating them again -------------------------------


def _accepted_forms() -> list[bytes]:
    """Prediction records that decode_prediction accepts, in every form a producer may send."""
    p = Prediction("e1", T0, 0.25, "review", "v1", "shadow", "fs", [1.0, float("nan"), -3.5], T0 + 7)
    base = p.to_dict()
    json_safe = base | {"features": [1, 2.5, 0]}
    return [
        encode_prediction(p),
        encode_prediction(dataclasses.replace(p, degraded=True)),
        msgpack.packb({k: v for k, v in base.items() if k != "degraded"}),  # no degraded, no v
        msgpack.packb(base | {"score": 1, "features": [1, 2, 3], "degraded": 1, "v": 1}),  # ints
        msgpack.packb(base | {"event_time": float(T0), "served_at": float(T0 + 7), "degraded": 0}),
        msgpack.packb(base | {"extra": "rides along", "features": []}),
        json.dumps(json_safe).encode(),
        json.dumps(json_safe | {"score": 0, "event_time": float(T0), "degraded": 1}).encode(),
        b"  " + json.dumps(json_safe).encode(),
    ]


def test_stored_predictions_decode_as_the_validating_decoder_does():
    for raw in _accepted_forms():
        expected, got = decode_prediction(raw), decode_stored_prediction(raw)
        assert repr(got) == repr(expected)  # repr: NaN features compare equal, types show
        assert [type(v) for v in got.to_dict().values()] == [type(v) for v in expected.to_dict().values()]
        assert all(type(x) is float for x in got.features)


def test_stored_predictions_that_do_not_decode_fail_with_the_validators_reason():
    p = Prediction("e1", T0, 0.25, "review", "v1", "shadow", "fs", [1.0], T0 + 7)
    broken = [
        b"",
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({k: v for k, v in p.to_dict().items() if k != "served_at"}),
        msgpack.packb(p.to_dict() | {"features": None}),
        msgpack.packb(p.to_dict() | {"event_time": "soon"}),
        msgpack.packb(p.to_dict() | {"v": 2}),
    ]
    for raw in broken:
        with pytest.raises(InvalidMessage) as expected:
            decode_prediction(raw)
        with pytest.raises(InvalidMessage) as got:
            decode_stored_prediction(raw)
        assert str(got.value) == str(expected.value)
    # What decodes is not checked again: stored predictions were validated when they came in.
    assert decode_stored_prediction(msgpack.packb(p.to_dict() | {"score": 2.0})).score == 2.0


def test_a_json_prediction_joins_as_validated():
    p = Prediction("a", T0 - 5, 0.5, "approve", "v1", "production", "fs", [1.0, 2.0], T0)
    raw = json.dumps(p.to_dict() | {"score": 0.5, "features": [1, 2], "event_time": float(T0 - 5)}).encode()
    logic = JoinLogic(TTL)
    out = logic.step({"a": None}, [(decode_prediction(raw), raw)], [])
    out = logic.step(out.entries, [], [_label("a", T0 + 10)], out.clocks)
    (j,) = out.joined
    assert j.predictions == [p] and type(j.served().event_time) is int


# -- the batch's writes: one command per kind of change, the same state -------------------------


def test_a_batchs_writes_leave_the_state_the_logic_computes(stack: Settings):
    """Every kind of change in one batch (new, updated, joined from either side, deleted, swept):
    Redis holds exactly the entries, and expiry sets, that the logic's steps give."""
    rng = random.Random(5)

    async def state(client: aioredis.Redis, prefix: str) -> tuple[dict, dict]:
        keys = sorted(k.decode() for k in await client.keys(prefix + "e:*"))
        blobs = await client.mget(keys) if keys else []
        entries = {k.rsplit(":", 1)[1]: Entry.decode(b) for k, b in zip(keys, blobs, strict=True)}
        expiries = {
            kind: {
                m.decode(): int(s)
                for m, s in await client.zrange(f"{prefix}exp:{kind}", 0, -1, withscores=True)
            }
            for kind in "plj"
        }
        return entries, {k: v for k, v in expiries.items() if v}

    async def run() -> None:
        client = aioredis.Redis.from_url(redis_url(stack))
        store = JoinStore(client, f"join-{uuid.uuid4().hex[:6]}", TTL)
        prefix = store.prefix(1)
        memory: dict[str, Entry] = {}
        clocks = Clocks()
        try:
            for b in range(6):
                t = T0 + b * TTL // 2  # the clocks pass some entries every other batch
                ids = [f"e{rng.randrange(60)}" for _ in range(40)]
                predictions = [
                    _prediction(i, t + k, rng.choice(["production", "shadow"]))
                    for k, i in enumerate(ids[:25])
                ]
                labels = [_label(i, t + k, rng.random() < 0.3) for k, i in enumerate(ids[15:])]
                batch = PartitionBatch(1, predictions, labels, {"predictions": b, "labels": b})
                result = await store.apply(batch)

                wanted = {i: memory.get(i) for i in {p.event_id for p, _ in predictions} | set(ids[15:])}
                expected = JoinLogic(TTL).step(
                    {i: (Entry.decode(e.encode()) if e else None) for i, e in wanted.items()},
                    predictions,
                    labels,
                    clocks,
                )
                before, clocks = clocks, expected.clocks
                for i, e in expected.entries.items():
                    if e is None:
                        memory.pop(i, None)
                    else:
                        memory[i] = e
                # the sweep: entries the batch did not touch, of the kinds whose bound moved
                for i, e in list(memory.items()):
                    kind = e.kind()
                    if (
                        i not in wanted
                        and e.expires < clocks.bound(kind)
                        and clocks.bound(kind) > before.bound(kind)
                    ):
                        del memory[i]
                        if kind != "j":
                            expected.outcomes["expired_label" if kind == "l" else "expired_prediction"] += 1
                assert +result.outcomes == +expected.outcomes
                assert sum(expected.outcomes[k] for k in ("joined", "expired_prediction")) > 0 or b == 0
                entries, expiries = await state(client, prefix)
                assert entries == memory
                assert expiries == {
                    kind: {i: e.expires for i, e in memory.items() if e.kind() == kind}
                    for kind in "plj"
                    if any(e.kind() == kind for e in memory.values())
                }
                assert await store.offsets(1) == {"predictions": b, "labels": b}
        finally:
            await client.aclose()

    asyncio.run(run())
