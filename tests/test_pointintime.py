"""Replay's columnar point-in-time engine against the online code, event by event, in process.

The reference walks the same events one at a time through the stream worker's state code
(`Layout.apply_update`) and reads each transaction's vector with the scorer's code
(`VectorBuilder.build`) just before applying it. The engine works on chunks of columns; both
must give the same vectors, whatever the chunk size and wherever releases fall: hot entities
with many events in one chunk, duplicated event ids, labels before their transaction, late
events, missing devices. (`test_replay.py` checks the same engine against the brute-force oracle
and the stream worker's Redis state, through the broker.)
"""

from __future__ import annotations

import random

import numpy as np
import pytest

from stream_ml.events import Label, Transaction
from stream_ml.features import FRAUD_FEATURES, table
from stream_ml.features.definitions import ENTITIES
from stream_ml.features.state import DISTINCT_CAP, EntityState, copy_state, in_window
from stream_ml.features.vector import VectorBuilder
from stream_ml.training.pointintime import PointInTime, _Events, _release_order, _stable_order

T0 = 1_780_000_000_000
LATENESS = FRAUD_FEATURES.allowed_lateness_s * 1000
TAGS = ["transactions:0", "transactions:1", "labels:0"]


def _stream(rng: random.Random, n: int) -> list[tuple[str, Transaction | Label]]:
    """(tag, event) in log order per partition: bursts, gaps of hours, disorder, late events, duplicates."""
    t = T0
    out: list[tuple[str, Transaction | Label]] = []
    txs: list[Transaction] = []
    for i in range(n):
        t += rng.choice(
            [0, 1, 50, 2_000, 40_000, 900_000, 2 * 3_600_000]
        )  # ~3 weeks: inside the label horizon
        ts = t - rng.choice([0, 0, 0, 0, 1_000, 1_200_000, 2 * LATENESS])  # some disorder, some too late
        if txs and rng.random() < 0.3:
            tx = rng.choice(txs)
            event_id = tx.event_id if rng.random() < 0.95 else "unknown"
            arrived = max(
                ts, tx.event_time + rng.choice([-5_000, 0, 10, 600_000])
            )  # a few before the payment
            out.append(("labels:0", Label(event_id, rng.random() < 0.3, arrived, "chargeback")))
            continue
        card = "hot" if rng.random() < 0.3 else f"c{rng.randrange(40)}"  # one card in a third of payments
        event_id = rng.choice(txs).event_id if txs and rng.random() < 0.03 else f"e{i}"  # a producer retry
        tx = Transaction(
            event_id,
            ts,
            card,
            f"m{rng.randrange(6)}",
            round(rng.uniform(0, 800), 2),
            "EUR",
            rng.choice(["FR", "DE", "US", "BR"]),
            rng.choice(["pos", "ecom", "atm", "contactless"]),
            rng.choice([None, None, f"d{rng.randrange(10)}"]),
        )
        txs.append(tx)
        out.append((f"transactions:{rng.randrange(2)}", tx))
    return out


