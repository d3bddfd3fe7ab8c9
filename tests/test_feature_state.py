"""Window state against the brute-force oracle, in process (no broker): tiles, decay, late events."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from feature_oracle import Oracle

from stream_ml.events import Label, Transaction
from stream_ml.features import FRAUD_FEATURES
from stream_ml.features.definitions import Feature, FeatureSet, RequestFeature
from stream_ml.features.state import DISTINCT_CAP, StoredValues, WritableValues, layouts
from stream_ml.features.vector import VectorBuilder

T0 = 1_780_000_000_000
DAY = 86_400_000


def _random_stream(rng: random.Random, n: int) -> list[Transaction]:
    """Mostly in order, some out of order within the lateness, a few far too late."""
    t = T0
    out = []
    for i in range(n):
        t += int(rng.expovariate(1 / 40_000))  # ~40 s apart: minutes to days of history
        ts = t
        r = rng.random()
        if r < 0.08:
            ts = t - rng.randrange(1, 3_000_000)  # out of order, within the hour of lateness
        elif r < 0.10:
            ts = t - rng.randrange(4_000_000, 90_000_000)  # later than the allowed lateness
        out.append(
            Transaction(
                f"e{i}",
                ts,
                f"c{rng.randrange(25)}",
                f"m{rng.randrange(8)}",
                round(rng.uniform(1, 500), 2),
                "EUR",
                rng.choice(["FR", "DE", "ES"]),
                rng.choice(["pos", "ecom"]),
                rng.choice([None, f"d{rng.randrange(30)}"]),
            )
        )
    return out


# The default set reads one maximum; this one adds minima and maxima of other series (windows
# long enough to hold events at the read times, which follow the last label by up to 31 days).
WITH_EXTREMES = dataclasses.replace(
    FRAUD_FEATURES,
    name="extremes",
    features=(
        *FRAUD_FEATURES.features,
        Feature("card_amount_min_7d", "card", "min", 7 * 86400, "amount"),
        Feature("card_amount_min_30d", "card", "min", 30 * 86400, "amount"),
        Feature("merchant_amount_max_30d", "merchant", "max", 30 * 86400, "amount"),
        Feature("merchant_amount_min_7d", "merchant", "min", 7 * 86400, "amount"),
    ),
)


@pytest.mark.parametrize(("seed", "fs"), [(1, FRAUD_FEATURES), (2, FRAUD_FEATURES), (3, WITH_EXTREMES)])
def test_every_feature_matches_the_oracle_at_random_times(seed, fs):
    rng = random.Random(seed)
    L = layouts(fs)
    oracle = Oracle(fs)
    states: dict[tuple[str, str], object] = {}
    stream = _random_stream(rng, 2500)
    labels = []
    for offset, tx in enumerate(stream):
        if not oracle.transaction(tx, partition=0):
            continue
        for entity, layout in L.items():
            entity_id = {"card": tx.card_id, "merchant": tx.merchant_id, "device": tx.device_id}[entity]
            if entity_id is None or "transactions" not in layout.fields:
                continue
            state = states.setdefault((entity, entity_id), layout.new())
            values = tuple(getattr(tx, f) for f in layout.fields["transactions"])
            assert layout.apply(state, "transactions", tx.event_time, values, "t0", offset)
            assert not layout.apply(state, "transactions", tx.event_time, values, "t0", offset)  # idempotent
        if rng.random() < 0.3:
            labels.append(
                (Label(tx.event_id, rng.random() < 0.2, tx.event_time + rng.randrange(DAY), "x"), tx)
            )
        if offset % 500 == 0:  # the stored form round-trips mid-stream
            for key, state in states.items():
                states[key] = L[key[0]].decode(L[key[0]].encode(state), writable=True)
    # Before the labels (up to a day later), reads just after the last payment: the short windows
    # still hold events (after the labels they are all empty at the read times below).
    last = max(tx.event_time for tx in stream)
    in_windows = 0
    for (entity, entity_id), state in states.items():
        layout = L[entity]
        for t in (last, last + 1, last + 300_000, last + 1_800_000):
            for f, value in zip(layout.features, layout.read(state, t), strict=True):
                expected = oracle.value(f, entity_id, t)
                assert value == pytest.approx(expected, rel=1e-9, abs=1e-9), (f.name, entity_id, t - last)
                in_windows += f.window_s <= 3600 and expected != f.default
    assert in_windows > 50
    labels.sort(key=lambda lt: lt[0].label_time)
    for offset, (label, tx) in enumerate(labels):
        if not oracle.label(label, tx, partition=0):
            continue
        for entity, layout in L.items():
            entity_id = {"card": tx.card_id, "merchant": tx.merchant_id, "device": tx.device_id}[entity]
            if entity_id is None or "labels" not in layout.fields:
                continue
            state = states.setdefault((entity, entity_id), layout.new())
            layout.apply(state, "labels", label.label_time, (1.0 if label.is_fraud else 0.0,), "l0", offset)
    assert oracle.dropped, "the stream must contain events later than the lateness"

    end = max(max(tx.event_time for tx in stream), max(lb.label_time for lb, _ in labels))
    times = [end, end + 1, end + 600_000, end + 2 * 3_600_000, end + DAY, end + 8 * DAY, end + 31 * DAY]
    times += [end + rng.randrange(31 * DAY) for _ in range(5)]
    checked = 0
    for (entity, entity_id), state in states.items():
        layout = L[entity]
        for t in times:
            got = layout.read(state, t)
            for f, value in zip(layout.features, got, strict=True):
                assert value == pytest.approx(oracle.value(f, entity_id, t), rel=1e-9, abs=1e-9), (
                    f.name,
                    entity_id,
                    t - end,
                )
                checked += 1
    assert checked > 5000
    # The batch read (what the scorer uses) is the same computation: one row per entity.
    for entity, layout in L.items():
        keys = [k for k in states if k[0] == entity]
        for t in times[:4]:
            batch = layout.read_many([states[k] for k in keys] + [None], [t] * (len(keys) + 1))
            assert batch[:-1] == [layout.read(states[k], t) for k in keys]
            assert batch[-1] == [f.default for f in layout.features]  # no state: the defaults
    # The scorer reads states as stored (distinct values not unpacked): the same values again.
    for entity, layout in L.items():
        keys = [k for k in states if k[0] == entity]
        stored = layout.decode_many(layout.encode_many([states[k] for k in keys]))
        for t in times[:4]:
            assert layout.read_many(stored, [t] * len(keys)) == [layout.read(states[k], t) for k in keys]
    # ... and decoded straight into columns, as the scorer reads them: one blob read by two rows,
    # a row with none.
    for entity, layout in L.items():
        keys = [k for k in states if k[0] == entity]
        blobs = layout.encode_many([states[k] for k in keys])
        which = [*range(len(keys)), 0, -1]
        for t in times[:4]:
            want = [layout.read(states[k], t) for k in keys]
            got = layout.read_columns(layout.decode_columns(blobs, which), np.full(len(which), t))
            assert got.tolist() == [*want, want[0], [f.default for f in layout.features]]


def test_stored_distinct_values_read_like_the_dicts_they_were():
    builder = VectorBuilder(FRAUD_FEATURES)
    card = builder.layouts["card"]
    rng = random.Random(5)
    state = card.new()
    # any text but lone surrogates: ids that look like prefixes of others, non-ASCII, separators
    names = ["m1", "m10", "m", "mé", "日本", "m 1", "m\x00", "FR"] + [f"m{i}" for i in range(40)]
    for i in range(300):
        values = (10.0, rng.choice(names), rng.choice(names), "FR")  # amount, merchant, device, country
        card.apply(state, "transactions", T0 + i * 600_000, values, "t0", i)
    stored = card.decode(card.encode(state))
    assert {type(d).__name__ for d in stored.distinct} == {"StoredValues", "dict"}  # large sets, small ones
    writable = card.decode(card.encode(state), writable=True)
    for plain, packed, back in zip(state.distinct, stored.distinct, writable.distinct, strict=True):
        assert back == plain and list(back) == list(plain)  # order kept too
        assert type(back) is (WritableValues if type(packed) is StoredValues else dict)
        assert len(packed) == len(plain) and dict(packed.items()) == plain and packed == plain
        for name in [*names, "m2x", "", "1"]:
            assert packed.get(name) == plain.get(name)
    assert card.decode(card.encode(card.new())).distinct[0].get("m1") is None  # nothing stored
    end = T0 + 300 * 600_000
    txs = [
        Transaction(f"e{i}", end + i, "c1", merchant, 5.0, "EUR", "FR", "pos", "d")
        for i, merchant in enumerate([*names, "new", "m2x"])
    ]
    as_of = [tx.event_time for tx in txs]
    want = builder.build_many([{"card": state}] * len(txs), txs, as_of)
    assert builder.build_many([{"card": stored}] * len(txs), txs, as_of) == want
    assert {v[builder.names.index("merchant_new_for_card")] for v in want} == {0.0, 1.0}


def test_values_out_of_every_window_are_dropped_an_eighth_of_the_window_late():
    fs = FeatureSet("t", (Feature("cards_1h", "device", "distinct", 3600, "card_id"),))
    layout = layouts(fs)["device"]
    s = layout.new()
    minute = 60_000
    for i in range(40):  # a card each 10 s, then one an hour after the first
        layout.apply(s, "transactions", T0 + i * 10_000, (f"c{i}",), "t0", i)
    at = T0 + 62 * minute
    layout.apply(s, "transactions", at, ("late",), "t0", 40)
    kept = layout.decode(layout.encode(s), writable=True)
    assert len(kept.distinct[0]) == 41  # none is an eighth of a window past the window yet
    assert layout.read(kept, at) == layout.read(s, at)
    later = at + 15 * minute  # now every card is: they go, their count was 0 already
    layout.apply(kept, "transactions", later, ("later",), "t0", 41)
    assert layout.read(kept, later) == [2.0]
    pruned = layout.decode(layout.encode(kept), writable=True)
    assert set(pruned.distinct[0]) == {"late", "later"}
    assert layout.read(pruned, later) == [2.0]


def test_a_value_many_entities_saw_is_one_object_in_their_sets():
    # Writing a batch reads every key of every set: copies spread over the heap were cache misses.
    fs = FeatureSet("t", (Feature("merchants_1h", "card", "distinct", 3600, "merchant_id"),))
    layout = layouts(fs)["card"]
    first, second = layout.new(), layout.new()
    one, other = "".join(["m", "42"]), "".join(["m", "42"])  # equal, but two objects
    assert one is not other
    layout.apply(first, "transactions", T0, (one,), "t0", 0)
    layout.apply(second, "transactions", T0, (other,), "t0", 1)
    layout.apply(second, "transactions", T0 + 1, (other,), "t0", 2)  # seen again: time moved
    (held_first,), (held_second,) = first.distinct[0], second.distinct[0]
    assert held_first is held_second
    assert second.distinct[0] == {"m42": T0 + 1}


def test_a_window_decays_without_new_events():
    fs = FeatureSet(
        "t", (Feature("n_1h", "card", "count", 3600), Feature("s_1h", "card", "sum", 3600, "amount"))
    )
    layout = layouts(fs)["card"]
    s = layout.new()
    for i in range(3):
        layout.apply(s, "transactions", T0 + i * 60_000, (10.0,), "t0", i)
    assert layout.read(s, T0 + 180_000) == [3.0, 30.0]
    assert layout.read(s, T0 + 3_600_000 + 500_000) == [0.0, 0.0]  # an hour and a tile later: gone


def test_the_vector_has_every_input_in_order_with_request_features():
    builder = VectorBuilder(FRAUD_FEATURES)
    L = builder.layouts
    card = L["card"].new()
    L["card"].apply(card, "transactions", T0, (100.0, "m1", "d1", "FR"), "t0", 0)
    tx = Transaction("e9", T0 + 60_000, "c1", "m2", 300.0, "EUR", "DE", "ecom", "d1")
    vector = dict(zip(builder.names, builder.build({"card": card}, tx, tx.event_time), strict=True))
    assert len(vector) == len(FRAUD_FEATURES.names) >= 20
    assert vector["card_tx_count_1h"] == 1.0 and vector["card_amount_mean_30d"] == 100.0
    assert vector["amount_to_card_mean_30d"] == 3.0
    assert vector["merchant_new_for_card"] == 1.0 and vector["device_new_for_card"] == 0.0
    assert vector["country_new_for_card"] == 1.0 and vector["channel_ecom"] == 1.0
    assert vector["merchant_tx_count_1h"] == 0.0  # no merchant state: defaults
    assert vector["card_since_last_s"] == 60.0


def test_feature_definitions_are_checked():
    with pytest.raises(ValueError, match="needs a field"):
        Feature("x", "card", "sum", 3600)
    with pytest.raises(ValueError, match="window"):
        Feature("x", "card", "count", 10)
    with pytest.raises(ValueError, match="duplicate"):
        FeatureSet("d", (Feature("x", "card", "count", 3600), Feature("x", "card", "count", 60)))
    with pytest.raises(ValueError, match="not a stored feature"):
        FeatureSet(
            "d", (Feature("x", "card", "count", 3600),), (RequestFeature("r", "is_new", "nope", "card_id"),)
        )


@pytest.mark.parametrize("seed", [1, 2])
def test_applying_a_batch_of_columns_equals_applying_events_one_by_one(seed):
    """`Layout.apply_columns` (replay's bulk form) against `apply_update` (the worker's), any order."""
    rng = random.Random(seed)
    layout = layouts(FRAUD_FEATURES)["card"]
    stream = [tx for tx in _random_stream(rng, 1500)]
    one_by_one = {}
    for offset, tx in enumerate(stream):
        state = one_by_one.setdefault(tx.card_id, layout.new())
        layout.apply(
            state,
            "transactions",
            tx.event_time,
            tuple(getattr(tx, f) for f in layout.fields["transactions"]),
            "t",
            offset,
        )
    ids = sorted(one_by_one)
    tiles = np.tile(np.frombuffer(layout.empty_tiles), (len(ids), 1))
    shuffled = rng.sample(stream, len(stream))  # the order must not matter
    layout.apply_columns(
        tiles,
        np.array([ids.index(tx.card_id) for tx in shuffled]),
        "transactions",
        np.array([tx.event_time for tx in shuffled]),
        {"amount": np.array([tx.amount for tx in shuffled])},
    )
    end = max(tx.event_time for tx in stream)
    for row, card in enumerate(ids):
        for t in (end, end + 3_600_000, end + 5 * DAY, end + 20 * DAY):
            want = np.zeros((1, len(layout.features)))
            got = np.zeros((1, len(layout.features)))
            layout.fill_numeric(
                want, layout.window_stats(np.frombuffer(one_by_one[card].tiles)[None, :], np.array([t]))
            )
            layout.fill_numeric(got, layout.window_stats(tiles[row : row + 1], np.array([t])))
            np.testing.assert_allclose(got, want, rtol=1e-12)


def test_a_state_stored_and_reloaded_at_every_write_reads_like_one_never_stored():
    """The worker's path: large sets become WritableValues at a write and are changed as such."""
    fs = FeatureSet(
        "t",
        (
            Feature("cards_1h", "device", "distinct", 3600, "card_id"),
            Feature("cards_24h", "device", "distinct", 86400, "card_id"),
            Feature("n_1h", "device", "count", 3600),
        ),
    )
    layout = layouts(fs)["device"]
    rng = random.Random(11)
    kept, stored = layout.new(), layout.new()
    t = T0
    for i in range(3000):
        t += rng.randrange(1, 120_000)  # a busy terminal: hundreds of cards a day
        ts = t - rng.randrange(0, 600_000)  # some out of order
        card = (f"c{rng.randrange(900)}",)
        layout.apply(kept, "transactions", ts, card, "t0", i)
        layout.apply(stored, "transactions", ts, card, "t0", i)
        stored = layout.decode(layout.encode(stored), writable=True)
        if i % 97 == 0:
            at = t + rng.randrange(0, 2 * 3_600_000)
            assert layout.read(stored, at) == layout.read(kept, at)
    assert any(type(d) is WritableValues for d in stored.distinct)
    assert len(stored.distinct[0]) < len(kept.distinct[0])  # pruned, same counts all along


