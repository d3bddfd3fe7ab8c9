"""File-backed sources: CSV, JSON lines and Parquet into transactions and labels (no broker)."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stream_ml.events import Label, Transaction
from stream_ml.events.sources.files import detect_format, load, parse_time_ms

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
MAPPING = {"event_id": "txn", "card_id": "card", "amount": "amt", "event_time": "ts"}
DEFAULTS = {"currency": "EUR"}

CSV_ISO = """\
txn,card,amt,ts,merchant_id,country,channel,is_fraud,note
t3,c1,30.00,2023-11-14T22:13:50Z,m1,FR,pos,0,third
t1,c1,10.50,2023-11-14T22:13:20Z,m2,FR,ecom,1,first
t2,c2,20,2023-11-14T22:13:30.250+00:00,m1,DE,contactless,false,
tbad,c3,abc,2023-11-14T22:13:40Z,m1,FR,pos,0,bad
t4,c2,40.25,2023-11-15T00:13:20+02:00,m3,FR,pos,yes,fourth
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def csv_iso(tmp_path: Path) -> Path:
    return write(tmp_path / "payments.csv", CSV_ISO)


def test_csv_with_mapping_defaults_and_iso_times(csv_iso):
    out = load(csv_iso, mapping=MAPPING, defaults=DEFAULTS, label_column="is_fraud", label_delay_s=60)

    # Sorted by event time (the file is out of order); t4 is 00:13:20+02:00, the same instant as t1.
    assert [t.event_id for t in out.transactions] == ["t1", "t4", "t2", "t3"]
    assert [t.event_time for t in out.transactions] == [T0, T0, T0 + 10_250, T0 + 30_000]
    by_id = {t.event_id: t for t in out.transactions}
    assert by_id["t1"] == Transaction(
        event_id="t1",
        event_time=T0,
        card_id="c1",
        merchant_id="m2",
        amount=10.5,
        currency="EUR",
        country="FR",
        channel="ecom",
        device_id=None,
        extra={"note": "first"},
    )
    assert by_id["t2"].amount == 20.0 and type(by_id["t2"].amount) is float
    assert by_id["t2"].country == "DE" and by_id["t2"].channel == "contactless"
    # An empty cell is null, still an extra field.
    assert dict(by_id["t2"].extra) == {"note": None}

    # No label leakage, no mapped column twice: extras are only the unmapped, non-label columns.
    for tx in out.transactions:
        assert set(tx.extra) == {"note"}
        assert "is_fraud" not in tx.to_dict()

    # The invalid row (row 4 of the data) is reported, its neighbours are kept.
    assert out.rejected == [(4, "field amount: expected number, got 'abc'")]
    assert "tbad" not in by_id

    # One label per valid row, label_delay_s after the payment, in label-time order.
    assert out.labels == [
        Label("t1", True, T0 + 60_000, "file"),
        Label("t4", True, T0 + 60_000, "file"),
        Label("t2", False, T0 + 10_250 + 60_000, "file"),
        Label("t3", False, T0 + 30_000 + 60_000, "file"),
    ]


def test_in_log_order_merges_by_emission_time(csv_iso):
    out = load(csv_iso, mapping=MAPPING, defaults=DEFAULTS, label_column="is_fraud", label_delay_s=15)
    merged = list(out.in_log_order())
    assert len(merged) == len(out.transactions) + len(out.labels) == 8
    order = [(type(i).__name__, i.event_id) for i in merged]
    assert order == [
        ("Transaction", "t1"),
        ("Transaction", "t4"),
        ("Transaction", "t2"),
        ("Label", "t1"),
        ("Label", "t4"),
        ("Label", "t2"),
        ("Transaction", "t3"),
        ("Label", "t3"),
    ]
    times = [i.event_time if type(i) is Transaction else i.label_time for i in merged]
    assert times == sorted(times)
    assert times == [T0, T0, T0 + 10_250, T0 + 15_000, T0 + 15_000, T0 + 25_250, T0 + 30_000, T0 + 45_000]


