"""The model registry: immutable model versions and atomic stage pointers (see ``store``)."""

from stream_ml.registry.store import (
    STAGES,
    ChecksumMismatch,
    FeatureSetMismatch,
    ModelVersion,
    Registry,
    RegistryError,
)

__all__ = ["STAGES", "ChecksumMismatch", "FeatureSetMismatch", "ModelVersion", "Registry", "RegistryError"]
