"""Streaming features: definitions, window state, the online store and the feature worker."""

from stream_ml.features.definitions import Feature, FeatureSet, RequestFeature
from stream_ml.features.fraud import FRAUD_FEATURES

FEATURE_SETS: dict[str, FeatureSet] = {FRAUD_FEATURES.name: FRAUD_FEATURES}


def feature_set(name: str) -> FeatureSet:
    try:
        return FEATURE_SETS[name]
    except KeyError:
        raise LookupError(f"no feature set {name!r}; known: {', '.join(FEATURE_SETS)}") from None


__all__ = ["FEATURE_SETS", "Feature", "FeatureSet", "RequestFeature", "feature_set"]