def test_in_log_order_label_with_zero_delay_follows_its_transaction(csv_iso):
    out = load(csv_iso, mapping=MAPPING, defaults=DEFAULTS, label_column="is_fraud")
    merged = list(out.in_log_order())
    seen: set[str] = set()
    for item in merged:
        if type(item) is Transaction:
            seen.add(item.event_id)
        else:
            assert item.event_id in seen, f"label of {item.event_id} before its transaction"
    assert all(lb.label_time == T0 for lb in out.labels[:2])


def test_csv_without_label_column_yields_no_labels_and_keeps_flag_as_extra(csv_iso):
    out = load(csv_iso, mapping=MAPPING, defaults=DEFAULTS)
    assert out.labels == []
    assert len(out.transactions) == 4
    # Without --label-column the column is just another extra field (the caller chose so).
    assert {t.event_id: t.extra["is_fraud"] for t in out.transactions} == {
        "t1": "1",
        "t2": "false",
        "t3": "0",
        "t4": "yes",
    }


def test_csv_epoch_seconds_and_milliseconds(tmp_path):
    path = write(
        tmp_path / "epoch.csv",
        "txn,card,amt,ts,merchant_id,country,channel\n"
        "a,c1,1.5,1700000060,m1,US,pos\n"
        "b,c1,2.5,1700000000.5,m1,US,pos\n"
        "c,c1,3.5,1700000030000,m1,US,pos\n",
    )
    out = load(path, mapping=MAPPING, defaults={"currency": "USD"})
    assert out.rejected == []
    assert [(t.event_id, t.event_time) for t in out.transactions] == [
        ("b", T0 + 500),
        ("c", T0 + 30_000),
        ("a", T0 + 60_000),
    ]
    assert all(t.currency == "USD" for t in out.transactions)


def test_default_does_not_override_the_file(tmp_path):
    path = write(
        tmp_path / "cur.csv",
        "txn,card,amt,ts,merchant_id,country,channel,currency\n"
        "a,c1,1,1700000000,m1,US,pos,USD\n"
        "b,c1,1,1700000001,m1,FR,pos,\n",
    )
    out = load(path, mapping=MAPPING, defaults=DEFAULTS)
    assert [(t.event_id, t.currency) for t in out.transactions] == [("a", "USD"), ("b", "EUR")]
    assert all("currency" not in t.extra for t in out.transactions)


def test_event_id_defaults_to_file_stem_and_row(tmp_path):
    path = write(
        tmp_path / "noid.csv",
        "card_id,amount,event_time,merchant_id,country,channel,currency\n"
        "c1,5,2023-11-14T22:13:21Z,m1,FR,pos,EUR\n"
        "c1,6,2023-11-14T22:13:20Z,m1,FR,pos,EUR\n",
    )
    out = load(path)
    assert [(t.event_id, t.amount) for t in out.transactions] == [("noid-2", 6.0), ("noid-1", 5.0)]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        (
            "x,c1,1,not-a-time,m1,FR,pos",
            "field event_time: expected epoch seconds, epoch milliseconds or an ",
        ),
        ("x,,1,1700000000,m1,FR,pos", "field card_id: required, missing"),
        ("x,c1,-5,1700000000,m1,FR,pos", "field amount: expected a number between 0 and 1e+09, got -5.0"),
        ("x,c1,1,1700000000,m1,FRA,pos", "field country: expected 2 upper-case letters, got 'FRA'"),
    ],
    ids=["bad-time", "no-card", "negative", "country"],
)
def test_invalid_rows_are_reported_with_row_number(tmp_path, row, reason):
    good = "g,c1,1,1700000000,m1,FR,pos"
    path = write(
        tmp_path / "bad.csv",
        "\n".join(["txn,card,amt,ts,merchant_id,country,channel", good, row, good.replace("g,", "h,")])
        + "\n",
    )
    out = load(path, mapping=MAPPING, defaults=DEFAULTS)
    assert [t.event_id for t in out.transactions] == ["g", "h"]
    assert len(out.rejected) == 1
    n, text = out.rejected[0]
    assert n == 2
    assert text.startswith(reason), text


