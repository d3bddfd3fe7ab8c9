"""The transaction event: what producers publish to the ``transactions`` topic, keyed by card id.

>>> tx = Transaction("e1", 1_700_000_000_000, "c1", "m1", 12.5, "EUR", "FR", "pos", None)
>>> decode_transaction(encode_transaction(tx)) == tx
True
>>> decode_transaction(b'{"event_id": "e1", "amount": "abc"}')
Traceback (most recent call last):
...
stream_ml.events.codec.InvalidMessage: field event_time: required, missing
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stream_ml.events.codec import (
    MAX_TIME_MS,
    MIN_TIME_MS,
    InvalidMessage,
    Scalar,
    decode_map,
    encode_map,
    extra_fields,
    opt_str,
    req_code,
    req_number,
    req_str,
    req_time_ms,
)

# Channels the synthetic generator and the default features know; other values are accepted and
# treated as one "other" category by the features.
CHANNELS = ("pos", "contactless", "ecom", "atm")
MAX_AMOUNT = 1e9


@dataclass(slots=True)
class Transaction:
    """Treat as immutable (not frozen: a frozen dataclass costs ~3 µs more to build)."""

    event_id: str
    event_time: int  # ms since the epoch, UTC: the time the payment happened
    card_id: str
    merchant_id: str
    amount: float
    currency: str  # ISO 4217, e.g. "EUR"
    country: str  # ISO 3166 alpha-2 of the merchant, e.g. "FR"
    channel: str  # e.g. "pos", "ecom"
    device_id: str | None  # the customer's device (online) or the terminal (in store)
    extra: Mapping[str, Scalar] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.extra,
            "event_id": self.event_id,
            "event_time": self.event_time,
            "card_id": self.card_id,
            "merchant_id": self.merchant_id,
            "amount": self.amount,
            "currency": self.currency,
            "country": self.country,
            "channel": self.channel,
            "device_id": self.device_id,
        }


KNOWN_FIELDS = frozenset(Transaction.__dataclass_fields__) - {"extra"}


def validate_transaction(d: Mapping[str, Any]) -> Transaction:
    """A mapping of fields to a :class:`Transaction`, or :class:`InvalidMessage` naming the field."""
    tx = _well_formed(d)
    return tx if tx is not None else _validate_field_by_field(d)


def _well_formed(d: Mapping[str, Any]) -> Transaction | None:
    """The common case in one pass (measured 5.0 µs against 7.1 µs field by field); None when in doubt."""
    get = d.get
    event_id, card_id, merchant_id = get("event_id"), get("card_id"), get("merchant_id")
    t, amount, channel = get("event_time"), get("amount"), get("channel")
    currency, country, device_id = get("currency"), get("country"), get("device_id")
    if (
        type(event_id) is str
        and 0 < len(event_id) <= 128
        and type(card_id) is str
        and 0 < len(card_id) <= 128
        and type(merchant_id) is str
        and 0 < len(merchant_id) <= 128
        and type(t) is int
        and MIN_TIME_MS <= t < MAX_TIME_MS
        and (type(amount) is float or type(amount) is int)
        and 0 <= amount <= MAX_AMOUNT
        and type(channel) is str
        and 0 < len(channel) <= 32
        and channel.islower()
        and type(currency) is str
        and len(currency) == 3
        and currency.isascii()
        and currency.isalpha()
        and currency.isupper()
        and type(country) is str
        and len(country) == 2
        and country.isascii()
        and country.isalpha()
        and country.isupper()
        and (device_id is None or (type(device_id) is str and 0 < len(device_id) <= 128))
    ):
        return Transaction(
            event_id,
            t,
            card_id,
            merchant_id,
            float(amount),
            currency,
            country,
            channel,
            device_id,
            extra_fields(d, KNOWN_FIELDS),
        )
    return None


def _validate_field_by_field(d: Mapping[str, Any]) -> Transaction:
    event_id = req_str(d, "event_id")
    event_time = req_time_ms(d, "event_time")
    card_id = req_str(d, "card_id")
    merchant_id = req_str(d, "merchant_id")
    amount = req_number(d, "amount")
    if amount < 0 or amount > MAX_AMOUNT:
        raise InvalidMessage(f"field amount: expected a number between 0 and {MAX_AMOUNT:g}, got {amount!r}")
    channel = req_str(d, "channel", 32)
    if not channel.islower():
        raise InvalidMessage(
            f"field channel: expected a lower-case name such as {', '.join(CHANNELS)}, got {channel!r}"
        )
    return Transaction(
        event_id=event_id,
        event_time=event_time,
        card_id=card_id,
        merchant_id=merchant_id,
        amount=amount,
        currency=req_code(d, "currency", 3),
        country=req_code(d, "country", 2),
        channel=channel,
        device_id=opt_str(d, "device_id"),
        extra=extra_fields(d, KNOWN_FIELDS),
    )


def encode_transaction(tx: Transaction) -> bytes:
    return encode_map(tx.to_dict())


def decode_transaction(data: bytes) -> Transaction:
    return validate_transaction(decode_map(data))
