"""Feedback worker: labels joined per second of one process, learning and drift on, in one run.

    python loadtests/bench_feedback.py [--transactions 60000]

Starts an embedded stack on free ports; turns a synthetic stream into the predictions a scorer
would have served (point-in-time vectors, the default model's scores) and its labels; then runs
one in-process feedback worker in two phases:

1. predictions: all of them published first; the worker watches them for drift and stores them
   in the join state (predictions/s);
2. labels: then all labels; each joins its prediction, and both online models predict, then
   learn (labels/s: the issue's figure, goal >= 5,000/s).

The same labels are then run through the learners alone, from memory, for the ratio of learning
to the whole. Absolute figures move with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

from stream_ml.config import Settings
from stream_ml.events import Label
from stream_ml.events.prediction import Prediction
from stream_ml.events.publish import publish
from stream_ml.events.sources.served import served
from stream_ml.events.sources.synthetic import SyntheticConfig, SyntheticStream
from stream_ml.features import feature_set
from stream_ml.feedback.online import Example, OnlineLearner
from stream_ml.feedback.options import FeedbackOptions, WatchOptions
from stream_ml.feedback.worker import FeedbackWorker
from stream_ml.registry import Registry
from stream_ml.serving.model import default_model
from stream_ml.stack import kafka_bootstrap, local, redis_url
from stream_ml.stack.processes import free_port
from stream_ml.stack.topics import ensure_topics

START = 1_793_491_200_000


async def _phase(worker: FeedbackWorker, settings: Settings, items: list, done_at: int) -> float:
    """Publish ``items`` while the worker runs; seconds until it has handled ``done_at`` records."""
    await publish(settings, kafka_bootstrap(settings), iter(items), progress=False)
    started = time.perf_counter()
    while worker.processed < done_at:
        await asyncio.sleep(0.02)
    return time.perf_counter() - started


async def _run(worker: FeedbackWorker, settings: Settings, predictions: list, labels: list) -> tuple:
    stop = asyncio.Event()
    task = asyncio.ensure_future(worker.run(stop))
    try:
        p_s = await _phase(worker, settings, predictions, len(predictions))
        l_s = await _phase(worker, settings, labels, len(predictions) + len(labels))
    finally:
        stop.set()
        await task
    return p_s, l_s


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transactions", type=int, default=60_000, help="transactions (each gets a label)")
    args = parser.parse_args()
    fs = feature_set("fraud")
    config = SyntheticConfig(seed=1, start_ms=START, rate=50.0, fraud_rate=0.005, label_delay_s=600)
    stream = SyntheticStream(config).items()
    limited = itertools.islice(stream, 2 * args.transactions)  # the stream is endless
    t = time.perf_counter()
    out = list(served(limited, fs, default_model(fs)))
    predictions = [p for p in out if isinstance(p, Prediction)]
    known = {p.event_id for p in predictions}
    labels = [lb for lb in out if isinstance(lb, Label) and lb.event_id in known]
    print(
        f"made {len(predictions):,} predictions and {len(labels):,} labels in {time.perf_counter() - t:.1f} s"
    )

    state = Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    base = Settings.from_env({}, state_dir=state, kafka_port=free_port(), redis_port=free_port())
    local.up(base)
    try:
        tag = uuid.uuid4().hex[:6]
        settings = replace(
            base, topic_labels=f"flab-{tag}", topic_predictions=f"fpred-{tag}", topic_drift=f"fdrift-{tag}"
        )
        asyncio.run(ensure_topics(kafka_bootstrap(settings), settings.topics(), settings.partitions))
        options = FeedbackOptions(
            group_id=f"bench-{tag}",
            watch=WatchOptions(window_s=600, bootstrap_rows=5000),
            snapshot_every_s=1e9,
        )
        worker = FeedbackWorker(
            settings,
            fs,
            kafka_bootstrap(settings),
            redis_url(settings),
            Registry(state / "registry"),
            options,
        )
        p_s, l_s = asyncio.run(_run(worker, settings, predictions, labels))

        learner = OnlineLearner(fs.names)
        by_id = {p.event_id: p for p in predictions}
        examples = [
            Example(by_id[lb.event_id].features, lb.is_fraud, by_id[lb.event_id].event_time, {})
            for lb in labels
        ]
        t = time.perf_counter()
        for i in range(0, len(examples), 10_000):
            learner.learn_many(examples[i : i + 10_000])
        learn_s = time.perf_counter() - t

        print(f"{'predictions (drift + join)':<30} {len(predictions) / p_s:>10,.0f} /s")
        print(f"{'labels (join + learn)':<30} {len(labels) / l_s:>10,.0f} /s  ({worker.joined:,} joined)")
        print(f"{'learners alone (memory)':<30} {len(examples) / learn_s:>10,.0f} /s")
        print(f"learning share of the label phase: {learn_s / l_s:.0%}")
        for name, m in worker.learner.metrics().items():
            print(f"  {name:<28} rolling ROC AUC {m['roc_auc']:.3f}  PR AUC {m['pr_auc']:.3f}")
    finally:
        local.down(base)


if __name__ == "__main__":
    main()
