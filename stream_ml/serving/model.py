"""The scoring model: a small MLP over the normalised feature vector, on the GPU when there is one.

The default model is created deterministically from the feature set, so the service runs before
any training; trained models replace it through the registry (issue 6).

>>> from stream_ml.features import FRAUD_FEATURES
>>> model = default_model(FRAUD_FEATURES)
>>> scores, reasons = model.score([[1.0] * len(FRAUD_FEATURES.names)])
>>> 0.0 < scores[0] < 1.0, len(reasons[0]) <= 3
(True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from stream_ml.features.definitions import FeatureSet

TOP_REASONS = 3


class FraudMLP(nn.Module):
    def __init__(self, n_inputs: int, hidden: tuple[int, int] = (128, 64)) -> None:
        super().__init__()
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