def test_a_set_over_the_cap_is_cut_back_to_its_newest_values_an_eighth_later():
    fs = FeatureSet("t", (Feature("cards_24h", "device", "distinct", 86400, "card_id"),))
    layout = layouts(fs)["device"]
    s = layout.new()
    for i in range(DISTINCT_CAP + 200):
        layout.apply(s, "transactions", T0 + i * 1000, (f"c{i}",), "t0", i)
        if i == DISTINCT_CAP + 99:
            s = layout.decode(layout.encode(s), writable=True)
            assert len(s.distinct[0]) == DISTINCT_CAP + 100  # not cut (a sort) at every new value
            assert layout.read(s, T0 + i * 1000) == [float(DISTINCT_CAP)]  # counts saturate
    s = layout.decode(layout.encode(s), writable=True)
    assert set(s.distinct[0]) == {f"c{i}" for i in range(200, DISTINCT_CAP + 200)}  # the newest kept
    assert layout.read(s, T0 + (DISTINCT_CAP + 200) * 1000) == [float(DISTINCT_CAP)]


def test_a_vector_reads_every_entity_type_in_one_pass_as_each_layout_reads_its_own():
    """VectorBuilder merges the layouts' read plans: the same values as each layout's read, with
    entities missing (no device, an unknown card), busy ones read by many rows, large sets."""
    builder = VectorBuilder(FRAUD_FEATURES)
    rng = random.Random(11)
    stream = _random_stream(rng, 3000)
    start = stream[-1].event_time
    stream += [  # a shop terminal: a large set of cards
        Transaction(f"t{i}", start + i * 1000, f"x{i}", "m1", 9.0, "EUR", "FR", "pos", "terminal")
        for i in range(60)
    ]
    states: dict[tuple[str, str], object] = {}
    for offset, tx in enumerate(stream):
        for entity, layout in builder.layouts.items():
            entity_id = builder.entity_ids(tx)[entity]
            if entity_id is not None:
                state = states.setdefault((entity, entity_id), layout.new())
                values = tuple(getattr(tx, f) for f in layout.fields["transactions"])
                layout.apply(state, "transactions", tx.event_time, values, "t0", offset)  # type: ignore[arg-type]
    stored = {k: builder.layouts[k[0]].decode(builder.layouts[k[0]].encode(s)) for k, s in states.items()}
    assert any(len(d) > 32 for s in stored.values() for d in s.distinct)  # StoredValues among them
    end = max(tx.event_time for tx in stream)
    txs = [dataclasses.replace(tx, event_time=end + rng.randrange(3 * DAY)) for tx in rng.sample(stream, 40)]
    txs[3] = dataclasses.replace(txs[3], card_id="never-seen", device_id=None)
    rows = [{e: stored.get((e, i)) if i else None for e, i in builder.entity_ids(tx).items()} for tx in txs]
    as_of = [tx.event_time for tx in txs]
    got = builder.build_array(rows, txs, as_of)
    for entity, layout in builder.layouts.items():
        want = layout.read_array([r[entity] for r in rows], as_of)
        np.testing.assert_array_equal(got[:, builder.columns[entity]], want)
    assert (got[3, builder.columns["card"]] == builder.layouts["card"].defaults).all()
