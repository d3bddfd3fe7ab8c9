"""A synthetic card-payment stream with fraud in it, deterministic for a seed.

Cards have habits (home country, favourite merchants, spend level, online and contactless
propensity, their own devices); traffic follows the time of day; fraud comes as campaigns:

- **compromised card**: a small "card test" then a burst of larger online/foreign payments on a
  new device at risky merchants;
- **compromised merchant**: a run of fraudulent, inflated payments at one merchant from many cards;
- **large amount**: one payment of many times the card's usual spend, online, on a new device.

Every transaction is labelled ``label_delay_s`` (± jitter) of event time later. A :class:`Shift`
moves one distribution from a chosen time on, for drift detection to find.

>>> stream = SyntheticStream(SyntheticConfig(seed=7, start_ms=1_700_000_000_000, rate=50))
>>> first = next(iter(stream))
>>> first.card_id.startswith("c"), first.event_time >= 1_700_000_000_000
(True, True)
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from stream_ml.events.label import Label
from stream_ml.events.transaction import Transaction

# (country, currency, share of cards at home there)
COUNTRIES = (
    ("US", "USD", 0.34),
    ("GB", "GBP", 0.10),
    ("FR", "EUR", 0.09),
    ("DE", "EUR", 0.09),
    ("ES", "EUR", 0.05),
    ("IT", "EUR", 0.05),
    ("NL", "EUR", 0.04),
    ("CA", "CAD", 0.05),
    ("BR", "BRL", 0.04),
    ("IN", "INR", 0.04),
    ("JP", "JPY", 0.04),
    ("MX", "MXN", 0.04),
    ("AU", "AUD", 0.03),
)

# (category, mcc, log-mean amount, log-sd amount, kind, share of merchants, risky for fraud)
CATEGORIES = (
    ("grocery", 5411, math.log(45), 0.6, "store", 0.22, False),
    ("restaurant", 5812, math.log(32), 0.5, "store", 0.18, False),
    ("fuel", 5541, math.log(55), 0.35, "store", 0.08, False),
    ("pharmacy", 5912, math.log(25), 0.6, "store", 0.06, False),
    ("clothing", 5651, math.log(75), 0.7, "store", 0.08, False),
    ("electronics", 5732, math.log(220), 0.9, "store", 0.04, True),
    ("jewelry", 5944, math.log(400), 0.9, "store", 0.015, True),
    ("hotel", 7011, math.log(180), 0.6, "store", 0.03, False),
    ("atm", 6011, math.log(100), 0.5, "atm", 0.04, False),
    ("marketplace", 5399, math.log(60), 0.9, "online", 0.12, False),
    ("digital_goods", 5815, math.log(15), 0.8, "online", 0.08, True),
    ("gift_cards", 5947, math.log(100), 0.6, "online", 0.025, True),
    ("airline", 4511, math.log(420), 0.6, "online", 0.03, False),
)
# Traffic by hour of day (UTC), relative to the daily mean.
HOURLY = np.array(
    [
        0.25,
        0.15,
        0.10,
        0.10,
        0.12,
        0.20,
        0.40,
        0.70,
        0.90,
        1.00,
        1.05,
        1.15,
        1.25,
        1.15,
        1.05,
        1.00,
        1.05,
        1.15,
        1.30,
        1.35,
        1.20,
        0.95,
        0.70,
        0.45,
    ]
)
HOURLY = HOURLY / HOURLY.mean()
_KIND_CODE = {"store": 0, "online": 1, "atm": 2}
_CHANNELS = ("pos", "contactless", "ecom", "atm")
SHIFT_KINDS = {
    "amount": "multiply every legitimate amount by FACTOR",
    "ecom": "send a FACTOR share (0-1) of in-store payments to online merchants instead",
    "foreign": "send a FACTOR share (0-1) of payments to merchants in another country",
}
FAVOURITES = 12
FAVOURITES_AT_HOME = 9
_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS
_CHUNK = 4096
# Fraud shares by scenario (card campaign, merchant campaign, single large amount).
_SHARE_CARD, _SHARE_MERCHANT, _SHARE_LARGE = 0.5, 0.25, 0.25
_CARD_BURST_MEAN = 5.0  # 2 + Poisson(3)
_MERCHANT_RUN_MEAN = 8.0  # 3 + Poisson(5)


@dataclass(frozen=True, slots=True)
class Shift:
    """From ``at_ms`` on, the distribution ``kind`` (a key of SHIFT_KINDS) moves by ``factor``."""

    kind: str
    factor: float
    at_ms: int

    def __post_init__(self) -> None:
        if self.kind not in SHIFT_KINDS:
            raise ValueError(f"unknown shift {self.kind!r}; choose one of: {', '.join(SHIFT_KINDS)}")
        if self.kind != "amount" and not 0.0 <= self.factor <= 1.0:
            raise ValueError(f"shift {self.kind}: FACTOR is a share between 0 and 1, got {self.factor}")
        if self.kind == "amount" and self.factor <= 0:
            raise ValueError(f"shift amount: FACTOR must be positive, got {self.factor}")

    @classmethod
    def parse(cls, spec: str, at_ms: int) -> Shift:
        """``KIND=FACTOR`` (as ``--shift`` takes it), starting at ``at_ms``."""
        kind, _, factor = spec.partition("=")
        try:
            return cls(kind.strip(), float(factor), at_ms)
        except ValueError as exc:
            raise ValueError(f"--shift {spec!r}: {exc} (expected KIND=FACTOR, e.g. amount=1.5)") from None


@dataclass(frozen=True, slots=True)
class SyntheticConfig:
    seed: int
    start_ms: int
    rate: float = 100.0  # transactions per second of event time in the start hour
    cards: int = 20_000
    merchants: int = 2_000
    fraud_rate: float = 0.003
    label_delay_s: float = 300.0
    label_jitter: float = 0.5  # a label arrives label_delay_s × (1 ± jitter) after its payment
    shifts: tuple[Shift, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraud_rate < 0.5:
            raise ValueError(f"fraud rate must be in [0, 0.5), got {self.fraud_rate}")
        if self.rate <= 0 or self.cards < 1 or self.merchants < len(CATEGORIES):
            raise ValueError(f"need rate > 0, cards >= 1 and merchants >= {len(CATEGORIES)}")
        if not 0.0 <= self.label_jitter < 1.0 or self.label_delay_s < 0:
            raise ValueError("need label delay >= 0 and jitter in [0, 1)")


class _World:
    """Cards and merchants, drawn once from the seed."""

    def __init__(self, cfg: SyntheticConfig, rng: np.random.Generator) -> None:
        n_cat = len(CATEGORIES)
        cat_share = np.array([c[5] for c in CATEGORIES])
        cat_share /= cat_share.sum()
        country_share = np.array([c[2] for c in COUNTRIES])
        country_share /= country_share.sum()

        # Every category has at least one merchant; the rest by share.
        m_cat = np.concatenate([np.arange(n_cat), rng.choice(n_cat, cfg.merchants - n_cat, p=cat_share)])
        self.m_cat = m_cat.tolist()
        self.m_country = rng.choice(len(COUNTRIES), cfg.merchants, p=country_share).tolist()
        self.m_popularity = rng.pareto(1.2, cfg.merchants) + 1.0
        self.m_terminals = (1 + rng.poisson(3, cfg.merchants)).tolist()
        self.m_kind = [CATEGORIES[c][4] for c in self.m_cat]
        self.m_risky = [CATEGORIES[c][6] for c in self.m_cat]
        self.online = [i for i, k in enumerate(self.m_kind) if k == "online"]
        self.risky_online = [i for i in self.online if self.m_risky[i]] or self.online
        self.store = [i for i, k in enumerate(self.m_kind) if k == "store"]
        by_country: dict[int, list[int]] = {}
        for i, c in enumerate(self.m_country):
            by_country.setdefault(c, []).append(i)
        self.by_country = by_country

        self.c_home = rng.choice(len(COUNTRIES), cfg.cards, p=country_share).tolist()
        self.c_activity = rng.lognormal(0.0, 0.8, cfg.cards)
        self.c_spend = rng.lognormal(0.0, 0.45, cfg.cards).tolist()
        self.c_contactless = rng.beta(2, 3, cfg.cards).tolist()
        self.c_devices = (1 + (rng.random(cfg.cards) < 0.35)).tolist()
        # Favourites: mostly shops (and ATMs) at home, plus a few popular online merchants.
        pop = self.m_popularity / self.m_popularity.sum()
        online = np.array(self.online)
        fav = np.empty((cfg.cards, FAVOURITES), dtype=np.int64)
        fav[:, FAVOURITES_AT_HOME:] = rng.choice(
            online, (cfg.cards, FAVOURITES - FAVOURITES_AT_HOME), p=pop[online] / pop[online].sum()
        )
        homes = np.array(self.c_home)
        for country in range(len(COUNTRIES)):
            cards = np.flatnonzero(homes == country)
            shops = np.array([m for m in by_country.get(country, []) if self.m_kind[m] != "online"])
            if len(shops) == 0:  # a tiny world: no shop in that country, so shop anywhere
                shops = np.array([m for m in range(cfg.merchants) if self.m_kind[m] != "online"])
            p = pop[shops] / pop[shops].sum()
            fav[cards, :FAVOURITES_AT_HOME] = rng.choice(shops, (len(cards), FAVOURITES_AT_HOME), p=p)
        self.c_favourites = fav
        self.card_p = self.c_activity / self.c_activity.sum()
        self.merchant_p = pop

        # Precomputed per entity so that the per-event loop only looks things up.
        self.m_mu = np.array([CATEGORIES[c][2] for c in self.m_cat])
        self.m_sd = np.array([CATEGORIES[c][3] for c in self.m_cat])
        self.m_kind_code = np.array([_KIND_CODE[k] for k in self.m_kind])
        self.m_ids = [f"m{i}" for i in range(cfg.merchants)]
        self.m_extra = [{"mcc": CATEGORIES[c][1]} for c in self.m_cat]
        self.m_place = [COUNTRIES[c][:2] for c in self.m_country]
        self.m_terminal_ids = [[f"t{i}-{k}" for k in range(n)] for i, n in enumerate(self.m_terminals)]
        self.c_ids = [f"c{i}" for i in range(cfg.cards)]
        self.c_device_ids = [[f"d{i}-{k}" for k in range(n)] for i, n in enumerate(self.c_devices)]
        self.c_home_arr = np.array(self.c_home)
        self.m_country_arr = np.array(self.m_country)
        self.contactless_arr = np.array(self.c_contactless)
        self.n_devices_arr = np.array(self.c_devices)
        self.n_terminals_arr = np.array(self.m_terminals)


class SyntheticStream:
    """An endless, time-ordered iterator of transactions and their labels (see the module doc).

    Items come in the order a log would see them: each at its event time (transactions) or label
    time (labels). ``pending_labels()`` gives the labels not yet due when iteration stops.
    """

    def __init__(self, config: SyntheticConfig) -> None:
        self.cfg = config
        self._rng = np.random.default_rng(config.seed)
        self._py = random.Random(config.seed)
        self.world = _World(config, self._rng)
        # (due time, tie-breaker, item, is fraud, label delay ms): campaign payments and labels
        self._heap: list[tuple[int, int, Transaction | Label, bool, int]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self._new_devices = itertools.count()
        self._t = float(config.start_ms)
        self._shifts = sorted(config.shifts, key=lambda s: s.at_ms)
        self.frauds = 0
        self.transactions = 0
        # Campaign triggers per legitimate payment, solved so that frauds / all = fraud_rate.
        f = config.fraud_rate
        per_legit = f / (1.0 - (_SHARE_CARD + _SHARE_MERCHANT) * f)
        self._p_card = per_legit * _SHARE_CARD / _CARD_BURST_MEAN
        self._p_merchant = per_legit * _SHARE_MERCHANT / _MERCHANT_RUN_MEAN
        self._p_large = per_legit * _SHARE_LARGE
        self._legit_rate = config.rate / (1.0 + (_SHARE_CARD + _SHARE_MERCHANT) * per_legit)

    def __iter__(self) -> Iterator[Transaction | Label]:
        return self.items()

    def items(self, until_ms: int | None = None) -> Iterator[Transaction | Label]:
        """The stream, stopping before the first item due at or after ``until_ms``."""
        heap = self._heap
        end = until_ms if until_ms is not None else 1 << 62
        for tx, fraud, delay_ms in self._legitimate():
            while heap and heap[0][0] <= tx.event_time:
                if heap[0][0] >= end:
                    return
                _, _, item, item_fraud, item_delay = heapq.heappop(heap)
                if isinstance(item, Transaction):
                    self._label_later(item, item_fraud, item_delay)
                yield item
            if tx.event_time >= end:
                return
            self._label_later(tx, fraud, delay_ms)
            yield tx

    def pending_labels(self) -> Iterator[Label]:
        """The labels of the transactions already yielded that are not due yet, in time order.

        Campaign payments scheduled after the stop are dropped: they never happened, so they
        get no label.
        """
        while self._heap:
            item = heapq.heappop(self._heap)[2]
            if isinstance(item, Label):
                yield item

    # -- legitimate traffic ---------------------------------------------------------------

    def _legitimate(self) -> Iterator[tuple[Transaction, bool, int]]:
        cfg, w, rng = self.cfg, self.world, self._rng
        # `rate` is the rate at the start hour, what a short run shows; the day then goes up and down.
        peak = float(HOURLY.max())
        start_hour = (cfg.start_ms % _DAY_MS) // _HOUR_MS
        lam_peak = self._legit_rate * peak / float(HOURLY[start_hour]) / 1000.0  # candidates per ms
        p_card, p_merchant, p_large = self._p_card, self._p_merchant, self._p_large
        p_any = p_card + p_merchant + p_large
        prefix = f"s{cfg.seed}-"
        ids = self._ids
        while True:
            gaps = rng.exponential(1.0 / lam_peak, _CHUNK)
            times = self._t + np.cumsum(gaps)
            self._t = float(times[-1])
            hours = (times.astype(np.int64) % _DAY_MS) // _HOUR_MS
            keep = rng.random(_CHUNK) < HOURLY[hours] / peak
            times = times[keep].astype(np.int64)
            n = len(times)
            cards = rng.choice(cfg.cards, n, p=w.card_p)
            fav_pick = rng.integers(0, FAVOURITES, n)
            from_fav = rng.random(n) < 0.85
            global_pick = rng.choice(cfg.merchants, n, p=w.merchant_p)
            merchants = np.where(from_fav, w.c_favourites[cards, fav_pick], global_pick)
            u = rng.random(n)
            scale = np.ones(n)
            for shift in self._shifts:
                merchants = self._shift(shift, times, cards, merchants, scale)
            kind = w.m_kind_code[merchants]
            amounts = np.round(
                np.exp(w.m_mu[merchants] + w.m_sd[merchants] * rng.standard_normal(n))
                * np.take(w.c_spend, cards)
                * scale,
                2,
            )
            channel = np.where(kind == 1, 2, np.where(kind == 2, 3, (u < w.contactless_arr[cards]) * 1))
            slot = np.where(kind == 1, u * w.n_devices_arr[cards], u * w.n_terminals_arr[merchants])
            delays = (
                cfg.label_delay_s * 1000.0 * (1.0 + cfg.label_jitter * (2.0 * rng.random(n) - 1.0))
            ).astype(np.int64)
            triggers = rng.random(n).tolist()
            rows = zip(
                times.tolist(),
                cards.tolist(),
                merchants.tolist(),
                amounts.tolist(),
                channel.tolist(),
                slot.astype(np.int64).tolist(),
                delays.tolist(),
                triggers,
                strict=True,
            )
            for t, card, m, amount, ch, k, delay, trig in rows:
                if trig < p_any:
                    if trig < p_card:
                        self._card_campaign(t)
                    elif trig < p_card + p_merchant:
                        self._merchant_campaign(t)
                    else:
                        yield self._large_amount(t, card), True, delay
                        continue
                place = w.m_place[m]
                yield (
                    Transaction(
                        prefix + str(next(ids)),
                        t,
                        w.c_ids[card],
                        w.m_ids[m],
                        amount,
                        place[1],
                        place[0],
                        _CHANNELS[ch],
                        w.c_device_ids[card][k] if ch == 2 else w.m_terminal_ids[m][k],
                        w.m_extra[m],
                    ),
                    False,
                    delay,
                )

    def _shift(
        self, s: Shift, times: np.ndarray, cards: np.ndarray, merchants: np.ndarray, scale: np.ndarray
    ) -> np.ndarray:
        """Apply ``s`` to the payments at or after its time (``scale`` is updated in place)."""
        w, rng = self.world, self._rng
        after = times >= s.at_ms
        if not after.any():
            return merchants
        if s.kind == "amount":
            scale[after] *= s.factor
            return merchants
        moved = after & (rng.random(len(times)) < s.factor)
        if s.kind == "ecom":
            moved &= w.m_kind_code[merchants] == 0
            online = np.array(w.online)
            candidates = online[rng.integers(0, len(online), len(times))]
        else:  # foreign: a random merchant, kept where it is in another country than the card's home
            candidates = rng.integers(0, self.cfg.merchants, len(times))
            moved &= w.m_country_arr[candidates] != w.c_home_arr[cards]
        return np.where(moved, candidates, merchants)

    def _tx(self, t: int, card: int, m: int, amount: float, device: str) -> Transaction:
        """A payment made by a fraudster (campaigns): on ``device``, whatever the merchant."""
        w = self.world
        kind = w.m_kind[m]
        channel = "ecom" if kind == "online" else "atm" if kind == "atm" else "pos"
        if kind != "online":
            device = w.m_terminal_ids[m][0]
        place = w.m_place[m]
        return Transaction(
            f"s{self.cfg.seed}-{next(self._ids)}",
            t,
            w.c_ids[card],
            w.m_ids[m],
            round(amount, 2),
            place[1],
            place[0],
            channel,
            device,
            w.m_extra[m],
        )

    # -- fraud campaigns ------------------------------------------------------------------

    def _card_campaign(self, t: int) -> None:
        """A stolen card: a small test payment, then a burst abroad or online on a new device."""
        py, w = self._py, self.world
        card = py.randrange(self.cfg.cards)
        device = f"dx{next(self._new_devices)}"
        abroad = [c for c in w.by_country if c != w.c_home[card]] or list(w.by_country)
        shops_abroad = w.by_country[abroad[py.randrange(len(abroad))]]
        burst = 2 + _poisson(py, _CARD_BURST_MEAN - 2)
        for k in range(burst):
            t += int(py.expovariate(1.0 / 20_000)) + 1000  # fraudsters are quick: ~20 s apart
            if k == 0:
                m, amount = w.risky_online[py.randrange(len(w.risky_online))], py.uniform(0.5, 5.0)
            else:
                m = w.risky_online[py.randrange(len(w.risky_online))]
                amount = math.exp(py.gauss(math.log(300), 0.7))
            if py.random() < 0.3:  # card present, abroad (a cloned card)
                m = shops_abroad[py.randrange(len(shops_abroad))]
            self._schedule(t, self._tx(t, card, m, amount, device), fraud=True)

    def _merchant_campaign(self, t: int) -> None:
        """A compromised merchant: inflated payments from many cards over a couple of hours."""
        py, w = self._py, self.world
        m = w.store[py.randrange(len(w.store))]
        cat = CATEGORIES[w.m_cat[m]]
        for _ in range(3 + _poisson(py, _MERCHANT_RUN_MEAN - 3)):
            t += int(py.expovariate(1.0 / 90_000)) + 1000  # ~1.5 min apart
            card = py.randrange(self.cfg.cards)
            amount = math.exp(cat[2] + cat[3] * py.gauss(0, 1)) * py.uniform(2.5, 6.0)
            self._schedule(t, self._tx(t, card, m, amount, f"d{card}-0"), fraud=True)

    def _large_amount(self, t: int, card: int) -> Transaction:
        """The card's own payment, but many times its usual spend, online, from a new device."""
        py, w = self._py, self.world
        m = w.risky_online[py.randrange(len(w.risky_online))]
        cat = CATEGORIES[w.m_cat[m]]
        amount = math.exp(cat[2]) * w.c_spend[card] * py.uniform(10.0, 40.0)
        return self._tx(t, card, m, amount, f"dx{next(self._new_devices)}")

    # -- labels ---------------------------------------------------------------------------

    def _label_later(self, tx: Transaction, fraud: bool, delay_ms: int) -> None:
        self.transactions += 1
        self.frauds += fraud
        label_time = tx.event_time + delay_ms
        label = Label(tx.event_id, fraud, label_time, "chargeback" if fraud else "no-dispute")
        heapq.heappush(self._heap, (label_time, next(self._seq), label, fraud, 0))

    def _schedule(self, t: int, tx: Transaction, fraud: bool) -> None:
        cfg = self.cfg
        delay = cfg.label_delay_s * 1000.0 * (1.0 + cfg.label_jitter * (2.0 * self._py.random() - 1.0))
        heapq.heappush(self._heap, (t, next(self._seq), tx, fraud, int(delay)))


def _poisson(py: random.Random, mean: float) -> int:
    # Knuth's method: exact and cheap for the small means used here.
    limit, k, p = math.exp(-mean), 0, py.random()
    while p > limit:
        k += 1
        p *= py.random()
    return k
