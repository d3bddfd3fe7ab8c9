"""The scoring model: a small MLP over the normalised feature vector, on the GPU when there is one.

The default model is created deterministically from the feature set, so the service runs before
any training; trained models replace it through the registry: ``load_model`` rebuilds one from its
recorded architecture and checked weights, refusing one whose inputs are not the served features.
Two architectures are served: ``fraud-mlp`` (the trainer's) and ``online-logistic`` (the feedback
worker's river model, exported by :mod:`stream_ml.feedback.logistic`).

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
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from stream_ml import __version__
from stream_ml.features.definitions import FeatureSet
from stream_ml.registry import FeatureSetMismatch, ModelVersion, Registry, RegistryError

TOP_REASONS = 3
KIND = "fraud-mlp"
ONLINE_LOGISTIC = "online-logistic"


def model_input(vectors: list[list[float]] | list[Sequence[float]]) -> np.ndarray:
    """Served vectors as every model sees them: float32, a missing value (NaN) replaced by 0.

    The one definition of that rule: the scorer uses it, and so do the online learners, which
    must learn from exactly what is served (±inf become the float32 extremes, as in torch).
    """
    x = np.array(vectors, dtype=np.float32)
    if not np.isfinite(x).all():  # rare: nan_to_num's five passes cost ~15 µs even on a clean batch
        np.nan_to_num(x, copy=False, nan=0.0)
    return x


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


class OnlineLogisticModule(nn.Module):
    """river's StandardScaler + LogisticRegression as torch runs it: the same numbers, in float64.

    ``mean``/``var``/``count`` are the scaler's running statistics, ``linear`` the weights and
    intercept. An input whose variance is 0 is scaled to 0, as river does (not divided by 1), so
    ``scale`` is 1 there only to keep the reasons' arithmetic finite; the mask does the work.
    ``logit_offset`` is the learner's calibration correction (−log of its positive weight). The
    other buffers (``class_counts``, ``steps``) are never used to score: they are there so that
    the learner restores exactly from the same safetensors file.
    """

    def __init__(self, n_inputs: int) -> None:
        super().__init__()
        self.n_inputs = n_inputs
        f64 = torch.float64
        self.register_buffer("mean", torch.zeros(n_inputs, dtype=f64))
        self.register_buffer("var", torch.zeros(n_inputs, dtype=f64))
        self.register_buffer("count", torch.zeros(n_inputs, dtype=torch.int64))
        self.register_buffer("logit_offset", torch.zeros((), dtype=f64))
        self.register_buffer("class_counts", torch.zeros(2, dtype=torch.int64))  # negatives, positives
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))  # the optimizer's iterations
        self.linear = nn.Linear(n_inputs, 1, dtype=f64)

    @property
    def scale(self) -> torch.Tensor:
        return torch.where(self.var > 0, self.var.sqrt(), torch.ones_like(self.var))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.mean.dtype)
        z = torch.where(self.var > 0, (x - self.mean) / self.scale, torch.zeros_like(x))
        return self.linear(z).squeeze(-1) + self.logit_offset

    def architecture(self) -> dict:
        return {"kind": ONLINE_LOGISTIC, "n_inputs": self.n_inputs}


@dataclass
class ScoringModel:
    """A model ready to score: weights on their device, the names of its inputs, its version."""

    module: FraudMLP | OnlineLogisticModule
    names: list[str]
    version: str
    feature_set: str
    device: torch.device
    _mlp: _MLPGradient | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._mlp = _MLPGradient(self.module) if type(self.module) is FraudMLP else None

    def score(
        self, vectors: list[list[float]], inputs: np.ndarray | None = None
    ) -> tuple[list[float], list[list[tuple[str, float]]]]:
        """Fraud probabilities, and per row the inputs that push it up most (gradient × input).

        ``inputs``: the same vectors as an array, when the caller has one (saves converting the lists).
        """
        x = torch.from_numpy(model_input(vectors if inputs is None else inputs)).to(self.device)
        if self._mlp is not None:
            with torch.inference_mode():
                logits, grad, centred = self._mlp(x)
        else:
            x.requires_grad_(True)
            logits = self.module(x)
            (grad,) = torch.autograd.grad(logits.sum(), x)  # rows are independent: one pass for the batch
            centred = x.detach() - self.module.mean
        with torch.inference_mode():
            # Gradient × input in the model's normalised space: d logit/dz · z, with z = (x − mean) / scale
            # and d logit/dz = grad · scale, which is grad · (x − mean): the scale cancels.
            push = (grad * centred).cpu()
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
            x = torch.from_numpy(model_input(vectors)).to(self.device)
            return torch.sigmoid(self.module(x)).cpu().tolist()


class _MLPGradient:
    """``module(x)`` and d Σlogits / dx, by the very operations autograd would run, without its graph.

    The same kernels on the same operands in the same order (forward: ``nn.Linear``'s ``F.linear``,
    ``nn.ReLU``'s ``relu``; backward: ``mm`` by each weight, ReLU's ``threshold_backward``, the
    division by ``scale``), so the numbers are identical to ``torch.autograd.grad`` (tested bit for
    bit), at ~40 % of its cost on a small batch: the graph bookkeeping was most of it. The weights
    are held as plain tensors: each ``nn.Module`` attribute look-up costs ~6 µs here, and a torch
    call ~5–15 µs, so a batch of one is mostly such overheads.
    """

    def __init__(self, module: FraudMLP) -> None:
        first, second, last = module.net[0], module.net[2], module.net[4]
        self.mean, self.scale = module.mean, module.scale
        self.w1, self.b1 = first.weight.detach(), first.bias.detach()
        self.w2, self.b2 = second.weight.detach(), second.bias.detach()
        self.w3, self.b3 = last.weight.detach(), last.bias.detach()

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, gradient, x − mean): call under ``torch.no_grad()`` or ``torch.inference_mode()``."""
        centred = x - self.mean
        h1 = torch.relu(F.linear(centred / self.scale, self.w1, self.b1))
        h2 = torch.relu(F.linear(h1, self.w2, self.b2))
        logits = F.linear(h2, self.w3, self.b3).squeeze(-1)
        grad = self.w3.expand(x.shape[0], -1)  # d Σlogits / d h2: each row is the last weight
        grad = _relu_backward(grad, h2, 0.0).mm(self.w2)
        grad = _relu_backward(grad, h1, 0.0).mm(self.w1)
        return logits, grad / self.scale, centred


