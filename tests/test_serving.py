"""`stream-ml serve` as a real server process, against the real Redis of the session stack."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import msgpack
import pytest
import redis.asyncio as aioredis
from helpers import REPO

from stream_ml.config import ENV_PREFIX, Settings
from stream_ml.events import Transaction
from stream_ml.features import FRAUD_FEATURES
from stream_ml.features.state import layouts
from stream_ml.features.store import FeatureStore
from stream_ml.features.vector import VectorBuilder
from stream_ml.serving.model import default_model
from stream_ml.stack import redis_url
from stream_ml.stack.processes import free_port

T = 1_780_000_000_000
KEY = "test-key-1"
TX = {
    "event_id": "e1",
    "event_time": T,
    "card_id": "card-s1",
    "merchant_id": "m-s1",
    "amount": 420.0,
    "currency": "EUR",
    "country": "FR",
    "channel": "ecom",
    "device_id": "dev-s1",
}


class Server:
    def __init__(self, redis: str, *extra: str, keys: str = KEY, env: dict | None = None) -> None:
        import os

        self.port = free_port()
        environment = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        # a registry of its own: a developer's production pointer must not decide what is served
        registry = tempfile.mkdtemp(prefix="registry-")
        environment |= {
            "STREAM_ML_REDIS_URL": redis,
            "STREAM_ML_API_KEYS": keys,
            "STREAM_ML_REGISTRY": registry,
            **(env or {}),
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream_ml", "serve", "--port", str(self.port), *extra],
            env=environment,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read()[-3000:]
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError("the scorer did not become ready")

    def request(
        self, path: str, body: bytes | None = None, headers: dict | None = None
    ) -> tuple[int, dict, dict]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
                return (
                    r.status,
                    (json.loads(raw) if raw[:1] in b"{[" else {"text": raw.decode()}),
                    dict(r.headers),
                )
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read()), dict(e.headers)

    def get(self, path: str) -> tuple[int, dict, dict]:
        return self.request(path)

    def score(self, tx: dict, key: str | None = KEY, **headers: str) -> tuple[int, dict, dict]:
        h = {"Content-Type": "application/json", **headers}
        if key is not None:
            h["X-API-Key"] = key
        return self.request("/score", json.dumps(tx).encode(), h)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def _store_card_history(url: str) -> None:
    """Two earlier payments of the card, written as the feature worker would."""

    async def write() -> None:
        client = aioredis.Redis.from_url(url)
        try:
            await client.flushdb()
            store = FeatureStore(client, FRAUD_FEATURES)
            card = layouts(FRAUD_FEATURES)["card"]
            state = card.new()
            for i, amount in enumerate((20.0, 40.0)):
                card.apply(
                    state,
                    "transactions",
                    T - 3_600_000 + i * 60_000,
                    (amount, "m-old", "dev-s1", "FR"),
                    "transactions:0",
                    i,
                )
            await store.write(store.prepare({"card": {"card-s1": state}}))
        finally:
            await client.aclose()

    asyncio.run(write())


@pytest.fixture(scope="module")
def store_url(stack: Settings) -> str:
    url = redis_url(stack).rsplit("/", 1)[0] + "/5"
    _store_card_history(url)
    return url


@pytest.fixture(scope="module")
def server(store_url: str):
    # A generous deadline: these tests check the answers, and a busy 2-core machine cannot score 64
    # calls sent at once within the default 50 ms (test_batcher.py tests the deadline refusals).
    s = Server(store_url, "--rate-limit", "100000", "--deadline-ms", "2000")
    yield s
    s.stop()


def test_a_score_uses_the_stored_features_and_the_one_vector_function(server: Server, store_url: str):
    status, answer, _ = server.score(TX)
    assert status == 200, answer
    # the same computation, in process: stored state -> vector -> the same deterministic model
    builder = VectorBuilder(FRAUD_FEATURES)

    async def states() -> dict:
        client = aioredis.Redis.from_url(store_url)
        try:
            return await FeatureStore(client, FRAUD_FEATURES).entity_states(
                builder.entity_ids(Transaction(**TX))
            )
        finally:
            await client.aclose()

    tx = Transaction(**TX)
    vector = builder.build(asyncio.run(states()), tx, tx.event_time)
    assert vector[builder.names.index("card_amount_mean_30d")] == 30.0  # the history was read
    expected, _ = default_model(FRAUD_FEATURES).score([vector])
    assert answer["score"] == pytest.approx(expected[0], rel=1e-5)
    assert answer["decision"] in ("approve", "review", "decline") and answer["degraded"] is False
    assert answer["event_id"] == "e1" and answer["features_as_of"] == T and len(answer["reasons"]) <= 3
    assert {r["feature"] for r in answer["reasons"]} <= set(builder.names)


def test_msgpack_and_bearer_are_accepted(server: Server):
    status, answer, _ = server.request(
        "/score", msgpack.packb(TX), {"Content-Type": "application/msgpack", "Authorization": f"Bearer {KEY}"}
    )
    assert status == 200 and answer["event_id"] == "e1"


@pytest.mark.parametrize("key", [None, "wrong-key", ""])
def test_callers_without_a_valid_key_get_401(server: Server, key):
    status, answer, _ = server.score(TX, key=key)
    assert status == 401 and "API key" in answer["error"]


def test_bad_input_gets_a_clear_4xx(server: Server):
    status, answer, _ = server.score({**TX, "amount": "abc"})
    assert (status, answer["error"]) == (422, "field amount: expected number, got 'abc'")
    status, answer, _ = server.request("/score", b"{not json", {"X-API-Key": KEY})
    assert status == 400 and "not valid JSON" in answer["error"]
    status, answer, _ = server.request("/score", '{"amount": "é"}'.encode("latin-1"), {"X-API-Key": KEY})
    assert status == 400 and "not valid JSON" in answer["error"] and "utf-8" in answer["error"]
    status, answer, _ = server.request("/score", b"x" * 70_000, {"X-API-Key": KEY})
    assert status == 413


def test_calls_the_connection_does_not_take_are_scored_by_the_app(server: Server):
    """A chunked body (no length to check at the headers) and HTTP/1.0 go to the app's /score."""
    import http.client
    import socket

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    headers = {"Content-Type": "application/json", "X-API-Key": KEY}
    conn.request("POST", "/score", body=iter([json.dumps(TX).encode()]), headers=headers, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 200 and json.loads(response.read())["event_id"] == "e1"
    conn.request("POST", "/score", body=iter([b"x" * 70_000]), headers=headers, encode_chunked=True)
    response = conn.getresponse()
    assert response.status == 413 and "over the limit" in json.loads(response.read())["error"]
    conn.close()

    body = json.dumps({**TX, "amount": "abc"}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /score HTTP/1.0\r\nContent-Type: application/json\r\nX-API-Key: "
            + KEY.encode()
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
            + body
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 422") and b"field amount" in answer


def test_every_answer_is_counted_by_status(server: Server):
    def counts() -> dict[str, float]:
        lines = server.get("/metrics")[1]["text"].splitlines()
        prefix = 'stream_ml_score_responses_total{endpoint="score",status="'
        return {
            line[len(prefix) : line.index('"', len(prefix))]: float(line.split()[-1])
            for line in lines
            if line.startswith(prefix)
        }

    before = counts()
    server.score(TX, key="wrong-key")
    server.score({**TX, "amount": "abc"})
    server.score(TX)
    after = counts()
    for status in ("401", "422", "200"):
        assert after.get(status, 0) - before.get(status, 0) == 1, (status, before, after)


def test_batch_answers_each_transaction(server: Server):
    body = [{**TX, "event_id": f"b{i}"} for i in range(10)] + [{**TX, "event_id": "bad", "currency": "eur"}]
    status, answer, _ = server.request("/score/batch", json.dumps(body).encode(), {"X-API-Key": KEY})
    assert status == 200
    results = answer["results"]
    assert [r.get("event_id") for r in results[:10]] == [f"b{i}" for i in range(10)]
    assert results[10] == {"error": "field currency: expected 3 upper-case letters, got 'eur'", "status": 422}


def test_a_full_batch_call_to_an_idle_scorer_is_answered_in_full(server: Server):
    body = [{**TX, "event_id": f"full{i}"} for i in range(256)]  # the most a call may carry
    status, answer, _ = server.request("/score/batch", json.dumps(body).encode(), {"X-API-Key": KEY})
    assert status == 200
    refused = [r for r in answer["results"] if "error" in r]
    assert not refused, f"{len(refused)} of 256 refused, e.g. {refused[0]}"


def _batch_totals(server: Server) -> tuple[float, float]:
    lines = server.get("/metrics")[1]["text"].splitlines()

    def value(name: str) -> float:
        return float(next(line.split()[-1] for line in lines if line.startswith(name)))

    return value("stream_ml_score_batch_size_requests_count"), value(
        "stream_ml_score_batch_size_requests_sum"
    )


def _burst(port: int, calls: int, prefix: str) -> list[bytes]:
    """``calls`` POST /score sent at once, each on its own connection: the raw answers."""

    async def call(i: int) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        body = json.dumps({**TX, "event_id": f"{prefix}{i}"}).encode()
        writer.write(
            b"POST /score HTTP/1.1\r\nHost: x\r\nX-API-Key: "
            + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
        await writer.drain()
        answer = await reader.read()
        writer.close()
        return answer

    async def burst() -> list[bytes]:
        return await asyncio.gather(*(call(i) for i in range(calls)))

    return asyncio.run(burst())


def test_concurrent_calls_are_micro_batched(server: Server):
    """64 calls sent at once on their own connections: they are scored in fewer model batches."""
    batches_before, requests_before = _batch_totals(server)

    answers = _burst(server.port, 64, "c")
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers), [
        a[:60] for a in answers if b" 200" not in a[:15]
    ]
    batches, requests = _batch_totals(server)
    assert requests - requests_before == 64
    assert batches - batches_before < 64, "calls that arrived together were never scored together"


def test_a_burst_over_capacity_is_shed_at_once_with_503_and_retry_after(store_url: str):
    """A deadline nobody can meet under a burst: refused before the body is read, each refusal counted."""
    s = Server(store_url, "--rate-limit", "100000", "--deadline-ms", "2", "--max-batch", "1")
    try:
        before = s.get("/metrics")[1]["text"]

        answers = _burst(s.port, 200, "o")
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503") and b"overloaded" in a]
        # A call that was tried may still miss a 2 ms deadline on a slow machine: dropped, not scored.
        tried = [a for a in answers if a.startswith(b"HTTP/1.1 200") or b"deadline passed" in a]
        assert len(refused) + len(tried) == 200
        assert refused and tried, "an idle scorer tries a call; a busy one refuses what would be late"
        assert all(b"retry-after: " in a.lower() for a in refused)
        after = s.get("/metrics")[1]["text"]

        def rejected(text: str) -> float:
            line = 'stream_ml_score_rejected_total{reason="overload"}'
            return sum(float(x.split()[-1]) for x in text.splitlines() if x.startswith(line))

        assert rejected(after) - rejected(before) == len(refused)
        assert s.score(TX, **{"X-Deadline-Ms": "2000"})[0] == 200  # and it serves on afterwards
    finally:
        s.stop()


def test_openapi_and_health(server: Server):
    status, doc, _ = server.get("/openapi.json")
    assert status == 200 and "/score" in doc["paths"] and doc["components"]["securitySchemes"]
    assert server.get("/healthz")[0] == 200
    status, answer, headers = server.get("/score")  # the bare ASGI route answers other methods too
    assert (status, headers["allow"]) == (405, "POST") and "POST" in answer["error"]


def test_rate_limit_answers_429_with_retry_after(store_url: str):
    s = Server(store_url, "--rate-limit", "5")
    try:
        statuses = [s.score(TX) for _ in range(20)]
    finally:
        s.stop()
    limited = [a for a in statuses if a[0] == 429]
    assert limited and all(float(a[2]["retry-after"]) > 0 for a in limited)
    assert sum(a[0] == 200 for a in statuses) >= 5


def test_redis_down_gives_degraded_scores_or_503_never_a_hang():
    down = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    s = Server(down)
    try:
        started = time.monotonic()
        status, answer, _ = s.score(TX)
        assert status == 200 and answer["degraded"] is True
        assert time.monotonic() - started < 2.0
    finally:
        s.stop()
    strict = Server(down, "--no-degraded")
    try:
        status, answer, headers = strict.score(TX)
        assert status == 503 and "retry-after" in headers and "feature store" in answer["error"]
    finally:
        strict.stop()


def test_serve_refuses_to_start_without_api_keys(store_url: str):
    import os

    from helpers import run_cli

    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)} | {
        "STREAM_ML_REDIS_URL": store_url
    }
    result = run_cli("serve", "--port", str(free_port()), env=env, timeout=30)
    assert result.returncode == 2 and "STREAM_ML_API_KEYS" in result.stderr


