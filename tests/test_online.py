"""Online learning: the exported model scores as river does, restores exactly, adapts to a concept
change where a frozen model does not; rolling metrics, imbalance weighting, missing values, gauges."""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import REGISTRY
from river import preprocessing

from stream_ml.features import FRAUD_FEATURES
from stream_ml.feedback import snapshot
from stream_ml.feedback.forest import OnlineForest
from stream_ml.feedback.logistic import (
    OnlineLogistic,
    RunningScaler,
    as_river_inputs,
    model_rows,
    rows_as_dicts,
)
from stream_ml.feedback.online import FOREST, LOGISTIC, Example, OnlineLearner
from stream_ml.feedback.progressive import RollingMetrics
from stream_ml.registry import FeatureSetMismatch, Registry, RegistryError
from stream_ml.serving.model import load_model, model_input
from stream_ml.training import metrics

NAMES = FRAUD_FEATURES.names
CONSTANT = NAMES.index("is_weekend")  # never varies while learning: river scales it to 0
MISSING = NAMES.index("card_since_last_s")


def vectors(n: int, rng: np.random.Generator, *, constant: bool = True) -> np.ndarray:
    """Vectors with the fraud feature set's value ranges, some missing (NaN)."""
    x = np.empty((n, len(NAMES)))
    for j, name in enumerate(NAMES):
        if "amount" in name and "to_" not in name:
            x[:, j] = (
                np.log(rng.lognormal(3.5, 1.2, n)) if name == "log_amount" else rng.lognormal(3.5, 1.2, n)
            )
        elif name.endswith("_s"):
            x[:, j] = rng.uniform(0, 30 * 86_400, n)
        elif "count" in name or name.endswith(("_24h", "_30d", "_7d")):
            x[:, j] = rng.poisson(3.0, n)
        elif name == "hour_of_day":
            x[:, j] = rng.integers(0, 24, n)
        else:
            x[:, j] = rng.random(n) < 0.3
    x[rng.random(n) < 0.3, MISSING] = np.nan
    if constant:
        x[:, CONSTANT] = 0.0
    return x


