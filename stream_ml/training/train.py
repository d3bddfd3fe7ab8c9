"""Train the scoring model (FraudMLP) on a replayed dataset, evaluate it against baselines, register it.

The split is by time, not at random: the last ``val_fraction`` of the labelled rows (by event
time) is the validation period, because the model is used on payments that come after the ones it
learnt from, and a random split would leak a card's later behaviour into training.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> n = 4000
>>> x = rng.normal(size=n).astype(np.float32)
>>> label = (x + rng.normal(scale=0.5, size=n) > 2.3).astype(np.int8)
>>> columns = {"event_id": [str(i) for i in range(n)], "event_time": np.arange(n) * 60_000,
...            "card_id": ["c"] * n, "label": label, "label_time": np.arange(n) * 60_000 + 1, "x": x}
>>> manifest = {"feature_set": "demo-1", "feature_names": ["x"], "label_cutoff_ms": n * 60_000,
...             "sources": {}, "data_version": "d1"}
>>> result = train((columns, manifest), TrainOptions(epochs=3, hidden=(8, 4), progress=False))
>>> result.metrics["model"]["roc_auc"] > 0.9
True
"""

from __future__ import annotations

import copy
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from stream_ml import __version__
from stream_ml.serving.model import FraudMLP
from stream_ml.training import metrics as m
from stream_ml.training.dataset import read_dataset
from stream_ml.training.options import TrainOptions
from stream_ml.training.reference import reference

# Normalisation statistics come from at most this many training rows: percentiles of all rows of a
# large replay cost seconds and say nothing more.
STATS_ROWS = 1_000_000
EVAL_BATCH = 65_536


@dataclass
class TrainResult:
    """A trained model and everything the registry records about it."""

    model: FraudMLP  # on the CPU, in eval mode
    feature_set: str
    feature_names: list[str]
    architecture: dict[str, Any]
    metrics: dict[str, Any]
    params: dict[str, Any]
    data_version: dict[str, Any]
    code_version: str
    environment: dict[str, Any]
    reference: dict[str, Any]
    history: list[dict[str, Any]]
    version: str | None = None  # set by register()
    path: Path | None = None

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone().contiguous() for k, v in self.model.state_dict().items()}

    def register(self, root: Path) -> str:
        """Add the model to the registry at ``root``; returns its version."""
        from stream_ml.registry import Registry  # here: training from Python needs no registry

        metrics = {**self.metrics, "history": self.history}
        mv = Registry(Path(root)).register(
            self.weights,
            feature_set=self.feature_set,
            feature_names=self.feature_names,
            architecture=self.architecture,
            metrics=metrics,
            params=self.params,
            data_version=self.data_version,
            code_version=self.code_version,
            environment=self.environment,
            reference=self.reference,
        )
        self.version, self.path = mv.version, Path(mv.path)
        return mv.version

    def summary(self) -> str:
        """What a person wants to read after training: data, split, metrics against the baselines."""
        s, d = self.metrics["split"], self.data_version
        labelled = s["train_rows"] + s["validation_rows"]
        positives = s["train_positives"] + s["validation_positives"]
        k = self.params["top_k"]
        lines = [
            f"data       {d.get('path') or '(in memory)'}: data version {d.get('data_version')}, "
            f"feature set {self.feature_set}",
            f"rows       {labelled:,} labelled ({positives:,} fraud, {_pct(positives, labelled)}), "
            f"{s['unlabelled_dropped']:,} without a label dropped",
            f"split      train {s['train_rows']:,} ({s['train_positives']:,} fraud) | validation "
            f"{s['validation_rows']:,} ({s['validation_positives']:,} fraud) "
            f"from {_iso(s['validation_from_ms'])}",
            f"training   {self.environment['device']}, {self.metrics['epochs_run']} epochs "
            f"(best {self.metrics['best_epoch']}), {self.metrics['train_seconds']:.1f} s, "
            f"pos weight {self.params['pos_weight_used']:.1f}",
            "",
        ]
        baselines = self.metrics["baselines"]
        lines.append(f"{'validation':<30}{'model':>9}" + "".join(f"{b:>9}" for b in baselines))
        for key, label in (
            ("roc_auc", "ROC AUC"),
            ("pr_auc", "PR AUC"),
            ("recall_at_1pct_fpr", "recall at 1 % FPR"),
            ("precision_at_top_k_per_day", f"precision in top {k} a day"),
        ):
            row = [self.metrics["model"][key], *(b[key] for b in baselines.values())]
            lines.append(f"  {label:<28}" + "".join(f"{_fmt(v):>9}" for v in row))
        return "\n".join(lines)


