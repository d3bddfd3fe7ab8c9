"""The scorer's batch in process: time a call at each batch size, optionally against other code.

    python loadtests/bench_score_batch.py                           # this tree alone
    python loadtests/bench_score_batch.py --against /tmp/before     # this tree against another

``--against`` takes another checkout of the repository (for one commit: ``git worktree add
/tmp/before <commit>``). Each tree's ``Scorer._score_batch`` runs in a process of its own, on the
embedded stack's Redis filled as the load test fills it (``load_score.py``), reading the same
transactions. The processes take turns, a few hundred calls each, round after round, so a drift of
the machine's speed (several-fold within an hour on the shared sandboxes) falls on both alike.
Each round gives a ratio, other tree's time over this one's; the median ratio is printed, with
its range. A difference of 3 % reads clearly here, where fixed-rate load runs differ by 30 %
between two runs of the same code.

What a call costs here: the feature read (one MGET), decoding, the feature vector, the model with
its reasons, the answer objects. Not HTTP, the batcher or the prediction log: those are the load
test's (``load_score.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import uvloop

HERE = Path(__file__).resolve()
CALLS_PER_TURN = 600


def _worker(redis: str) -> None:
    """Serve turns on stdin ("size calls" per line; an empty line ends): one figure per turn,
    µs per call. Runs in the tree under test (its working directory), with that tree's code."""
    sys.path.insert(0, os.getcwd())
    from stream_ml.events.sources.synthetic import SyntheticConfig, SyntheticStream
    from stream_ml.events.transaction import Transaction
    from stream_ml.features import feature_set
    from stream_ml.serving.app import Scorer
    from stream_ml.serving.options import ServeOptions

    config = SyntheticConfig(seed=3, start_ms=int(time.time() * 1000), rate=1000.0)
    txs = [t for t in itertools.islice(SyntheticStream(config), 5000) if isinstance(t, Transaction)]

    async def serve() -> None:
        scorer = Scorer(feature_set("fraud"), redis, ServeOptions(api_keys=("bench",)))
        await scorer.start()
        loop = asyncio.get_running_loop()
        turn = 0
        while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
            size, calls = map(int, line.split())
            batches = max(1, calls // size)
            started = time.perf_counter()
            for _ in range(batches):
                at = (turn * size) % (len(txs) - size)
                turn += 1
                await scorer._score_batch(txs[at : at + size])
            print((time.perf_counter() - started) / (batches * size) * 1e6, flush=True)
        await scorer.stop()

    uvloop.run(serve())  # as `stream-ml serve` runs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--against", type=Path, help="another checkout of the repository to compare with")
    parser.add_argument("--sizes", default="1,8,32,64", help="batch sizes (comma-separated)")
    parser.add_argument("--rounds", type=int, default=10, help="turns of each tree at each size")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker)
        return

    sys.path.insert(0, str(HERE.parent))
    import load_score

    from stream_ml.stack import local, redis_url

    settings = load_score.stack_settings("stream-ml-bench-")
    local.up(settings)
    trees = {"this tree": HERE.parent.parent} | ({"other": args.against.resolve()} if args.against else {})
    workers = {}
    try:
        load_score._fill_store(settings)
        for name, tree in trees.items():
            workers[name] = subprocess.Popen(
                [sys.executable, str(HERE), "--worker", redis_url(settings)],
                cwd=tree,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        sizes = [int(s) for s in args.sizes.split(",")]
        turns = {size: f"{size} {max(CALLS_PER_TURN, size * 10)}" for size in sizes}
        figures = lockstep(workers, args.rounds, list(turns.values()))
        times = {(name, size): figures[(name, turn)] for name in trees for size, turn in turns.items()}
        _report(sizes, times, args.against)
    finally:
        close(workers)
        local.down(settings)


def lockstep(
    workers: dict[str, subprocess.Popen], rounds: int, turns: list[str]
) -> dict[tuple[str, str], list[float]]:
    """Each turn's line to each worker, round after round, the workers' order alternating; the
    figure each worker answered, by (worker, turn). Round 0 warms them up, uncounted."""
    times: dict[tuple[str, str], list[float]] = {(name, turn): [] for name in workers for turn in turns}
    for round_ in range(rounds + 1):
        for turn in turns:
            order = list(workers.items()) if round_ % 2 else list(workers.items())[::-1]
            for name, worker in order:
                worker.stdin.write(turn + "\n")  # type: ignore[union-attr]
                worker.stdin.flush()  # type: ignore[union-attr]
                figure = float(worker.stdout.readline())  # type: ignore[union-attr]
                if round_:
                    times[(name, turn)].append(figure)
    return times


def close(workers: dict[str, subprocess.Popen]) -> None:
    """An empty line ends each worker's turns; wait for them to stop."""
    for worker in workers.values():
        worker.stdin.write("\n")  # type: ignore[union-attr]
        worker.stdin.flush()  # type: ignore[union-attr]
        worker.wait(30)


def _report(sizes: list[int], times: dict[tuple[str, int], list[float]], against: Path | None) -> None:
    head = "| batch size | this tree, µs a call (median) |"
    print(head + (f" {against}, µs a call | ratio other / this (range) |" if against else ""))
    print("|---|---|" + ("---|---|" if against else ""))
    for size in sizes:
        mine = times[("this tree", size)]
        row = f"| {size} | {statistics.median(mine):.1f} |"
        if against:
            other = times[("other", size)]
            ratios = sorted(o / m for o, m in zip(other, mine, strict=True))
            row += f" {statistics.median(other):.1f} | {statistics.median(ratios):.3f}"
            row += f" ({ratios[0]:.2f}–{ratios[-1]:.2f}) |"
        print(row)


if __name__ == "__main__":
    main()
