"""docker-compose.yml, the Dockerfile and the Prometheus config, checked without Docker.

Every stream-ml service's command is parsed by the real CLI parser and every ``STREAM_ML_*``
variable is checked against the settings, so the compose file cannot drift from the code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from stream_ml import config
from stream_ml.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
TORCH_PIN = "torch==2.13.0"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "no `services:` mapping"
    return doc


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, from either the mapping or the list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _builds_here(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if isinstance(build, dict):
        build = build.get("context", ".")
    return build is not None and str(build).rstrip("/") in {".", ""}


def stream_ml_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from this repository, or running the image such a service builds."""
    services = compose["services"]
    images = {s["image"] for s in services.values() if _builds_here(s) and s.get("image")}
    return {
        name: s
        for name, s in services.items()
        if _builds_here(s) or (s.get("image") and s["image"] in images)
    }


def command_error(command: Any) -> str | None:
    """Why ``command`` is not a valid stream-ml invocation, or None when the CLI accepts it."""
    argv = shlex.split(command) if isinstance(command, str) else command
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return f"command must be a non-empty list of strings, got {command!r}"
    if argv[0] != "stream-ml":
        return f"command must start with 'stream-ml', got {argv[0]!r}"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        message = stderr.getvalue().strip().splitlines()
        return f"stream-ml rejects {argv[1:]} (exit {exc.code}): {message[-1] if message else ''}"
    if not callable(getattr(args, "run", None)):
        return f"{argv[1:]} does not select a runnable subcommand"
    return None


# --- the validator itself: it must reject what the CLI rejects ---------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["stream-ml", "no-such-command"],
        ["stream-ml", "produce", "synthetic", "--no-such-flag"],
        ["stream-ml", "produce", "synthetic", "--rate", "fast"],
        ["stream-ml", "stack"],
        ["stream-ml", "--help"],
        ["python", "-m", "stream_ml"],
        [],
        None,
    ],
)
def test_command_validator_rejects_bad_commands(command: Any) -> None:
    assert command_error(command) is not None


def test_command_validator_names_the_problem() -> None:
    error = command_error(["stream-ml", "no-such-command"])
    assert error is not None and "no-such-command" in error


def test_command_validator_accepts_real_commands() -> None:
    assert command_error(["stream-ml", "stack", "up"]) is None
    assert command_error(["stream-ml", "produce", "synthetic", "--rate", "5", "--partitions", "2"]) is None


# --- docker-compose.yml -----------------------------------------------------------------------


def test_kafka_runs_in_kraft_mode(compose: dict[str, Any]) -> None:
    kafka = compose["services"].get("kafka")
    assert kafka is not None, "no `kafka` service"
    assert str(kafka.get("image", "")).startswith("apache/kafka:")
    env = _environment(kafka)
    roles = {r.strip() for r in env.get("KAFKA_PROCESS_ROLES", "").split(",")}
    assert "controller" in roles, f"KAFKA_PROCESS_ROLES={env.get('KAFKA_PROCESS_ROLES')!r}: not KRaft"
    assert not any("ZOOKEEPER" in k for k in env), "KRaft needs no ZooKeeper settings"
    for key in ("KAFKA_NODE_ID", "KAFKA_CONTROLLER_QUORUM_VOTERS", "KAFKA_CONTROLLER_LISTENER_NAMES"):
        assert env.get(key), f"kafka: {key} is not set"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in env.get("KAFKA_LISTENERS", "")
    assert env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "").lower() == "false"
    assert "healthcheck" in kafka


def test_stream_ml_services_run_real_commands(compose: dict[str, Any]) -> None:
    services = stream_ml_services(compose)
    assert {"topics", "producer"} <= set(services), f"stream-ml services found: {sorted(services)}"
    errors = {name: command_error(s.get("command")) for name, s in services.items()}
    failures = [f"service {name!r}: {error}" for name, error in errors.items() if error]
    if failures:
        pytest.fail("\n".join(failures))


