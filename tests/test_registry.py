"""The model registry on a real folder: versions, checksums, stage pointers, concurrency, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_cli, settings_env

from stream_ml.config import Settings
from stream_ml.features import FRAUD_FEATURES
from stream_ml.registry import (
    STAGES,
    ChecksumMismatch,
    FeatureSetMismatch,
    ModelVersion,
    Registry,
    RegistryError,
)
from stream_ml.serving.model import default_model, load_model, register_default_model

FS = FRAUD_FEATURES.version


def _register(registry: Registry, seed: int, feature_set: str = FS, **meta: object) -> ModelVersion:
    torch.manual_seed(seed)
    fields: dict = {
        "feature_set": feature_set,
        "feature_names": ["a", "b"],
        "architecture": {"kind": "test", "n_inputs": 2},
        "metrics": {"roc_auc": 0.9 + seed / 1000, "pr_auc": 0.5},
        "params": {"seed": seed},
        "data_version": {"topic": "transactions", "offsets": {"0": [0, 100]}},
        "code_version": "abc123",
        "environment": {"torch": torch.__version__},
        "reference": {"amount": {"bins": [0, 10, 100], "counts": [seed, 2]}},
    }
    return registry.register({"w": torch.randn(3, 2), "b": torch.zeros(3)}, **(fields | meta))


def test_register_get_list_promote_rollback(tmp_path: Path):
    registry = Registry(tmp_path / "reg")
    assert registry.versions() == [] and registry.stages() == dict.fromkeys(STAGES)
    a, b = _register(registry, 1), _register(registry, 2)
    # Sortable by time, to the millisecond (two versions within a second happen: the demo, the tests).
    assert a.version.split("-")[0] < b.version.split("-")[0]
    assert a.meta["created_at"] < b.meta["created_at"]
    assert [v.version for v in registry.versions()] == [a.version, b.version]
    got = registry.get(a.version)
    assert got.meta == a.meta and got.path == tmp_path / "reg" / "versions" / a.version
    assert got.meta["feature_set"] == FS and got.meta["data_version"]["topic"] == "transactions"
    assert set(got.meta["files"]) == {"weights.safetensors", "reference.json"}
    torch.manual_seed(1)
    assert torch.equal(registry.load_weights(a.version)["w"], torch.randn(3, 2))
    assert registry.reference(a.version) == {"amount": {"bins": [0, 10, 100], "counts": [1, 2]}}

    registry.promote(a.version, "production", serving_feature_set=FS)
    registry.promote(b.version, "production", serving_feature_set=FS)
    registry.promote(b.version, "shadow", serving_feature_set=FS)
    assert registry.stages() == {"production": b.version, "challenger": None, "shadow": b.version}
    pointer = json.loads((tmp_path / "reg" / "stages" / "production.json").read_text())
    assert pointer["version"] == b.version and pointer["history"] == [a.version] and pointer["moved_at"]
    assert registry.rollback("production") == a.version
    assert registry.stage("production") == a.version
    with pytest.raises(RegistryError, match="no previous version"):
        registry.rollback("production")
    with pytest.raises(RegistryError, match="never set"):
        registry.rollback("challenger")
    with pytest.raises(ValueError, match="unknown stage"):
        registry.promote(a.version, "canary", serving_feature_set=FS)


def test_unknown_versions_are_named(tmp_path: Path):
    registry = Registry(tmp_path)
    a = _register(registry, 1)
    for bad in ("nope", "../versions", ""):
        with pytest.raises(LookupError, match=a.version):
            registry.get(bad)
    with pytest.raises(LookupError):
        registry.promote("nope", "production", serving_feature_set=FS)


def test_a_version_is_immutable(tmp_path: Path):
    registry = Registry(tmp_path)
    a = _register(registry, 1, version="v1")
    with pytest.raises(RegistryError, match="immutable"):
        _register(registry, 2, version="v1")
    assert registry.get("v1").meta == a.meta and registry.load_weights("v1")["w"].shape == (3, 2)
    assert not any((tmp_path / ".tmp").iterdir())  # nothing half-written left behind
    # registering the default model again finds the version already there
    assert register_default_model(registry, FRAUD_FEATURES).version == (
        register_default_model(registry, FRAUD_FEATURES).version  # idempotent for the default model
    )


def _flip_a_byte(path: Path, offset: int = -5) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_an_altered_file_is_refused(tmp_path: Path):
    registry = Registry(tmp_path)
    a, b = _register(registry, 1), _register(registry, 2)
    registry.promote(a.version, "production", serving_feature_set=FS)
    _flip_a_byte(b.path / "weights.safetensors")
    with pytest.raises(ChecksumMismatch, match=r"altered.*register the model again"):
        registry.load_weights(b.version)
    with pytest.raises(ChecksumMismatch):  # a corrupt version never becomes a stage's version
        registry.promote(b.version, "production", serving_feature_set=FS)
    assert registry.stage("production") == a.version
    _flip_a_byte(a.path / "reference.json", offset=3)
    with pytest.raises(ChecksumMismatch, match=r"reference\.json"):
        registry.reference(a.version)
    assert isinstance(ChecksumMismatch("x"), RegistryError)


def test_feature_set_mismatch_needs_the_override(tmp_path: Path):
    registry = Registry(tmp_path)
    other = _register(registry, 1, feature_set="fraud-0000000000")
    with pytest.raises(FeatureSetMismatch, match="--allow-feature-set-mismatch"):
        registry.promote(other.version, "production", serving_feature_set=FS)
    assert registry.stage("production") is None
    registry.promote(other.version, "production", serving_feature_set=FS, allow_feature_set_mismatch=True)
    assert registry.stage("production") == other.version


def test_load_model_rebuilds_the_scoring_model(tmp_path: Path):
    registry = Registry(tmp_path)
    mv = register_default_model(registry, FRAUD_FEATURES, seed=3)
    row = [[float(i) for i in range(len(FRAUD_FEATURES.names))]]
    loaded = load_model(registry, mv.version, FRAUD_FEATURES)
    assert loaded.version == mv.version and not loaded.module.training
    assert loaded.score(row)[0] == default_model(FRAUD_FEATURES, seed=3).score(row)[0]
    assert loaded.probabilities(row) == pytest.approx(loaded.score(row)[0])
    # the same inputs under another feature set version: refused unless overridden
    module = default_model(FRAUD_FEATURES).module
    weights = {k: v.cpu() for k, v in module.state_dict().items()}
    meta = {
        "feature_names": FRAUD_FEATURES.names,
        "architecture": module.architecture(),
        "metrics": {},
        "params": {},
        "data_version": {},
        "code_version": "x",
        "environment": {},
        "reference": {},
    }
    other = registry.register(weights, feature_set="fraud-0000000000", **meta)
    with pytest.raises(FeatureSetMismatch, match="fraud-0000000000"):
        load_model(registry, other.version, FRAUD_FEATURES)
    assert load_model(registry, other.version, FRAUD_FEATURES, allow_feature_set_mismatch=True)
    # a model of another width cannot score these vectors at all, override or not
    narrow = registry.register(
        {k: v[..., :5] if k in ("mean", "scale", "net.0.weight") else v for k, v in weights.items()},
        feature_set=FS,
        **(
            meta
            | {
                "feature_names": FRAUD_FEATURES.names[:5],
                "architecture": {**meta["architecture"], "n_inputs": 5},
            }
        ),
    )
    with pytest.raises(FeatureSetMismatch, match="cannot be served"):
        load_model(registry, narrow.version, FRAUD_FEATURES, allow_feature_set_mismatch=True)


# A writer process: promotes its two versions in turn (each promote moves the pointer), registers
# new versions, then prints how many moves it made.
WRITER = """
import sys, time, torch
from pathlib import Path
from stream_ml.registry import Registry, store
store.HISTORY_KEPT = 1_000_000  # keep every move, so that a lost one would show
root, go = Path(sys.argv[1]), Path(sys.argv[2])
fs, mine, rounds = sys.argv[3], sys.argv[4:6], int(sys.argv[6])
registry = Registry(root)
while not go.exists():
    time.sleep(0.01)
