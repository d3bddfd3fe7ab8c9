"""`serve --workers`: the supervisor of forked workers, and the rate limit they share."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO

from stream_ml.serving.limits import RateLimiter

# A stand-in for the scorer: each worker marks its number and pid, then serves until stopped.
_SUPERVISED = """
import os, sys, time
from pathlib import Path
from stream_ml.serving import workers

out, mode, grace = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])

def serve(number):
    if mode == "fail":
        raise RuntimeError("production points to a model that cannot be loaded")
    (out / f"{number}-{os.getpid()}").touch()
    while True:
        time.sleep(1)

sys.exit(workers.supervise(2, serve, start_grace_s=grace))
"""


def _supervisor(tmp_path: Path, mode: str, grace: float) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", _SUPERVISED, str(tmp_path), mode, str(grace)],
        cwd=REPO,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def _workers(folder: Path) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = {}
    for mark in sorted(folder.iterdir(), key=lambda p: p.stat().st_mtime_ns):
        number, pid = map(int, mark.name.split("-"))
        seen.setdefault(number, []).append(pid)
    return seen


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_worker_that_dies_is_replaced_and_a_stop_stops_them_all(tmp_path: Path):
    proc = _supervisor(tmp_path, "serve", grace=0.2)
    try:
        first = _wait_for(lambda: len(_workers(tmp_path)) == 2 and _workers(tmp_path))
        time.sleep(0.3)  # past the start grace: a death now is a crash, not a failed start
        os.kill(first[0][0], signal.SIGKILL)
        again = _wait_for(lambda: len(_workers(tmp_path)[0]) == 2 and _workers(tmp_path))
        assert again[1] == first[1]  # the other worker served on
        replacement = again[0][1]
        assert _alive(replacement)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, proc.stderr.read()
        assert "worker 0" in proc.stderr.read()
        assert not _alive(replacement) and not _alive(first[1][0])
    finally:
        proc.kill()


def test_a_worker_that_cannot_start_stops_the_server_with_its_error(tmp_path: Path):
    proc = _supervisor(tmp_path, "fail", grace=30.0)
    try:
        assert proc.wait(30) == 1
        err = proc.stderr.read()
        assert "cannot be loaded" in err and "while starting" in err
    finally:
        proc.kill()


def _drain(limiter: RateLimiter, calls: int, allowed) -> None:
    allowed.value = sum(limiter.allow("k") == 0.0 for _ in range(calls))


def test_the_rate_limit_is_one_bucket_for_every_forked_worker():
    limiter = RateLimiter(1.0, ["k"])  # one token a second: none comes back during the test
    allowed = multiprocessing.Value("i", 0)
    worker = multiprocessing.get_context("fork").Process(target=_drain, args=(limiter, 5, allowed))
    worker.start()
    worker.join(10)
    assert allowed.value == 1  # the forked worker took the one token...
    wait = limiter.allow("k")
    assert 0.0 < wait <= 1.0  # ...and this process sees the bucket it emptied
