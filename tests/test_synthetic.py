"""The synthetic stream: determinism, fraud rate, labels, validity, shifts and time of day (no broker)."""

from __future__ import annotations

import dataclasses
import itertools
import re
import statistics
from collections import Counter

import pytest

from stream_ml.events import Label, Transaction, validate_transaction
from stream_ml.events.sources.synthetic import Shift, SyntheticConfig, SyntheticStream

START = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
MIDNIGHT = 1_699_920_000_000  # 2023-11-14 00:00:00 UTC
HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def emission_time(item: Transaction | Label) -> int:
    return item.event_time if type(item) is Transaction else item.label_time


def take(stream: SyntheticStream, n_transactions: int) -> list[Transaction | Label]:
    """Items up to and including the ``n_transactions``-th transaction."""
    out: list[Transaction | Label] = []
    n = 0
    for item in stream:
        out.append(item)
        if type(item) is Transaction:
            n += 1
            if n >= n_transactions:
                break
    return out


def take_until(stream: SyntheticStream, end_ms: int) -> list[Transaction | Label]:
    out: list[Transaction | Label] = []
    for item in stream:
        if emission_time(item) >= end_ms:
            break
        out.append(item)
    return out


def fields(item: Transaction | Label) -> tuple:
    return (type(item).__name__, *dataclasses.astuple(item))


# -- a shared run, reused by the label and validity tests ------------------------------------------


@dataclasses.dataclass
class Run:
    stream: SyntheticStream
    items: list[Transaction | Label]  # from iteration
    drained: list[Label]  # from pending_labels() afterwards

    @property
    def transactions(self) -> list[Transaction]:
        return [i for i in self.items if type(i) is Transaction]

    @property
    def labels(self) -> list[Label]:
        return [i for i in self.items if type(i) is Label] + self.drained


@pytest.fixture(scope="module")
def run_1pct() -> Run:
    # A low rate spreads the run over hours of event time, so the campaigns cut short at the stop (their
    # later payments are dropped) hardly bias the fraud share.
    cfg = SyntheticConfig(seed=11, start_ms=START, rate=20, fraud_rate=0.01, label_delay_s=120)
    stream = SyntheticStream(cfg)
    items = take(stream, 60_000)
    drained = list(stream.pending_labels())
    return Run(stream, items, drained)


# -- determinism -----------------------------------------------------------------------------------


def test_same_seed_same_stream():
    def first_items(n: int) -> list[Transaction | Label]:
        cfg = SyntheticConfig(seed=42, start_ms=START, rate=200, label_delay_s=10)
        return list(itertools.islice(SyntheticStream(cfg), n))

    a, b = first_items(20_000), first_items(20_000)
    assert len(a) == len(b) == 20_000
    assert 1_000 < sum(type(x) is Label for x in a) < 19_000  # labels are interleaved
    assert [fields(x) for x in a] == [fields(x) for x in b]
    assert a == b


def test_different_seed_different_stream():
    a = take(SyntheticStream(SyntheticConfig(seed=1, start_ms=START)), 2_000)
    b = take(SyntheticStream(SyntheticConfig(seed=2, start_ms=START)), 2_000)
    ta = [fields(x)[2:] for x in a if type(x) is Transaction]  # without the (seed-prefixed) event id
    tb = [fields(x)[2:] for x in b if type(x) is Transaction]
    assert ta != tb
    assert sum(x == y for x, y in zip(ta, tb, strict=False)) < 10
    assert [x.amount for x in a[:50] if type(x) is Transaction] != [
        x.amount for x in b[:50] if type(x) is Transaction
    ]


def test_event_ids_unique_and_seed_prefixed(run_1pct):
    ids = [t.event_id for t in run_1pct.transactions]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("s11-") for i in ids)


# -- fraud rate ------------------------------------------------------------------------------------


def test_fraud_rate_one_percent(run_1pct):
    stream = run_1pct.stream
    assert stream.transactions >= 60_000
    rate = stream.frauds / stream.transactions
    assert 0.007 <= rate <= 0.013, rate
    # Counted independently from the labels: they agree with the stream's counters after draining.
    labels = run_1pct.labels
    assert len(labels) == stream.transactions
    assert sum(lb.is_fraud for lb in labels) == stream.frauds
    assert all(lb.source == ("chargeback" if lb.is_fraud else "no-dispute") for lb in labels)


def test_fraud_rate_default():
    stream = SyntheticStream(SyntheticConfig(seed=5, start_ms=START, rate=20))
    assert stream.cfg.fraud_rate == 0.003
    items = take(stream, 100_000)
    labels = [i for i in items if type(i) is Label] + list(stream.pending_labels())
    frauds = sum(lb.is_fraud for lb in labels)
    assert frauds == stream.frauds
    assert len(labels) == stream.transactions >= 100_000
    rate = frauds / len(labels)
    assert 0.003 * 0.65 <= rate <= 0.003 * 1.35, rate
    assert rate < 0.01  # well under 1%


