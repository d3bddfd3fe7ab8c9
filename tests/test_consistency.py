"""`stream-ml consistency` on a real loop: worker → Redis → scorer → predictions, then replay.

Payments are scored through the real scorer process (which reads the worker's store and logs
what it served), then published, as a payment gateway does. Replay must compute the same vectors:
0 skew. Then a card's state is lost from the store before more payments are scored: the report
must find that skew, on that card's features, and exit 1.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import redis
from helpers import read_topic, run_cli, settings_env
from test_feature_worker import Dataset, _redis_db, _start, _stop, _wait_done
from test_serving import Server

from stream_ml.config import Settings
from stream_ml.events import Label, Transaction
from stream_ml.events.publish import publish
from stream_ml.events.sources.synthetic import SyntheticConfig, SyntheticStream
from stream_ml.features import FRAUD_FEATURES
from stream_ml.features.store import FeatureStore
from stream_ml.stack import kafka_bootstrap

START = 1_781_000_000_000
HOUR = 3_600_000


def _publish(settings: Settings, items: list) -> None:
    asyncio.run(publish(settings, kafka_bootstrap(settings), iter(items), progress=False))


def _payments(history: list[Transaction], n: int, t0: int, tag: str) -> list[Transaction]:
    """New payments of ``n`` cards, merchants and devices of the history, no two sharing one."""
    used: set[str] = set()
    out: list[Transaction] = []
    for tx in reversed(history):
        ids = {f"c:{tx.card_id}", f"m:{tx.merchant_id}", f"d:{tx.device_id}"}
        if tx.device_id is None or ids & used:
            continue
        used |= ids
        t = t0 + len(out) * 1000
        out.append(
            Transaction(
                f"{tag}-{len(out)}",
                t,
                tx.card_id,
                tx.merchant_id,
                57.5,
                "EUR",
                tx.country,
                tx.channel,
                tx.device_id,
            )
        )
        if len(out) == n:
            return out
    raise AssertionError("history too small for disjoint payments")


def _score_all(server: Server, txs: list[Transaction]) -> None:
    body = json.dumps([tx.to_dict() for tx in txs]).encode()
    status, answer, _ = server.request("/score/batch", body, {"X-API-Key": "test-key-1"})
    assert status == 200, answer


def test_served_vectors_equal_replay_and_lost_state_is_reported(topics: Settings):
    settings = topics
    stream = SyntheticStream(
        SyntheticConfig(seed=3, start_ms=START, rate=1.0, cards=60, merchants=40, label_delay_s=600)
    )
    items = list(stream.items(until_ms=START + HOUR))
    history = [i for i in items if isinstance(i, Transaction)]
    _publish(settings, [i for i in items if isinstance(i, Transaction | Label)])

    ds = Dataset(settings, None, [], [], 0, [])  # type: ignore[arg-type]
    group, url = f"cons-{uuid.uuid4().hex[:6]}", _redis_db(settings, 6)
    worker = _start(ds, group, url)
    server = None
    try:
        _wait_done(ds, group, [worker])
        # a generous deadline: this test checks vectors, and a busy CI machine may refuse a burst
        server = Server(url, "--deadline-ms", "2000", env=settings_env(settings))
        end = max(tx.event_time for tx in history)

        first = _payments(history, 12, end + 60_000, "a")
        _score_all(server, first)
        _publish(settings, first)
        _wait_done(ds, group, [worker])
        read_topic(kafka_bootstrap(settings), settings.topic_predictions, len(first))

        env = settings_env(settings)
        clean = run_cli("consistency", "--quiet", "--json", "--tolerance", "0", env=env)
        assert clean.returncode == 0, clean.stdout + clean.stderr
        report = json.loads(clean.stdout)
        assert report["compared"] == len(first) and report["matched"] == len(first), report
        assert report["not_in_log"] == 0 and report["skewed"] == 0

        # the store loses one card's state: what the scorer serves for it is now skewed
        second = _payments(history, 12, end + 120_000, "b")
        lost = second[0].card_id
        redis.Redis.from_url(url).delete(FeatureStore(None, FRAUD_FEATURES).key("card", lost))  # type: ignore[arg-type]
        _score_all(server, second)
        _publish(settings, second)
        read_topic(kafka_bootstrap(settings), settings.topic_predictions, len(first) + len(second))

        skewed = run_cli("consistency", "--quiet", env=env)
        assert skewed.returncode == 1, skewed.stdout + skewed.stderr
        assert "FAIL" in skewed.stdout and "card_tx_count_30d" in skewed.stdout
        report = json.loads(run_cli("consistency", "--quiet", "--json", env=env).stdout)
        assert report["skewed"] == 1 and report["examples"][0]["event_id"] == second[0].event_id
        assert all(name.startswith("card_") or "card" in name for name in report["by_feature"]), report
    finally:
        if server is not None:
            server.stop()
        _stop([worker])
