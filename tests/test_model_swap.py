"""A real scorer process following the registry: promotion, rollback of a bad load, shadow scoring."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from helpers import read_topic, run_cli
from test_serving import KEY, TX, Server

from stream_ml.config import ENV_PREFIX, Settings
from stream_ml.events import decode_prediction
from stream_ml.features import FRAUD_FEATURES
from stream_ml.registry import Registry
from stream_ml.serving.model import default_model, load_model, register_default_model
from stream_ml.stack import kafka_bootstrap, redis_url

FS = FRAUD_FEATURES.version


@pytest.fixture
def store(stack: Settings) -> str:
    return redis_url(stack).rsplit("/", 1)[0] + "/6"


def _metric(server: Server, line_start: str) -> float | None:
    for line in server.get("/metrics")[1]["text"].splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return None


def _wait_for(condition, timeout_s: float = 6.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s")


def _other_feature_set(registry: Registry, seed: int) -> str:
    """A model whose inputs match but whose feature set version does not: not servable as is."""
    module = default_model(FRAUD_FEATURES, seed).module
    return registry.register(
        {k: v.cpu() for k, v in module.state_dict().items()},
        feature_set="fraud-0000000000",
        feature_names=FRAUD_FEATURES.names,
        architecture=module.architecture(),
        metrics={},
        params={},
        data_version={},
        code_version="test",
        environment={},
        reference={},
    ).version


def test_a_promotion_is_served_within_seconds_and_no_request_fails(store: str, tmp_path: Path):
    registry = Registry(tmp_path / "registry")
    a = register_default_model(registry, FRAUD_FEATURES, seed=1).version
    b = register_default_model(registry, FRAUD_FEATURES, seed=2).version
    unservable = _other_feature_set(registry, seed=3)
    registry.promote(a, "production", serving_feature_set=FS)
    # A generous deadline: this checks that a swap drops nothing, not latency on a shared 2-core box.
    server = Server(
        store,
        "--model-poll-s",
        "0.1",
        "--deadline-ms",
        "2000",
        "--rate-limit",
        "1000000",
        env={"STREAM_ML_REGISTRY": str(registry.root)},
    )
    answers: list[list[tuple[int, str | None, float | None]]] = [[], []]
    stop = threading.Event()

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            status, answer, _ = server.score({**TX, "event_id": f"t{n}-{i}"})
            answers[n].append((status, answer.get("model_version"), answer.get("score")))
            i += 1

    clients = [threading.Thread(target=client, args=(n,)) for n in range(2)]
    try:
        status, first, _ = server.score(TX)
        assert status == 200 and first["model_version"] == a
        assert server.get("/readyz")[1]["model_version"] == a
        for c in clients:
            c.start()
        time.sleep(0.3)
        registry.promote(b, "production", serving_feature_set=FS)
        took = _wait_for(lambda: all(got and got[-1][1] == b for got in answers))
        assert took < 5.0
        # a version this scorer cannot serve: the old model serves on, the failure is counted
        registry.promote(unservable, "production", serving_feature_set=FS, allow_feature_set_mismatch=True)
        _wait_for(lambda: _metric(server, 'stream_ml_model_load_failures_total{stage="production"}') == 1.0)
        time.sleep(0.3)
        stop.set()
        for c in clients:
            c.join()
        assert _metric(server, f'stream_ml_model_info{{stage="production",version="{b}"}}') == 1.0
        assert _metric(server, f'stream_ml_model_info{{stage="production",version="{a}"}}') is None
        assert server.score(TX)[1]["model_version"] == b
    finally:
        stop.set()
        server.stop()
    for got in answers:
        assert got and all(status == 200 for status, _, _ in got), [g for g in got if g[0] != 200][:3]
        versions = [v for _, v, _ in got]
        # each client's calls are sequential: A until the swap, then B, never back, never the unservable
        switch = versions.index(b)
        assert switch > 0 and set(versions[:switch]) == {a} and set(versions[switch:]) == {b}
        scores = {v: s for _, v, s in got}
        assert scores[a] != scores[b]  # the other weights really score


def test_shadow_scores_are_logged_and_never_change_the_answer(topics: Settings, store: str, tmp_path: Path):
    registry = Registry(tmp_path / "registry")
    a = register_default_model(registry, FRAUD_FEATURES, seed=1).version
    b = register_default_model(registry, FRAUD_FEATURES, seed=2).version
    registry.promote(a, "production", serving_feature_set=FS)
    registry.promote(b, "shadow", serving_feature_set=FS)
    bootstrap = kafka_bootstrap(topics)
    server = Server(
        store,
        "--model-poll-s",
        "0.1",
        env={
            "STREAM_ML_REGISTRY": str(registry.root),
            "STREAM_ML_KAFKA_BOOTSTRAP": bootstrap,
            "STREAM_ML_TOPIC_PREDICTIONS": topics.topic_predictions,
        },
    )
    try:
        _wait_for(lambda: _metric(server, f'stream_ml_model_info{{stage="shadow",version="{b}"}}') == 1.0)
        answers = {f"s{i}": server.score({**TX, "event_id": f"s{i}"})[1] for i in range(5)}
        _wait_for(lambda: (_metric(server, "stream_ml_shadow_scored_total") or 0) >= 5)
    finally:
        server.stop()
    assert {x["model_version"] for x in answers.values()} == {a}
    records = [decode_prediction(r.value) for r in read_topic(bootstrap, topics.topic_predictions, 10)]
    production = {p.event_id: p for p in records if p.variant == "production"}
    shadow = {p.event_id: p for p in records if p.variant == "shadow"}
    assert set(production) == set(shadow) == set(answers) and len(records) == 10
    model_b = load_model(registry, b, FRAUD_FEATURES)
    for event_id, p in shadow.items():
        assert p.model_version == b and production[event_id].model_version == a
        assert p.features == production[event_id].features  # the same vector, scored twice
        assert p.score == pytest.approx(model_b.probabilities([p.features])[0], rel=1e-5)
        assert production[event_id].score == pytest.approx(answers[event_id]["score"])
        assert p.score != pytest.approx(answers[event_id]["score"])


def test_serve_refuses_a_production_model_that_was_altered(store: str, tmp_path: Path):
    registry = Registry(tmp_path / "registry")
    mv = register_default_model(registry, FRAUD_FEATURES, seed=1)
    registry.promote(mv.version, "production", serving_feature_set=FS)
    weights = mv.path / "weights.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)} | {
        "STREAM_ML_REDIS_URL": store,
        "STREAM_ML_API_KEYS": KEY,
        "STREAM_ML_REGISTRY": str(registry.root),
    }
    result = run_cli("serve", "--port", "1", env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "altered" in result.stderr and "models rollback --stage production" in result.stderr


def test_mlp_reasons_without_autograd_are_autograd_s_bit_for_bit():
    """The scorer's gradient pass for the MLP gives exactly torch.autograd's logits and gradients."""
    import numpy as np
    import torch

    from stream_ml.features import FRAUD_FEATURES
    from stream_ml.serving.model import _MLPGradient, default_model

    module = default_model(FRAUD_FEATURES, seed=3).module
    gradient = _MLPGradient(module)
    rng = np.random.default_rng(0)
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, threads):
            torch.set_num_threads(n_threads)
            for scale in (1.0, 10.0, 1e4, 1e30):
                for n in (1, 2, 7, 31, 64, 128):
                    x = torch.from_numpy(
                        (rng.standard_normal((n, module.n_inputs)) * scale).astype(np.float32)
                    )
                    with torch.inference_mode():
                        logits, grad, centred = gradient(x)
                    xg = x.clone().requires_grad_(True)
                    expected = module(xg)
                    (expected_grad,) = torch.autograd.grad(expected.sum(), xg)
                    assert torch.equal(logits, expected.detach()), (n, scale)
                    assert torch.equal(grad, expected_grad), (n, scale)
                    assert torch.equal(centred, x - module.mean)
    finally:
        torch.set_num_threads(threads)