def _reference(stream: list[tuple[str, Transaction | Label]], rows_from: int):
    """The stream's vectors by the online code, one event at a time, in the documented order."""
    builder = VectorBuilder(FRAUD_FEATURES)
    watermark = dict.fromkeys(TAGS, -(1 << 62))
    offsets = dict.fromkeys(TAGS, 0)
    kept = []
    for tag, event in stream:
        t = event.event_time if isinstance(event, Transaction) else event.label_time
        offset = offsets[tag]
        offsets[tag] += 1
        if t < watermark[tag] - LATENESS:
            continue
        watermark[tag] = max(watermark[tag], t)
        kept.append((t, 0 if isinstance(event, Transaction) else 1, tag, offset, event))
    kept.sort(key=lambda e: e[:4])
    states: dict[str, dict[str, EntityState]] = {e: {} for e in builder.layouts}
    index: dict[str, tuple[str | None, ...]] = {}
    ids, vectors, latest = [], [], []
    seen_last: dict[tuple[str, str], int] = {}
    seq = 0
    for t, kind, _tag, _offset, event in kept:
        if kind == 0:
            entity_ids = tuple(getattr(event, f) for f in ENTITIES.values())
            if rows_from <= t:
                snap = {
                    e: copy_state(s[i]) if (i := getattr(event, ENTITIES[e])) in s else None
                    for e, s in states.items()
                }
                ids.append(event.event_id)
                vectors.append(builder.build(snap, event, t))
                latest.append(max(seen_last.get((e, getattr(event, ENTITIES[e])), -1) for e in states))
            index[event.event_id] = entity_ids
            source = "transactions"
        else:
            entity_ids = index.get(event.event_id, (None,) * len(ENTITIES))
            source = "labels"
        for entity, layout in builder.layouts.items():
            entity_id = entity_ids[list(ENTITIES).index(entity)]
            if entity_id is None or source not in layout.fields:
                continue
            state = states[entity].setdefault(entity_id, layout.new())
            values = [getattr(event, f) for f in layout.fields[source]]
            if source == "labels":
                values = [1.0 if v else 0.0 for v in values]
            seq += 1
            layout.apply_update(state, source, [entity_id, kind, "replay", seq, t, *values])
            seen_last[(entity, entity_id)] = t
    return ids, np.array(vectors), np.array(latest), states


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
@pytest.mark.parametrize("small_set", [0, 1 << 30], ids=["sets-searched", "sets-compared"])
def test_the_columnar_engine_gives_the_online_codes_vectors(seed, small_set, monkeypatch):
    monkeypatch.setattr(table, "_SMALL_SET", small_set)  # each way of counting stored values
    rng = random.Random(seed)
    stream = _stream(rng, 1200)
    rows_from = T0 + 3 * 3_600_000  # earlier payments only warm the state up
    want_ids, want, want_latest, want_states = _reference(stream, rows_from)

    pit = PointInTime(FRAUD_FEATURES, TAGS, rows_from=rows_from, chunk_size=rng.choice([1, 3, 40, 5000]))
    offsets = dict.fromkeys(TAGS, 0)
    chunks = []
    for tag, event in stream:
        add = pit.add_transaction if isinstance(event, Transaction) else pit.add_label
        add(event, tag, offsets[tag])  # type: ignore[arg-type]
        offsets[tag] += 1
        if rng.random() < 0.03:
            chunks.append(pit.release())
    chunks.append(pit.release(final=True))

    assert [e for c in chunks for e in c.event_ids] == want_ids
    got = np.concatenate([c.features for c in chunks])
    assert len(want_ids) > 300 and pit.counts.late > 0 and pit.counts.labels_unknown > 0
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.concatenate([c.latest_before for c in chunks]), want_latest)

    end = max(e.event_time if isinstance(e, Transaction) else e.label_time for _, e in stream)
    final = pit.final_states()
    for entity, layout in pit.layouts.items():
        assert set(final[entity]) == set(want_states[entity])
        for entity_id, state in want_states[entity].items():
            for t in (end, end + 3_600_000, end + 8 * 86_400_000):
                assert layout.read(final[entity][entity_id], t) == pytest.approx(
                    layout.read(state, t), rel=1e-9
                )
            # values out of every window at the end are forgotten; the rest as the online state
            for index, seen in enumerate(state.distinct):
                tiles = [tile_ms for _, tile_ms in layout.distinct_reads(index)]
                inside = {v: t for v, t in seen.items() if any(in_window(t, end, tile) for tile in tiles)}
                assert final[entity][entity_id].distinct[index] == inside
            assert final[entity][entity_id].last == state.last


def test_offsets_are_tracked_for_a_backfill():
    pit = PointInTime(FRAUD_FEATURES, TAGS, track_offsets=True, chunk_size=2)
    for offset in range(5):
        tx = Transaction(f"e{offset}", T0 + offset, "c1", "m1", 1.0, "EUR", "FR", "pos", None)
        pit.add_transaction(tx, TAGS[offset % 2], offset)
    pit.add_label(Label("e4", True, T0 + 10, "chargeback"), "labels:0", 7)
    pit.release(final=True)
    states = pit.final_states()
    assert states["card"]["c1"].offsets == {"transactions:0": 4, "transactions:1": 3, "labels:0": 7}
    assert states["merchant"]["m1"].offsets == {"transactions:0": 4, "transactions:1": 3, "labels:0": 7}
    assert "device" in states and not states["device"]