def test_every_prediction_is_logged_with_the_vector_it_used(topics: Settings, store_url: str):
    from helpers import read_topic

    from stream_ml.events import decode_prediction
    from stream_ml.stack import kafka_bootstrap

    bootstrap = kafka_bootstrap(topics)
    s = Server(
        store_url,
        env={"STREAM_ML_KAFKA_BOOTSTRAP": bootstrap, "STREAM_ML_TOPIC_PREDICTIONS": topics.topic_predictions},
    )
    try:
        answers = {f"p{i}": s.score({**TX, "event_id": f"p{i}"})[1] for i in range(5)}
    finally:
        s.stop()
    records = read_topic(bootstrap, topics.topic_predictions, 5)
    logged = {r.key.decode(): decode_prediction(r.value) for r in records}
    assert set(logged) == set(answers)
    for event_id, p in logged.items():
        assert (
            p.score == pytest.approx(answers[event_id]["score"])
            and p.decision == answers[event_id]["decision"]
        )
        assert len(p.features) == len(FRAUD_FEATURES.names) and p.variant == "production"
        assert p.features[FRAUD_FEATURES.names.index("card_amount_mean_30d")] == 30.0  # the vector it saw


def test_a_broker_down_never_holds_up_answers_and_drops_are_counted(store_url: str):
    s = Server(
        store_url, "--prediction-buffer", "2", env={"STREAM_ML_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    )
    try:
        started = time.monotonic()
        statuses = [s.score({**TX, "event_id": f"d{i}"})[0] for i in range(6)]
        took = time.monotonic() - started
        metrics = s.get("/metrics")[1]["text"]
    finally:
        s.stop()
    assert statuses == [200] * 6 and took < 3.0
    dropped = float(
        next(
            line.split()[-1]
            for line in metrics.splitlines()
            if line.startswith("stream_ml_score_predictions_dropped_total")
        )
    )
    assert dropped >= 4


def test_produce_through_the_scorer_scores_every_payment_then_publishes_it(topics: Settings, store_url: str):
    from helpers import read_topic, run_cli, settings_env

    from stream_ml.events import decode_prediction
    from stream_ml.events.transaction import decode_transaction
    from stream_ml.stack import kafka_bootstrap

    bootstrap = kafka_bootstrap(topics)
    s = Server(
        store_url,
        "--rate-limit",
        "100000",
        "--deadline-ms",
        "2000",  # every payment must be scored: 400 at full speed on a busy machine, not a latency test
        env={"STREAM_ML_KAFKA_BOOTSTRAP": bootstrap, "STREAM_ML_TOPIC_PREDICTIONS": topics.topic_predictions},
    )
    try:
        result = run_cli(
            "produce", "synthetic", "--events", "400", "--max-speed", "--seed", "5", "--label-delay", "1",
            "--score-url", f"http://127.0.0.1:{s.port}/score",
            env=settings_env(topics, STREAM_ML_API_KEYS=KEY),
        )  # fmt: skip
    finally:
        s.stop()
    assert result.returncode == 0, result.stderr
    assert "scored" in result.stdout and "failed" not in result.stdout, result.stdout
    payments = {
        decode_transaction(r.value).event_id for r in read_topic(bootstrap, topics.topic_transactions, 1)
    }
    predicted = {
        decode_prediction(r.value).event_id for r in read_topic(bootstrap, topics.topic_predictions, 1)
    }
    assert len(payments) > 300 and payments == predicted


def test_produce_through_the_scorer_needs_a_key(topics: Settings):
    from helpers import run_cli, settings_env

    result = run_cli(
        "produce", "synthetic", "--events", "10", "--score-url", "http://127.0.0.1:1/score",
        env=settings_env(topics),
    )  # fmt: skip
    assert result.returncode == 2 and "STREAM_ML_API_KEYS" in result.stderr


def test_answers_are_encoded_as_starlette_encodes_them():
    from starlette.responses import JSONResponse

    from stream_ml.serving.app import _JSONResponse, _send_json

    answer = {
        "event_id": "é-1",
        "score": 0.1234567890123,
        "reasons": [{"feature": "amount", "value": 1e-300}, {"feature": "x", "value": 3.0}],
        "degraded": False,
        "latency_ms": 1.25,
        "none": None,
    }
    assert _JSONResponse(answer).body == JSONResponse(answer).body
    assert (
        _JSONResponse(answer, status_code=503, headers={"Retry-After": "1"}).headers
        == JSONResponse(answer, status_code=503, headers={"Retry-After": "1"}).headers
    )
    with pytest.raises(ValueError):
        _JSONResponse({"score": float("nan")})

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(_send_json(send, 503, answer, {"Retry-After": "1"}))  # /score's bare ASGI answers
    response = _JSONResponse(answer, status_code=503, headers={"Retry-After": "1"})
    assert sent[0]["status"] == 503 and sorted(sent[0]["headers"]) == sorted(response.raw_headers)
    assert sent[1]["body"] == response.body


def test_a_scored_answer_is_the_json_of_its_fields_and_headers_read_as_starlette_reads_them():
    from starlette.datastructures import Headers

    from stream_ml.serving.app import Scored, _answer, _headers, _JSONResponse

    tx = Transaction('é-"1"\n', T, "c", "m", 1.0, "EUR", "FR", "pos", None)
    for degraded, score, reasons in [
        (False, 0.1234567890123, [("amount", 1e-300), ("x", 3.0)]),
        (True, 1.0, []),
    ]:
        body = _answer(tx, Scored(score, "approve", reasons, "v/1", degraded), time.monotonic())
        answer = json.loads(body)
        assert answer["latency_ms"] >= 0
        expected = {
            "event_id": tx.event_id,
            "score": score,
            "decision": "approve",
            "model_version": "v/1",
            "reasons": [{"feature": name, "value": value} for name, value in reasons],
            "features_as_of": T,
            "degraded": degraded,
            "latency_ms": answer["latency_ms"],
        }
        assert body == _JSONResponse(expected).body  # the very bytes the encoder makes
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(ValueError):
            _answer(tx, Scored(bad, "approve", [], "v", False), time.monotonic())
        with pytest.raises(ValueError):
            _answer(tx, Scored(0.5, "approve", [("amount", bad)], "v", False), time.monotonic())

    raw = [
        (b"x-api-key", b"first"),
        (b"x-api-key", b"second"),
        (b"content-type", b"caf\xe9"),
        (b"host", b"h"),
    ]
    headers = _headers(raw)
    for name in ("x-api-key", "content-type", "content-length", "authorization", "x-deadline-ms"):
        assert headers.get(name) == Headers(raw=raw).get(name)


def test_scoring_from_the_built_array_is_scoring_from_the_vectors():
    builder = VectorBuilder(FRAUD_FEATURES)
    model = default_model(FRAUD_FEATURES)
    txs = [
        Transaction(
            f"e{i}", 1_795_420_000_000 + i * 3_600_000, f"c{i}", "m", 10.0 * i, "EUR", "FR", "ecom", None
        )
        for i in range(9)
    ]
    inputs = builder.build_array([{}] * len(txs), txs, [tx.event_time for tx in txs])
    vectors = builder.build_many([{}] * len(txs), txs, [tx.event_time for tx in txs])
    assert inputs.tolist() == vectors
    assert model.score(vectors, inputs) == model.score(vectors)


def test_workers_share_the_port_the_rate_limit_and_the_metrics(store_url: str):
    import http.client

    s = Server(store_url, "--workers", "2", "--rate-limit", "10", "--deadline-ms", "2000")
    try:
        # A connection stays with the worker that accepted it: one kept open to each. A worker
        # accepts none until its warm-up is done, and Server() waited for the first one only.
        conns: dict[int, http.client.HTTPConnection] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=10)
            conn.request("GET", "/readyz")
            answer = conn.getresponse()
            worker = json.loads(answer.read())["worker"]
            if answer.status == 200 and worker not in conns:
                conns[worker] = conn
            else:
                conn.close()
            if len(conns) == 2:
                break
            time.sleep(0.01)
        assert sorted(conns) == [0, 1], "in 60 s, every connection went to one worker"
        body = json.dumps(TX).encode()
        headers = {"Content-Type": "application/json", "X-API-Key": KEY}
        statuses = []
        started = time.monotonic()
        for i in range(40):  # alternately through each worker
            conn = conns[i % 2]
            conn.request("POST", "/score", body, headers)
            answer = conn.getresponse()
            answer.read()
            statuses.append(answer.status)
        elapsed = time.monotonic() - started
        scored, limited = statuses.count(200), statuses.count(429)
        assert scored + limited == 40
        # One bucket of 10 a second for the key, not one per worker (that would let ~20 through).
        assert 10 <= scored <= 10 + 10 * elapsed + 1, (scored, elapsed)

        # /metrics, from either worker, counts the answers of both.
        conns[0].request("GET", "/metrics")
        text = conns[0].getresponse().read().decode()
        prefix = 'stream_ml_score_responses_total{endpoint="score",status="'
        counted = {
            line[len(prefix) : line.index('"', len(prefix))]: float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith(prefix)
        }
        assert counted == {"200": scored, "429": limited}
        for conn in conns.values():
            conn.close()
    finally:
        s.stop()
    assert s.proc.returncode == 0
