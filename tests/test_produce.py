"""`stream-ml produce synthetic | file` into the real broker, read back and checked."""

from __future__ import annotations

import csv
import re
from collections import defaultdict

from helpers import read_topic, run_cli, settings_env

from stream_ml.config import Settings
from stream_ml.events import decode_label, decode_transaction
from stream_ml.stack import kafka_bootstrap

START = "2026-03-02T00:00:00Z"
START_MS = 1_772_409_600_000


def _published(stdout: str) -> tuple[int, int]:
    match = re.search(r"published ([\d,]+) transactions and ([\d,]+) labels", stdout)
    assert match, stdout
    return int(match[1].replace(",", "")), int(match[2].replace(",", ""))


def _synthetic(settings: Settings, *extra: str):
    args = ["produce", "synthetic", "--max-speed", "--quiet", "--seed", "5", "--start", START]
    result = run_cli(*args, *extra, env=settings_env(settings))
    assert result.returncode == 0, result.stderr
    return result


def test_synthetic_stream_lands_keyed_timestamped_and_labelled(topics: Settings):
    result = _synthetic(topics, "--rate", "200", "--duration", "40", "--label-delay", "10")
    n_tx, n_labels = _published(result.stdout)
    assert n_tx > 5_000 and n_labels > 0
    bootstrap = kafka_bootstrap(topics)

    tx_records = read_topic(bootstrap, topics.topic_transactions, n_tx)
    label_records = read_topic(bootstrap, topics.topic_labels, n_labels)
    assert len(tx_records) == n_tx and len(label_records) == n_labels

    partition_of_card: dict[bytes, int] = {}
    transactions = {}
    for r in tx_records:
        tx = decode_transaction(r.value)
        assert r.key == tx.card_id.encode()
        assert r.timestamp == tx.event_time  # the log can be searched by event time
        assert START_MS <= tx.event_time < START_MS + 40 * 200_000 // 200 * 1000
        assert partition_of_card.setdefault(r.key, r.partition) == r.partition
        transactions[tx.event_id] = tx
    for r in label_records:
        label = decode_label(r.value)
        assert r.key == label.event_id.encode() and r.timestamp == label.label_time
        delay_ms = label.label_time - transactions[label.event_id].event_time
        assert 5_000 <= delay_ms <= 15_000  # 10 s ± 50%
        assert label.label_time < START_MS + 40_000  # only labels that are due by the end

    # Per card (one partition), payments are in event-time order.
    times = defaultdict(list)
    for r in sorted(tx_records, key=lambda r: (r.partition, r.offset)):
        times[r.key].append(r.timestamp)
    assert all(t == sorted(t) for t in times.values())


def test_same_seed_publishes_the_same_log(topics: Settings, stack: Settings):
    from dataclasses import replace

    other = replace(topics, topic_transactions=topics.topic_predictions, topic_labels=topics.topic_drift)
    first = _synthetic(topics, "--events", "3000")
    second = _synthetic(other, "--events", "3000")
    assert _published(first.stdout) == _published(second.stdout)
    bootstrap = kafka_bootstrap(topics)
    n_tx, _ = _published(first.stdout)
    a = sorted(
        (r.partition, r.offset, r.key, bytes(r.value))
        for r in read_topic(bootstrap, topics.topic_transactions, n_tx)
    )
    b = sorted(
        (r.partition, r.offset, r.key, bytes(r.value))
        for r in read_topic(bootstrap, other.topic_transactions, n_tx)
    )
    assert a == b and len(a) == n_tx


