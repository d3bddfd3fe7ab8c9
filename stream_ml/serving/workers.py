"""Several scorer processes on one listening socket, as uvicorn's and gunicorn's workers are.

One process serves about one core's worth of calls: its event loop reads the calls, scores the
batches and writes the answers in turn. ``stream-ml serve --workers N`` forks N of them from a
parent that holds the socket; the kernel gives each new connection to the worker that accepts it
first, so a busy worker takes fewer. Each worker has its own micro-batcher, model and Redis
connection, and follows the registry on its own. What callers see as one server stays one:

- the rate limit of a key holds across the workers (shared memory, see ``app.RateLimiter``);
- ``/metrics`` adds every worker's series up (prometheus_client's multiprocess mode, in a folder
  that :func:`shared_metrics` makes before the fork).

The parent forks before anything heavy is imported: a CUDA context does not survive a fork, and
each worker's torch then starts as a single process's would. A worker that dies is replaced; one
that dies while starting (a model that cannot be loaded) stops the server, rather than being
restarted in a loop: its error is the user's to fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator

log = logging.getLogger("stream_ml.serve")

# A worker that exits sooner than this after its fork failed to start (importing torch, loading
# and warming up the model take seconds): the server stops instead of forking it again and again.
START_GRACE_S = 30.0
METRICS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client reads it when it is first imported
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def supervise(workers: int, serve: Callable[[int], object], start_grace_s: float = START_GRACE_S) -> int:
    """Run ``serve(i)`` for i in 0..workers-1, each in a forked process, until SIGTERM or SIGINT;
    a worker that dies is replaced by one with its number.

    The exit status: 0 once stopped by a signal, 1 when a worker failed to start (exited within
    ``start_grace_s``; the rest are stopped then). ``serve`` runs in the child with the default
    signal handlers (uvicorn installs its own); an exception it raises is logged, and the child
    exits 1.
    """
    running: dict[int, tuple[int, float]] = {}  # pid -> (worker number, when it was forked)
    stopping = False

    def stop_all(signum: int | None = None, frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def fork(number: int) -> None:
        # Signals wait until the child has its own handlers: the parent's would stop its siblings.
        signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:
            for signum in _STOP_SIGNALS:
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
            os._exit(_child(serve, number))
        running[pid] = (number, time.monotonic())
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)

    for signum in _STOP_SIGNALS:
        signal.signal(signum, stop_all)
    for number in range(workers):
        fork(number)
    status = 0
    while running:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        if pid not in running:
            continue
        number, forked = running.pop(pid)
        _forget_metrics(pid)
        if stopping:
            continue
        code = os.waitstatus_to_exitcode(wait_status)
        if time.monotonic() - forked < start_grace_s:
            log.error("worker %d (pid %d) exited (code %d) while starting: stopping", number, pid, code)
            status = 1
            stop_all()
        else:
            log.warning("worker %d (pid %d) exited (code %d): starting another", number, pid, code)
            fork(number)
    return status


def _child(serve: Callable[[int], object], number: int) -> int:
    try:
        serve(number)
    except Exception as exc:
        log.error("worker %d: %s", number, exc, exc_info=not isinstance(exc, RuntimeError | ValueError))
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        logging.shutdown()
    return 0


@contextlib.contextmanager
def shared_metrics() -> Iterator[str]:
    """A folder for the workers' metrics (prometheus_client's multiprocess mode), removed after.

    One the user set in ``PROMETHEUS_MULTIPROC_DIR`` is used as it is, and kept: it must be
    empty at start, or the counts of an earlier run are added in.
    """
    from prometheus_client import values

    given = os.environ.get(METRICS_DIR)
    folder = given or tempfile.mkdtemp(prefix="stream-ml-metrics-")
    os.environ[METRICS_DIR] = folder
    # prometheus_client picks its value class when first imported, and the CLI has imported it
    # already: the metrics the workers create from here on must keep their values in the folder.
    single = values.ValueClass
    values.ValueClass = values.get_value_class()
    try:
        yield folder
    finally:
        values.ValueClass = single
        if not given:
            os.environ.pop(METRICS_DIR, None)
            shutil.rmtree(folder, ignore_errors=True)


def _forget_metrics(pid: int) -> None:
    """A dead worker's live gauges leave ``/metrics`` (its counters stay in the totals)."""
    if METRICS_DIR in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound (not yet listening: each worker listens once it is ready)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart need not wait
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(
            f"cannot listen on {host}:{port}: {exc.strerror}; stop what uses it, or pick another --port"
        ) from None
    sock.set_inheritable(True)
    return sock