def test_stream_ml_variables_are_settings(compose: dict[str, Any]) -> None:
    known = {config.env_name(f.name) for f in dataclasses.fields(config.Settings)}
    # Anywhere in the file (anchors, services, comments): a misspelt variable is silently ignored.
    used = set(re.findall(rf"\b{config.ENV_PREFIX}[A-Z0-9_]+", COMPOSE.read_text()))
    assert used, "docker-compose.yml sets no STREAM_ML_* variable"
    assert used <= known, f"not settings: {sorted(used - known)}; known: {sorted(known)}"


def test_stream_ml_services_reach_kafka_and_redis(compose: dict[str, Any]) -> None:
    services = compose["services"]
    advertised = _environment(services["kafka"]).get("KAFKA_ADVERTISED_LISTENERS", "")
    for name, service in stream_ml_services(compose).items():
        env = _environment(service)
        settings = config.Settings.from_env(env)  # values of the right type
        assert settings.kafka_bootstrap, f"{name}: STREAM_ML_KAFKA_BOOTSTRAP unset (would start a stack)"
        assert settings.redis_url, f"{name}: STREAM_ML_REDIS_URL unset (would start a stack)"
        for server in settings.kafka_bootstrap.split(","):
            assert f"://{server}" in advertised, f"{name}: {server} is not an advertised Kafka listener"
        redis_host = re.sub(r"^rediss?://(?:[^@/]*@)?([^:/]+).*$", r"\1", settings.redis_url)
        assert redis_host in services, f"{name}: Redis host {redis_host!r} is no service"


def test_producer_waits_for_the_topics(compose: dict[str, Any]) -> None:
    depends = compose["services"]["producer"].get("depends_on") or {}
    assert isinstance(depends, dict), "producer: depends_on needs the long form with a condition"
    assert depends.get("topics", {}).get("condition") == "service_completed_successfully"


def test_prometheus_config_is_mounted_from_the_repo(compose: dict[str, Any]) -> None:
    prometheus = [s for s in compose["services"].values() if str(s.get("image", "")).startswith("prom/")]
    assert prometheus, "no Prometheus service"
    mounted = []
    for volume in prometheus[0].get("volumes") or []:
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume.get("target", "")
        else:
            source, _, rest = str(volume).partition(":")
            target = rest.split(":")[0]
        if source.startswith((".", "/")):
            mounted.append((source, target))
    assert mounted, "Prometheus mounts no file from the repository"
    for source, target in mounted:
        path = (ROOT / source).resolve()
        assert path.is_file(), f"{source} (mounted at {target}) does not exist"
        if target == "/etc/prometheus/prometheus.yml":
            cfg = yaml.safe_load(path.read_text())
            assert isinstance(cfg, dict) and isinstance(cfg.get("scrape_configs"), list)
            assert cfg["scrape_configs"], f"{source}: scrape_configs is empty"
    assert "/etc/prometheus/prometheus.yml" in {t for _, t in mounted}


# --- Dockerfile -------------------------------------------------------------------------------


def _instructions(dockerfile: str) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    lines = [ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#")]
    return [" ".join(i.split()) for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def test_dockerfile_installs_torch_before_the_project() -> None:
    steps = _instructions(DOCKERFILE.read_text())
    assert steps and steps[0].startswith("FROM python:3.11"), steps[:1]
    runs = [(i, s) for i, s in enumerate(steps) if s.startswith("RUN ")]
    torch = [i for i, s in runs if "pip install" in s and TORCH_PIN in s]
    project = [i for i, s in runs if re.search(r"pip install\b[^;&|]*\s\.(\s|$|;|&)", s)]
    assert torch, f"no `pip install {TORCH_PIN}` step"
    assert project, "no `pip install .` step"
    assert torch[0] < project[0], "torch must be installed before the project"
    copies = [i for i, s in enumerate(steps) if s.startswith(("COPY ", "ADD "))]
    assert all(torch[0] < i for i in copies), "torch's layer must come before the project is copied in"


def test_dockerfile_names_no_package_index() -> None:
    text = DOCKERFILE.read_text()
    assert "index-url" not in text and "find-links" not in text and "://" not in text


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache"):
        assert entry in ignored, f".dockerignore: {entry} missing"