def test_no_fraud_when_rate_is_zero():
    stream = SyntheticStream(SyntheticConfig(seed=3, start_ms=START, fraud_rate=0.0, cards=500, merchants=50))
    items = take(stream, 3_000)
    list(stream.pending_labels())
    assert stream.frauds == 0
    assert not any(i.is_fraud for i in items if type(i) is Label)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"fraud_rate": 0.5},
        {"fraud_rate": -0.1},
        {"rate": 0},
        {"cards": 0},
        {"merchants": 5},
        {"label_jitter": 1.0},
    ],
)
def test_invalid_config(kwargs):
    with pytest.raises(ValueError):
        SyntheticConfig(seed=1, start_ms=START, **kwargs)


# -- labels and ordering ---------------------------------------------------------------------------


def test_every_transaction_has_exactly_one_label(run_1pct):
    by_id = Counter(lb.event_id for lb in run_1pct.labels)
    assert max(by_id.values()) == 1
    labels = {lb.event_id: lb for lb in run_1pct.labels}
    txs = run_1pct.transactions
    assert all(t.event_id in labels for t in txs)
    # Only emitted transactions are labelled (and counted): no label names an unknown event id.
    assert len(labels) == len(txs) == run_1pct.stream.transactions
    assert sum(labels[t.event_id].is_fraud for t in txs) == run_1pct.stream.frauds


def test_label_delay_within_jitter(run_1pct):
    cfg = run_1pct.stream.cfg
    lo = cfg.label_delay_s * 1000 * (1 - cfg.label_jitter) - 1
    hi = cfg.label_delay_s * 1000 * (1 + cfg.label_jitter) + 1
    labels = {lb.event_id: lb for lb in run_1pct.labels}
    delays = [labels[t.event_id].label_time - t.event_time for t in run_1pct.transactions]
    assert all(lo <= d <= hi for d in delays), (min(delays), max(delays))
    # The jitter is used: delays spread over most of the allowed range.
    assert min(delays) < cfg.label_delay_s * 1000 * 0.6
    assert max(delays) > cfg.label_delay_s * 1000 * 1.4


def test_items_in_emission_order_and_labels_after_transactions(run_1pct):
    times = [emission_time(i) for i in run_1pct.items] + [lb.label_time for lb in run_1pct.drained]
    assert all(a <= b for a, b in itertools.pairwise(times))
    assert times[0] >= START
    position: dict[str, int] = {}
    for k, item in enumerate(run_1pct.items):
        if type(item) is Transaction:
            position[item.event_id] = k
        else:
            assert item.event_id in position, "a label came before its transaction"
            assert position[item.event_id] < k


def test_zero_label_delay_keeps_label_after_transaction():
    stream = SyntheticStream(
        SyntheticConfig(seed=9, start_ms=START, label_delay_s=0, cards=500, merchants=50, fraud_rate=0.05)
    )
    items = take(stream, 2_000)
    seen: set[str] = set()
    for item in items:
        if type(item) is Transaction:
            seen.add(item.event_id)
        else:
            assert item.event_id in seen
    labels = [i for i in items if type(i) is Label]
    txs = {t.event_id: t for t in items if type(t) is Transaction}
    assert labels and all(lb.label_time == txs[lb.event_id].event_time for lb in labels)


# -- validity --------------------------------------------------------------------------------------


def test_generated_transactions_are_valid(run_1pct):
    txs = run_1pct.transactions
    for tx in txs:
        assert validate_transaction(tx.to_dict()) == tx
    channels = Counter(t.channel for t in txs)
    assert set(channels) <= {"pos", "contactless", "ecom", "atm"}
    assert len(channels) == 4
    assert all(t.amount >= 0 for t in txs)
    assert all(t.device_id for t in txs)
    assert all(isinstance(t.extra.get("mcc"), int) for t in txs)


# -- shifts ----------------------------------------------------------------------------------------


def _split_at(items: list[Transaction | Label], at_ms: int) -> tuple[list[Transaction], list[Transaction]]:
    legit = {i.event_id for i in items if type(i) is Label and not i.is_fraud}
    txs = [i for i in items if type(i) is Transaction and i.event_id in legit]
    return [t for t in txs if t.event_time < at_ms], [t for t in txs if t.event_time >= at_ms]


def test_amount_shift_doubles_legitimate_amounts():
    at = START + 60_000
    stream = SyntheticStream(
        SyntheticConfig(seed=21, start_ms=START, label_delay_s=1, shifts=(Shift("amount", 2.0, at),))
    )
    before, after = _split_at(take_until(stream, START + 120_000), at)
    assert len(before) > 3_000 and len(after) > 3_000
    ratio = statistics.median(t.amount for t in after) / statistics.median(t.amount for t in before)
    assert 1.6 <= ratio <= 2.5, ratio


def test_no_shift_keeps_amounts():
    stream = SyntheticStream(SyntheticConfig(seed=21, start_ms=START, label_delay_s=1))
    before, after = _split_at(take_until(stream, START + 120_000), START + 60_000)
    ratio = statistics.median(t.amount for t in after) / statistics.median(t.amount for t in before)
    assert 0.85 <= ratio <= 1.15, ratio


