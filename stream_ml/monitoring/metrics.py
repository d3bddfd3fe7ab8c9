"""Prometheus metrics of drift detection (units in the names where they have units).

The gauges hold the latest closed window's values per column (``feature="score"`` for the
model's score), so an alert rule can fire on ``stream_ml_feature_drift_severity >= 2``.

>>> SEVERITY_CODE["critical"], SEVERITY_CODE["none"]
(2, 0)
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

from stream_ml.monitoring.drift import WindowReport

SEVERITY_CODE = {"none": 0, "warning": 1, "critical": 2}

FEATURE_PSI = Gauge(
    "stream_ml_feature_psi",
    "Population stability index of each feature (and feature=score) in the latest closed window.",
    ["feature"],
)
FEATURE_KS_PVALUE = Gauge(
    "stream_ml_feature_ks_pvalue",
    "Two-sample KS p-value against the reference in the latest closed window (numeric columns).",
    ["feature"],
)
FEATURE_CHI2_PVALUE = Gauge(
    "stream_ml_feature_chi2_pvalue",
    "Chi-squared p-value against the reference in the latest closed window (binary columns).",
    ["feature"],
)
FEATURE_DRIFT_SEVERITY = Gauge(
    "stream_ml_feature_drift_severity",
    "Drift severity of each column in the latest closed window: 0 none, 1 warning, 2 critical.",
    ["feature"],
)
DRIFT_WINDOWS = Counter(
    "stream_ml_drift_windows_total",
    "Drift windows closed, by worst severity (none, warning, critical, insufficient).",
    ["severity"],
)
DRIFT_WINDOW_ROWS = Gauge("stream_ml_drift_window_rows", "Rows in the latest closed drift window.")
RETRAIN_RECOMMENDATIONS = Counter(
    "stream_ml_retrain_recommendations_total",
    "Drift windows that recommended retraining (a critical column).",
)
PERFORMANCE_DRIFT = Counter(
    "stream_ml_performance_drift_total", "Changes in the production model's error rate found by ADWIN."
)
DRIFT_LATE_ROWS = Counter(
    "stream_ml_drift_late_rows_total", "Served rows dropped by drift detection: their window had closed."
)


def export(report: WindowReport) -> None:
    """Set the gauges and counters from a closed window.

    An insufficient window (too few rows) is counted but leaves the gauges at the last window
    that could be judged: its numbers would be noise.
    """
    DRIFT_WINDOWS.labels(report.severity).inc()
    DRIFT_WINDOW_ROWS.set(report.rows)
    if report.late_rows:
        DRIFT_LATE_ROWS.inc(report.late_rows)
    if report.retrain:
        RETRAIN_RECOMMENDATIONS.inc()
    if report.severity == "insufficient":
        return
    for column in report.columns:
        FEATURE_PSI.labels(column.feature).set(column.psi)
        if column.ks_pvalue is not None:
            FEATURE_KS_PVALUE.labels(column.feature).set(column.ks_pvalue)
        if column.chi2_pvalue is not None:
            FEATURE_CHI2_PVALUE.labels(column.feature).set(column.chi2_pvalue)
        FEATURE_DRIFT_SEVERITY.labels(column.feature).set(SEVERITY_CODE[column.severity])


def export_performance_drift() -> None:
    """Count one change found by :class:`~stream_ml.monitoring.drift.PerformanceMonitor`."""
    PERFORMANCE_DRIFT.inc()