for i in range(rounds):
    registry.promote(mine[i % 2], "production", serving_feature_set=fs)
    if i % 10 == 0:
        registry.register({"w": torch.randn(64, 64)}, feature_set=fs, feature_names=[], architecture={},
            metrics={}, params={}, data_version={}, code_version="", environment={}, reference={})
print(rounds)
"""


def test_concurrent_promotes_and_readers_never_see_a_torn_state(tmp_path: Path):
    registry = Registry(tmp_path / "reg")
    ours = [_register(registry, i).version for i in range(6)]
    go, rounds = tmp_path / "go", 60
    writers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(registry.root),
                str(go),
                FS,
                *ours[2 * w : 2 * w + 2],
                str(rounds),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(2)
    ]
    errors: list[str] = []
    reads = {"pointer": 0, "versions": 0}
    stop = threading.Event()

    def read_pointers() -> None:
        while not stop.is_set():
            try:
                raw = (registry.root / "stages" / "production.json").read_bytes()
            except FileNotFoundError:
                continue  # not promoted yet
            try:
                version = json.loads(raw)["version"]
                assert version in ours, version
                registry.load_weights(version)
                reads["pointer"] += 1
            except Exception as exc:
                errors.append(f"pointer: {exc!r}: {raw[:80]!r}")

    def read_versions() -> None:
        while not stop.is_set():
            try:
                for mv in registry.versions():
                    registry.load_weights(mv.version)  # every listed version is complete
                reads["versions"] += 1
            except Exception as exc:
                errors.append(f"versions: {exc!r}")

    def promote_in_threads() -> None:  # a third writer, in this process, on the other stage
        for i in range(rounds):
            registry.promote(ours[4 + i % 2], "shadow", serving_feature_set=FS)

    threads = [threading.Thread(target=t) for t in (read_pointers, read_pointers, read_versions)]
    for t in threads:
        t.start()
    go.touch()
    promote_in_threads()
    outputs = [w.communicate(timeout=60) for w in writers]
    stop.set()
    for t in threads:
        t.join()
    assert [w.returncode for w in writers] == [0, 0], [err[-2000:] for _, err in outputs]
    assert not errors, errors[:5]
    assert reads["pointer"] > 50 and reads["versions"] > 5
    # every move of the two processes is in the history: none lost to a read-modify-write race
    pointer = json.loads((registry.root / "stages" / "production.json").read_text())
    assert len(pointer["history"]) + 1 == sum(int(out) for out, _ in outputs)
    assert registry.stage("shadow") == ours[5] and len(registry.history("shadow")) == 50
    assert len(registry.versions()) == 6 + 2 * (rounds // 10)
    assert not any((registry.root / ".tmp").iterdir())


def test_models_cli(tmp_path: Path):
    """As a user runs it: subprocesses, the registry from STREAM_ML_REGISTRY."""
    root = tmp_path / "reg"
    env = settings_env(Settings.from_env({}, state_dir=tmp_path / "state"), STREAM_ML_REGISTRY=str(root))
    registry = Registry(root)
    a, b = _register(registry, 1), _register(registry, 2)

    promoted = run_cli("models", "promote", a.version, "--stage", "production", env=env)
    assert promoted.returncode == 0 and a.version in promoted.stdout, promoted.stderr
    registry.promote(b.version, "production", serving_feature_set=FS)
    listing = run_cli("models", "list", env=env)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split()[:3] == ["VERSION", "CREATED", "FEATURE"] and "ROC_AUC" in lines[0]
    row_b = next(line for line in lines if line.startswith(b.version))
    assert "production" in row_b and FS in row_b and "0.9020" in row_b

    shown = run_cli("models", "show", b.version, env=env)
    assert shown.returncode == 0 and json.loads(shown.stdout) == b.meta
    back = run_cli("models", "rollback", "--stage", "production", env=env)
    assert back.returncode == 0 and registry.stage("production") == a.version
    again = run_cli("models", "rollback", "--stage", "production", env=env)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        "stream-ml: error: stage production has no previous version to roll back to "
        f"(it points to {a.version})"
    ]


def test_models_cli_json_mismatch_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    """The same entry point in this process (each subprocess costs seconds of imports)."""
    from stream_ml.cli import main

    monkeypatch.setenv("STREAM_ML_REGISTRY", str(tmp_path))
    assert main(["models", "list"]) == 0 and "no model versions" in capsys.readouterr().out
    registry = Registry(tmp_path)
    a, other = _register(registry, 1), _register(registry, 3, feature_set="fraud-0000000000")
    registry.promote(a.version, "production", serving_feature_set=FS)

    assert main(["models", "list", "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    assert [v["version"] for v in as_json] == [a.version, other.version]
    assert as_json[0]["stages"] == ["production"] and as_json[0]["metrics"]["pr_auc"] == 0.5

    assert main(["models", "promote", other.version, "--stage", "shadow"]) == 2
    assert "--allow-feature-set-mismatch" in capsys.readouterr().err
    assert (
        main(["models", "promote", other.version, "--stage", "shadow", "--allow-feature-set-mismatch"]) == 0
    )
    assert registry.stage("shadow") == other.version and other.version in capsys.readouterr().out
    assert (
        main(["models", "promote", other.version, "--stage", "shadow", "--allow-feature-set-mismatch"]) == 0
    )
    assert "already points" in capsys.readouterr().out

    assert main(["models", "show", "nope"]) == 2 and a.version in capsys.readouterr().err
    for command in ("list", "show", "promote", "rollback"):
        with pytest.raises(SystemExit) as exited:
            main(["models", command, "--help"])
        assert exited.value.code == 0 and "--registry" in capsys.readouterr().out
