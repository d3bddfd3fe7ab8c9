"""The prediction record: what the scorer served, with the feature vector it saw.

Published to ``predictions`` keyed by event id; the feedback loop joins it with the label, so
learning uses the features *as served* (no leakage), and the consistency check replays them.

>>> p = Prediction("e1", 1_700_000_000_000, 0.91, "decline", "v3", "production", "fs1",
...                [1.0, 2.5], 1_700_000_000_020)
>>> decode_prediction(encode_prediction(p)) == p
True
>>> decode_stored_prediction(encode_prediction(p)) == p
True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stream_ml.events.codec import (
    InvalidMessage,
    decode_map,
    encode_map,
    req_bool,
    req_number,
    req_str,
    req_time_ms,
)

DECISIONS = ("approve", "review", "decline")
VARIANTS = ("production", "challenger", "shadow")


@dataclass(slots=True)
class Prediction:
    event_id: str
    event_time: int  # ms: the transaction's event time (the features' as-of time)
    score: float  # probability of fraud, 0..1
    decision: str  # one of DECISIONS
    model_version: str
    variant: str  # one of VARIANTS
    feature_set: str  # version of the feature definitions that produced `features`
    features: list[float]  # the model input as served, in the feature set's order; NaN = missing
    served_at: int  # ms: when the answer left the scorer
    degraded: bool = False  # True when served without the online store (request-only features)

    def to_dict(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "event_time": self.event_time,
            "score": self.score,
            "decision": self.decision,
            "model_version": self.model_version,
            "variant": self.variant,
            "feature_set": self.feature_set,
            "features": self.features,
            "served_at": self.served_at,
            "degraded": self.degraded,
        }


def validate_prediction(d: Mapping[str, Any]) -> Prediction:
    score = req_number(d, "score")
    if not 0.0 <= score <= 1.0:
        raise InvalidMessage(f"field score: expected a probability between 0 and 1, got {score!r}")
    decision = req_str(d, "decision", 16)
    if decision not in DECISIONS:
        raise InvalidMessage(f"field decision: expected one of {', '.join(DECISIONS)}, got {decision!r}")
    variant = req_str(d, "variant", 16)
    if variant not in VARIANTS:
        raise InvalidMessage(f"field variant: expected one of {', '.join(VARIANTS)}, got {variant!r}")
    features = d.get("features")
    if not isinstance(features, list) or not all(
        type(x) in (float, int) and type(x) is not bool for x in features
    ):
        raise InvalidMessage("field features: expected a list of numbers")
    return Prediction(
        event_id=req_str(d, "event_id"),
        event_time=req_time_ms(d, "event_time"),
        score=score,
        decision=decision,
        model_version=req_str(d, "model_version"),
        variant=variant,
        feature_set=req_str(d, "feature_set"),
        features=[float(x) for x in features],
        served_at=req_time_ms(d, "served_at"),
        degraded=req_bool(d, "degraded") if "degraded" in d else False,
    )


def encode_prediction(p: Prediction) -> bytes:
    return encode_map(p.to_dict())


def decode_prediction(data: bytes) -> Prediction:
    return validate_prediction(decode_map(data))


def decode_stored_prediction(data: bytes) -> Prediction:
    """:func:`decode_prediction` of bytes it has already accepted, without checking them again.

    For the copy the feedback join keeps in Redis: the record's bytes as published, validated when
    they were consumed. The result is the same as :func:`decode_prediction`'s (its normalisation
    is kept: a JSON record, integer numbers, whole-float times, a 0/1 ``degraded``), at less than
    half the cost. Bytes that do not decode this way (never the case for stored ones) go through
    :func:`decode_prediction`, so they fail with its reason.
    """
    try:
        d = decode_map(data)
        event_time, served_at = d["event_time"], d["served_at"]
        degraded = d.get("degraded", False)
        return Prediction(
            d["event_id"],
            event_time if type(event_time) is int else int(event_time),
            float(d["score"]),
            d["decision"],
            d["model_version"],
            d["variant"],
            d["feature_set"],
            list(map(float, d["features"])),
            served_at if type(served_at) is int else int(served_at),
            degraded if type(degraded) is bool else bool(degraded),
        )
    except (KeyError, TypeError, ValueError, OverflowError):  # InvalidMessage is a ValueError
        return decode_prediction(data)
