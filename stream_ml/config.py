"""The one settings object: every config value is defined here, once.

Each field is read from the environment as ``STREAM_ML_<FIELD NAME>`` and can be overridden by
the global CLI flag ``--<field-name>``; the flags are generated from this class, so a new field is
a new env var and a new flag at once.

>>> s = Settings.from_env({"STREAM_ML_PARTITIONS": "8"})
>>> s.partitions
8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

ENV_PREFIX = "STREAM_ML_"


class ConfigError(ValueError):
    """A setting has a value that cannot be used; the message says which and what to do."""


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "stream-ml"


def _setting(default: Any = None, *, help: str, factory: Any = None, secret: bool = False) -> Any:
    # A secret has no flag: command lines show in process lists, the environment does not.
    metadata = {"help": help, "secret": secret}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, slots=True)
class Settings:
    kafka_bootstrap: str | None = _setting(
        help="Kafka bootstrap servers (host:port[,host:port]). Unset: the stack started by `stack up`."
    )
    redis_url: str | None = _setting(
        help="Redis URL of the online store (redis://host:port/db). Unset: the stack started by `stack up`."
    )
    state_dir: Path = _setting(
        factory=_default_state_dir,
        help="Where the embedded stack keeps its PIDs, logs and endpoints.",
    )
    kafka_port: int = _setting(19092, help="Port of the embedded Kafka-compatible broker.")
    redis_port: int = _setting(16379, help="Port of the embedded Redis server.")
    partitions: int = _setting(4, help="Partitions of each topic created by `stack up`.")
    topic_transactions: str = _setting("transactions", help="Topic of transaction events.")
    topic_labels: str = _setting("labels", help="Topic of label events.")
    topic_predictions: str = _setting("predictions", help="Topic of served predictions.")
    topic_drift: str = _setting("drift", help="Topic of drift reports.")
    topic_dead_letter: str = _setting("dead-letter", help="Topic of rejected messages, with the reason.")
    feature_set: str = _setting("fraud", help="Name of the feature set the workers and the scorer use.")
    registry: str | None = _setting(help="Model registry folder. Unset: `registry` in the state dir.")
    api_keys: str | None = _setting(
        help="Comma-separated API keys the scorer accepts (environment only).", secret=True
    )

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``STREAM_ML_*`` variables, then ``overrides`` (non-None values win)."""
        env = os.environ if env is None else env
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(env_name(f.name))
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw, hints[f.name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The ``STREAM_ML_*`` variables that give a child process these settings."""
        return {
            env_name(f.name): str(value)
            for f in dataclasses.fields(self)
            if (value := getattr(self, f.name)) is not None
        }

    def registry_path(self) -> Path:
        return Path(self.registry) if self.registry else self.state_dir / "registry"

    def topics(self) -> list[str]:
        """Every topic of the architecture, in a stable order."""
        return [
            self.topic_transactions,
            self.topic_labels,
            self.topic_predictions,
            self.topic_drift,
            self.topic_dead_letter,
        ]


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _parse(name: str, raw: str, typ: Any) -> Any:
    base = _base_type(typ)
    try:
        return base(raw)
    except ValueError:
        raise ConfigError(
            f"{env_name(name)}={raw!r}: expected {base.__name__}; fix or unset the variable"
        ) from None


def _base_type(typ: Any) -> type:
    args = getattr(typ, "__args__", None)
    if args:  # `str | None` and friends: the non-None member
        return next(a for a in args if a is not type(None))
    return typ


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a ``--flag`` per setting to ``parser`` (defaults to None: unset flags do not override)."""
    group = parser.add_argument_group("settings (each also read from its STREAM_ML_* variable)")
    hints = get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        if f.metadata["secret"]:
            continue
        base = _base_type(hints[f.name])
        group.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f"setting_{f.name}",
            type=base,
            default=None,
            metavar=base.__name__.upper(),
            help=f"{f.metadata['help']} [{env_name(f.name)}]",
        )


def from_arguments(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    overrides = {f.name: getattr(args, f"setting_{f.name}", None) for f in dataclasses.fields(Settings)}
    return Settings.from_env(env, **overrides)