def labels(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    amount = np.nan_to_num(x[:, NAMES.index("amount_to_card_mean_30d")])
    logit = -5.0 + 2.5 * x[:, NAMES.index("device_new_for_card")] + 0.3 * np.log1p(amount)
    return rng.random(len(x)) < 1 / (1 + np.exp(-logit))


def trained_logistic(n: int = 3000, seed: int = 0) -> tuple[OnlineLogistic, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = vectors(n, rng)
    y = labels(x, rng)
    model = OnlineLogistic(NAMES)
    for row, label in zip(x.tolist(), y.tolist(), strict=True):
        model.learn_one(row, label)
    return model, x, y


# -- the exported model: served by the scorer, restored by the learner ------------------------


def test_the_scorer_serves_a_snapshot_with_rivers_numbers(tmp_path: Path):
    model, _, _ = trained_logistic()
    assert model.positives > 10
    learner = OnlineLearner(NAMES)
    learner.logistic = model
    registry = Registry(tmp_path)
    mv = snapshot.save(learner, registry, FRAUD_FEATURES, group="g1", about={"source": "test"})
    assert mv.meta["params"]["online"] is True and mv.meta["params"]["group"] == "g1"
    assert mv.meta["params"]["examples"] == model.examples and mv.meta["data_version"] == {"source": "test"}
    assert registry.stage("shadow") is None and registry.stage("challenger") is None  # nothing promoted

    served = load_model(registry, mv.version, FRAUD_FEATURES)
    rng = np.random.default_rng(7)
    x = vectors(500, rng, constant=False)  # the input constant while learning now varies
    x[:5] = np.nan  # all missing: scored as all zeros, by both
    rows = x.tolist()
    expected = np.array([model.predict_proba_one(r) for r in rows])
    scores, reasons = served.score(rows)
    assert np.abs(np.array(scores) - expected).max() < 1e-9
    assert np.abs(np.array(served.probabilities(rows)) - expected).max() < 1e-9
    assert expected.std() > 0.01  # the comparison means something: the scores differ
    # an input with no variance counts for nothing (river's rule), so it is never a reason
    assert all(name != NAMES[CONSTANT] for row in reasons for name, _ in row)
    assert any(reasons) and all(math.isfinite(v) for row in reasons for _, v in row if v == v)


def test_a_restored_model_predicts_and_learns_exactly_as_the_original(tmp_path: Path):
    model, _, _ = trained_logistic(seed=1)
    learner = OnlineLearner(NAMES)
    learner.logistic = model
    registry = Registry(tmp_path)
    snapshot.save(learner, registry, FRAUD_FEATURES, group="g1", about={})
    restored = snapshot.restore(registry, FRAUD_FEATURES, group="g1")
    assert restored is not None and restored is not model
    rng = np.random.default_rng(2)
    x = vectors(400, rng, constant=False)
    y = labels(x, rng)
    rows = x.tolist()
    assert [restored.predict_proba_one(r) for r in rows] == [model.predict_proba_one(r) for r in rows]
    for row, label in zip(rows, y.tolist(), strict=True):
        model.learn_one(row, label)
        restored.learn_one(row, label)
    assert [restored.predict_proba_one(r) for r in rows] == [model.predict_proba_one(r) for r in rows]
    after, before = restored.to_tensors()[0], model.to_tensors()[0]
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert restored.examples == model.examples and restored.positive_weight() == model.positive_weight()


def test_restore_takes_the_newest_snapshot_of_its_group_and_feature_set(tmp_path: Path):
    registry = Registry(tmp_path)
    assert snapshot.restore(registry, FRAUD_FEATURES, group="g1") is None
    learner = OnlineLearner(NAMES)
    rng = np.random.default_rng(3)
    x = vectors(600, rng)
    y = labels(x, rng)
    examples = [Example(r, v, i) for i, (r, v) in enumerate(zip(x.tolist(), y.tolist(), strict=True))]
    learner.learn_many(examples[:300])
    first = snapshot.save(learner, registry, FRAUD_FEATURES, group="g1", about={})
    assert snapshot.save(learner, registry, FRAUD_FEATURES, group="g1", about={}) == first  # unchanged
    learner.learn_many(examples[300:])
    second = snapshot.save(learner, registry, FRAUD_FEATURES, group="g1", about={})
    other = OnlineLearner(NAMES)
    other.learn_many(examples[:100])
    snapshot.save(other, registry, FRAUD_FEATURES, group="g2", about={})
    assert second.version != first.version
    assert snapshot.restore(registry, FRAUD_FEATURES, group="g1").examples == 600
    assert snapshot.restore(registry, FRAUD_FEATURES, group="g2").examples == 100
    assert snapshot.restore(registry, FRAUD_FEATURES, group="g3") is None


def test_the_scorer_refuses_an_online_model_of_another_width(tmp_path: Path):
    weights, architecture = OnlineLogistic(NAMES[:5]).to_tensors()
    registry = Registry(tmp_path)
    common = {"metrics": {}, "params": {}, "data_version": {}, "code_version": "x", "environment": {}}
    narrow = registry.register(
        weights,
        feature_set="fs-x",
        feature_names=NAMES[:5],
        architecture=architecture,
        reference={},
        **common,
    )
    with pytest.raises(FeatureSetMismatch, match="cannot be served"):
        load_model(registry, narrow.version, FRAUD_FEATURES, allow_feature_set_mismatch=True)
    odd = registry.register(
        {"w": torch.ones(1)},
        feature_set="fs-x",
        feature_names=[],
        architecture={"kind": "tree"},
        reference={},
        **common,
    )
    with pytest.raises(RegistryError, match="online-logistic"):
        load_model(registry, odd.version, FRAUD_FEATURES, allow_feature_set_mismatch=True)


# -- a concept change -------------------------------------------------------------------------

CHANGE_NAMES = ["a", "b", "noise", "amount"]


def concept_change(n: int, change_at: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fraud (about 1.5 %) follows input a before ``change_at``, input b after; a and b independent."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4))
    x[:, 3] = rng.lognormal(3.0, 1.0, size=n)
    driver = np.where(np.arange(n) < change_at, x[:, 0], x[:, 1])
    y = rng.random(n) < 1 / (1 + np.exp(-(-6.0 + 2.0 * driver)))
    return x, y


def test_online_models_recover_from_a_concept_change_a_frozen_model_does_not():
    n, change_at, window = 40_000, 20_000, 10_000
    x, y = concept_change(n, change_at, seed=0)
    assert 0.01 < y.mean() < 0.02
    examples = [Example(r, v, i) for i, (r, v) in enumerate(zip(x.tolist(), y.tolist(), strict=True))]
    learner = OnlineLearner(CHANGE_NAMES, window=window)
    learner.learn_many(examples[:change_at])
    before = learner.metrics()
    assert before[LOGISTIC]["roc_auc"] > 0.85 and before[FOREST]["roc_auc"] > 0.8, (
        before
    )  # good before the change
    # the static model: the online logistic model as it was at the change, frozen, served as production
    frozen = OnlineLogistic.from_tensors(*learner.logistic.to_tensors(), CHANGE_NAMES)
    for e in examples[change_at:]:
        e.served["production:frozen"] = frozen.predict_proba_one(e.features)
    learner.learn_many(examples[change_at:])
    after = learner.metrics()  # the last 10,000 examples: from 10,000 after the change on
    static = after["production:frozen"]["roc_auc"]
    assert static < 0.65  # it ranks on a, which says nothing now
    assert after[LOGISTIC]["roc_auc"] > static + 0.25, after
    assert after[FOREST]["roc_auc"] > static + 0.15, after
    assert after[LOGISTIC]["examples"] == after["production:frozen"]["examples"] == window


# -- progressive metrics ----------------------------------------------------------------------


def test_rolling_metrics_are_the_trainers_metrics_on_the_last_window():
    rng = np.random.default_rng(4)
    y = rng.random(2_500) < 0.05
    p = np.round(rng.random(2_500) * 0.5 + 0.4 * y, 2)  # ties included
    rolling = RollingMetrics(window=1_000, review_threshold=0.6)
    reference: deque = deque(maxlen=1_000)
    for i in range(0, 2_500, 333):  # pieces of every size relative to the window: eviction wraps
        if i % 2:
            for a, b in zip(y[i : i + 333], p[i : i + 333], strict=True):
                rolling.add(bool(a), float(b))
        else:
            rolling.add_many(y[i : i + 333], p[i : i + 333])
        reference.extend(zip(y[i : i + 333], p[i : i + 333], strict=True))
        ry, rp = (np.array(v) for v in zip(*reference, strict=True))
        got = rolling.metrics()
        assert got["roc_auc"] == metrics.roc_auc(ry, rp) and got["pr_auc"] == metrics.pr_auc(ry, rp)
        assert got["recall_at_review"] == (rp[ry] >= 0.6).mean()
        assert got["examples"] == len(ry) and got["positives"] == ry.sum()
    rolling.add_many(y, p)  # more than a window at once: its last window only
    np.testing.assert_array_equal(rolling.pairs()[1], p[-1_000:])
    assert rolling.total == 5_000


def test_rolling_metrics_are_nan_without_both_classes():
    rolling = RollingMetrics(window=10, review_threshold=0.5)
    assert all(math.isnan(rolling.metrics()[k]) for k in ("roc_auc", "pr_auc", "recall_at_review"))
    rolling.add_many([False] * 5, [0.1] * 5)
    got = rolling.metrics()
    assert math.isnan(got["roc_auc"]) and math.isnan(got["recall_at_review"]) and got["examples"] == 5
    with pytest.raises(ValueError, match="NaN"):
        rolling.add(True, float("nan"))


def test_gauges_show_each_models_rolling_metrics_and_forget_replaced_versions():
    rng = np.random.default_rng(5)
    x = vectors(400, rng)
    y = labels(x, rng)
    learner = OnlineLearner(NAMES, window=200)

    def sample(name: str, model: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"model": model})

    counted = sample("stream_ml_online_examples_total", LOGISTIC) or 0.0
    rows = x.tolist()
    learner.learn_many(Example(rows[i], bool(y[i]), i, {"production:v1": 0.5}) for i in range(200))
    assert learner.export_gauges(every_s=0.0)
    got = learner.metrics()
    assert sample("stream_ml_online_examples_total", LOGISTIC) == counted + 200
    for gauge, key in (
        ("roc_auc", "roc_auc"),
        ("pr_auc", "pr_auc"),
        ("recall_at_review", "recall_at_review"),
    ):
        for model in (LOGISTIC, FOREST, "production:v1"):
            value = sample(f"stream_ml_online_{gauge}", model)
            assert value == got[model][key] or (math.isnan(value) and math.isnan(got[model][key]))
    assert not learner.export_gauges(every_s=3600.0)  # throttled
    # v2 replaces v1; once v1 has not been seen for a whole window it is dropped
    learner.learn_many(Example(rows[i], bool(y[i]), i, {"production:v2": 0.5}) for i in range(200, 400))
    assert "production:v1" in learner.metrics()
    learner.learn_many([Example(rows[0], False, 400, {"production:v2": 0.5})])
    assert "production:v1" not in learner.metrics() and "production:v2" in learner.metrics()
    assert sample("stream_ml_online_roc_auc", "production:v1") is None
    assert learner.seen == 401 and learner.examples == 401


# -- imbalance and missing values ---------------------------------------------------------------


def test_positives_are_weighted_by_the_root_of_the_class_ratio():
    names = ["a", "b"]
    weighted = OnlineLogistic(names)
    rng = np.random.default_rng(6)
    for _ in range(99):
        weighted.learn_one(rng.normal(size=2).tolist(), False)
    weights, architecture = weighted.to_tensors()
    plain = OnlineLogistic.from_tensors(weights, architecture | {"weight_positives": False}, names)
    row = rng.normal(size=2).tolist()
    steps = []
    for model in (weighted, plain):
        before = model.model.intercept
        model.learn_one(row, True)
        steps.append(model.model.intercept - before)
    assert weighted.positive_weight() == math.sqrt(99) and plain.positive_weight() == 1.0
    assert steps[0] == pytest.approx(math.sqrt(99) * steps[1], rel=1e-12)
    # with the weight taken back out of the odds, the scores are probabilities again
    x = rng.normal(size=(30_000, 2))
    y = rng.random(30_000) < 1 / (1 + np.exp(-(-5.0 + 1.5 * x[:, 0])))
    model = OnlineLogistic(names)
    scores = []
    for r, label in zip(x.tolist(), y.tolist(), strict=True):
        scores.append(model.predict_proba_one(r))
        model.learn_one(r, label)
    late = slice(10_000, None)
    assert np.mean(scores[late]) == pytest.approx(y[late].mean(), rel=0.2)
    assert model.positive_weight() > 5


def test_missing_values_are_zeros_for_the_learners_as_for_the_scorer():
    rows = [[1.0, float("nan"), float("inf"), -float("inf"), 1e-50, 3.3]]
    # the scorer's rule before it had one definition: a float32 tensor, nan_to_num(0)
    scorer = torch.tensor(rows, dtype=torch.float32).nan_to_num_(0.0).numpy()
    np.testing.assert_array_equal(model_input(rows), scorer)
    names = [f"x{i}" for i in range(6)]
    assert as_river_inputs(rows, names)[0] == dict(zip(names, scorer[0].tolist(), strict=True))

    rng = np.random.default_rng(8)
    x = rng.normal(size=(300, 6))
    y = rng.random(300) < 0.1
    with_nan = x.copy()
    with_nan[rng.random(x.shape) < 0.2] = np.nan
    as_zero = np.nan_to_num(with_nan, nan=0.0)
    for cls in (OnlineLogistic, OnlineForest):
        a, b = cls(names), cls(names)
        for r_nan, r_zero, label in zip(with_nan.tolist(), as_zero.tolist(), y.tolist(), strict=True):
            assert a.predict_proba_one(r_nan) == b.predict_proba_one(r_zero)
            a.learn_one(r_nan, label)
            b.learn_one(r_zero, label)


# -- the forest ---------------------------------------------------------------------------------


def test_the_forests_fast_vote_is_rivers_vote():
    x, y = concept_change(12_000, 6_000, seed=1)  # a change: trees are replaced on the way
    model = OnlineForest(CHANGE_NAMES, negative_rate=0.2, seed=3)
    rows = as_river_inputs(x.tolist(), CHANGE_NAMES)
    assert model._vote(rows[0]) == 0.0  # no tree yet
    for i, (row, label) in enumerate(zip(rows, y.tolist(), strict=True)):
        if i % 7 == 0:
            assert model._vote(row) == pytest.approx(
                model.model.predict_proba_one(row).get(True, 0.0), abs=1e-12
            )
        model.learn_dict(row, label)
    assert max(t.n_nodes for t in model.model) > 3


def test_the_forest_learns_every_fraud_and_a_sample_of_the_rest():
    x, y = concept_change(20_000, 20_000, seed=2)
    model = OnlineForest(CHANGE_NAMES, negative_rate=0.05, seed=0)
    for row, label in zip(x.tolist(), y.tolist(), strict=True):
        model.learn_one(row, label)
    positives = int(y.sum())
    expected = positives + 0.05 * (len(y) - positives)
    assert model.seen == len(y)
    assert abs(model.learnt - expected) < 4 * math.sqrt(expected)
    # corrected for the sample, the scores are near the true rate, not the sample's (about 25 %)
    scores = [model.predict_proba_one(r) for r in x[-3_000:].tolist()]
    assert np.mean(scores) == pytest.approx(y.mean(), rel=0.3)


# -- the scaler: river's numbers, learnt on arrays -----------------------------------------------


def test_the_array_scaler_is_rivers_standard_scaler_bit_for_bit():
    rng = np.random.default_rng(11)
    x = vectors(3000, rng)  # a constant feature (variance 0) and missing values among them
    x[:, 0] *= 1e6  # and very different scales
    rows = model_rows(x.tolist(), NAMES)
    dicts = rows_as_dicts(rows, NAMES)
    ours, theirs = RunningScaler(len(NAMES)), preprocessing.StandardScaler()
    assert ours.transform_one(dicts[0]) == theirs.transform_one(dicts[0])  # before any example
    for i, (row, d) in enumerate(zip(rows, dicts, strict=True)):
        if i % 50 == 0 or i < 5:
            assert ours.transform_one(d) == theirs.transform_one(d)
            assert ours.means.tolist() == [theirs.means[n] for n in NAMES]
            assert ours.vars.tolist() == [theirs.vars[n] for n in NAMES]
            assert ours.counts.tolist() == [theirs.counts[n] for n in NAMES]
        ours.learn(row)
        theirs.learn_one(d)
    assert ours.transform_one(dicts[-1])[NAMES[CONSTANT]] == 0.0


def _river_logistic_scores(x: np.ndarray, y: np.ndarray) -> tuple[list[float], dict, float]:
    """The online logistic model as it was written on river's StandardScaler: the reference."""
    scaler = preprocessing.StandardScaler()
    model = OnlineLogistic(NAMES).model  # a fresh river LogisticRegression with the same settings
    positives = negatives = 0
    scores = []
    for d, label in zip(as_river_inputs(x.tolist(), NAMES), y.tolist(), strict=True):
        z = scaler.transform_one(d)
        w = math.sqrt(max(negatives, 1) / max(positives, 1))
        p = model.predict_proba_one(z)[True]
        scores.append(p / (p + (1.0 - p) * w))
        if label:  # a positive is weighted by the counts with it
            positives += 1
            model.learn_one(z, True, math.sqrt(max(negatives, 1) / max(positives, 1)))
        else:
            negatives += 1
            model.learn_one(z, False, 1.0)
        scaler.learn_one(d)
    return scores, dict(model.weights), model.intercept


def test_the_online_logistic_model_learns_exactly_as_on_rivers_scaler():
    rng = np.random.default_rng(12)
    x = vectors(4000, rng)
    y = labels(x, rng)
    expected, weights, intercept = _river_logistic_scores(x, y)
    # through the learner (batches of rows) ...
    learner = OnlineLearner(NAMES, window=len(x))
    for i in range(0, len(x), 700):
        learner.learn_many(
            Example(r, bool(t), i, {}) for r, t in zip(x[i : i + 700].tolist(), y[i : i + 700], strict=True)
        )
    assert learner.rolling[LOGISTIC].pairs()[1].tolist() == expected
    assert dict(learner.logistic.model.weights) == weights and learner.logistic.model.intercept == intercept
    # ... and one vector at a time, or one dict at a time (in any key order)
    one, by_dict = OnlineLogistic(NAMES), OnlineLogistic(NAMES)
    for row, d, label, p in zip(
        x.tolist(), as_river_inputs(x.tolist(), NAMES), y.tolist(), expected, strict=True
    ):
        assert one.predict_proba_one(row) == p
        one.learn_one(row, label)
        assert by_dict.predict_learn_dict(dict(reversed(d.items())), label) == p
    assert dict(one.model.weights) == weights == dict(by_dict.model.weights)


def test_the_reasons_are_the_largest_contributions_to_the_logit():
    """Logistic model: input i adds w_i · (x_i − mean_i) / scale_i to the logit; the reasons are
    the three largest positive ones (a feature on a large scale is not favoured nor penalised)."""
    from stream_ml.serving.model import OnlineLogisticModule, ScoringModel

    names = ["a", "b", "c", "d", "e"]
    module = OnlineLogisticModule(len(names))
    with torch.no_grad():
        module.mean.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0], dtype=torch.float64))
        module.var.copy_(torch.tensor([1.0, 100.0**2, 0.5**2, 1.0, 1.0], dtype=torch.float64))
        module.linear.weight.copy_(torch.tensor([[1.0, 3.0, 0.5, -2.0, 0.1]], dtype=torch.float64))
        module.linear.bias.zero_()
    model = ScoringModel(module, names, "v", "fs", torch.device("cpu"))
    x = [2.0, 50.0, 1.0, 1.0, 1.0]
    # contributions: a 2.0, b 3 · 0.5 = 1.5, c 0.5 · 2 = 1.0, d −2.0, e 0.1
    _, (reasons,) = model.score([x])
    assert [name for name, _ in reasons] == ["a", "b", "c"]
    assert reasons[0] == ("a", 2.0)
