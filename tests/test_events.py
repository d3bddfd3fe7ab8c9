"""Event contracts: wire format, validation reasons, split_valid and dead-letter headers (no broker)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

from stream_ml.events import (
    SCHEMA_VERSION,
    InvalidMessage,
    Label,
    Prediction,
    Transaction,
    decode_label,
    decode_prediction,
    decode_transaction,
    encode_label,
    encode_prediction,
    encode_transaction,
    validate_transaction,
)
from stream_ml.events.consume import split_valid
from stream_ml.events.deadletter import (
    HEADER_FAILED_AT,
    HEADER_OFFSET,
    HEADER_PARTITION,
    HEADER_REASON,
    HEADER_TOPIC,
    Rejected,
    reason_of,
)

T0 = 1_700_000_000_000

TX = Transaction(
    event_id="e1",
    event_time=T0,
    card_id="c1",
    merchant_id="m1",
    amount=12.5,
    currency="EUR",
    country="FR",
    channel="pos",
    device_id="d1",
    extra={"mcc": 5411, "note": "hello", "flag": True, "ratio": 0.25, "nothing": None},
)
LABEL = Label(event_id="e1", is_fraud=True, label_time=T0 + 300_000, source="chargeback")
PREDICTION = Prediction(
    event_id="e1",
    event_time=T0,
    score=0.91,
    decision="decline",
    model_version="v3",
    variant="production",
    feature_set="fs1",
    features=[1.0, 2.5, 0.0],
    served_at=T0 + 20,
    degraded=True,
)


def tx_fields(**changes: Any) -> dict[str, Any]:
    """A valid transaction as a dict, with ``changes`` applied (a value of ``...`` drops the field)."""
    d: dict[str, Any] = {
        "event_id": "e1",
        "event_time": T0,
        "card_id": "c1",
        "merchant_id": "m1",
        "amount": 12.5,
        "currency": "EUR",
        "country": "FR",
        "channel": "pos",
        "device_id": "d1",
    }
    for key, value in changes.items():
        if value is ...:
            d.pop(key, None)
        else:
            d[key] = value
    return d


def label_fields(**changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"event_id": "e1", "is_fraud": False, "label_time": T0, "source": "analyst"}
    d.update(changes)
    return d


def prediction_fields(**changes: Any) -> dict[str, Any]:
    d = PREDICTION.to_dict()
    d.update(changes)
    return d


def packb(d: Any) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


# -- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "encode", "decode"),
    [
        (TX, encode_transaction, decode_transaction),
        (LABEL, encode_label, decode_label),
        (PREDICTION, encode_prediction, decode_prediction),
    ],
    ids=["transaction", "label", "prediction"],
)
def test_round_trip_msgpack_and_json(event, encode, decode):
    data = encode(event)
    assert isinstance(data, bytes)
    back = decode(data)
    assert back == event
    assert type(back) is type(event)

    raw = msgpack.unpackb(data, raw=False)
    assert isinstance(raw, dict)
    assert raw["v"] == SCHEMA_VERSION == 1
    assert {k: v for k, v in raw.items() if k != "v"} == event.to_dict()

    # The same fields as JSON (accepted on input), with and without the version key.
    assert decode(json.dumps(raw).encode()) == event
    assert decode(json.dumps(event.to_dict()).encode()) == event
    # Leading whitespace still reads as JSON.
    assert decode(b"  \n" + json.dumps(event.to_dict()).encode()) == event


def test_transaction_extra_fields_survive_round_trip():
    back = decode_transaction(encode_transaction(TX))
    assert dict(back.extra) == {"mcc": 5411, "note": "hello", "flag": True, "ratio": 0.25, "nothing": None}
    assert back.extra["mcc"] == 5411 and type(back.extra["mcc"]) is int
    # Known fields never leak into extra; the version key is not an extra field.
    assert set(back.extra).isdisjoint({"event_id", "amount", "card_id", "v"})
    # to_dict carries the extras at the top level, so they survive a second trip too.
    assert decode_transaction(encode_transaction(back)) == TX


def test_transaction_extra_fields_from_json():
    tx = decode_transaction(json.dumps(tx_fields(mcc=5411, promo="spring")).encode())
    assert dict(tx.extra) == {"mcc": 5411, "promo": "spring"}


def test_a_message_shape_seen_before_still_has_its_extra_values_checked():
    """The extra field names are found once per shape of message; the values every time."""
    shape = tx_fields(mcc=5411, promo="spring")
    assert dict(decode_transaction(packb(shape)).extra) == {"mcc": 5411, "promo": "spring"}
    with pytest.raises(InvalidMessage, match="field promo: extra fields must be"):
        decode_transaction(packb({**shape, "promo": ["spring"]}))
    assert dict(decode_transaction(packb({**shape, "mcc": 1})).extra) == {"mcc": 1, "promo": "spring"}
    # the same names in another order are another shape: the extras keep the message's order
    flipped = {**tx_fields(), "promo": "spring", "mcc": 5411}
    assert list(decode_transaction(packb(flipped)).extra) == ["promo", "mcc"]


def test_transaction_decoded_values_and_types():
    tx = decode_transaction(packb(tx_fields(amount=12, device_id=None, event_time=float(T0))))
    assert tx.amount == 12.0 and type(tx.amount) is float
    assert tx.event_time == T0 and type(tx.event_time) is int
    assert tx.device_id is None
    assert tx.extra == {}
    # device_id may also be absent altogether.
    assert decode_transaction(packb(tx_fields(device_id=...))).device_id is None


def test_encoding_does_not_depend_on_previous_calls():
    # The encoder reuses a packer per thread: consecutive encodings must not leak into each other.
    first = encode_transaction(TX)
    encode_label(LABEL)
    assert encode_transaction(TX) == first
    assert decode_label(encode_label(LABEL)) == LABEL


def test_prediction_degraded_defaults_to_false():
    d = prediction_fields()
    del d["degraded"]
    p = decode_prediction(packb(d))
    assert p.degraded is False
    assert p.features == [1.0, 2.5, 0.0]


def test_prediction_features_may_hold_nan_for_missing():
    p = decode_prediction(packb(prediction_fields(features=[1, float("nan")])))
    assert p.features[0] == 1.0 and type(p.features[0]) is float
    assert math.isnan(p.features[1])


# -- invalid messages -----------------------------------------------------------------------------

TX_INVALID = [
    ("amount-string", packb(tx_fields(amount="abc")), "field amount: expected number, got 'abc'"),
    ("missing-card-id", packb(tx_fields(card_id=...)), "field card_id: required, missing"),
    ("null-card-id", packb(tx_fields(card_id=None)), "field card_id: required, missing"),
    (
        "empty-card-id",
        packb(tx_fields(card_id="")),
        "field card_id: expected a non-empty string of at most 128 characters, got ''",
    ),
    (
        "negative-amount",
        packb(tx_fields(amount=-1.0)),
        "field amount: expected a number between 0 and 1e+09, got -1.0",
    ),
    (
        "huge-amount",
        packb(tx_fields(amount=2e9)),
        "field amount: expected a number between 0 and 1e+09, got 2000000000.0",
    ),
    ("nan-amount", packb(tx_fields(amount=float("nan"))), "field amount: expected number, got nan"),
    ("inf-amount", packb(tx_fields(amount=float("inf"))), "field amount: expected number, got inf"),
    ("-inf-amount", packb(tx_fields(amount=float("-inf"))), "field amount: expected number, got -inf"),
    (
        "nan-amount-json",
        json.dumps(tx_fields(amount=float("nan"))).encode(),
        "field amount: expected number, got nan",
    ),
    ("bool-amount", packb(tx_fields(amount=True)), "field amount: expected number, got True"),
    ("bool-amount-false", packb(tx_fields(amount=False)), "field amount: expected number, got False"),
    (
        "currency-lower",
        packb(tx_fields(currency="eur")),
        "field currency: expected 3 upper-case letters, got 'eur'",
    ),
    (
        "currency-long",
        packb(tx_fields(currency="EURO")),
        "field currency: expected 3 upper-case letters, got 'EURO'",
    ),
    (
        "currency-digits",
        packb(tx_fields(currency="E1R")),
        "field currency: expected 3 upper-case letters, got 'E1R'",
    ),
    (
        "country-alpha3",
        packb(tx_fields(country="FRA")),
        "field country: expected 2 upper-case letters, got 'FRA'",
    ),
    (
        "channel-upper",
        packb(tx_fields(channel="POS")),
        "field channel: expected a lower-case name such as pos, contactless, ecom, atm, got 'POS'",
    ),
    (
        "event-time-seconds",
        packb(tx_fields(event_time=1_700_000_000)),
        "field event_time: 1700000000 is before 1973 in milliseconds; was it sent in seconds? "
        "expected milliseconds since the epoch",
    ),
    (
        "event-time-microseconds",
        packb(tx_fields(event_time=1_700_000_000_000_000)),
        "field event_time: 1700000000000000 is too far in the future; expected milliseconds since the epoch",
    ),
    (
        "event-time-string",
        packb(tx_fields(event_time="1700000000000")),
        "field event_time: expected integer milliseconds since the epoch, got '1700000000000'",
    ),
    (
        "event-time-fraction",
        packb(tx_fields(event_time=1_700_000_000_000.5)),
        "field event_time: expected integer milliseconds since the epoch, got 1700000000000.5",
    ),
    (
        "event-time-bool",
        packb(tx_fields(event_time=True)),
        "field event_time: expected integer milliseconds since the epoch, got True",
    ),
    (
        "schema-v2",
        packb({**tx_fields(), "v": 2}),
        "field v: schema version 2 is not supported (this build reads version 1)",
    ),
    (
        "schema-v2-json",
        json.dumps({**tx_fields(), "v": 2}).encode(),
        "field v: schema version 2 is not supported (this build reads version 1)",
    ),
    ("msgpack-list", packb([1, 2, 3]), "expected a map of fields, got list"),
    ("msgpack-int", packb(7), "expected a map of fields, got int"),
    # A JSON array is neither a msgpack map nor a JSON object: rejected (the exact reason is the codec's).
    ("json-array", json.dumps([1]).encode(), None),
    ("empty", b"", "empty message"),
    (
        "extra-list",
        packb(tx_fields(tags=["a", "b"])),
        "field tags: extra fields must be a string, number, boolean or null, got list",
    ),
    (
        "extra-dict",
        packb(tx_fields(meta={"a": 1})),
        "field meta: extra fields must be a string, number, boolean or null, got dict",
    ),
    (
        "extra-bytes",
        packb(tx_fields(blob=b"\x00\x01")),
        "field blob: extra fields must be a string, number, boolean or null, got bytes",
    ),
]


@pytest.mark.parametrize(("data", "reason"), [c[1:] for c in TX_INVALID], ids=[c[0] for c in TX_INVALID])
def test_invalid_transaction_reason(data, reason):
    with pytest.raises(InvalidMessage) as info:
        decode_transaction(data)
    if reason is not None:
        assert str(info.value) == reason
    assert isinstance(info.value, ValueError)  # InvalidMessage is a ValueError


@pytest.mark.parametrize(
    "data",
    [b"\xc1\xc1\xc1", b"not json, not msgpack", b"{not json", b"\x81\xa1a", b"\x81"],
    ids=["reserved-byte", "text", "broken-json", "truncated-map", "truncated-map-header"],
)
def test_bytes_neither_msgpack_nor_json(data):
    with pytest.raises(InvalidMessage, match=r"^not msgpack or JSON: "):
        decode_transaction(data)


def test_long_value_is_truncated_in_reason():
    with pytest.raises(InvalidMessage) as info:
        decode_transaction(packb(tx_fields(amount="x" * 500)))
    reason = str(info.value)
    assert reason.startswith("field amount: expected number, got 'xxxx")
    assert reason.endswith("...")
    assert len(reason) < 120


def test_validate_transaction_names_first_missing_field():
    with pytest.raises(InvalidMessage, match=r"^field event_time: required, missing$"):
        validate_transaction({"event_id": "e1", "amount": "abc"})


@pytest.mark.parametrize(
    ("is_fraud", "expected"),
    [(True, True), (False, False), (1, True), (0, False)],
)
def test_label_is_fraud_accepts_bools_and_0_1(is_fraud, expected):
    lb = decode_label(packb(label_fields(is_fraud=is_fraud)))
    assert lb.is_fraud is expected


@pytest.mark.parametrize(
    ("is_fraud", "got"),
    [("yes", "'yes'"), ("true", "'true'"), (2, "2"), (1.0, "1.0"), (-1, "-1")],
)
def test_label_is_fraud_rejects_other_values(is_fraud, got):
    with pytest.raises(InvalidMessage) as info:
        decode_label(packb(label_fields(is_fraud=is_fraud)))
    assert str(info.value) == f"field is_fraud: expected true/false (or 0/1), got {got}"


def test_label_missing_and_bad_fields():
    with pytest.raises(InvalidMessage, match=r"^field is_fraud: required, missing$"):
        decode_label(json.dumps({"event_id": "e1", "label_time": T0, "source": "x"}).encode())
    with pytest.raises(InvalidMessage, match=r"^field label_time: .*was it sent in seconds\?"):
        decode_label(packb(label_fields(label_time=1_700_000_000)))
    with pytest.raises(InvalidMessage, match=r"^field source: expected a non-empty string of at most 64"):
        decode_label(packb(label_fields(source="s" * 65)))


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"score": 1.5}, "field score: expected a probability between 0 and 1, got 1.5"),
        ({"score": -0.1}, "field score: expected a probability between 0 and 1, got -0.1"),
        ({"score": "0.5"}, "field score: expected number, got '0.5'"),
        ({"decision": "maybe"}, "field decision: expected one of approve, review, decline, got 'maybe'"),
        ({"variant": "other"}, "field variant: expected one of production, challenger, shadow, got 'other'"),
        ({"features": ["a"]}, "field features: expected a list of numbers"),
        ({"features": [1.0, True]}, "field features: expected a list of numbers"),
        ({"features": "1,2"}, "field features: expected a list of numbers"),
        ({"features": None}, "field features: expected a list of numbers"),
        ({"served_at": 1_700_000_000}, None),
        ({"degraded": "no"}, "field degraded: expected true/false (or 0/1), got 'no'"),
    ],
    ids=[
        "score-1.5",
        "score-negative",
        "score-string",
        "decision-maybe",
        "variant-other",
        "features-strings",
        "features-bool",
        "features-string",
        "features-null",
        "served-at-seconds",
        "degraded-string",
    ],
)
def test_invalid_prediction_reason(changes, reason):
    for data in (packb(prediction_fields(**changes)), json.dumps(prediction_fields(**changes)).encode()):
        with pytest.raises(InvalidMessage) as info:
            decode_prediction(data)
        if reason is None:
            assert str(info.value).startswith("field served_at: 1700000000 is before 1973 in milliseconds")
        else:
            assert str(info.value) == reason


def test_prediction_score_bounds_are_inclusive():
    assert decode_prediction(packb(prediction_fields(score=0))).score == 0.0
    assert decode_prediction(packb(prediction_fields(score=1))).score == 1.0


# -- split_valid and dead-letter headers -----------------------------------------------------------


@dataclass
class FakeRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Any = ()


def _records() -> list[FakeRecord]:
    values = [
        encode_transaction(TX),  # 0 valid
        packb(tx_fields(event_id="e2", amount="abc")),  # 1 invalid
        json.dumps(tx_fields(event_id="e3", amount=3)).encode(),  # 2 valid (JSON)
        None,  # 3 null value
        b"",  # 4 empty
        packb(tx_fields(event_id="e5", currency="eur")),  # 5 invalid
        encode_transaction(Transaction("e6", T0 + 6, "c6", "m6", 6.0, "USD", "US", "ecom", None)),  # 6 valid
    ]
    return [FakeRecord("transactions", 3, 100 + i, b"c", v) for i, v in enumerate(values)]


def test_split_valid_keeps_order_and_reasons():
    records = _records()
    valid, rejected = split_valid(records, decode_transaction)

    assert [r.offset for r, _ in valid] == [100, 102, 106]
    assert all(r is records[r.offset - 100] for r, _ in valid)
    events = [event for _, event in valid]
    assert events[0] == TX
    assert [e.event_id for e in events] == ["e1", "e3", "e6"]
    assert events[1].amount == 3.0
    assert all(isinstance(e, Transaction) for e in events)

    assert [r.record.offset for r in rejected] == [101, 103, 104, 105]
    assert all(r.record is records[r.record.offset - 100] for r in rejected)
    reasons = {r.record.offset: r.reason for r in rejected}
    assert reasons[101] == "field amount: expected number, got 'abc'"
    assert reasons[103] == "empty message (null value)"
    assert reasons[104] == "empty message"
    assert reasons[105] == "field currency: expected 3 upper-case letters, got 'eur'"


def test_split_valid_turns_decoder_crash_into_rejection():
    def buggy(data: bytes) -> Any:
        if data == b"boom":
            raise KeyError("oops")
        if data == b"zero":
            return 1 / 0
        return data.decode()

    records = [
        FakeRecord("t", 0, 1, None, b"ok"),
        FakeRecord("t", 0, 2, None, b"boom"),
        FakeRecord("t", 0, 3, None, b"zero"),
        FakeRecord("t", 0, 4, None, b"fine"),
    ]
    valid, rejected = split_valid(records, buggy)
    assert [(r.offset, e) for r, e in valid] == [(1, "ok"), (4, "fine")]
    assert [(r.record.offset, r.reason) for r in rejected] == [
        (2, "decoder error: KeyError: 'oops'"),
        (3, "decoder error: ZeroDivisionError: division by zero"),
    ]


def test_split_valid_empty_and_all_valid():
    assert split_valid([], decode_transaction) == ([], [])
    recs = [FakeRecord("labels", 1, i, b"e1", encode_label(LABEL)) for i in range(3)]
    valid, rejected = split_valid(recs, decode_label)
    assert rejected == []
    assert [e for _, e in valid] == [LABEL] * 3


def test_rejected_headers():
    record = FakeRecord(
        "transactions",
        7,
        12345,
        b"card-1",
        b"\x00bad",
        [("trace-id", b"abc"), ("x-error-reason", b"stale reason from an earlier hop")],
    )
    rej = Rejected(record, "field amount: expected number, got 'abc'")
    headers = rej.headers()
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers)
    as_dict = dict(headers)
    assert as_dict[HEADER_REASON] == b"field amount: expected number, got 'abc'"
    assert as_dict[HEADER_TOPIC] == b"transactions"
    assert as_dict[HEADER_PARTITION] == b"7"
    assert as_dict[HEADER_OFFSET] == b"12345"
    assert int(as_dict[HEADER_FAILED_AT]) > T0
    # The original headers are kept, an earlier hop's x- headers are replaced, not duplicated.
    assert ("trace-id", b"abc") in headers
    assert [k for k, _ in headers].count(HEADER_REASON) == 1
    assert reason_of(headers) == "field amount: expected number, got 'abc'"
    assert HEADER_REASON == "x-error-reason"
    assert HEADER_TOPIC == "x-source-topic"
    assert HEADER_PARTITION == "x-source-partition"
    assert HEADER_OFFSET == "x-source-offset"


def test_rejected_headers_without_original_headers_and_unicode_reason():
    rej = Rejected(FakeRecord("labels", 0, 0, None, None, None), "field source: got 'é'")
    as_dict = dict(rej.headers())
    assert as_dict[HEADER_REASON] == "field source: got 'é'".encode()
    assert as_dict[HEADER_PARTITION] == b"0"
    assert as_dict[HEADER_OFFSET] == b"0"
    assert reason_of(rej.headers()) == "field source: got 'é'"
    assert reason_of(None) is None


def test_split_valid_rejection_headers_end_to_end():
    _, rejected = split_valid(_records(), decode_transaction)
    first = dict(rejected[0].headers())
    assert first[HEADER_REASON] == b"field amount: expected number, got 'abc'"
    assert first[HEADER_OFFSET] == b"101"
    assert first[HEADER_PARTITION] == b"3"
    assert first[HEADER_TOPIC] == b"transactions"


# -- known bugs -------------------------------------------------------------------------------------


def test_huge_integer_amount_is_an_invalid_message():
    data = json.dumps(tx_fields(amount=10**400)).encode()
    with pytest.raises(InvalidMessage, match=r"^field amount: "):
        decode_transaction(data)
