"""`stream-ml drift report` against the real broker: the drift messages of several windows, one
feature shifted from a known hour, are published to a fresh drift topic, and the command's page
must name that feature critical from that hour, the others none, with real PNG charts.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from helpers import run_cli, settings_env

from stream_ml.config import Settings
from stream_ml.events.drift import PerformanceDrift, Record, record
from stream_ml.kafka import producer
from stream_ml.monitoring.drift import DriftDetector, WindowReport, bootstrap_reference
from stream_ml.monitoring.drift_report import fmt_time
from stream_ml.stack import kafka_bootstrap

HOUR = 3_600_000
T0 = 1_781_006_400_000  # 2026-06-09 12:00 UTC
SHIFT_HOUR = 3
NAMES = ["amount", "tx_count", "ecom"]
PNG = b"\x89PNG\r\n\x1a\n"


def _windows() -> list[WindowReport]:
    """Six hourly windows; amounts double from the fourth on, and the score follows them."""
    rng = np.random.default_rng(21)

    def rows(n: int, factor: float) -> tuple[np.ndarray, np.ndarray]:
        x = np.column_stack([rng.lognormal(3.5, 0.8, n) * factor, rng.poisson(0.7, n), rng.random(n) < 0.3])
        return x.astype(np.float64), 1 / (1 + np.exp(-(np.log(x[:, 0]) - 4.5)))

    x, score = rows(10_000, 1.0)
    det = DriftDetector(bootstrap_reference(x, NAMES, score), NAMES, model_version="v3", window_ms=HOUR)
    reports = []
    for hour in range(6):
        x, score = rows(2000, 2.0 if hour >= SHIFT_HOUR else 1.0)
        reports += det.add_many(T0 + hour * HOUR + np.arange(2000) * 1000, x, score)
    return reports + det.flush()


def _publish(settings: Settings, records: list[Record], raw: Sequence[bytes] = ()) -> None:
    async def send() -> None:
        kafka = producer(kafka_bootstrap(settings))
        await kafka.start()
        try:
            for r in records:
                await kafka.send(settings.topic_drift, r.value, key=r.key, timestamp_ms=r.timestamp_ms)
            for value in raw:
                await kafka.send(settings.topic_drift, value, key=b"amount")
            await kafka.flush()
        finally:
            await kafka.stop()

    asyncio.run(send())


class _Tables(HTMLParser):
    """The text of every table cell, table by table, row by row."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _summary_table(index: Path) -> dict[str, dict[str, str]]:
    parser = _Tables()
    parser.feed(index.read_text(encoding="utf-8"))
    header, *rows = parser.tables[0]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows}


@pytest.fixture(scope="module")
def windows() -> list[WindowReport]:
    return _windows()


def test_report_names_the_shifted_feature_critical_from_its_hour(
    topics: Settings, windows: list[WindowReport], tmp_path: Path
):
    assert [w.window_start for w in windows] == [T0 + h * HOUR for h in range(6)]
    assert windows[SHIFT_HOUR]["amount"].severity == "critical"  # the premise of this test
    perf = PerformanceDrift("v3", T0 + 4 * HOUR, 900, 1, 0.04, 0.31, 120)
    records = [r for w in windows for r in w.records()] + [record(perf)]
    _publish(topics, records, raw=[b"not a drift message"])

    out = tmp_path / "report"
    done = run_cli("drift", "report", "--output", str(out), env=settings_env(topics))
    assert done.returncode == 0, done.stderr
    assert str(out / "index.html") in done.stdout
    assert "6 windows" in done.stdout and "critical: amount" in done.stdout

    table = _summary_table(out / "index.html")
    assert list(table)[:2] == ["score", "amount"] or list(table)[:2] == ["amount", "score"]
    amount = table["amount"]
    assert amount["worst"] == "critical"
    assert amount["first critical"] == fmt_time(T0 + SHIFT_HOUR * HOUR)
    assert amount["first warning"] == fmt_time(T0 + SHIFT_HOUR * HOUR)
    for name in ("tx_count", "ecom"):
        assert table[name]["worst"] == "none"
        assert table[name]["first warning"] == table[name]["first critical"] == "—"
    assert table["score"]["worst"] != "none"

    page = (out / "index.html").read_text(encoding="utf-8")
    assert "1 records of the topic failed validation" in page
    assert "0.040" in page and "0.310" in page  # the performance change
    images = sorted(p.name for p in out.glob("*.png"))
    assert images == ["hist_amount.png", "hist_score.png", "psi_over_time.png", "severity.png"]
    for name in images:
        assert (out / name).read_bytes().startswith(PNG)
        assert f"src='{name}'" in page

    # --from/--to keep the windows that overlap the range: before the shift, nothing moved
    before = tmp_path / "before"
    done = run_cli(
        "drift",
        "report",
        "--from",
        str(T0 + HOUR // 2),
        "--to",
        fmt_time(T0 + SHIFT_HOUR * HOUR).replace(" ", "T") + "Z",
        "--output",
        str(before),
        env=settings_env(topics),
    )
    assert done.returncode == 0, done.stderr
    assert "3 windows" in done.stdout and "no drift" in done.stdout
    assert _summary_table(before / "index.html")["amount"]["worst"] == "none"

    # a range without windows: a clear error that says what to do
    done = run_cli(
        "drift", "report", "--from", "2030-01-01", "--output", str(tmp_path / "x"), env=settings_env(topics)
    )
    assert done.returncode == 2
    assert "no drift reports from 2030-01-01 00:00" in done.stderr
    assert fmt_time(T0) in done.stderr and "--from/--to" in done.stderr


def test_empty_topic_says_to_run_the_feedback_worker(topics: Settings, tmp_path: Path):
    done = run_cli("drift", "report", "--output", str(tmp_path / "r"), env=settings_env(topics))
    assert done.returncode == 2
    assert "no drift reports in topic" in done.stderr and "stream-ml worker feedback" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists()


def test_help():
    done = run_cli("drift", "report", "--help", env=dict(os.environ))
    assert done.returncode == 0
    assert "--from" in done.stdout and "--output" in done.stdout and "index.html" in done.stdout
