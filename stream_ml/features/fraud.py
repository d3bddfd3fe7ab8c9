"""The default fraud feature set: card, merchant and device behaviour, plus request-time features.

Declarations only: what the features are is here, how they are computed is in `state.py` and
`vector.py`, the same code for the stream worker, the scorer and replay.
"""

from __future__ import annotations

from stream_ml.features.definitions import Feature, FeatureSet, RequestFeature

MINUTE, HOUR, DAY = 60, 3600, 86400

FRAUD_FEATURES = FeatureSet(
    name="fraud",
    features=(
        # card: velocity, spend and spread
        Feature("card_tx_count_10m", "card", "count", 10 * MINUTE),
        Feature("card_tx_count_1h", "card", "count", HOUR),
        Feature("card_tx_count_24h", "card", "count", DAY),
        Feature("card_amount_sum_1h", "card", "sum", HOUR, "amount"),
        Feature("card_amount_sum_24h", "card", "sum", DAY, "amount"),
        Feature("card_amount_max_24h", "card", "max", DAY, "amount"),
        Feature("card_amount_mean_30d", "card", "mean", 30 * DAY, "amount"),
        Feature("card_tx_count_30d", "card", "count", 30 * DAY),
        Feature("card_merchants_24h", "card", "distinct", DAY, "merchant_id"),
        Feature("card_merchants_30d", "card", "distinct", 30 * DAY, "merchant_id"),
        Feature("card_devices_30d", "card", "distinct", 30 * DAY, "device_id"),
        Feature("card_countries_24h", "card", "distinct", DAY, "country"),
        Feature("card_countries_30d", "card", "distinct", 30 * DAY, "country"),
        Feature("card_since_last_s", "card", "since_last", 30 * DAY, default=30.0 * DAY),
        Feature("card_frauds_30d", "card", "sum", 30 * DAY, "is_fraud", source="labels"),
        # merchant: traffic, ticket size and confirmed fraud (by label arrival time)
        Feature("merchant_tx_count_1h", "merchant", "count", HOUR),
        Feature("merchant_tx_count_24h", "merchant", "count", DAY),
        Feature("merchant_amount_mean_7d", "merchant", "mean", 7 * DAY, "amount"),
        Feature("merchant_labels_7d", "merchant", "count", 7 * DAY, source="labels"),
        Feature("merchant_frauds_7d", "merchant", "sum", 7 * DAY, "is_fraud", source="labels"),
        Feature("merchant_fraud_rate_7d", "merchant", "mean", 7 * DAY, "is_fraud", source="labels"),
        # device (the customer's phone or the shop's terminal)
        Feature("device_tx_count_1h", "device", "count", HOUR),
        Feature("device_tx_count_24h", "device", "count", DAY),
        Feature("device_cards_24h", "device", "distinct", DAY, "card_id"),
        Feature("device_since_last_s", "device", "since_last", 30 * DAY, default=30.0 * DAY),
    ),
    request_features=(
        RequestFeature("amount", "amount"),
        RequestFeature("log_amount", "log_amount"),
        RequestFeature("amount_to_card_mean_30d", "amount_to_mean", arg="card_amount_mean_30d"),
        RequestFeature("hour_of_day", "hour_of_day"),
        RequestFeature("is_weekend", "is_weekend"),
        RequestFeature("channel_ecom", "channel_is", arg="ecom"),
        RequestFeature("channel_atm", "channel_is", arg="atm"),
        RequestFeature("channel_contactless", "channel_is", arg="contactless"),
        RequestFeature("merchant_new_for_card", "is_new", arg="card_merchants_30d", field="merchant_id"),
        RequestFeature("device_new_for_card", "is_new", arg="card_devices_30d", field="device_id"),
        RequestFeature("country_new_for_card", "is_new", arg="card_countries_30d", field="country"),
    ),
)
