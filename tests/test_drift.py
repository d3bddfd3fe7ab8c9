"""Windowed drift detection: the statistics against independent computations, shifts found in the
window they start in (or the next) and no false alarms elsewhere, windows by time and by count,
late rows, the drift messages, and ADWIN on the error stream. No broker needed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import REGISTRY
from scipy import stats

from stream_ml.events.codec import InvalidMessage, decode_map, encode_map
from stream_ml.events.drift import (
    KEY_PERFORMANCE,
    KEY_WINDOW,
    DriftWindow,
    FeatureDrift,
    PerformanceDrift,
    decode_drift,
    encode_drift,
    record,
)
from stream_ml.events.sources.synthetic import Shift, SyntheticConfig, SyntheticStream
from stream_ml.events.transaction import Transaction
from stream_ml.monitoring import metrics
from stream_ml.monitoring.drift import (
    DriftDetector,
    PerformanceMonitor,
    WindowReport,
    adjust_pvalues,
    bootstrap_reference,
    chi2,
    psi,
)

HOUR = 3_600_000
T0 = 1_781_006_400_000  # an hour's start (2026-06-09 12:00 UTC): windows align with the hours
NAMES = ["amount", "tx_count", "ecom"]


def _rows(rng: np.random.Generator, n: int, amount_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Amount (continuous), a count with many zeros (tied deciles), a binary flag; a score of the amount."""
    x = np.empty((n, 3))
    x[:, 0] = rng.lognormal(3.5, 0.8, n) * amount_factor
    x[:, 1] = rng.poisson(0.7, n)
    x[:, 2] = rng.random(n) < 0.3
    score = 1 / (1 + np.exp(-(np.log(x[:, 0]) - 4.5)))
    return x, score


def _reference(rng: np.random.Generator, n: int = 20_000) -> dict:
    x, score = _rows(rng, n)
    return bootstrap_reference(x, NAMES, score)


# --- independent computations ------------------------------------------------------------------------


def _right_closed_fractions(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    # np.digitize(right=True): i such that edges[i-1] < x <= edges[i], written apart from the module's bins
    idx = np.digitize(values, edges, right=True)
    return np.array([(idx == b).sum() for b in range(len(edges) + 1)]) / len(values)


def _psi_by_hand(ref: np.ndarray, cur: np.ndarray, eps: float = 1e-4) -> float:
    total = 0.0
    for r, c in zip(ref, cur, strict=True):
        r, c = max(r, eps), max(c, eps)
        total += (c - r) * math.log(c / r)
    return total


def _ks_statistic_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    grid = np.union1d(a, b)
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def _bh_by_hand(p: list[float]) -> list[float]:
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):  # from the largest p down: the cumulative minimum
        i = order[rank - 1]
        running = min(running, p[i] * m / rank)
        out[i] = running
    return out


# --- the statistics --------------------------------------------------------------------------------


