"""Background server processes that the stack starts, tracks by PID and stops by PID."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class PortInUse(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class Process:
    name: str
    pid: int
    port: int
    argv: list[str]
    log: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"running": self.is_running()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Process:
        """A process as :meth:`to_json` wrote it (its ``running`` is re-checked when asked)."""
        return cls(**{f: d[f] for f in ("name", "pid", "port", "argv", "log")})

    def is_running(self) -> bool:
        """True if our PID is alive *and* still runs our binary (a recycled PID is not ours)."""
        try:
            exe = os.readlink(f"/proc/{self.pid}/exe")
        except FileNotFoundError:
            return False  # gone, or a zombie
        except OSError:
            return _pid_alive(self.pid)  # no procfs (macOS) or not ours to inspect: trust the PID
        return exe == os.path.realpath(self.argv[0])

    def stop(self, timeout_s: float = 10.0) -> None:
        if not self.is_running():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _reap(self.pid)
            if not self.is_running():
                return
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        _reap(self.pid)


def ensure_port_free(port: int, what: str, hint: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise PortInUse(f"port {port} is in use, so the {what} cannot start there; {hint}") from None


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn(
    name: str, argv: list[str], port: int, log_path: Path, env: Mapping[str, str] | None = None
) -> Process:
    """Start ``argv`` detached from our session (it outlives this command), output to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=None if env is None else dict(env),
        )
    return Process(name=name, pid=proc.pid, port=port, argv=argv, log=str(log_path))


def wait_for_port(process: Process, host: str, timeout_s: float) -> None:
    """Wait until ``process`` accepts TCP connections; fail early, with its log, if it dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not process.is_running():
            raise RuntimeError(
                f"{process.name} exited at start-up; its log ({process.log}) ends with:\n" + tail(process.log)
            )
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.2)
            if s.connect_ex((host, process.port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(
        f"{process.name} did not listen on port {process.port} within {timeout_s:.0f} s; see {process.log}"
    )


def tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pid: int) -> None:
    # Only our own children can be reaped; a stack started by another command is not one.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
