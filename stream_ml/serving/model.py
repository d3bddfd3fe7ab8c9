"""The scoring model: a small MLP over the normalised feature vector, on the GPU when there is one.

The default model is created deterministically from the feature set, so the service runs before
any training; trained models replace it through the registry: ``load_model`` rebuilds one from its
recorded architecture and checked weights, refusing one whose inputs are not the served features.

>>> import tempfile
>>> from pathlib import Path
>>> from stream_ml.features import FRAUD_FEATURES
>>> from stream_ml.registry import Registry
>>> model = default_model(FRAUD_FEATURES)
>>> scores, reasons = model.score([[1.0] * len(FRAUD_FEATURES.names)])
>>> 0.0 < scores[0] < 1.0, len(reasons[0]) <= 3
(True, True)
>>> registry = Registry(Path(tempfile.mkdtemp()))
>>> mv = register_default_model(registry, FRAUD_FEATURES)
>>> loaded = load_model(registry, mv.version, FRAUD_FEATURES)
>>> loaded.version == mv.version, loaded.score([[1.0] * len(FRAUD_FEATURES.names)])[0] == scores
(True, True)
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass

import torch
from torch import nn

from stream_ml import __version__
from stream_ml.features.definitions import FeatureSet
from stream_ml.registry import FeatureSetMismatch, ModelVersion, Registry, RegistryError

TOP_REASONS = 3
KIND = "fraud-mlp"


class FraudMLP(nn.Module):
    def __init__(self, n_inputs: int, hidden: tuple[int, int] = (128, 64)) -> None:
        super().__init__()
        self.n_inputs, self.hidden = n_inputs, tuple(hidden)
        self.register_buffer("mean", torch.zeros(n_inputs))
        self.register_buffer("scale", torch.ones(n_inputs))
        self.net = nn.Sequential(
            nn.Linear(n_inputs, hidden[0]),
            nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(),
            nn.Linear(hidden[1], 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.scale).squeeze(-1)

    def architecture(self) -> dict:
        """What the registry records so that ``load_model`` can rebuild this module."""
        return {"kind": KIND, "n_inputs": self.n_inputs, "hidden": list(self.hidden)}


@dataclass
class ScoringModel:
    """A model ready to score: weights on their device, the names of its inputs, its version."""

    module: FraudMLP
    names: list[str]
    version: str
    feature_set: str
    device: torch.device

    def score(self, vectors: list[list[float]]) -> tuple[list[float], list[list[tuple[str, float]]]]:
        """Fraud probabilities, and per row the inputs that push it up most (gradient × input)."""
        x = torch.tensor(vectors, dtype=torch.float32, device=self.device).nan_to_num_(0.0)
        x.requires_grad_(True)
        logits = self.module(x)
        (grad,) = torch.autograd.grad(logits.sum(), x)  # rows are independent: one pass for the batch
        with torch.no_grad():
            push = (grad * (x - self.module.mean) / self.module.scale).cpu()
            scores = torch.sigmoid(logits).cpu().tolist()
            top = torch.topk(push, k=min(TOP_REASONS, push.shape[1]), dim=1)
        reasons = [
            [(self.names[j], vectors[i][j]) for j, v in zip(idx, val, strict=True) if v > 0]
            for i, (idx, val) in enumerate(zip(top.indices.tolist(), top.values.tolist(), strict=True))
        ]
        return scores, reasons

    def probabilities(self, vectors: list[list[float]]) -> list[float]:
        """Fraud probabilities only, no gradient pass: the shadow model's reasons are never read."""
        with torch.no_grad():
            x = torch.tensor(vectors, dtype=torch.float32, device=self.device).nan_to_num_(0.0)
            return torch.sigmoid(self.module(x)).cpu().tolist()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_model(feature_set: FeatureSet, seed: int = 0) -> ScoringModel:
    """A deterministic untrained model: same weights for the same feature set and seed."""
    generator = torch.Generator().manual_seed(seed)
    names = feature_set.names
    module = FraudMLP(len(names))
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (1.0 / math.sqrt(max(p.shape[-1], 1))))
        # Counts and amounts span orders of magnitude: a rough scale keeps the inputs near 1.
        module.scale.copy_(torch.tensor([_rough_scale(n) for n in names]))
        module.net[-1].bias.fill_(-3.0)  # most payments are fine: an untrained model should say so
    module.eval()
    dev = device()
    return ScoringModel(
        module.to(dev), names, f"default-{feature_set.version}-{seed}", feature_set.version, dev
    )


def _rough_scale(name: str) -> float:
    if "amount" in name and "to_" not in name:
        return 100.0
    if name.endswith("_s"):
        return 86_400.0
    if "count" in name:
        return 10.0
    return 1.0


def load_model(
    registry: Registry, version: str, feature_set: FeatureSet, *, allow_feature_set_mismatch: bool = False
) -> ScoringModel:
    """A registered version, ready to serve ``feature_set``'s vectors (checksums checked on load).

    FeatureSetMismatch when the model was trained on other inputs (unless overridden); a model whose
    input width differs from the vector is refused even then: it could not score a single row.
    """
    mv = registry.get(version)
    names = feature_set.names
    if not allow_feature_set_mismatch and (
        mv.meta["feature_set"] != feature_set.version or mv.meta["feature_names"] != names
    ):
        raise FeatureSetMismatch(
            f"model {version} was trained on feature set {mv.meta['feature_set']} "
            f"({len(mv.meta['feature_names'])} inputs), the scorer serves {feature_set.version} "
            f"({len(names)} inputs): promote a model trained on {feature_set.version}, or serve with "
            "--allow-feature-set-mismatch if the inputs are known to be the same"
        )
    module = _build(mv, len(names))
    module.load_state_dict(registry.load_weights(version), strict=True)
    module.eval()
    dev = device()
    return ScoringModel(module.to(dev), names, version, feature_set.version, dev)


def _build(mv: ModelVersion, n_inputs: int) -> FraudMLP:
    arch = mv.meta.get("architecture") or {}
    if arch.get("kind") != KIND:
        raise RegistryError(
            f"model {mv.version} has architecture {arch.get('kind')!r}; this scorer serves {KIND!r} models"
        )
    hidden = arch.get("hidden", [])
    if arch.get("n_inputs") != n_inputs or len(hidden) != 2:
        raise FeatureSetMismatch(
            f"model {mv.version} takes {arch.get('n_inputs')} inputs through layers {hidden}, but the "
            f"feature vector has {n_inputs}: it cannot be served on this feature set"
        )
    return FraudMLP(n_inputs, (int(hidden[0]), int(hidden[1])))


def register_default_model(registry: Registry, feature_set: FeatureSet, seed: int = 0) -> ModelVersion:
    """Register the untrained default model like a trained one (idempotent for the same weights)."""
    module = default_model(feature_set, seed).module
    weights = {k: v.cpu() for k, v in module.state_dict().items()}
    params = {"untrained": True, "seed": seed}
    for mv in registry.versions():
        if mv.meta["feature_set"] == feature_set.version and mv.meta["params"] == params:
            stored = registry.load_weights(mv.version)
            if stored.keys() == weights.keys() and all(torch.equal(stored[k], v) for k, v in weights.items()):
                return mv
    return registry.register(
        weights,
        feature_set=feature_set.version,
        feature_names=feature_set.names,
        architecture=module.architecture(),
        metrics={},
        params=params,
        data_version={},
        code_version=__version__,
        environment={"python": platform.python_version(), "torch": torch.__version__},
        reference={},
    )
