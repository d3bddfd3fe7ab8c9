"""Transactions (and labels) from a CSV, JSON-lines or Parquet file, in event-time order.

Columns are mapped to the transaction's fields (``mapping``: field → column; a field with the same
name as a column needs no mapping), constants fill fields the file lacks (``defaults``), other
columns ride along as extra fields. A label column, when named, yields a label per row
``label_delay_s`` after the payment (an empty cell: no label, the outcome is unknown). Rows that
fail validation are reported, not published.
"""

from __future__ import annotations

import csv
import heapq
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stream_ml.events.codec import MIN_TIME_MS, InvalidMessage
from stream_ml.events.label import Label
from stream_ml.events.transaction import KNOWN_FIELDS, Transaction, validate_transaction

FORMATS = ("csv", "jsonl", "parquet")
_TRUE = frozenset({"1", "true", "yes", "y", "t", "fraud"})
_FALSE = frozenset({"0", "false", "no", "n", "f", "legit", "genuine"})


@dataclass(slots=True)
class FileLoad:
    transactions: list[Transaction] = field(default_factory=list)
    labels: list[Label] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)  # (row number, reason)

    def in_log_order(self) -> Iterator[Transaction | Label]:
        """Transactions at their event time and labels at their label time, merged."""
        return heapq.merge(self.transactions, self.labels, key=_emission_time)


def _emission_time(item: Transaction | Label) -> int:
    return item.event_time if isinstance(item, Transaction) else item.label_time


def detect_format(path: Path) -> str:
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("csv", "tsv"):
        return "csv"
    if suffix in ("jsonl", "ndjson", "json"):
        return "jsonl"
    if suffix in ("parquet", "pq"):
        return "parquet"
    raise ValueError(
        f"cannot tell the format of {path.name!r} from its extension; pass --format ({', '.join(FORMATS)})"
    )


def read_rows(path: Path, fmt: str) -> Iterator[dict[str, Any]]:
    if fmt == "csv":
        with open(path, newline="") as f:
            dialect = "excel-tab" if path.suffix.lower() == ".tsv" else "excel"
            yield from csv.DictReader(f, dialect=dialect)
    elif fmt == "jsonl":
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError as exc:
                        raise ValueError(f"{path.name} line {n}: not JSON ({exc})") from None
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=65_536):
            yield from batch.to_pylist()
    else:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def load(
    path: Path,
    *,
    fmt: str | None = None,
    mapping: Mapping[str, str] | None = None,
    defaults: Mapping[str, str] | None = None,
    label_column: str | None = None,
    label_delay_s: float = 0.0,
    label_source: str = "file",
) -> FileLoad:
    mapping = dict(mapping or {})
    unknown = set(mapping) - KNOWN_FIELDS
    if unknown:
        raise ValueError(f"--map names unknown fields {sorted(unknown)}; fields: {sorted(KNOWN_FIELDS)}")
    defaults = dict(defaults or {})
    mapped_columns = set(mapping.values()) | ({label_column} if label_column else set())
    out = FileLoad()
    delay_ms = int(label_delay_s * 1000)
    for n, row in enumerate(read_rows(path, fmt or detect_format(path)), 1):
        try:
            fields = _fields(row, mapping, defaults, mapped_columns)
            fields.setdefault("event_id", f"{path.stem}-{n}")
            tx = validate_transaction(fields)
            label = None
            if label_column:
                if label_column not in row:
                    raise InvalidMessage(f"label column {label_column!r} is missing")
                outcome = row[label_column]
                if outcome is not None and outcome != "":  # an empty cell: outcome unknown, no label
                    fraud = _as_bool(outcome, label_column)
                    label = Label(tx.event_id, fraud, tx.event_time + delay_ms, label_source)
        except InvalidMessage as exc:
            out.rejected.append((n, str(exc)))
            continue
        out.transactions.append(tx)
        if label is not None:
            out.labels.append(label)
    out.transactions.sort(key=lambda t: t.event_time)  # stable: ties keep file order
    out.labels.sort(key=lambda lb: lb.label_time)
    return out


def _fields(
    row: Mapping[str, Any], mapping: Mapping[str, str], defaults: Mapping[str, str], mapped_columns: set[str]
) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, column in row.items():
        if column is None or name in mapped_columns or name in mapping:
            continue
        fields[name] = None if column == "" else column
    for name, column in mapping.items():
        if column not in row:
            raise InvalidMessage(f"column {column!r} (mapped to {name}) is missing")
        fields[name] = None if row[column] == "" else row[column]
    for name, value in defaults.items():
        if fields.get(name) is None:
            fields[name] = value
    for name in ("amount",):
        fields[name] = _as_number(fields.get(name), name)
    fields["event_time"] = parse_time_ms(fields.get("event_time"), "event_time")
    return fields


def _as_number(value: Any, name: str) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise InvalidMessage(f"field {name}: expected number, got {value!r}") from None
    return value


def _as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    try:
        return float(text) != 0.0
    except ValueError:
        raise InvalidMessage(
            f"column {name}: expected a fraud flag (1/0, true/false), got {value!r}"
        ) from None


def parse_time_ms(value: Any, name: str) -> Any:
    """Milliseconds from epoch seconds, epoch milliseconds (told apart by size) or ISO 8601."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, datetime):
        return _datetime_ms(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                return _datetime_ms(datetime.fromisoformat(text.replace("Z", "+00:00")))
            except ValueError:
                raise InvalidMessage(
                    f"field {name}: expected epoch seconds, epoch milliseconds or an "
                    f"ISO 8601 time, got {value!r}"
                ) from None
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidMessage(f"field {name}: expected a time, got {value!r}")
    if isinstance(value, int | float):
        return int(value if value >= MIN_TIME_MS else value * 1000)
    return value


def _datetime_ms(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)  # a time without a zone is read as UTC
    return int(dt.timestamp() * 1000)
