"""The feedback worker on the real broker and Redis: join, learning, drift, restarts, SIGKILL.

The predictions are made here, with vectors from a known distribution (stationary but for one
feature that shifts at a known time) and labels that depend on one feature, so that what the
worker must find is known: the shifted feature goes critical in the first window after the shift
and only there, the others stay quiet, and the online models learn the label's dependence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
from helpers import REPO, read_topic, run_cli, settings_env

from stream_ml.config import Settings
from stream_ml.events import Label
from stream_ml.events.deadletter import reason_of
from stream_ml.events.drift import KEY_WINDOW, decode_drift
from stream_ml.events.prediction import Prediction
from stream_ml.events.publish import publish
from stream_ml.features import FRAUD_FEATURES
from stream_ml.feedback.options import FeedbackOptions, WatchOptions
from stream_ml.feedback.worker import FeedbackWorker
from stream_ml.registry import Registry
from stream_ml.stack import kafka_bootstrap, redis_url

START = 1_781_000_000_000
MINUTE = 60_000
WINDOW_S = 1800
NAMES = FRAUD_FEATURES.names
SHIFTED = "amount"  # a request feature: multiplied by 4 from SHIFT_AT on
SIGNAL = "card_amount_sum_1h"  # fraud is likelier the larger this is
SHIFT_AT = START + 4 * WINDOW_S * 1000


def _vectors(rng: np.random.Generator, times: np.ndarray) -> np.ndarray:
    x = rng.lognormal(mean=1.0, sigma=0.5, size=(len(times), len(NAMES)))
    x[:, NAMES.index(SHIFTED)] *= np.where(times >= SHIFT_AT, 4.0, 1.0)
    return x


def _stream(n: int, seed: int = 0, per_s: float = 1.0) -> tuple[list[Prediction], list[Label]]:
    """``n`` predictions, one every 1/per_s s of event time, each labelled a minute later."""
    rng = np.random.default_rng(seed)
    times = START + (np.arange(n) * 1000 / per_s).astype(np.int64)
    x = _vectors(rng, times)
    z = x[:, NAMES.index(SIGNAL)]
    fraud = rng.random(n) < 1 / (1 + np.exp(-(3.0 * (z - 5.0))))  # ~5 % fraud, driven by SIGNAL
    scores = rng.random(n) * 0.1
    predictions = [
        Prediction(
            f"e{i}",
            int(t),
            float(s),
            "approve",
            "v-test",
            "production",
            FRAUD_FEATURES.version,
            row.tolist(),
            int(t) + 20,
        )
        for i, (t, row, s) in enumerate(zip(times, x, scores, strict=True))
    ]
    labels = [
        Label(f"e{i}", bool(f), int(t) + MINUTE, "chargeback")
        for i, (t, f) in enumerate(zip(times, fraud, strict=True))
    ]
    return predictions, labels


def _in_time_order(predictions: list[Prediction], labels: list[Label]) -> list:
    items = [(p.served_at, 0, p) for p in predictions] + [(lb.label_time, 1, lb) for lb in labels]
    return [item for _, _, item in sorted(items, key=lambda x: (x[0], x[1]))]


def _publish(settings: Settings, items: list) -> None:
    asyncio.run(publish(settings, kafka_bootstrap(settings), iter(items), progress=False))


def _publish_raw(settings: Settings, topic: str, values: list[bytes]) -> None:
    from stream_ml.kafka import producer

    async def run() -> None:
        kafka = producer(kafka_bootstrap(settings))
        await kafka.start()
        try:
            for v in values:
                await kafka.send_and_wait(topic, v, key=b"bad")
        finally:
            await kafka.stop()

    asyncio.run(run())


def _options(group: str, **extra: object) -> FeedbackOptions:
    base = FeedbackOptions(
        group_id=group,
        join_ttl_s=3600,
        watch=WatchOptions(window_s=WINDOW_S, bootstrap_rows=1000),
        metrics_window=5000,
        snapshot_every_s=0.0,
        snapshot_min_examples=500,
    )
    return dataclasses.replace(base, **extra)


def _run_until(worker: FeedbackWorker, records: int, timeout_s: float = 120.0) -> None:
    """Run the worker in process until it has handled ``records`` records, then stop it cleanly."""

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(worker.run(stop))
        deadline = time.monotonic() + timeout_s
        while worker.processed < records and not task.done():
            if time.monotonic() > deadline:
                stop.set()
                await task
                raise AssertionError(f"processed {worker.processed} of {records} records in {timeout_s} s")
            await asyncio.sleep(0.1)
        stop.set()
        await task

    asyncio.run(run())


def _worker(settings: Settings, registry: Path, url: str, options: FeedbackOptions) -> FeedbackWorker:
    return FeedbackWorker(
        settings, FRAUD_FEATURES, kafka_bootstrap(settings), url, Registry(registry), options
    )


def _redis_db(settings: Settings, db: int) -> str:
    url = redis_url(settings).rsplit("/", 1)[0] + f"/{db}"
    redis.Redis.from_url(url).flushdb()
    return url


def _join_state(url: str, group: str) -> dict[bytes, object]:
    """Every join key of ``group``, without the group in its name, with its content."""
    client = redis.Redis.from_url(url)
    prefix = f"sm:fb:{{{group}:".encode()
    state: dict[bytes, object] = {}
    for key in client.scan_iter(match=prefix + b"*", count=1000):
        kind = client.type(key)
        name = key[len(prefix) :]
        if kind == b"string":
            state[name] = client.get(key)
        elif kind == b"zset":
            state[name] = client.zrange(key, 0, -1, withscores=True)
        else:
            state[name] = client.hgetall(key)
    return state


def test_join_learning_and_drift_end_to_end(topics: Settings, tmp_path: Path):
    n = 9 * WINDOW_S  # nine windows of one prediction a second: the shift starts the fifth
    predictions, labels = _stream(n)
    early = set(range(0, n, 50))  # some labels reach the log just before their prediction
    items = []
    for item in _in_time_order(predictions, [lb for i, lb in enumerate(labels) if i not in early]):
        if isinstance(item, Prediction) and int(item.event_id[1:]) in early:
            items.append(labels[int(item.event_id[1:])])
        items.append(item)
    items.append(labels[7])  # a duplicate label
    _publish(topics, items)
    _publish_raw(topics, topics.topic_labels, [b"\x00not msgpack"])
    _publish_raw(topics, topics.topic_predictions, [b'{"event_id": "x"}'])

    group, url = f"fb-{uuid.uuid4().hex[:6]}", _redis_db(topics, 5)
    worker = _worker(topics, tmp_path / "registry", url, _options(group))
    _run_until(worker, len(items) + 2)

    # Join: every event once, whichever came first; the duplicate and the bad records counted.
    assert worker.joined == n
    state = _join_state(url, group)
    waiting = [k for k, v in state.items() if k.endswith((b":exp:p", b":exp:l")) and v]
    assert not waiting and any(k.endswith(b":exp:j") for k in state)  # only tombstones are left
    dead = read_topic(kafka_bootstrap(topics), topics.topic_dead_letter, expected=2)
    assert len(dead) == 2 and all(reason_of(r.headers) for r in dead)

    # Learning: the online models found the dependence of fraud on SIGNAL.
    learnt = worker.learner.metrics()
    assert learnt["online-logistic"]["roc_auc"] > 0.85, learnt
    assert learnt["online-forest"]["roc_auc"] > 0.75, learnt
    assert 0.4 < learnt["production:v-test"]["roc_auc"] < 0.6  # the served scores are noise

    # Drift: the shifted feature critical from the window after the shift on, nothing else moved.
    windows = _drift_windows(topics)
    assert len(windows) >= 7
    for start, columns in windows.items():
        after = columns[SHIFTED]["window_end"] > SHIFT_AT  # the window holds shifted rows
        assert (columns[SHIFTED]["severity"] == "critical") == after, (start, columns[SHIFTED])
        quiet = [c for name, c in columns.items() if name not in (SHIFTED, "score")]
        assert all(c["severity"] == "none" for c in quiet), [
            (c["feature"], c["psi"]) for c in quiet if c["severity"] != "none"
        ]

    # The online model was registered as a candidate, and a new worker starts from it.
    registry = Registry(tmp_path / "registry")
    online = [mv for mv in registry.versions() if mv.meta["params"].get("online")]
    assert online
    newest = max(online, key=lambda mv: mv.meta["params"]["examples"])  # ids sort by second, then hash
    again = _worker(topics, tmp_path / "registry", url, _options(group))
    _run_until(again, 0)
    assert again.learner.logistic.predict_proba_one(predictions[5].features) == pytest.approx(
        _restored_probability(registry, newest.version, predictions[5].features), abs=1e-5
    )


def _restored_probability(registry: Registry, version: str, features: list[float]) -> float:
    from stream_ml.serving.model import load_model

    model = load_model(registry, version, FRAUD_FEATURES)
    return model.probabilities([features])[0]


def _drift_windows(settings: Settings) -> dict[int, dict[str, dict]]:
    records = read_topic(kafka_bootstrap(settings), settings.topic_drift, expected=1, timeout_s=10)
    windows: dict[int, dict[str, dict]] = {}
    for r in records:
        if r.key.decode() in (KEY_WINDOW, "__performance__"):
            continue
        message = decode_drift(r.value).to_dict()
        windows.setdefault(message["window_start"], {})[message["feature"]] = message
    return dict(sorted(windows.items()))


def test_a_restart_in_between_joins_nothing_twice(topics: Settings, tmp_path: Path):
    predictions, labels = _stream(3000, seed=1)
    items = _in_time_order(predictions, labels)
    half = len(items) // 2
    group, url = f"fb-re-{uuid.uuid4().hex[:6]}", _redis_db(topics, 6)
    options = _options(group, learn=False)

    _publish(topics, items[:half])
    first = _worker(topics, tmp_path / "registry", url, options)
    _run_until(first, half)
    _publish(topics, items[half:])
    second = _worker(topics, tmp_path / "registry", url, options)
    _run_until(second, len(items) - half)
    assert first.joined + second.joined == len(labels)
    assert second.processed < len(items)  # it resumed from the stored offsets, not the beginning


def test_sigkill_and_restart_give_the_same_join_state(topics: Settings, tmp_path: Path):
    predictions, labels = _stream(20_000, seed=2, per_s=5.0)
    rng = np.random.default_rng(2)
    kept = [lb for lb in labels if rng.random() < 0.8]  # some never labelled: they stay waiting
    items = _in_time_order(predictions, kept)
    _publish(topics, items)
    url = _redis_db(topics, 7)

    clean_group = f"fb-clean-{uuid.uuid4().hex[:6]}"
    _run_until(_worker(topics, tmp_path / "r1", url, _options(clean_group, learn=False)), len(items))
    clean = _join_state(url, clean_group)

    group = f"fb-kill-{uuid.uuid4().hex[:6]}"
    env = settings_env(topics, STREAM_ML_REDIS_URL=url, STREAM_ML_REGISTRY=str(tmp_path / "r2"))
    args = ["worker", "feedback", "--group", group, "--join-ttl", "3600", "--no-learn", "--metrics-port", "0"]
    args += ["--batch-size", "700"]
    client = redis.Redis.from_url(url)
    for _ in range(3):
        before = _applied(client, group)
        if before >= len(items):
            break  # a killed one applied everything (a slow first write): nothing left to interrupt
        proc = subprocess.Popen([sys.executable, "-m", "stream_ml", *args], env=env, cwd=REPO)
        _wait(lambda: _applied(client, group) > before, 60)  # noqa: B023
        time.sleep(np.random.default_rng().uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    log = tmp_path / "last.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "stream_ml", *args], env=env, cwd=REPO, stderr=err)
    try:
        _wait(lambda: _applied(client, group) >= len(items), 120)
        # In its loop (the killed ones may have applied everything): a SIGTERM now is a clean stop.
        _wait(lambda: "Successfully synced group" in log.read_text(), 60)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert _join_state(url, group) == clean


def _applied(client: redis.Redis, group: str) -> int:
    total = 0
    for key in client.scan_iter(match=f"sm:fb:{{{group}:*}}:off".encode()):
        total += sum(int(v) for k, v in client.hgetall(key).items() if not k.startswith(b"clock"))
    return total


def _wait(condition, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_worker_feedback_help():
    result = run_cli("worker", "feedback", "--help", env=settings_env(Settings.from_env({})))
    assert result.returncode == 0
    assert "--join-ttl" in result.stdout and "--window" in result.stdout