def test_bad_label_value_rejects_the_row(tmp_path):
    path = write(
        tmp_path / "lab.csv",
        "txn,card,amt,ts,merchant_id,country,channel,fraud\n"
        "a,c1,1,1700000000,m1,FR,pos,maybe\n"
        "b,c1,1,1700000000,m1,FR,pos,fraud\n",
    )
    out = load(path, mapping=MAPPING, defaults=DEFAULTS, label_column="fraud")
    assert out.rejected == [(1, "column fraud: expected a fraud flag (1/0, true/false), got 'maybe'")]
    assert [(lb.event_id, lb.is_fraud) for lb in out.labels] == [("b", True)]
    assert [t.event_id for t in out.transactions] == ["b"]


def test_empty_label_cell_publishes_the_payment_without_a_label(tmp_path):
    path = write(
        tmp_path / "lab.csv",
        "txn,card,amt,ts,merchant_id,country,channel,fraud\n"
        "a,c1,1,1700000000,m1,FR,pos,\n"
        "b,c1,1,1700000001,m1,FR,pos,0\n",
    )
    out = load(path, mapping=MAPPING, defaults=DEFAULTS, label_column="fraud")
    assert out.rejected == []
    assert [t.event_id for t in out.transactions] == ["a", "b"]
    assert [(lb.event_id, lb.is_fraud) for lb in out.labels] == [("b", False)]


def test_missing_mapped_column_rejects_rows(tmp_path):
    path = write(tmp_path / "m.csv", "txn,card,ts,merchant_id,country,channel\na,c1,1700000000,m1,FR,pos\n")
    out = load(path, mapping=MAPPING, defaults=DEFAULTS)
    assert out.transactions == []
    assert out.rejected == [(1, "column 'amt' (mapped to amount) is missing")]


def test_mapping_unknown_field_is_an_error(csv_iso):
    with pytest.raises(ValueError, match=r"--map names unknown fields \['amout'\]"):
        load(csv_iso, mapping={"amout": "amt"})


def test_jsonl(tmp_path):
    rows = [
        {"id": "j2", "card_id": "c9", "amount": 7, "event_time": T0 + 2_000, "mcc": 5411, "vip": True},
        {"id": "j1", "card_id": "c9", "amount": 3.25, "event_time": T0, "mcc": 5812, "vip": False},
        {"id": "j3", "card_id": "c9", "amount": "abc", "event_time": T0, "mcc": 1, "vip": False},
        {
            "id": "j4",
            "card_id": "c9",
            "amount": 1,
            "event_time": "2023-11-14T22:13:21Z",
            "mcc": 1,
            "vip": None,
        },
    ]
    common = {"merchant_id": "m1", "currency": "GBP", "country": "GB", "channel": "ecom", "label": 0}
    rows[0]["label"] = 1
    text = "\n".join(json.dumps({**common, **r}) for r in rows) + "\n\n"
    path = write(tmp_path / "events.jsonl", text)
    out = load(path, mapping={"event_id": "id"}, label_column="label", label_delay_s=1.5)
    assert [t.event_id for t in out.transactions] == ["j1", "j4", "j2"]
    assert out.transactions[0].amount == 3.25
    assert out.transactions[1].event_time == T0 + 1_000
    # Typed JSON values ride along with their types; the label does not.
    assert dict(out.transactions[2].extra) == {"mcc": 5411, "vip": True}
    assert dict(out.transactions[1].extra) == {"mcc": 1}  # a null value is dropped
    assert out.rejected == [(3, "field amount: expected number, got 'abc'")]
    assert [(lb.event_id, lb.is_fraud, lb.label_time) for lb in out.labels] == [
        ("j1", False, T0 + 1_500),
        ("j4", False, T0 + 2_500),
        ("j2", True, T0 + 3_500),
    ]


