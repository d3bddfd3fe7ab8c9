"""The online logistic model in the model registry: a snapshot the scorer serves, a checkpoint to resume.

A snapshot is an ordinary immutable model version (architecture ``online-logistic``, safetensors
weights) with ``params["online"]`` true and the feedback worker's consumer ``group``: the scorer's
``load_model`` serves it like a trained model, and a restarted worker of the same group resumes
learning from the newest one. Registering it serves nothing: pointing ``shadow`` or
``challenger`` at it (``stream-ml registry promote``) is a person's decision. The metrics recorded
are its rolling progressive ones. No reference distributions are stored (``reference`` is empty):
drift is measured against the trained production model's. The forest is not saved (see
:mod:`stream_ml.feedback.forest`).

>>> import tempfile
>>> from pathlib import Path
>>> from stream_ml.features import FRAUD_FEATURES
>>> from stream_ml.feedback.online import Example, OnlineLearner
>>> from stream_ml.registry import Registry
>>> registry = Registry(Path(tempfile.mkdtemp()))
>>> learner = OnlineLearner(FRAUD_FEATURES.names)
>>> learner.learn_many([Example([1.0] * 36, i % 50 == 0, i) for i in range(500)])
>>> mv = save(learner, registry, FRAUD_FEATURES, group="feedback", about={"source": "doctest"})
>>> mv.meta["architecture"]["kind"], mv.meta["params"]["online"], mv.meta["params"]["examples"]
('online-logistic', True, 500)
>>> restore(registry, FRAUD_FEATURES, group="feedback").examples
500
>>> restore(registry, FRAUD_FEATURES, group="another") is None
True
"""

from __future__ import annotations

import contextlib
import logging
import math
import platform

import river
import torch

from stream_ml import __version__
from stream_ml.features.definitions import FeatureSet
from stream_ml.feedback.logistic import OnlineLogistic
from stream_ml.feedback.online import LOGISTIC, OnlineLearner
from stream_ml.registry import ChecksumMismatch, ModelVersion, Registry
from stream_ml.serving.model import ONLINE_LOGISTIC

log = logging.getLogger(__name__)


def save(
    learner: OnlineLearner, registry: Registry, feature_set: FeatureSet, *, group: str, about: dict
) -> ModelVersion:
    """Register the learner's online logistic model; ``about`` (the data it learnt) is its data version.

    Idempotent: when the group's newest snapshot has the same weights, that version is returned.
    """
    model = learner.logistic
    if model.names != feature_set.names:
        raise ValueError(
            f"the online model's inputs are not those of feature set {feature_set.version}: "
            "it cannot be registered for it"
        )
    weights, architecture = model.to_tensors()
    newest = _snapshots(registry, feature_set, group)
    if newest:
        with contextlib.suppress(ChecksumMismatch):  # a corrupt one is no duplicate: register anew
            stored = registry.load_weights(newest[0].version)
            if stored.keys() == weights.keys() and all(torch.equal(stored[k], v) for k, v in weights.items()):
                return newest[0]
    params = {
        "online": True,
        "group": group,
        "examples": model.examples,
        "positives": model.positives,
        "negatives": model.negatives,
        "positive_weight": model.positive_weight(),
        "optimizer": "sgd",
        "lr": model.lr,
        "intercept_lr": model.intercept_lr,
        "l2": model.l2,
        "window": learner.window,
    }
    rolling = learner.metrics()[LOGISTIC]
    metrics = {"progressive": {k: None if _nan(v) else v for k, v in rolling.items()}}
    return registry.register(
        weights,
        feature_set=feature_set.version,
        feature_names=feature_set.names,
        architecture=architecture,
        metrics=metrics,
        params=params,
        data_version=about,
        code_version=__version__,
        environment={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "river": river.__version__,
        },
        reference={},
    )


def restore(registry: Registry, feature_set: FeatureSet, *, group: str) -> OnlineLogistic | None:
    """The newest online snapshot of ``group`` on ``feature_set``, ready to learn on; None if none.

    A snapshot whose files fail their checksum is skipped (logged) for the one before it.
    """
    for mv in _snapshots(registry, feature_set, group):
        try:
            weights = registry.load_weights(mv.version)
        except ChecksumMismatch as exc:
            log.warning("online snapshot %s skipped: %s", mv.version, exc)
            continue
        return OnlineLogistic.from_tensors(weights, mv.meta["architecture"], feature_set.names)
    return None


def _snapshots(registry: Registry, feature_set: FeatureSet, group: str) -> list[ModelVersion]:
    """The group's snapshots on this feature set, newest first (then most examples first)."""
    found = [
        mv
        for mv in registry.versions()
        if (mv.meta.get("params") or {}).get("online") is True
        and mv.meta["params"].get("group") == group
        and (mv.meta.get("architecture") or {}).get("kind") == ONLINE_LOGISTIC
        and mv.meta["feature_set"] == feature_set.version
        and mv.meta["feature_names"] == feature_set.names
    ]
    return sorted(
        found, key=lambda mv: (mv.meta["created_at"], mv.meta["params"].get("examples", 0)), reverse=True
    )


def _nan(v: object) -> bool:
    return isinstance(v, float) and math.isnan(v)
