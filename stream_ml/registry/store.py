"""The model registry: immutable model versions and one movable pointer per stage.

Layout under the root (a folder by default)::

    versions/<version>/weights.safetensors   tensors only (safetensors: loading runs no code)
    versions/<version>/reference.json        reference distributions for drift, as the trainer gave them
    versions/<version>/model.json            metadata, with the sha256 of the two files above
    stages/<stage>.json                      {"version", "moved_at", "history": [older, newest first]}

Only two kinds of write exist, so that an object store can replace the folder later without a new
design: a version is *written once* (assembled in a temporary folder inside the root, then renamed
into place in one step, so a reader sees all of it or none; on an object store, model.json written
last is the commit) and a stage pointer is a *small object replaced whole* (a temporary file, then
``os.replace``; on an object store, one PUT with a conditional write for the read-modify-write).
Versions are never changed after they exist; checksums catch a file altered behind the registry.

Version ids sort by time: ``<UTC second>-<first 8 hex of the weights' sha256>``, so two trainers
registering different weights in the same second still get different ids.

>>> import tempfile, torch
>>> reg = Registry(Path(tempfile.mkdtemp()))
>>> mv = reg.register({"w": torch.ones(2)}, feature_set="fs-1", feature_names=["a", "b"],
...     architecture={"kind": "demo"}, metrics={}, params={}, data_version={}, code_version="0",
...     environment={}, reference={})
>>> reg.promote(mv.version, "production", serving_feature_set="fs-1")
>>> reg.stage("production") == mv.version, reg.load_weights(mv.version)["w"].tolist()
(True, [1.0, 1.0])
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch takes seconds to import: only the calls that move tensors load it
    import torch

STAGES = ("production", "challenger", "shadow")
WEIGHTS = "weights.safetensors"
REFERENCE = "reference.json"
META = "model.json"
FORMAT = 1
HISTORY_KEPT = 50  # enough rollbacks for any incident; the pointer file stays small
_VERSION_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,127}$")


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message says what to do instead."""


class ChecksumMismatch(RegistryError):
    """A file of a version no longer has the sha256 recorded when it was registered."""


class FeatureSetMismatch(RegistryError):
    """A model trained on one feature set would be served on another."""


@dataclass(frozen=True, slots=True)
class ModelVersion:
    version: str
    path: Path
    meta: dict[str, Any]  # the content of model.json

    @property
    def feature_set(self) -> str:
        return self.meta["feature_set"]