def test_psi_ks_chi2_agree_with_independent_computations():
    rng = np.random.default_rng(1)
    ref = _reference(rng)
    det = DriftDetector(ref, NAMES, model_version="v1", window_ms=HOUR)
    x, score = _rows(rng, 3000, amount_factor=1.3)
    t = T0 + np.sort(rng.integers(0, HOUR, 3000))
    assert det.add_many(t, x, score) == []
    (report,) = det.flush()
    assert (report.window_start, report.window_end, report.rows) == (T0, T0 + HOUR, 3000)
    assert report.reference == "bootstrap"

    for j, name in enumerate(["amount", "tx_count"]):
        dist = ref["features"][name]
        sample = np.array(dist["sample"])
        edges = np.unique(np.array(dist["quantiles"])[1:-1])
        ref_frac = _right_closed_fractions(sample, edges)
        cur_frac = _right_closed_fractions(x[:, j], edges)
        got = report[name]
        assert got.kind == "numeric"
        assert got.edges == pytest.approx(edges.tolist())
        assert got.reference_fractions == pytest.approx(ref_frac.tolist())
        assert got.current_fractions == pytest.approx(cur_frac.tolist())
        assert got.psi == pytest.approx(_psi_by_hand(ref_frac, cur_frac), rel=1e-9)
        # the window (3,000 rows) fits in the reservoir: KS is on exactly its rows
        assert got.ks_statistic == pytest.approx(_ks_statistic_by_hand(sample, x[:, j]), abs=1e-12)
        assert got.ks_pvalue == pytest.approx(stats.ks_2samp(sample, x[:, j]).pvalue, rel=1e-9)
        assert got.chi2_statistic is None

    # the count has tied deciles (most rows are 0 or 1): the bins are the unique edges only,
    # and 0 gets a bin of its own
    assert report["tx_count"].edges[0] == 0.0 and len(report["tx_count"].edges) < 9
    assert report["amount"].severity in ("warning", "critical")  # amounts 1.3× larger
    assert report["tx_count"].severity == "none"

    # chi-squared on the binary flag, written out: sum (o - e)² / e with 1 degree of freedom
    ecom = report["ecom"]
    freq = ref["features"]["ecom"]["frequencies"]
    observed = np.array([(x[:, 2] == 0).sum(), (x[:, 2] == 1).sum()])
    expected = np.array([freq["0"], freq["1"]]) * 3000
    stat = float(((observed - expected) ** 2 / expected).sum())
    assert ecom.kind == "binary" and ecom.ks_statistic is None
    assert ecom.chi2_statistic == pytest.approx(stat, rel=1e-9)
    assert ecom.chi2_pvalue == pytest.approx(stats.chi2.sf(stat, df=1), rel=1e-9)
    assert ecom.psi == pytest.approx(_psi_by_hand([freq["0"], freq["1"], 0.0], [*(observed / 3000), 0.0]))

    # Benjamini-Hochberg across the columns (features and score) of the window
    raw = [c.ks_pvalue if c.ks_pvalue is not None else c.chi2_pvalue for c in report.columns]
    assert [c.p_adjusted for c in report.columns] == pytest.approx(_bh_by_hand(raw), rel=1e-9)


def test_pure_functions():
    p = [0.001, 0.04, 0.03, 0.5, 0.2, None]
    assert adjust_pvalues(p)[:5] == pytest.approx(_bh_by_hand(p[:5]))
    assert adjust_pvalues(p)[5] is None
    assert psi([0.2, 0.8, 0.0], [0.2, 0.8, 0.0]) == 0.0
    assert psi([0.5, 0.5], [1.0, 0.0]) == pytest.approx(_psi_by_hand([0.5, 0.5], [1.0, 0.0]))
    # a category the reference never saw is expected at eps; one neither side has is left out
    stat, _ = chi2([1.0, 0.0, 0.0], [90, 10, 0])
    e = np.array([1.0, 1e-4]) / (1 + 1e-4) * 100
    assert stat == pytest.approx((((np.array([90, 10]) - e) ** 2) / e).sum())
    assert chi2([1.0, 0.0, 0.0], [100, 0, 0]) == (0.0, 1.0)