def _ecom_shift_run(factor: float) -> tuple[list[Transaction], list[Transaction]]:
    at = START + 60_000
    shift = Shift("ecom", factor, at)
    stream = SyntheticStream(SyntheticConfig(seed=22, start_ms=START, label_delay_s=1, shifts=(shift,)))
    return _split_at(take_until(stream, START + 120_000), at)


def _share(txs: list[Transaction], *channels: str) -> float:
    return sum(t.channel in channels for t in txs) / len(txs)


def test_ecom_shift_moves_a_share_of_store_payments_online():
    before, after = _ecom_shift_run(0.5)
    store_before, store_after = _share(before, "pos", "contactless"), _share(after, "pos", "contactless")
    # Half of the in-store payments go online: the store share halves, the ecom share takes it.
    assert store_after == pytest.approx(store_before / 2, abs=0.03), (store_before, store_after)
    gain = _share(after, "ecom") - _share(before, "ecom")
    assert gain == pytest.approx(store_before / 2, abs=0.03), (gain, store_before)
    assert gain > 0.1
    # ATM payments are not moved.
    assert _share(after, "atm") == pytest.approx(_share(before, "atm"), abs=0.01)


def test_ecom_shift_of_one_moves_every_store_payment():
    before, after = _ecom_shift_run(1.0)
    assert _share(before, "pos", "contactless") > 0.2
    assert _share(after, "pos", "contactless") == 0.0
    assert _share(after, "ecom") - _share(before, "ecom") >= 0.2


@pytest.mark.parametrize(
    ("kind", "factor"),
    [("unknown", 1.0), ("ecom", 1.5), ("foreign", -0.1), ("amount", 0.0), ("amount", -2.0)],
)
def test_invalid_shift(kind, factor):
    with pytest.raises(ValueError):
        Shift(kind, factor, START)


def test_shift_error_messages():
    unknown = "unknown shift 'unknown'; choose one of: amount, ecom, foreign"
    with pytest.raises(ValueError, match=re.escape(unknown)):
        Shift("unknown", 1.0, START)
    with pytest.raises(ValueError, match=re.escape("shift ecom: FACTOR is a share between 0 and 1, got 1.5")):
        Shift("ecom", 1.5, START)


# -- time of day -----------------------------------------------------------------------------------


def test_traffic_follows_time_of_day():
    # 0.1 tx/s at midnight is about 26,000 transactions a day; 26 hours covers the whole day once.
    stream = SyntheticStream(
        SyntheticConfig(seed=8, start_ms=MIDNIGHT, rate=0.1, cards=2_000, merchants=200, fraud_rate=0.0)
    )
    hours = Counter(
        (i.event_time % DAY_MS) // HOUR_MS
        for i in take_until(stream, MIDNIGHT + 26 * HOUR_MS)
        if type(i) is Transaction and i.event_time < MIDNIGHT + DAY_MS
    )
    assert len(hours) == 24
    evening = hours[19]
    night = max(hours[2], hours[3])
    assert evening >= 3 * night, (evening, hours[2], hours[3])
    # The start hour runs at about the configured rate (0.1 tx/s, 360 an hour).
    assert 250 <= hours[0] <= 480, hours[0]


def test_drained_labels_only_name_emitted_transactions():
    # A high fraud rate and an early stop leave campaign payments scheduled: they are dropped, not labelled.
    stream = SyntheticStream(
        SyntheticConfig(seed=4, start_ms=START, fraud_rate=0.2, cards=500, merchants=50, label_delay_s=60)
    )
    items = take(stream, 2_000)
    drained = list(stream.pending_labels())
    assert all(type(lb) is Label for lb in drained)
    emitted = {t.event_id for t in items if type(t) is Transaction}
    labels = [i for i in items if type(i) is Label] + drained
    assert sorted(lb.event_id for lb in labels) == sorted(emitted)
    assert stream.transactions == len(emitted) == 2_000
    assert stream.frauds == sum(lb.is_fraud for lb in labels) > 0
    assert list(stream.pending_labels()) == []


def test_items_until_stops_before_end():
    stream = SyntheticStream(
        SyntheticConfig(seed=6, start_ms=START, label_delay_s=5, cards=500, merchants=50)
    )
    end = START + 20_000
    items = list(stream.items(until_ms=end))
    assert items and all(emission_time(i) < end for i in items)
    # Everything before the end came out: the same stream without a bound agrees up to the end.
    other = SyntheticStream(SyntheticConfig(seed=6, start_ms=START, label_delay_s=5, cards=500, merchants=50))
    assert items == take_until(other, end)


# -- known issues ----------------------------------------------------------------------------------


def test_most_favourites_are_shops_at_home():
    stream = SyntheticStream(SyntheticConfig(seed=1, start_ms=START))
    w = stream.world
    fav = w.c_favourites
    at_home_in_store = (w.m_kind_code[fav] == 0) & (w.m_country_arr[fav] == w.c_home_arr[:, None])
    assert at_home_in_store.mean() > 0.5


def test_ecom_shift_half_raises_ecom_share_by_a_fifth():
    before, after = _ecom_shift_run(0.5)
    assert _share(after, "ecom") - _share(before, "ecom") >= 0.2
