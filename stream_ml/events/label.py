"""The label event: the truth about a transaction, published to ``labels`` keyed by event id.

Labels arrive late (chargebacks take days); ``label_time`` is when the label became known, and
point-in-time training counts a label only once its ``label_time`` has passed.

>>> lb = Label("e1", True, 1_700_000_000_000, "chargeback")
>>> decode_label(encode_label(lb)) == lb
True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stream_ml.events.codec import (
    MAX_TIME_MS,
    MIN_TIME_MS,
    decode_map,
    encode_map,
    req_bool,
    req_str,
    req_time_ms,
)


@dataclass(slots=True)
class Label:
    event_id: str
    is_fraud: bool
    label_time: int  # ms since the epoch, UTC: when the label became known
    source: str  # e.g. "chargeback", "analyst", "no-dispute"

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "is_fraud": self.is_fraud,
            "label_time": self.label_time,
            "source": self.source,
        }


def validate_label(d: Mapping[str, Any]) -> Label:
    """A mapping of fields to a :class:`Label`, or :class:`InvalidMessage` naming the field."""
    get = d.get
    event_id, is_fraud, t, source = get("event_id"), get("is_fraud"), get("label_time"), get("source")
    if (  # the common case in one pass; the field-by-field checks below name the field at fault
        type(event_id) is str
        and 0 < len(event_id) <= 128
        and type(is_fraud) is bool
        and type(t) is int
        and MIN_TIME_MS <= t < MAX_TIME_MS
        and type(source) is str
        and 0 < len(source) <= 64
    ):
        return Label(event_id, is_fraud, t, source)
    return Label(
        event_id=req_str(d, "event_id"),
        is_fraud=req_bool(d, "is_fraud"),
        label_time=req_time_ms(d, "label_time"),
        source=req_str(d, "source", 64),
    )


def encode_label(label: Label) -> bytes:
    return encode_map(label.to_dict())


def decode_label(data: bytes) -> Label:
    return validate_label(decode_map(data))