def test_reservoir_is_a_uniform_sample_of_a_large_window():
    rng = np.random.default_rng(2)
    det = DriftDetector(_reference(rng), NAMES, model_version="v1", window_ms=HOUR, sample_size=2000)
    x, score = _rows(rng, 40_000)
    x[20_000:, 0] *= 4  # the second half of the window differs: a sample of the first rows would miss it
    t = T0 + np.arange(40_000) * (HOUR // 40_000)
    for i in range(0, 40_000, 3000):
        det.add_many(t[i : i + 3000], x[i : i + 3000], score[i : i + 3000])
    (window,) = det._open.values()
    assert window.reservoir.shape == (2000, 4)  # bounded whatever the window's rows
    late_half = np.isin(window.reservoir[:, 0], x[20_000:, 0]).mean()
    assert 0.45 < late_half < 0.55
    (report,) = det.flush()
    full = _ks_statistic_by_hand(np.array(det._columns[0].ref_sample), x[:, 0])
    assert report["amount"].ks_statistic == pytest.approx(full, abs=0.04)


# --- shifts found, no false alarms -------------------------------------------------------------------


def test_shift_goes_critical_within_a_window_and_nothing_else_alarms():
    rng = np.random.default_rng(3)
    det = DriftDetector(_reference(rng), NAMES, model_version="v1", window_ms=HOUR)
    shift_at = T0 + 4 * HOUR + HOUR // 3  # a third into the fifth window
    reports: list[WindowReport] = []
    for hour in range(8):
        t = T0 + hour * HOUR + np.sort(rng.integers(0, HOUR, 3600))
        x, _ = _rows(rng, 3600)
        x[t >= shift_at, 0] *= 2.0
        score = 1 / (1 + np.exp(-(np.log(x[:, 0]) - 4.5)))  # the model answers the shifted amounts
        for i in range(0, 3600, 500):  # batches as a consumer fetches them
            reports += det.add_many(t[i : i + 500], x[i : i + 500], score[i : i + 500])
    reports += det.flush()
    assert [r.window_start for r in reports] == [T0 + h * HOUR for h in range(8)]
    by_amount = [r["amount"].severity for r in reports]
    assert by_amount[:4] == ["none"] * 4
    assert "critical" in by_amount[4:6]  # the window of the shift, or the next one
    assert by_amount[5:] == ["critical"] * 3
    assert all(r["tx_count"].severity == "none" and r["ecom"].severity == "none" for r in reports)
    assert [r.score.severity for r in reports[:4]] == ["none"] * 4
    assert all(r.score.severity == "critical" for r in reports[5:])  # the score follows its feature
    assert all(not r.retrain for r in reports[:4])
    first = next(r for r in reports if r.retrain)
    assert "amount" in first.reason and first.severity == "critical"
    assert all(r["tx_count"].p_adjusted > 0.01 for r in reports)


def test_synthetic_amount_shift_is_found_and_other_features_stay_quiet():
    start = T0 + 13 * 60_000  # not on an hour: the first live window is a partial one
    shift_at = start + 4 * HOUR
    cfg = SyntheticConfig(
        seed=5, start_ms=start, rate=2.0, cards=2000, merchants=200, shifts=(Shift("amount", 1.8, shift_at),)
    )
    txs = [i for i in SyntheticStream(cfg).items(until_ms=start + 7 * HOUR) if isinstance(i, Transaction)]
    t = np.array([tx.event_time for tx in txs], dtype=np.int64)
    amount = np.array([tx.amount for tx in txs])
    x = np.column_stack(
        [
            amount,
            np.log1p(amount),
            [tx.channel == "ecom" for tx in txs],
            [tx.channel == "atm" for tx in txs],
        ]
    ).astype(np.float64)
    score = 1 / (1 + np.exp(-(np.log1p(amount) - 5)))
    names = ["amount", "log_amount", "channel_ecom", "channel_atm"]
    cut = start + 2 * HOUR  # two hours of reference, then the live stream
    ref = bootstrap_reference(x[t < cut], names, score[t < cut])
    det = DriftDetector(ref, names, model_version="v0", window_ms=HOUR)
    live = t >= cut
    reports = det.add_many(t[live], x[live], score[live]) + det.flush()
    shifted = next(i for i, r in enumerate(reports) if r.window_end > shift_at)
    for r in reports[:shifted]:
        assert r.severity == "none", (r.window_start, [(c.feature, c.psi) for c in r.columns])
    assert "critical" in (reports[shifted]["amount"].severity, reports[shifted + 1]["amount"].severity)
    for r in reports[shifted + 1 :]:
        assert r["amount"].severity == r["log_amount"].severity == "critical"
        assert r["channel_ecom"].severity == r["channel_atm"].severity == "none"
        assert r.score.severity != "none"


# --- windows: by count, late rows, too few rows ------------------------------------------------------


def test_count_windows():
    rng = np.random.default_rng(4)
    det = DriftDetector(_reference(rng), NAMES, model_version="v1", window_events=1000)
    x, score = _rows(rng, 3500)
    t = T0 + np.arange(3500) * 1000
    reports = []
    for i in range(0, 3500, 300):
        reports += det.add_many(t[i : i + 300], x[i : i + 300], score[i : i + 300])
    assert [r.rows for r in reports] == [1000, 1000, 1000]
    assert [(r.window_start, r.window_end) for r in reports] == [
        (T0 + k * 1_000_000, T0 + (k + 1) * 1_000_000 - 1000 + 1) for k in range(3)
    ]
    (last,) = det.flush()
    assert last.rows == 500 and last.severity == "none"
    assert det.flush() == []


def test_late_rows_are_dropped_and_counted_and_lateness_is_allowed():
    rng = np.random.default_rng(5)
    det = DriftDetector(
        _reference(rng), NAMES, model_version="v1", window_ms=60_000, lateness_ms=10_000, min_rows=1
    )
    x, score = _rows(rng, 10)

    def add(*times: int) -> list[WindowReport]:
        n = len(times)
        return det.add_many(T0 + np.array(times) * 1000, x[:n], score[:n])

    assert add(5, 30, 65) == []  # 65 s is in the next window, but within the lateness: none closes
    assert add(55) == []  # within the allowed lateness: counted in the first window
    (first,) = add(71, 20, 66)  # 71 s closes the first window; the row at 20 s after it is late
    assert (first.rows, first.late_rows, det.late_rows) == (3, 0, 1)  # 20 s came after 71 s
    assert add(10, 12) == []  # late: their window has closed
    (second,) = add(200)
    assert (second.window_start, second.rows, second.late_rows) == (T0 + 60_000, 3, 3)
    assert det.late_rows == 3 and det.rows == 7


def test_batching_does_not_change_the_reports():
    rng = np.random.default_rng(6)
    ref = _reference(rng)
    x, score = _rows(rng, 30_000)
    t = T0 + np.sort(rng.integers(0, 3 * HOUR, 30_000))
    t[::97] -= 2 * HOUR  # some rows late
    one = DriftDetector(ref, NAMES, model_version="v1", sample_size=1000)
    many = DriftDetector(ref, NAMES, model_version="v1", sample_size=1000)
    a = one.add_many(t, x, score) + one.flush()
    b = []
    for i in range(0, 30_000, 777):
        b += many.add_many(t[i : i + 777], x[i : i + 777], score[i : i + 777])
    b += many.flush()
    assert a == b and one.late_rows == many.late_rows > 0


def test_too_few_rows_is_insufficient_not_an_alarm():
    rng = np.random.default_rng(7)
    det = DriftDetector(_reference(rng), NAMES, model_version="v1", window_ms=HOUR)
    x, score = _rows(rng, 50, amount_factor=10.0)
    det.add_many(T0 + np.arange(50), x, score)
    (report,) = det.flush()
    assert report.severity == "insufficient" and not report.retrain and report.reason == ""
    assert {c.severity for c in report.columns} == {"insufficient"}
    assert report["amount"].psi > 1  # measured, but not judged


def test_nan_is_compared_as_zero_and_counted():
    rng = np.random.default_rng(8)
    det = DriftDetector(_reference(rng), NAMES, model_version="v1", window_events=200)
    x, score = _rows(rng, 200)
    x[:20, 1] = np.nan
    (report,) = det.add_many(T0 + np.arange(200), x, score)
    assert report["tx_count"].nan_rows == 20 and report["amount"].nan_rows == 0
    zero_bin = report["tx_count"].current_fractions[0]
    assert zero_bin == pytest.approx(((np.nan_to_num(x[:, 1]) == 0).sum()) / 200)


def test_reference_must_cover_the_features():
    rng = np.random.default_rng(9)
    with pytest.raises(ValueError, match="empty"):
        DriftDetector({}, NAMES, model_version="default")
    with pytest.raises(ValueError, match="other"):
        DriftDetector(_reference(rng), [*NAMES, "other"], model_version="v1")
    model_ref = _reference(rng) | {"split": "validation"}
    assert DriftDetector(model_ref, NAMES, model_version="v1").reference_kind == "model"


# --- messages ------------------------------------------------------------------------------------


def _one_report(shift: float = 3.0) -> WindowReport:
    rng = np.random.default_rng(10)
    det = DriftDetector(_reference(rng), NAMES, model_version="v7", window_events=500)
    x, score = _rows(rng, 500, amount_factor=shift)
    (report,) = det.add_many(T0 + np.arange(500) * 1000, x, score)
    return report


def test_messages_round_trip_one_per_column_and_a_summary():
    report = _one_report()
    records = report.records()
    assert [r.key.decode() for r in records] == [*NAMES, "score", KEY_WINDOW]
    assert all(r.timestamp_ms == report.window_end for r in records)
    decoded = [decode_drift(r.value) for r in records]
    assert decoded[:-1] == report.columns
    summary = decoded[-1]
    assert isinstance(summary, DriftWindow)
    assert summary.critical == [c.feature for c in report.columns if c.severity == "critical"]
    assert "amount" in summary.critical and summary.retrain
    assert decode_map(records[0].value)["v"] == 1
    assert WindowReport.from_messages(decoded[:-1], summary) == report

    perf = PerformanceDrift("v7", T0, 1234, 1, 0.05, 0.4, 200)
    assert record(perf).key.decode() == KEY_PERFORMANCE
    assert decode_drift(encode_drift(perf)) == perf


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"type": "nope"}, "field type"),
        ({"severity": "bad"}, "field severity"),
        ({"psi": -1.0}, "field psi"),
        ({"psi": float("nan")}, "field psi"),
        ({"ks_pvalue": 1.5}, "field ks_pvalue"),
        ({"window_end": T0 - 1}, "field window_end"),
        ({"window_start": 1_700_000}, "field window_start"),
        ({"current_fractions": [0.5]}, "bins"),
        ({"edges": [1.0]}, "field edges"),
        ({"rows": -1}, "field rows"),
        ({"feature": None}, "field feature: required"),
    ],
)
def test_invalid_drift_messages_say_why(change: dict, reason: str):
    report = _one_report()
    message = report["amount"].to_dict() | change
    with pytest.raises(InvalidMessage, match=reason):
        decode_drift(encode_map(message))