def test_labels_find_their_transactions_after_older_ones_are_forgotten():
    """Past the label horizon a transaction is forgotten, and its row with it once most rows are:
    a label of a kept one still counts for its own card, a label of a forgotten one for none."""
    hour = 3_600_000
    tags = ["transactions:0", "labels:0"]
    pit = PointInTime(FRAUD_FEATURES, tags, label_horizon_ms=2 * hour, chunk_size=500)
    pit.finish_partition("labels:0")  # its labels come at the end: they do not hold the rest back
    offsets = iter(range(10_000))

    def pay(event_id: str, t: int, card: str) -> None:
        tx = Transaction(event_id, t, card, "m1", 1.0, "EUR", "FR", "pos", None)
        pit.add_transaction(tx, "transactions:0", next(offsets))

    for i in range(2_000):
        pay(f"old{i}", T0 + i * 1_000, f"c{i % 50}")
    for j in range(10):
        pay(f"kept{j}", T0 + 2 * hour + j * 1_000, f"k{j}")
    pay("push", T0 + 3 * hour + hour // 2, "c0")  # released up to 2.5 h; labellable from 1.5 h
    pit.release()
    assert pit._tx_rows < 2_000  # the forgotten rows were let go, and the kept ones renumbered
    for offset, event_id in enumerate(["kept3", "old5"]):
        pit.add_label(Label(event_id, True, T0 + 4 * hour, "chargeback"), "labels:0", offset)
    pay("after-k3", T0 + 4 * hour + 1_000, "k3")
    pay("after-c5", T0 + 4 * hour + 2_000, "c5")
    chunk = pit.release(final=True)
    assert pit.counts.labels_unknown == 1
    frauds = chunk.features[:, FRAUD_FEATURES.names.index("card_frauds_30d")]
    assert dict(zip(chunk.event_ids[-2:], frauds[-2:].tolist(), strict=True)) == {
        "after-k3": 1.0,
        "after-c5": 0.0,
    }


def test_distinct_counts_in_small_blocks_of_pairs_give_the_same_vectors(monkeypatch):
    """A hot entity makes many (reader, earlier event) pairs: they are counted a block at a time."""
    rng = random.Random(5)
    stream = _stream(rng, 600)
    want_ids, want, _, _ = _reference(stream, T0)
    monkeypatch.setattr("stream_ml.training.pointintime._MAX_PAIRS", 7)
    pit = PointInTime(FRAUD_FEATURES, TAGS, rows_from=T0, chunk_size=600)
    offsets = dict.fromkeys(TAGS, 0)
    for tag, event in stream:
        add = pit.add_transaction if isinstance(event, Transaction) else pit.add_label
        add(event, tag, offsets[tag])  # type: ignore[arg-type]
        offsets[tag] += 1
    chunk = pit.release(final=True)
    assert chunk.event_ids == want_ids
    np.testing.assert_allclose(chunk.features, want.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_distinct_counts_saturate_at_the_cap_in_every_path():
    """A shop terminal with more cards in a day than a stored set keeps: every path stops at the cap."""
    txs = [
        Transaction(f"e{i}", T0 + i * 30_000, f"c{i}", "m1", 1.0, "EUR", "FR", "pos", "t1")
        for i in range(DISTINCT_CAP + 300)
    ]
    stream: list[tuple[str, Transaction | Label]] = [("transactions:0", tx) for tx in txs]
    _, want, _, states = _reference(stream, T0)
    pit = PointInTime(FRAUD_FEATURES, TAGS, rows_from=T0, chunk_size=500)
    for offset, (tag, tx) in enumerate(stream):
        pit.add_transaction(tx, tag, offset)  # type: ignore[arg-type]
    got = pit.release(final=True).features
    column = FRAUD_FEATURES.names.index("device_cards_24h")
    assert want[-1, column] == DISTINCT_CAP and want[DISTINCT_CAP - 1, column] == DISTINCT_CAP - 1
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-6, atol=1e-6)
    layout = VectorBuilder(FRAUD_FEATURES).layouts["device"]
    stored = layout.decode(layout.encode(states["device"]["t1"]))  # pruned to the newest values
    assert len(stored.distinct[0]) == DISTINCT_CAP
    end = txs[-1].event_time
    assert layout.read(stored, end) == layout.read(states["device"]["t1"], end)


@pytest.mark.parametrize("top", [1, 300, 1 << 16, 1 << 20, 1 << 40])
def test_the_fast_stable_orders_are_numpys_stable_orders(top: int):
    """Rows past 65,535 take a second radix pass; keys past 2**32 numpy's own stable sort."""
    rng = np.random.default_rng(top)
    for n in (0, 1, 7, 5000):
        keys = rng.integers(0, top, n)
        np.testing.assert_array_equal(_stable_order(keys), np.argsort(keys, kind="stable"))
    # events of a few partitions, each read in offset order: released as a lexsort would
    n, tags = 3000, 5
    tag = rng.integers(0, tags, n).astype(np.int32)
    offset = np.zeros(n, dtype=np.int64)
    for code in range(tags):
        mine = tag == code
        offset[mine] = np.cumsum(rng.integers(1, 3, int(mine.sum())))
    t = T0 + rng.integers(0, 50, n)
    kind = rng.integers(0, 2, n).astype(np.int8)
    events = _Events(t, kind, tag, offset, np.empty(n, dtype=object), np.empty((n, 0), dtype=np.int64))
    np.testing.assert_array_equal(_release_order(events, tags), np.lexsort((offset, tag, kind, t)))