def train(
    data: Path | str | tuple[Mapping[str, np.ndarray], Mapping[str, Any]],
    options: TrainOptions | None = None,
) -> TrainResult:
    """Train a FraudMLP on a dataset folder, or on ``(columns, manifest)`` as read_dataset returns them."""
    options = options or TrainOptions()
    options.validate()
    log = options.log or (lambda _line: None)
    if isinstance(data, tuple):
        columns, manifest, path = data[0], dict(data[1]), None
    else:
        path = Path(data)
        columns, manifest = read_dataset(path, columns=["event_time", "label"])
    names = list(manifest["feature_names"])
    split = _split(columns, options.val_fraction)
    x_train, y_train = _features(columns, names, split.train), np.asarray(columns["label"])[split.train]
    x_val_raw, y_val = _features(columns, names, split.val, raw=True), np.asarray(columns["label"])[split.val]
    x_val = np.nan_to_num(x_val_raw, nan=0.0)
    t_val = np.asarray(columns["event_time"])[split.val]
    n_pos = int(y_train.sum())
    pos_weight = options.pos_weight or math.sqrt((len(y_train) - n_pos) / n_pos)

    dev = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(options.seed)
        model = FraudMLP(len(names), hidden=tuple(options.hidden))
    mean, scale = normalisation(x_train)
    with torch.no_grad():
        model.mean.copy_(torch.from_numpy(mean))
        model.scale.copy_(torch.from_numpy(scale))
        # Start at the weighted base rate instead of 50 %: the first epochs then learn the ranking,
        # not the prior.
        prior = n_pos / len(y_train)
        model.net[-1].bias.fill_(math.log(prior / (1 - prior)) + math.log(pos_weight))
    model.to(dev)

    started, threads = time.perf_counter(), torch.get_num_threads()
    try:
        torch.set_num_threads(options.threads)
        history = _fit(model, x_train, y_train, x_val, y_val, options, pos_weight, dev, log)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - started
    with torch.no_grad():
        # Weighting frauds by w adds log(w) to the optimal logit; removing it makes the score a
        # probability again, which is what the scorer's review/decline thresholds expect.
        model.net[-1].bias.sub_(math.log(pos_weight))
    model.eval()
    scores = _scores(model, x_val, dev)
    model.cpu()

    best = max(history, key=lambda h: h["val_pr_auc"])
    amount = names.index("amount") if "amount" in names else None
    baselines = {"prior": np.full(len(y_val), prior)}
    if amount is not None:  # a rule a person would try first: bigger payments are riskier
        baselines["amount"] = x_val[:, amount].astype(np.float64)
    metrics = {
        "model": evaluate(y_val, scores, t_val, options.top_k),
        "baselines": {b: evaluate(y_val, s, t_val, options.top_k) for b, s in reversed(baselines.items())},
        "top_k": options.top_k,
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "train_seconds": round(seconds, 3),
        "split": split.describe(columns, names),
    }
    params = {k: v for k, v in asdict(options).items() if k != "log"}
    params |= {"hidden": list(options.hidden), "pos_weight_used": pos_weight, "loss": "bce-with-logits"}
    params |= {"optimizer": "adamw", "normalisation": "mean and std of the 0.5-99.5 % winsorised column"}
    return TrainResult(
        model=model,
        feature_set=str(manifest["feature_set"]),
        feature_names=names,
        architecture=model.architecture(),  # the scorer's load_model rebuilds the module from it
        metrics=_jsonable(metrics),
        params=params,
        data_version=_data_version(manifest, path),
        code_version=code_version(),
        environment=environment(dev),
        reference=reference(
            x_val_raw,
            names,
            scores,
            split="validation",
            from_ms=int(t_val.min()),
            to_ms=int(t_val.max()),
            why="the most recent labelled period, and out-of-sample scores (training scores are overfit)",
        ),
        history=history,
    )