def test_invalid_summary_and_version():
    summary = _one_report().summary().to_dict()
    with pytest.raises(InvalidMessage, match="field retrain"):
        decode_drift(encode_map(summary | {"retrain": "yes"}))
    with pytest.raises(InvalidMessage, match="field critical"):
        decode_drift(encode_map(summary | {"critical": "amount"}))
    with pytest.raises(InvalidMessage, match="schema version"):
        decode_drift(encode_map(summary | {"v": 99}))
    assert isinstance(decode_drift(encode_map(summary)), DriftWindow)
    assert isinstance(decode_drift(encode_map(_one_report()["ecom"].to_dict())), FeatureDrift)


def test_export_sets_the_gauges():
    report = _one_report()
    before = REGISTRY.get_sample_value("stream_ml_retrain_recommendations_total") or 0.0
    metrics.export(report)
    assert REGISTRY.get_sample_value("stream_ml_feature_psi", {"feature": "amount"}) == report["amount"].psi
    assert REGISTRY.get_sample_value("stream_ml_feature_drift_severity", {"feature": "amount"}) == 2
    assert REGISTRY.get_sample_value("stream_ml_feature_drift_severity", {"feature": "tx_count"}) == 0
    assert REGISTRY.get_sample_value("stream_ml_feature_psi", {"feature": "score"}) == report.score.psi
    assert REGISTRY.get_sample_value("stream_ml_retrain_recommendations_total") == before + 1
    assert REGISTRY.get_sample_value("stream_ml_drift_windows_total", {"severity": "critical"}) >= 1