def test_jsonl_not_json_is_a_clear_error(tmp_path):
    path = write(tmp_path / "broken.ndjson", '{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.ndjson line 2: not JSON"):
        load(path)


def test_parquet(tmp_path):
    table = pa.table(
        {
            "txn": ["p2", "p1", "p3"],
            "card": ["c1", "c2", "c3"],
            "amt": [12.5, 7.0, 1.0],
            "ts": pa.array(
                [
                    datetime(2023, 11, 14, 22, 13, 21, tzinfo=UTC),
                    datetime(2023, 11, 14, 22, 13, 20, 250_000, tzinfo=UTC),
                    datetime(2023, 11, 14, 22, 13, 22, tzinfo=UTC),
                ],
                type=pa.timestamp("ms", tz="UTC"),
            ),
            "merchant_id": ["m1", "m1", "m2"],
            "country": ["FR", "FR", "ES"],
            "channel": ["pos", "atm", "pos"],
            "is_fraud": [True, False, None],
            "mcc": [5411, 6011, None],
        }
    )
    path = tmp_path / "events.parquet"
    pq.write_table(table, path)
    out = load(path, mapping=MAPPING, defaults=DEFAULTS, label_column="is_fraud", label_delay_s=10)
    assert [(t.event_id, t.event_time) for t in out.transactions] == [
        ("p1", T0 + 250),
        ("p2", T0 + 1_000),
        ("p3", T0 + 2_000),
    ]
    assert out.transactions[0].channel == "atm" and out.transactions[0].currency == "EUR"
    assert dict(out.transactions[0].extra) == {"mcc": 6011}
    assert [(lb.event_id, lb.is_fraud, lb.label_time) for lb in out.labels] == [
        ("p1", False, T0 + 10_250),
        ("p2", True, T0 + 11_000),
    ]
    # A null label is an unknown outcome: the payment is published, with no label guessed for it.
    assert out.rejected == []


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.csv", "csv"),
        ("a.TSV", "csv"),
        ("a.jsonl", "jsonl"),
        ("a.ndjson", "jsonl"),
        ("a.json", "jsonl"),
        ("a.parquet", "parquet"),
        ("a.pq", "parquet"),
    ],
)
def test_detect_format(name, fmt):
    assert detect_format(Path(name)) == fmt


@pytest.mark.parametrize("name", ["data.xlsx", "data", "data.csv.gz"])
def test_detect_format_unknown_extension(name):
    with pytest.raises(
        ValueError, match=re.escape(f"cannot tell the format of '{name}' from its extension; pass --format")
    ):
        detect_format(Path(name))


def test_load_unknown_extension_without_format(tmp_path):
    path = write(tmp_path / "data.txt", "a,b\n1,2\n")
    with pytest.raises(ValueError, match=re.escape("cannot tell the format of 'data.txt'")):
        load(path)
    # An explicit format overrides the extension.
    out = load(path, fmt="csv")
    assert out.transactions == [] and [n for n, _ in out.rejected] == [1]


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        ("1700000000", T0),
        ("1700000000000", T0),
        (1_700_000_000, T0),
        (1_700_000_000.25, T0 + 250),
        ("2023-11-14T22:13:20Z", T0),
        ("2023-11-14T22:13:20.123Z", T0 + 123),
        ("2023-11-14 22:13:20", T0),  # no zone: UTC
        ("2023-11-15T00:13:20+02:00", T0),
        (datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC), T0),
    ],
)
def test_parse_time_ms(value, ms):
    assert parse_time_ms(value, "event_time") == ms


# -- known bugs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", ["nan", "inf"])
def test_non_finite_time_cell_rejects_only_that_row(tmp_path, cell):
    path = write(
        tmp_path / "nan.csv",
        f"txn,card,amt,ts,merchant_id,country,channel\na,c1,1,1700000000,m1,FR,pos\nb,c1,1,{cell},m1,FR,pos\n",
    )
    out = load(path, mapping=MAPPING, defaults=DEFAULTS)
    assert [t.event_id for t in out.transactions] == ["a"]
    assert [n for n, _ in out.rejected] == [2]
