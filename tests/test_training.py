"""The dataset format, the ranking metrics and `stream-ml train`, on a synthetic dataset (no stack)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli, settings_env

from stream_ml.config import Settings
from stream_ml.features import FRAUD_FEATURES
from stream_ml.registry import Registry
from stream_ml.serving.model import FraudMLP, load_model
from stream_ml.training import metrics
from stream_ml.training.dataset import DatasetWriter, read_dataset, write_dataset
from stream_ml.training.train import TrainOptions, TrainResult, train

NAMES = FRAUD_FEATURES.names
DAY_MS = 86_400_000
T0 = 1_780_000_000_000
FAST = {"epochs": 6, "batch_size": 512, "progress": False}


def synthetic(n: int = 30_000, days: int = 10, seed: int = 7) -> tuple[dict, dict]:
    """Rows over ``days`` days where fraud depends on a few features (one interaction), ~1.5 % positive."""
    rng = np.random.default_rng(seed)
    cols: dict[str, np.ndarray] = {}
    for name in NAMES:
        if name.startswith(("is_", "channel_")) or name.endswith("_new_for_card"):
            cols[name] = (rng.random(n) < 0.2).astype(np.float32)
        elif "count" in name or "merchants" in name or "devices" in name or "countries" in name:
            cols[name] = rng.poisson(3.0, n).astype(np.float32)
        elif name.endswith("_s"):
            cols[name] = rng.exponential(3600.0, n).astype(np.float32)
        else:
            cols[name] = rng.lognormal(3.5, 1.0, n).astype(np.float32)
    cols["amount_to_card_mean_30d"] = rng.lognormal(0.0, 0.6, n).astype(np.float32)
    logit = (
        -6.8
        + 2.0 * cols["device_new_for_card"]
        + 0.6 * (cols["card_countries_24h"] - 3.0)
        + 2.2 * (cols["amount_to_card_mean_30d"] > 2.0) * cols["channel_ecom"]
        + 0.3 * np.log(cols["amount"])
    )
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    event_time = np.sort(T0 + rng.integers(0, days * DAY_MS, n))
    label_time = event_time + 3_600_000
    cutoff = T0 + days * DAY_MS - 12 * 3_600_000
    label[label_time > cutoff] = -1
    label_time[label == -1] = -1
    cols["card_countries_24h"][rng.random(n) < 0.01] = np.nan  # replay may leave a value out
    columns = {
        "event_id": np.array([f"e{i}" for i in range(n)], dtype=object),
        "event_time": event_time,
        "card_id": np.array([f"c{i % 997}" for i in range(n)], dtype=object),
        "label": label,
        "label_time": label_time,
        **{name: cols[name] for name in NAMES},
    }
    manifest = {
        "feature_set": FRAUD_FEATURES.version,
        "feature_names": list(NAMES),
        "from_ms": T0,
        "to_ms": T0 + days * DAY_MS,
        "label_cutoff_ms": cutoff,
        "sources": {"transactions": {0: [0, n - 1]}, "labels": {0: [0, n - 1]}},
    }
    return columns, manifest


@pytest.fixture(scope="module")
def data() -> tuple[dict, dict]:
    return synthetic()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory, data: tuple[dict, dict]) -> Path:
    path = tmp_path_factory.mktemp("datasets") / "ds"
    write_dataset(path, *data)
    return path


@pytest.fixture(scope="module")
def trained(dataset: Path) -> TrainResult:
    return train(dataset, TrainOptions(**FAST))


# -- dataset format -----------------------------------------------------------------------------


def test_roundtrip_keeps_columns_types_and_provenance(dataset: Path, data: tuple[dict, dict]) -> None:
    columns, given = data
    read, manifest = read_dataset(dataset)
    assert list(read) == ["event_id", "event_time", "card_id", "label", "label_time", *NAMES]
    assert read["event_id"].tolist() == columns["event_id"].tolist()
    assert read["event_time"].dtype == np.int64 and read["label"].dtype == np.int8
    assert all(read[n].dtype == np.float32 for n in NAMES)
    np.testing.assert_array_equal(read["amount"], columns["amount"])
    np.testing.assert_array_equal(
        np.isnan(read["card_countries_24h"]), np.isnan(columns["card_countries_24h"])
    )
    label = columns["label"]
    assert manifest["format"] == 1 and manifest["rows"] == len(label)
    assert (manifest["positives"], manifest["negatives"], manifest["unlabelled"]) == (
        int((label == 1).sum()),
        int((label == 0).sum()),
        int((label == -1).sum()),
    )
    assert manifest["sources"] == {
        "transactions": {"0": [0, len(label) - 1]},
        "labels": {"0": [0, len(label) - 1]},
    }
    assert len(manifest["data_version"]) == 12 and len(manifest["sha256"]) == 64
    assert manifest["label_cutoff_ms"] == given["label_cutoff_ms"] and manifest["created_at"]
    assert list(read_dataset(dataset, columns=["label"])[0]) == ["label", *NAMES]


def test_existing_dataset_is_not_overwritten_unless_asked(tmp_path: Path) -> None:
    columns, manifest = synthetic(n=200, days=2)
    first = write_dataset(tmp_path / "ds", columns, manifest)
    with pytest.raises(ValueError, match="exists"):
        write_dataset(tmp_path / "ds", columns, manifest)
    columns["amount"] = columns["amount"] * 2
    second = write_dataset(tmp_path / "ds", columns, manifest, overwrite=True)
    assert second["sha256"] != first["sha256"] and second["data_version"] != first["data_version"]
    assert read_dataset(tmp_path / "ds")[1]["sha256"] == second["sha256"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary folders left


def test_altered_or_missing_data_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ds"
    write_dataset(path, *synthetic(n=200, days=2))
    with (path / "data.parquet").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="changed since it was written"):
        read_dataset(path)
    with pytest.raises(FileNotFoundError, match="stream-ml replay"):
        read_dataset(tmp_path / "nothing-here")
    (path / "manifest.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a complete dataset"):
        read_dataset(path)


def test_chunked_writer_matches_one_shot_and_aborts_cleanly(tmp_path: Path) -> None:
    columns, manifest = synthetic(n=1000, days=2)
    one = write_dataset(tmp_path / "one", columns, manifest)
    with DatasetWriter(tmp_path / "chunked", NAMES) as writer:
        for lo in range(0, 1000, 300):
            writer.append({k: v[lo : lo + 300] for k, v in columns.items()})
        chunked = writer.close(manifest)
    assert {k: chunked[k] for k in ("rows", "positives", "unlabelled")} == {
        k: one[k] for k in ("rows", "positives", "unlabelled")
    }
    a, b = read_dataset(tmp_path / "one")[0], read_dataset(tmp_path / "chunked")[0]
    assert all(np.array_equal(a[k], b[k], equal_nan=k in NAMES) for k in a)

    with pytest.raises(RuntimeError), DatasetWriter(tmp_path / "failed", NAMES) as writer:
        writer.append(columns)
        raise RuntimeError("replay broke")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunked", "one"]


def test_bad_columns_are_refused_with_a_reason(tmp_path: Path) -> None:
    columns, manifest = synthetic(n=50, days=1)
    missing = {k: v for k, v in columns.items() if k != "amount"}
    with pytest.raises(ValueError, match=r"missing \['amount'\]"):
        write_dataset(tmp_path / "a", missing, manifest)
    with pytest.raises(ValueError, match="label must be"):
        write_dataset(tmp_path / "b", {**columns, "label": np.full(50, 2)}, manifest)
    with pytest.raises(ValueError, match="sources"):
        write_dataset(tmp_path / "c", columns, {k: v for k, v in manifest.items() if k != "sources"})
    assert not any(tmp_path.iterdir())


# -- metrics --------------------------------------------------------------------------------------


def brute_auc(y: np.ndarray, p: np.ndarray) -> float:
    pos, neg = p[y == 1], p[y == 0]
    return float(((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])).mean())


def brute_thresholds(y: np.ndarray, p: np.ndarray) -> list[tuple[int, int]]:
    """(true positives, false positives) of `score >= t` for each distinct t, highest first."""
    return [
        (int(((p >= t) & (y == 1)).sum()), int(((p >= t) & (y == 0)).sum())) for t in sorted(set(p))[::-1]
    ]


def brute_ap(y: np.ndarray, p: np.ndarray) -> float:
    ap, last_tp = 0.0, 0
    for tp, fp in brute_thresholds(y, p):
        ap += (tp - last_tp) / y.sum() * tp / (tp + fp)
        last_tp = tp
    return ap


def brute_recall_at_fpr(y: np.ndarray, p: np.ndarray, fpr: float) -> float:
    n_neg = (y == 0).sum()
    return max([tp / y.sum() for tp, fp in brute_thresholds(y, p) if fp <= fpr * n_neg] + [0.0])


def brute_top_k(y: np.ndarray, p: np.ndarray, t: np.ndarray, k: int) -> float:
    precisions = []
    for day in sorted(set(t // DAY_MS)):
        rows = [i for i in range(len(y)) if t[i] // DAY_MS == day]
        best = sorted(rows, key=lambda i: -p[i])[:k]  # sorted() is stable: ties in input order
        precisions.append(np.mean([y[i] for i in best]))
    return float(np.mean(precisions))


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    y = (rng.random(n) < 0.15).astype(np.int8)
    y[:2] = [0, 1]
    p = np.round(rng.random(n) * 0.5 + 0.3 * y, 1 + seed % 3)  # rounding makes ties
    t = T0 + rng.integers(0, 4 * DAY_MS, n)
    assert metrics.roc_auc(y, p) == pytest.approx(brute_auc(y, p))
    assert metrics.pr_auc(y, p) == pytest.approx(brute_ap(y, p))
    for fpr in (0.0, 0.01, 0.1, 0.5):
        assert metrics.recall_at_fpr(y, p, fpr) == pytest.approx(brute_recall_at_fpr(y, p, fpr))
    for k in (1, 5, 40):
        assert metrics.precision_at_top_k_per_day(y, p, t, k) == pytest.approx(brute_top_k(y, p, t, k))


def test_metric_edge_cases() -> None:
    assert np.isnan(metrics.roc_auc([0, 0], [0.1, 0.2])) and np.isnan(metrics.pr_auc([0, 0], [0.1, 0.2]))
    assert metrics.roc_auc([0, 1, 0, 1], [0.5] * 4) == 0.5
    assert metrics.pr_auc([0, 1, 0, 0], [0.5] * 4) == 0.25  # all tied: precision = prevalence
    with pytest.raises(ValueError, match="drop unknown labels"):
        metrics.roc_auc([-1, 1], [0.1, 0.2])


# -- training -------------------------------------------------------------------------------------


def test_training_beats_the_baselines_on_the_later_period(
    trained: TrainResult, data: tuple[dict, dict]
) -> None:
    model, baselines = trained.metrics["model"], trained.metrics["baselines"]
    assert model["pr_auc"] >= 2 * baselines["prior"]["pr_auc"], trained.summary()
    assert model["pr_auc"] >= 2 * baselines["amount"]["pr_auc"], trained.summary()
    assert model["roc_auc"] > baselines["amount"]["roc_auc"] + 0.1
    split = trained.metrics["split"]
    label = data[0]["label"]
    assert split["train_rows"] + split["validation_rows"] == (label >= 0).sum()
    assert split["unlabelled_dropped"] == (label == -1).sum()
    assert split["validation_from_ms"] > split["train_from_ms"]
    assert split["validation_rows"] == pytest.approx(0.2 * (label >= 0).sum(), abs=1)
    # The pos-weight correction leaves probabilities, not inflated scores: mean score ≈ fraud rate.
    score_mean = trained.reference["score"]["mean"]
    assert 0.5 < score_mean / model["positive_rate"] < 2.0, (score_mean, model["positive_rate"])
    text = trained.summary()
    assert "PR AUC" in text and "amount" in text and f"{split['train_rows']:,}" in text


def test_training_records_what_the_registry_needs(trained: TrainResult, dataset: Path) -> None:
    manifest = read_dataset(dataset)[1]
    assert trained.feature_set == FRAUD_FEATURES.version and trained.feature_names == NAMES
    assert trained.architecture == {"kind": "fraud-mlp", "n_inputs": len(NAMES), "hidden": [128, 64]}
    assert trained.data_version["data_version"] == manifest["data_version"]
    assert trained.data_version["sources"] == manifest["sources"]
    assert trained.params["seed"] == 0 and trained.params["epochs"] == FAST["epochs"]
    assert trained.code_version and trained.environment["torch"] == torch.__version__
    assert len(trained.history) == trained.metrics["epochs_run"] <= FAST["epochs"]
    ref = trained.reference
    assert ref["split"] == "validation" and ref["rows"] == trained.metrics["split"]["validation_rows"]
    assert set(ref["features"]) == set(NAMES)
    assert ref["features"]["is_weekend"]["kind"] == "binary"
    assert set(ref["features"]["is_weekend"]["counts"]) == {"0", "1"}
    amount = ref["features"]["amount"]
    assert amount["kind"] == "numeric" and len(amount["quantiles"]) == 11 and len(amount["sample"]) == 5000
    assert amount["quantiles"] == sorted(amount["quantiles"])
    assert ref["features"]["card_countries_24h"]["nan_rows"] > 0
    json.dumps([trained.metrics, trained.params, trained.reference, trained.environment], allow_nan=False)


def test_same_seed_same_model(data: tuple[dict, dict]) -> None:
    options = {**FAST, "epochs": 2, "hidden": (16, 8)}
    a = train(data, TrainOptions(**options)).weights
    b = train(data, TrainOptions(**options)).weights
    c = train(data, TrainOptions(**options, seed=1)).weights
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["net.0.weight"], c["net.0.weight"])


def test_no_fraud_in_validation_is_explained(data: tuple[dict, dict]) -> None:
    columns, manifest = data
    later = columns["event_time"] > np.quantile(columns["event_time"], 0.7)
    label = np.where(later & (columns["label"] == 1), 0, columns["label"]).astype(np.int8)
    with pytest.raises(ValueError, match="validation period has 0 fraud"):
        train(({**columns, "label": label}, manifest), TrainOptions(**FAST))


def test_registered_model_loads_back_strictly(trained: TrainResult, tmp_path: Path) -> None:
    version = trained.register(tmp_path / "registry")
    reg = Registry(tmp_path / "registry")
    model = FraudMLP(len(NAMES), hidden=(128, 64))
    model.load_state_dict(reg.load_weights(version), strict=True)
    x = torch.randn(5, len(NAMES)) * 10
    assert torch.equal(model(x), trained.model(x))
    meta = reg.get(version).meta
    assert meta["data_version"]["data_version"] == trained.data_version["data_version"]
    assert meta["metrics"]["model"]["pr_auc"] == trained.metrics["model"]["pr_auc"]
    assert reg.reference(version)["score"]["kind"] == "numeric"
    # and the scorer serves it: same scores as the trained module
    served = load_model(reg, version, FRAUD_FEATURES)
    vectors = x.tolist()
    expected = torch.sigmoid(trained.model(x)).tolist()
    assert served.score(vectors)[0] == pytest.approx(expected, rel=1e-5)


# -- command line ---------------------------------------------------------------------------------


def test_train_help_names_the_options(tmp_path: Path) -> None:
    done = run_cli("train", "--help", env=settings_env(Settings.from_env({}, state_dir=tmp_path)))
    assert done.returncode == 0, done.stderr
    for option in ("--epochs", "--val-fraction", "--patience", "--no-register", "--promote", "--registry"):
        assert option in done.stdout


def test_train_command_registers_and_promotes(dataset: Path, tmp_path: Path) -> None:
    env = settings_env(Settings.from_env({}, state_dir=tmp_path))
    started = time.monotonic()
    done = run_cli(
        "train", str(dataset), "--epochs", "2", "--hidden", "16,8", "--promote", "production", env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "epoch   1/2" in done.stdout and "PR AUC" in done.stdout
    assert "registered model" in done.stdout and "promoted" in done.stdout, done.stdout
    assert time.monotonic() - started < 60
    version = Registry(tmp_path / "registry").stage("production")
    assert version and version in done.stdout

    missing = run_cli("train", str(tmp_path / "no-such-dataset"), "--no-register", env=env)
    assert missing.returncode == 2 and "stream-ml replay" in missing.stderr, missing.stderr