def test_drain_labels_publishes_one_label_per_transaction(topics: Settings):
    result = _synthetic(topics, "--rate", "50", "--duration", "20", "--label-delay", "600", "--drain-labels")
    n_tx, n_labels = _published(result.stdout)
    assert n_tx == n_labels > 500


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_produce_file_with_a_column_mapping(topics: Settings, tmp_path):
    rows = [
        {
            "txn": "a3",
            "ts": "2026-03-02T10:00:03Z",
            "card": "k1",
            "shop": "s1",
            "amt": "30.5",
            "chan": "ecom",
            "fraud": "0",
            "note": "x",
        },
        {
            "txn": "a1",
            "ts": "2026-03-02T10:00:01Z",
            "card": "k1",
            "shop": "s2",
            "amt": "10",
            "chan": "pos",
            "fraud": "1",
            "note": "y",
        },
        {
            "txn": "bad",
            "ts": "2026-03-02T10:00:02Z",
            "card": "k2",
            "shop": "s1",
            "amt": "abc",
            "chan": "pos",
            "fraud": "0",
            "note": "z",
        },
        {
            "txn": "a2",
            "ts": "2026-03-02T10:00:02Z",
            "card": "k2",
            "shop": "s1",
            "amt": "20",
            "chan": "pos",
            "fraud": "0",
            "note": "",
        },
    ]
    path = tmp_path / "payments.csv"
    _write_csv(path, rows)
    mapping = [
        "event_id=txn",
        "event_time=ts",
        "card_id=card",
        "merchant_id=shop",
        "amount=amt",
        "channel=chan",
    ]
    args = [
        "produce",
        "file",
        str(path),
        "--quiet",
        "--label-column",
        "fraud",
        "--label-delay",
        "60",
        "--set",
        "currency=EUR",
        "--set",
        "country=FR",
    ]
    for m in mapping:
        args += ["--map", m]
    env = settings_env(topics)

    strict = run_cli(*args, "--strict", env=env)
    assert strict.returncode == 1
    assert "row 3: field amount: expected number, got 'abc'" in strict.stderr
    assert "nothing published" in strict.stderr

    result = run_cli(*args, env=env)
    assert result.returncode == 0, result.stderr
    assert _published(result.stdout) == (3, 3) and "skipped 1 invalid rows" in result.stdout
    bootstrap = kafka_bootstrap(topics)
    txs = [decode_transaction(r.value) for r in read_topic(bootstrap, topics.topic_transactions, 3)]
    by_id = {t.event_id: t for t in txs}
    assert set(by_id) == {"a1", "a2", "a3"}
    a1 = by_id["a1"]
    assert (a1.card_id, a1.merchant_id, a1.amount, a1.currency, a1.country, a1.channel) == (
        "k1",
        "s2",
        10.0,
        "EUR",
        "FR",
        "pos",
    )
    assert a1.event_time == 1_772_445_601_000
    assert a1.extra == {"note": "y"}  # the label column never rides along
    k1 = [t.event_id for t in txs if t.card_id == "k1"]
    assert k1 == ["a1", "a3"]  # event-time order, not file order
    labels = {
        lb.event_id: lb
        for lb in map(decode_label, (r.value for r in read_topic(bootstrap, topics.topic_labels, 3)))
    }
    assert labels["a1"].is_fraud and not labels["a3"].is_fraud
    assert labels["a1"].label_time == a1.event_time + 60_000


def test_the_producer_counts_what_it_published_on_its_metrics_port(topics: Settings):
    import subprocess
    import sys
    import time
    import urllib.request

    from helpers import REPO

    from stream_ml.stack.processes import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_ml", "produce", "synthetic", "--quiet", "--seed", "5", "--rate", "300",
         "--duration", "6", "--label-delay", "1", "--metrics-port", str(port)],
        env=settings_env(topics), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    counted: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                    text = r.read().decode()
            except OSError:
                time.sleep(0.2)
                continue
            for line in text.splitlines():
                if line.startswith("stream_ml_produced_events_total{"):
                    counted[line.split('topic="')[1].split('"')[0]] = float(line.split()[-1])
            time.sleep(0.2)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    n_tx, n_labels = _published(out)
    # Read while it ran: never more than it published in the end, and something already.
    assert 0 < counted.get(topics.topic_transactions, 0) <= n_tx
    assert counted.get(topics.topic_labels, 0) <= n_labels


def test_publish_counts_every_event_by_topic(topics: Settings):
    import asyncio

    from prometheus_client import REGISTRY

    from stream_ml.events.publish import publish
    from stream_ml.events.sources.synthetic import SyntheticConfig, SyntheticStream

    def value(topic: str) -> float:
        return REGISTRY.get_sample_value("stream_ml_produced_events_total", {"topic": topic}) or 0.0

    before = value(topics.topic_transactions), value(topics.topic_labels)
    items = list(
        SyntheticStream(SyntheticConfig(seed=3, start_ms=START_MS, rate=500, label_delay_s=1)).items(
            until_ms=START_MS + 12_000
        )
    )
    report = asyncio.run(publish(topics, kafka_bootstrap(topics), items, progress=False))
    assert report.transactions > 2_048  # past a progress step, where the counters move mid-run
    assert value(topics.topic_transactions) - before[0] == report.transactions
    assert value(topics.topic_labels) - before[1] == report.labels
