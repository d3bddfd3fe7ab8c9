"""Event contracts: the messages on the topics, their wire format and their validation."""

from stream_ml.events.codec import SCHEMA_VERSION, InvalidMessage
from stream_ml.events.label import Label, decode_label, encode_label, validate_label
from stream_ml.events.prediction import Prediction, decode_prediction, encode_prediction, validate_prediction
from stream_ml.events.transaction import (
    Transaction,
    decode_transaction,
    encode_transaction,
    validate_transaction,
)

__all__ = [
    "SCHEMA_VERSION",
    "InvalidMessage",
    "Label",
    "Prediction",
    "Transaction",
    "decode_label",
    "decode_prediction",
    "decode_transaction",
    "encode_label",
    "encode_prediction",
    "encode_transaction",
    "validate_label",
    "validate_prediction",
    "validate_transaction",
]
