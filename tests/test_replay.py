"""Replay: the log read back from the real broker, point in time, against the oracle and the worker.

Uses the feature worker's dataset (tests/test_feature_worker.py): synthetic payments with
out-of-order and too-late copies, and their labels, on fresh topics.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from pathlib import Path

import msgpack
import numpy as np
import pytest
from helpers import run_cli, settings_env
from test_feature_worker import (
    HOUR,
    START,
    Dataset,
    _assert_matches_oracle,
    _redis_db,
    _snapshot,
    _start,
    _stop,
    _wait_done,
    make_dataset,
)

from stream_ml.config import Settings
from stream_ml.events import Label, Transaction
from stream_ml.features import FRAUD_FEATURES
from stream_ml.stack import kafka_bootstrap
from stream_ml.training.dataset import read_dataset
from stream_ml.training.replay import ReplayOptions, replay


@pytest.fixture(scope="module")
def dataset(stack: Settings) -> Dataset:
    return make_dataset(stack)


def test_rows_are_point_in_time(dataset: Dataset, tmp_path: Path):
    rows_from, rows_to, cutoff = START + HOUR, START + 2 * HOUR + HOUR // 2, START + 2 * HOUR
    out = tmp_path / "ds"
    result = asyncio.run(
        replay(
            dataset.settings,
            FRAUD_FEATURES,
            kafka_bootstrap(dataset.settings),
            ReplayOptions(
                rows_from=rows_from, rows_to=rows_to, label_cutoff=cutoff, output=out, progress=False
            ),
        )
    )
    columns, manifest = read_dataset(out)
    txs = {i.event_id: i for i in dataset.items if isinstance(i, Transaction)}
    kept = [t for t in txs.values() if t.event_id not in set(dataset.oracle.dropped)]
    expected_ids = {t.event_id for t in kept if rows_from <= t.event_time < rows_to}
    assert set(columns["event_id"].tolist()) == expected_ids
    assert result.counts["late"] == dataset.late
    assert manifest["feature_set"] == FRAUD_FEATURES.version
    assert manifest["sources"][dataset.settings.topic_transactions]  # offsets read, per partition

    # labels as known at the cutoff: a label that arrived later is unknown (-1)
    labels: dict[str, Label] = {}
    for item in dataset.items:
        if isinstance(item, Label) and item.label_time <= cutoff:
            held = labels.get(item.event_id)
            if held is None or held.label_time <= item.label_time:
                labels[item.event_id] = item
    for event_id, label in zip(columns["event_id"].tolist(), columns["label"].tolist(), strict=True):
        known = labels.get(event_id)
        assert label == (-1 if known is None else int(known.is_fraud)), event_id
    assert (columns["label"] == -1).sum() > 0 and (columns["label"] >= 0).sum() > 0

    # every stored feature of a few hundred rows equals the oracle over the events before it only
    times = {}
    for entity, ids in dataset.oracle.events.items():
        for entity_id, events in ids.items():
            for _, ts, _ in events:
                times.setdefault((entity, entity_id, ts), 0)
                times[(entity, entity_id, ts)] += 1
    index = {e: i for i, e in enumerate(columns["event_id"].tolist())}
    rng = random.Random(5)
    checked = 0
    for event_id in rng.sample(sorted(index), min(300, len(index))):
        tx = txs[event_id]
        ids = {"card": tx.card_id, "merchant": tx.merchant_id, "device": tx.device_id}
        if any(times.get((e, i, tx.event_time), 0) > 1 for e, i in ids.items()):
            continue  # another event of the same entity at the same millisecond: order by tie rule
        row = index[event_id]
        for f in FRAUD_FEATURES.features:
            entity_id = ids[f.entity]
            want = (
                f.default
                if entity_id is None
                else dataset.oracle.value(f, entity_id, tx.event_time, before=tx.event_time)
            )
            got = float(columns[f.name][row])
            assert got == pytest.approx(want, rel=1e-6, abs=1e-3), (f.name, event_id)
            checked += 1
        assert float(columns["amount"][row]) == pytest.approx(tx.amount, rel=1e-6)
    assert checked > 5000


def test_replayed_state_equals_the_stream_workers(dataset: Dataset):
    """`replay --materialize` into an empty store gives the worker's state for the same log."""
    group, worker_url = f"rp-{uuid.uuid4().hex[:6]}", _redis_db(dataset.settings, 4)
    worker = _start(dataset, group, worker_url)
    try:
        _wait_done(dataset, group, [worker])
    finally:
        _stop([worker])
    replay_url = _redis_db(dataset.settings, 5)
    env = settings_env(dataset.settings, STREAM_ML_REDIS_URL=replay_url)
    done = run_cli("replay", "--materialize", "--quiet", env=env)
    assert done.returncode == 0, done.stderr
    assert "entity states written" in done.stdout

    replayed, streamed = _snapshot(dataset, replay_url), _snapshot(dataset, worker_url)
    assert replayed.keys() == streamed.keys()
    for key, values in replayed.items():
        assert values == pytest.approx(streamed[key], rel=1e-9, abs=1e-9), key
    _assert_matches_oracle(dataset, replayed)

    # a second backfill over a store that has it all already changes nothing
    again = run_cli("replay", "--materialize", "--quiet", env=env)
    assert again.returncode == 0, again.stderr
    assert _snapshot(dataset, replay_url) == replayed