class Registry:
    """A registry rooted at a folder; nothing is created on disk until the first write."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._versions = self.root / "versions"
        self._stages = self.root / "stages"

    # ---- versions

    def register(
        self,
        weights: dict[str, torch.Tensor],
        *,
        feature_set: str,
        feature_names: list[str],
        architecture: dict,
        metrics: dict,
        params: dict,
        data_version: dict,
        code_version: str,
        environment: dict,
        reference: dict,
        version: str | None = None,
    ) -> ModelVersion:
        """Store a new immutable version and return it (``version`` only to pick the id yourself)."""
        from safetensors.torch import save as save_safetensors

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
        weights_bytes = save_safetensors(tensors)
        reference_bytes = json.dumps(reference, sort_keys=True, allow_nan=False).encode()
        weights_sha = _sha256(weights_bytes)
        now = datetime.now(UTC)
        # Milliseconds in the id: versions registered within one second still sort by time.
        version = version or f"{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}Z-{weights_sha[:8]}"
        _check_version_id(version)
        meta = {
            "format": FORMAT,
            "version": version,
            "created_at": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "feature_set": feature_set,
            "feature_names": list(feature_names),
            "architecture": architecture,
            "metrics": metrics,
            "params": params,
            "data_version": data_version,
            "code_version": code_version,
            "environment": environment,
            "tensors": {k: list(v.shape) for k, v in tensors.items()},
            "files": {WEIGHTS: weights_sha, REFERENCE: _sha256(reference_bytes)},
        }
        meta_bytes = json.dumps(meta, indent=2, allow_nan=False).encode() + b"\n"
        final = self._versions / version
        if final.exists():
            raise RegistryError(f"version {version} already exists and versions are immutable: register anew")
        staging = self.root / ".tmp" / f"{version}.{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        try:
            # model.json last: on a store without rename, its presence is what commits the version
            for name, data in ((WEIGHTS, weights_bytes), (REFERENCE, reference_bytes), (META, meta_bytes)):
                _write_synced(staging / name, data)
                os.chmod(staging / name, 0o444)  # a reminder to people and tools: never edited in place
            _fsync_dir(staging)
            self._versions.mkdir(parents=True, exist_ok=True)
            try:
                # rename(2) of a folder onto an existing non-empty one fails: no version is overwritten
                os.rename(staging, final)
            except OSError:
                raise RegistryError(
                    f"version {version} already exists and versions are immutable: register anew"
                ) from None
            _fsync_dir(self._versions)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return ModelVersion(version, final, meta)

    def versions(self) -> list[ModelVersion]:
        """Every complete version, oldest first."""
        if not self._versions.is_dir():
            return []
        found = []
        for path in sorted(self._versions.iterdir()):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError, ValueError):
                found.append(ModelVersion(path.name, path, json.loads((path / META).read_bytes())))
        return found

    def get(self, version: str) -> ModelVersion:
        path = self._versions / version
        try:
            _check_version_id(version)
            meta = json.loads((path / META).read_bytes())
        except (ValueError, FileNotFoundError, NotADirectoryError):
            known = [v.version for v in self.versions()]
            listed = ", ".join(known[-10:]) if known else "none"
            more = f" (and {len(known) - 10} older)" if len(known) > 10 else ""
            raise LookupError(f"no model version {version!r} in {self.root}; known: {listed}{more}") from None
        return ModelVersion(version, path, meta)

    def load_weights(self, version: str) -> dict[str, torch.Tensor]:
        """The version's tensors (on the CPU), after checking their sha256."""
        from safetensors.torch import load as load_safetensors

        mv = self.get(version)
        return load_safetensors(self._read_checked(mv, WEIGHTS))

    def reference(self, version: str) -> dict:
        """The reference distributions for drift, after checking their sha256."""
        mv = self.get(version)
        return json.loads(self._read_checked(mv, REFERENCE))

    def verify(self, version: str) -> ModelVersion:
        """Check every file of a version against its recorded sha256 (ChecksumMismatch if not)."""
        mv = self.get(version)
        for name in mv.meta["files"]:
            self._read_checked(mv, name)
        return mv

    def _read_checked(self, mv: ModelVersion, name: str) -> bytes:
        # The bytes checked are the bytes returned: no window for a change between check and use.
        expected = mv.meta["files"][name]
        try:
            data = (mv.path / name).read_bytes()
        except FileNotFoundError:
            raise ChecksumMismatch(
                f"{name} of model {mv.version} is missing: the version was altered; register the model again"
            ) from None
        if _sha256(data) != expected:
            raise ChecksumMismatch(
                f"{name} of model {mv.version} does not match its recorded sha256: the file was altered "
                "after registration; register the model again (versions are never repaired in place)"
            )
        return data

    # ---- stages

    def stage(self, stage: str) -> str | None:
        """The version ``stage`` points to, None when it was never set."""
        return self._pointer(stage).get("version")

    def stages(self) -> dict[str, str | None]:
        return {s: self.stage(s) for s in STAGES}

    def history(self, stage: str) -> list[str]:
        """The versions ``stage`` pointed to before, newest first (what rollback goes back to)."""
        return list(self._pointer(stage).get("history", []))

    def promote(
        self, version: str, stage: str, *, serving_feature_set: str, allow_feature_set_mismatch: bool = False
    ) -> None:
        """Point ``stage`` at ``version`` (atomically), after checking its files and feature set."""
        _check_stage(stage)
        mv = self.verify(version)  # a corrupt version never becomes the one served
        if mv.feature_set != serving_feature_set and not allow_feature_set_mismatch:
            raise FeatureSetMismatch(
                f"model {version} was trained on feature set {mv.feature_set}, but the scorer serves "
                f"{serving_feature_set}: train on {serving_feature_set}, or pass "
                "--allow-feature-set-mismatch if the inputs are known to be the same"
            )
        with self._locked(stage):
            current = self._pointer(stage)
            if current.get("version") == version:
                return
            history = [current["version"], *current.get("history", [])] if current.get("version") else []
            self._write_pointer(stage, version, history[:HISTORY_KEPT])

    def rollback(self, stage: str) -> str:
        """Point ``stage`` back at the version it held before; returns that version."""
        _check_stage(stage)
        with self._locked(stage):
            current = self._pointer(stage)
            history = current.get("history", [])
            if not history:
                where = f"it points to {current['version']}" if current.get("version") else "it was never set"
                raise RegistryError(f"stage {stage} has no previous version to roll back to ({where})")
            self._write_pointer(stage, history[0], history[1:])
            return history[0]

    def _pointer(self, stage: str) -> dict[str, Any]:
        _check_stage(stage)
        try:
            data = (self._stages / f"{stage}.json").read_bytes()
        except FileNotFoundError:
            return {}
        try:
            pointer = json.loads(data)
            if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str):
                raise ValueError("no version")
        except ValueError:
            raise RegistryError(
                f"stage pointer {self._stages / stage}.json is not valid: it was edited by hand; "
                "promote a version to that stage again"
            ) from None
        return pointer

    def _write_pointer(self, stage: str, version: str, history: list[str]) -> None:
        moved_at = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        data = json.dumps({"version": version, "moved_at": moved_at, "history": history}, indent=2).encode()
        temp = self._stages / f".{stage}.{uuid.uuid4().hex}.tmp"
        try:
            _write_synced(temp, data + b"\n")
            os.replace(temp, self._stages / f"{stage}.json")  # readers see the old or the new, whole
        finally:
            temp.unlink(missing_ok=True)
        _fsync_dir(self._stages)

    @contextlib.contextmanager
    def _locked(self, stage: str) -> Iterator[None]:
        # Serialises read-modify-write of a pointer between processes, so no history entry is lost;
        # readers never take it (the replace is atomic). An object store would use a conditional PUT.
        self._stages.mkdir(parents=True, exist_ok=True)
        with open(self._stages / f".{stage}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: use one of {', '.join(STAGES)}")


def _check_version_id(version: str) -> None:
    if not _VERSION_ID.match(version):
        raise ValueError(f"invalid version id {version!r}: letters, digits, '.', '_' and '-' only")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable across a power cut; harmless where directories cannot be opened.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