def evaluate(y: np.ndarray, scores: np.ndarray, event_time_ms: np.ndarray, top_k: int) -> dict[str, float]:
    """The validation metrics of one set of scores."""
    return {
        "roc_auc": m.roc_auc(y, scores),
        "pr_auc": m.pr_auc(y, scores),
        "recall_at_1pct_fpr": m.recall_at_fpr(y, scores, fpr=0.01),
        "precision_at_top_k_per_day": m.precision_at_top_k_per_day(y, scores, event_time_ms, top_k),
        "positive_rate": float(np.mean(y)),
    }


def normalisation(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column centre and scale for the model's ``mean``/``scale`` buffers.

    Counts and amounts are heavy-tailed and the model has no log transform, so a plain std is
    dominated by a few huge values. The statistics are taken on the column winsorised at its
    0.5 and 99.5 percentiles; a column that is constant there (a rare flag) falls back to its
    plain std, and a constant column to 1, so no input is divided by zero.
    """
    rows = x if len(x) <= STATS_ROWS else x[np.linspace(0, len(x) - 1, STATS_ROWS).astype(np.int64)]
    rows = rows.astype(np.float64)
    lo, hi = np.percentile(rows, [0.5, 99.5], axis=0)
    clipped = np.clip(rows, lo, hi)
    mean = clipped.mean(axis=0)
    scale = clipped.std(axis=0)
    fallback = rows.std(axis=0)
    scale = np.where(scale > 1e-6, scale, np.where(fallback > 1e-6, fallback, 1.0))
    return mean.astype(np.float32), scale.astype(np.float32)


@dataclass
class _Split:
    train: np.ndarray  # row indices, in time order
    val: np.ndarray
    unlabelled: int

    def describe(self, columns: Mapping[str, np.ndarray], names: list[str]) -> dict[str, Any]:
        label, t = np.asarray(columns["label"]), np.asarray(columns["event_time"])
        return {
            "train_rows": len(self.train),
            "train_positives": int((label[self.train] == 1).sum()),
            "validation_rows": len(self.val),
            "validation_positives": int((label[self.val] == 1).sum()),
            "train_from_ms": int(t[self.train].min()),
            "validation_from_ms": int(t[self.val].min()),
            "validation_to_ms": int(t[self.val].max()),
            "unlabelled_dropped": self.unlabelled,
        }


def _split(columns: Mapping[str, np.ndarray], val_fraction: float) -> _Split:
    label = np.asarray(columns["label"])
    labelled = np.flatnonzero(label >= 0)
    order = labelled[np.argsort(np.asarray(columns["event_time"])[labelled], kind="stable")]
    n_val = math.ceil(len(order) * val_fraction)
    train, val = order[: len(order) - n_val], order[len(order) - n_val :]
    for part, rows in (("training", train), ("validation", val)):
        if not (label[rows] == 1).any() or not (label[rows] == 0).any():
            raise ValueError(
                f"the {part} period has {(label[rows] == 1).sum()} fraud and {(label[rows] == 0).sum()} "
                f"legitimate labelled rows of {len(label)}: both classes are needed; replay a longer "
                "range or a later label cutoff, or change --val-fraction"
            )
    return _Split(train, val, int(len(label) - len(labelled)))


def _features(
    columns: Mapping[str, np.ndarray], names: list[str], rows: np.ndarray, raw: bool = False
) -> np.ndarray:
    x = np.stack([np.asarray(columns[n], dtype=np.float32)[rows] for n in names], axis=1)
    return x if raw else np.nan_to_num(x, nan=0.0)  # the scorer does the same (nan_to_num(0))


def _fit(
    model: FraudMLP,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    options: TrainOptions,
    pos_weight: float,
    dev: torch.device,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Mini-batch AdamW with early stopping on validation PR AUC; leaves the best weights in ``model``."""
    x = torch.from_numpy(x_train).to(dev)
    y = torch.from_numpy(y_train.astype(np.float32)).to(dev)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight], device=dev))
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    generator = torch.Generator().manual_seed(options.seed)  # on the CPU: same order on any device
    batches = math.ceil(len(x) / options.batch_size)
    show = options.progress and sys.stderr.isatty()
    history: list[dict[str, Any]] = []
    best, best_state, waited = -1.0, copy.deepcopy(model.state_dict()), 0
    for epoch in range(1, options.epochs + 1):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), generator=generator).to(dev)
        total = torch.zeros((), device=dev)  # summed on the device: no sync per batch
        bar = tqdm(total=batches, desc=f"epoch {epoch}", unit="batch", leave=False, disable=not show)
        for i in range(batches):
            idx = order[i * options.batch_size : (i + 1) * options.batch_size]
            loss = loss_fn(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach() * len(idx)
            bar.update()
        bar.close()
        model.eval()
        scores = _scores(model, x_val, dev)
        pr, roc = m.pr_auc(y_val, scores), m.roc_auc(y_val, scores)
        improved = pr > best
        if improved:
            best, best_state, waited = pr, copy.deepcopy(model.state_dict()), 0
        else:
            waited += 1
        entry = {
            "epoch": epoch,
            "loss": float(total) / len(x),
            "val_pr_auc": pr,
            "val_roc_auc": roc,
            "seconds": round(time.perf_counter() - started, 3),
        }
        history.append(entry)
        log(
            f"epoch {epoch:>3}/{options.epochs}  loss {entry['loss']:.4f}  val PR AUC {pr:.4f}  "
            f"ROC AUC {roc:.4f}  {entry['seconds']:.1f} s{'  best' if improved else ''}"
        )
        if waited >= options.patience:
            log(f"stopping: no better validation PR AUC for {waited} epochs; keeping epoch {epoch - waited}")
            break
    model.load_state_dict(best_state)
    return history


def _scores(model: FraudMLP, x: np.ndarray, dev: torch.device) -> np.ndarray:
    out = []
    with torch.no_grad():
        for i in range(0, len(x), EVAL_BATCH):
            batch = torch.from_numpy(x[i : i + EVAL_BATCH]).to(dev)
            out.append(torch.sigmoid(model(batch)).double().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def _data_version(manifest: Mapping[str, Any], path: Path | None) -> dict[str, Any]:
    keys = ("data_version", "sha256", "feature_set", "sources", "from_ms", "to_ms", "label_cutoff_ms")
    counts = ("rows", "positives", "negatives", "unlabelled")
    return {k: manifest.get(k) for k in keys + counts} | {"path": str(path) if path else None}


def code_version() -> str:
    """The git commit of this checkout (``-dirty`` with local changes), else the package version."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / ".git").exists():
        try:
            head = _git(repo, "rev-parse", "HEAD")
            dirty = bool(_git(repo, "status", "--porcelain"))
            return head + ("-dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):
            pass  # no git on this machine: the package version is the next best thing
    return f"stream-ml {__version__}"


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
    )
    return done.stdout.strip()


def environment(dev: torch.device) -> dict[str, Any]:
    """What the model was trained with, so a result that cannot be reproduced can be explained."""
    import pyarrow

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pyarrow": pyarrow.__version__,
        "device": str(dev) if dev.type != "cuda" else f"cuda ({torch.cuda.get_device_name(dev)})",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def _jsonable(value: Any) -> Any:
    """NaN and ±inf become None: the JSON the registry writes has no such numbers."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _fmt(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.2f} %" if whole else "n/a"


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))