def test_invalid_records_are_skipped_and_counted_and_the_read_stops_after_the_range(topics: Settings):
    """As the worker dead-letters them: the valid events around an invalid record all count."""
    from stream_ml.events import encode_label, encode_transaction
    from stream_ml.kafka import producer

    txs = [
        Transaction(f"e{i}", START + i * 300_000, f"c{i % 3}", "m1", 10.0 + i, "EUR", "FR", "pos", None)
        for i in range(40)
    ]
    bad_tx = [b"not msgpack", b"", msgpack.packb({"event_id": "x", "amount": "abc"})]
    bad_label = msgpack.packb({"event_id": "e1", "is_fraud": "yes", "label_time": START, "source": "x"})

    async def produce() -> None:
        kafka = producer(kafka_bootstrap(topics))
        await kafka.start()
        try:  # one card per partition key: invalid records land between valid ones
            for i, tx in enumerate(txs):
                await kafka.send(topics.topic_transactions, encode_transaction(tx), key=tx.card_id.encode())
                if i % 13 == 5:
                    raw = bad_tx[(i // 13) % len(bad_tx)]
                    await kafka.send(topics.topic_transactions, raw, key=tx.card_id.encode())
            label = Label("e3", True, START + 30 * 60_000, "chargeback")
            await kafka.send(topics.topic_labels, encode_label(label), key=b"e3")
            await kafka.send(topics.topic_labels, bad_label, key=b"e1")
            await kafka.flush()
        finally:
            await kafka.stop()

    asyncio.run(produce())
    bootstrap = kafka_bootstrap(topics)
    whole = asyncio.run(replay(topics, FRAUD_FEATURES, bootstrap, ReplayOptions(progress=False)))
    assert [e for c in whole.chunks for e in c.event_ids] == [tx.event_id for tx in txs]
    assert whole.counts["invalid"] == 4 and whole.counts["labels"] == 1
    assert whole.labels == {"e3": (True, START + 30 * 60_000)}

    # the first hour: its rows, the same vectors; read up to the allowed lateness (an hour) after
    rows_to = START + HOUR
    part = asyncio.run(
        replay(topics, FRAUD_FEATURES, bootstrap, ReplayOptions(rows_to=rows_to, progress=False))
    )
    got = [e for c in part.chunks for e in c.event_ids]
    assert got == [tx.event_id for tx in txs if tx.event_time < rows_to]
    np.testing.assert_array_equal(
        np.concatenate([c.features for c in part.chunks]),
        np.concatenate([c.features for c in whole.chunks])[: len(got)],
    )
    read = part.counts["transactions"] + part.counts["invalid"]
    assert len(got) < read < whole.counts["transactions"] + 3  # it stopped after the range


def test_replay_command_says_what_to_do(topics, tmp_path: Path):
    env = settings_env(topics)
    nothing = run_cli("replay", env=env)
    assert nothing.returncode == 2 and "give --output DIR" in nothing.stderr
    (tmp_path / "taken").mkdir()
    taken = run_cli("replay", "-o", str(tmp_path / "taken"), env=env)
    assert taken.returncode == 2 and "--overwrite" in taken.stderr
    bad_time = run_cli("replay", "-o", str(tmp_path / "x"), "--from", "yesterday", env=env)
    assert bad_time.returncode == 2 and "--from" in bad_time.stderr
    empty = run_cli("replay", "-o", str(tmp_path / "empty"), "--quiet", env=env)
    assert empty.returncode == 0, empty.stderr
    assert "0 rows" in empty.stdout


def test_a_model_trained_on_replayed_data_beats_the_baselines_later(topics: Settings, tmp_path: Path):
    """Synthetic stream → Kafka → replay (labels at the cutoff) → train → validated on the later period."""
    from stream_ml.events.publish import publish
    from stream_ml.events.sources.synthetic import SyntheticConfig, SyntheticStream
    from stream_ml.training.train import TrainOptions, train

    config = SyntheticConfig(seed=21, start_ms=START, rate=6.0, cards=800, merchants=60, fraud_rate=0.03)
    items = list(SyntheticStream(config).items(until_ms=START + 6 * HOUR))
    asyncio.run(publish(topics, kafka_bootstrap(topics), iter(items), progress=False))
    out = tmp_path / "train"
    asyncio.run(
        replay(
            topics,
            FRAUD_FEATURES,
            kafka_bootstrap(topics),
            ReplayOptions(label_cutoff=START + 6 * HOUR, output=out, progress=False),
        )
    )
    result = train(out, TrainOptions(epochs=15, seed=0, progress=False))
    model = result.metrics["model"]
    for baseline in result.metrics["baselines"].values():
        assert model["pr_auc"] > 2 * baseline["pr_auc"], result.summary()
    assert model["roc_auc"] > 0.75, result.summary()