_relu_backward = torch.ops.aten.threshold_backward  # grad where the ReLU's output is above 0, else 0


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


def _build(mv: ModelVersion, n_inputs: int) -> FraudMLP | OnlineLogisticModule:
    arch = mv.meta.get("architecture") or {}
    kind = arch.get("kind")
    if kind == ONLINE_LOGISTIC:
        if arch.get("n_inputs") != n_inputs:
            raise FeatureSetMismatch(
                f"model {mv.version} takes {arch.get('n_inputs')} inputs, but the feature vector has "
                f"{n_inputs}: it cannot be served on this feature set"
            )
        return OnlineLogisticModule(n_inputs)
    if kind != KIND:
        raise RegistryError(
            f"model {mv.version} has architecture {kind!r}; this scorer serves {KIND!r} and "
            f"{ONLINE_LOGISTIC!r} models"
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


def production_model(
    registry: Registry, feature_set: FeatureSet, *, allow_feature_set_mismatch: bool = False
) -> ScoringModel:
    """What to serve at start: the registry's production version, or the default before any.

    A production version that cannot be loaded is an error, never a silent fall back to the
    default model.
    """
    production = registry.stage("production")
    if production is None:
        return default_model(feature_set)
    try:
        return load_model(
            registry, production, feature_set, allow_feature_set_mismatch=allow_feature_set_mismatch
        )
    except Exception as exc:
        raise RuntimeError(
            f"production points to {production}, which cannot be served: {exc} (roll back with "
            "`stream-ml models rollback --stage production`)"
        ) from None
