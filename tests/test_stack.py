"""`stream-ml stack up | down | status`: real processes, started and stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest
from helpers import run_cli

from stream_ml.config import ENV_PREFIX, Settings
from stream_ml.stack.processes import free_port


def _env(state_dir: os.PathLike[str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env |= {"STREAM_ML_STATE_DIR": str(state_dir), **extra}
    return env


def _status(env: dict[str, str]) -> tuple[int, dict]:
    result = run_cli("stack", "status", "--json", env=env)
    return result.returncode, json.loads(result.stdout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a stopped child of ours may linger as a zombie until reaped: that is not running
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def own_stack(tmp_path):
    """A private stack's environment; whatever it started is stopped afterwards."""
    env = _env(
        tmp_path / "state", STREAM_ML_KAFKA_PORT=str(free_port()), STREAM_ML_REDIS_PORT=str(free_port())
    )
    yield env
    run_cli("stack", "down", env=env)


def test_up_is_idempotent_and_down_stops_exactly_what_up_started(own_stack):
    first = run_cli("stack", "up", env=own_stack)
    assert first.returncode == 0, first.stderr
    code, state = _status(own_stack)
    assert code == 0
    pids = {p["name"]: p["pid"] for p in state["processes"]}
    assert set(pids) == {"kafka", "redis"}
    assert all(p["running"] for p in state["processes"])
    assert state["kafka_bootstrap"] == f"127.0.0.1:{own_stack['STREAM_ML_KAFKA_PORT']}"
    assert state["redis_url"] == f"redis://127.0.0.1:{own_stack['STREAM_ML_REDIS_PORT']}/0"
    for topic in ("transactions", "labels", "predictions", "drift", "dead-letter"):
        assert f"topic  {topic}" in first.stdout

    second = run_cli("stack", "up", env=own_stack)
    assert second.returncode == 0, second.stderr
    assert second.stdout.count("already running") == 2
    assert {p["name"]: p["pid"] for p in _status(own_stack)[1]["processes"]} == pids

    down = run_cli("stack", "down", env=own_stack)
    assert down.returncode == 0, down.stderr
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids.values())
    code, state = _status(own_stack)
    assert code == 1 and state["processes"] == []
    assert "nothing to stop" in run_cli("stack", "down", env=own_stack).stdout


def test_a_dead_process_is_restarted_and_the_live_one_kept(own_stack):
    assert run_cli("stack", "up", env=own_stack).returncode == 0
    pids = {p["name"]: p["pid"] for p in _status(own_stack)[1]["processes"]}
    os.kill(pids["redis"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _status(own_stack)[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    code, _state = _status(own_stack)
    assert code == 1, "status must report the dead Redis"
    again = run_cli("stack", "up", env=own_stack)
    assert again.returncode == 0, again.stderr
    now = {p["name"]: p["pid"] for p in _status(own_stack)[1]["processes"]}
    assert now["kafka"] == pids["kafka"]
    assert now["redis"] != pids["redis"] and _alive(now["redis"])


@pytest.mark.parametrize("busy", ["STREAM_ML_KAFKA_PORT", "STREAM_ML_REDIS_PORT"])
def test_a_port_in_use_is_a_clear_error_and_leaves_nothing_running(own_stack, busy):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", int(own_stack[busy])))
        blocker.listen()
        result = run_cli("stack", "up", env=own_stack)
    assert result.returncode == 2
    assert f"port {own_stack[busy]} is in use" in result.stderr
    assert "Traceback" not in result.stderr
    other = "STREAM_ML_REDIS_PORT" if busy == "STREAM_ML_KAFKA_PORT" else "STREAM_ML_KAFKA_PORT"
    assert not _listening(int(own_stack[other])), "a half-started stack was left behind"


def test_external_servers_are_used_and_nothing_is_started(tmp_path, stack: Settings):
    from stream_ml.stack import kafka_bootstrap, redis_url

    env = _env(
        tmp_path / "state",
        STREAM_ML_KAFKA_BOOTSTRAP=kafka_bootstrap(stack),
        STREAM_ML_REDIS_URL=redis_url(stack),
        STREAM_ML_TOPIC_TRANSACTIONS="external-tx",
    )
    result = run_cli("stack", "up", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("nothing started") == 2
    assert "topic  external-tx" in result.stdout
    assert not (tmp_path / "state" / "logs").exists()
    _code, state = _status(env)
    assert state["processes"] == [] and state["kafka_bootstrap"] == kafka_bootstrap(stack)


def test_commands_find_the_running_stack_or_say_how_to_start_one(tmp_path, stack: Settings):
    found = run_cli(
        "produce", "synthetic", "--events", "50", "--max-speed", "--quiet", env=_env(stack.state_dir)
    )
    assert found.returncode == 0, found.stderr
    assert "published" in found.stdout

    missing = run_cli("produce", "synthetic", "--events", "5", env=_env(tmp_path / "nothing-here"))
    assert missing.returncode == 2
    assert "stream-ml stack up" in missing.stderr and "STREAM_ML_KAFKA_BOOTSTRAP" in missing.stderr