# --- model performance --------------------------------------------------------------------------


def test_adwin_finds_a_jump_in_the_error_rate_and_not_in_a_stationary_stream():
    rng = np.random.default_rng(11)
    steady = PerformanceMonitor("v1")
    fraud = rng.random(20_000) < 0.05
    score = np.clip(np.where(fraud, 0.8, 0.05) + rng.normal(0, 0.05, 20_000), 0, 1)
    assert not any(
        steady.update(bool(f), float(s), T0 + i) for i, (f, s) in enumerate(zip(fraud, score, strict=True))
    )
    assert steady.detections == 0 and steady.labels == 20_000

    jump = PerformanceMonitor("v1")
    worse = np.clip(np.where(fraud, 0.3, 0.25) + rng.normal(0, 0.05, 20_000), 0, 1)  # the model degrades
    score[10_000:] = worse[10_000:]
    found = [
        i for i, (f, s) in enumerate(zip(fraud, score, strict=True)) if jump.update(bool(f), float(s), T0 + i)
    ]
    assert found and 10_000 <= found[0] < 10_500
    assert jump.last is not None and jump.last.error_after > jump.last.error_before
    assert jump.last.event_time == T0 + found[-1]


def test_ignored_columns_are_not_watched():
    rng = np.random.default_rng(12)
    det = DriftDetector(_reference(rng), NAMES, model_version="v1", window_events=500, ignore=["tx_count"])
    x, score = _rows(rng, 500)
    x[:, 1] = 7.0  # would be critical
    (report,) = det.add_many(T0 + np.arange(500), x, score)
    assert [c.feature for c in report.columns] == ["amount", "ecom", "score"]
    assert report.severity == "none"
    with pytest.raises(ValueError, match="expected"):
        det.add_many(T0 + np.arange(3), x[:3, :2], score[:3])
    with pytest.raises(ValueError, match="not features"):
        DriftDetector(_reference(rng), NAMES, model_version="v1", ignore=["hour_of_day"])
