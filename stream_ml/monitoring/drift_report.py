"""`stream-ml drift report`: the ``drift`` topic read back into an HTML page a person can read.

The page shows which columns moved and when: a summary table (worst first, with the first window
at warning and at critical), a severity map (columns × windows), PSI over time per column, and
reference-against-current histograms of every column that drifted (at its worst window) and of
the score.

>>> summaries = summarize([_example(0, 0.01), _example(1, 0.15), _example(2, 0.3)])
>>> s = summaries[0]
>>> s.name, s.worst, round(s.max_psi, 2), fmt_time(s.first_warning), fmt_time(s.first_critical)
('x', 'critical', 0.3, '2026-01-01 01:00', '2026-01-01 02:00')
"""

from __future__ import annotations

import asyncio
import html
import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from stream_ml.events.codec import InvalidMessage
from stream_ml.events.drift import (
    KEY_SCORE,
    DriftMessage,
    DriftWindow,
    FeatureDrift,
    PerformanceDrift,
    decode_drift,
)
from stream_ml.kafka import FETCH_MAX_WAIT_MS
from stream_ml.monitoring.drift import PSI_CRITICAL, PSI_WARNING, WindowReport, worst_severity

COLOURS = {"critical": "#d62728", "warning": "#ff9f1c", "none": "#2ca02c", "insufficient": "#b0b0b0"}
BACKGROUNDS = {"critical": "#fbd5d5", "warning": "#ffe8c2", "none": "#dff3df", "insufficient": "#eeeeee"}
_LEGEND = {
    "critical": f"critical (PSI > {PSI_CRITICAL})",
    "warning": f"warning (PSI {PSI_WARNING}-{PSI_CRITICAL})",
    "none": "none",
    "insufficient": "too few rows",
}
_RANK = {"insufficient": 0, "none": 1, "warning": 2, "critical": 3}
_IDLE_POLLS = 5


# --- reading the topic ------------------------------------------------------------------------------


@dataclass(slots=True)
class DriftLog:
    """Everything the ``drift`` topic held."""

    columns: list[FeatureDrift] = field(default_factory=list)
    windows: list[DriftWindow] = field(default_factory=list)
    performance: list[PerformanceDrift] = field(default_factory=list)
    invalid: int = 0  # records that failed validation (skipped)

    def add(self, message: DriftMessage) -> None:
        if isinstance(message, FeatureDrift):
            self.columns.append(message)
        elif isinstance(message, DriftWindow):
            self.windows.append(message)
        else:
            self.performance.append(message)


async def read_drift(bootstrap: str, topic: str, timeout_s: float = 120.0) -> DriftLog:
    """Every message of ``topic``, from the beginning to the end it had when we came.

    The end is each partition's high watermark as a fetch reports it (the embedded broker answers
    ListOffsets(latest) wrongly, so ``end_offsets`` is not used).
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=FETCH_MAX_WAIT_MS,
    )
    await consumer.start()
    log = DriftLog()
    try:
        await consumer.topics()  # fetches the metadata that partitions_for_topic reads
        found = consumer.partitions_for_topic(topic)
        if not found:
            raise LookupError(
                f"topic {topic!r} does not exist on {bootstrap}: is this the right broker? "
                "(`stream-ml stack up` creates it)"
            )
        tps = [TopicPartition(topic, p) for p in sorted(found)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        live = set(tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        idle = 0
        while live:
            fetched = await consumer.getmany(*live, timeout_ms=200, max_records=10_000)
            idle = 0 if any(fetched.values()) else idle + 1
            for records in fetched.values():
                for r in records:
                    try:
                        log.add(decode_drift(r.value))
                    except InvalidMessage:
                        log.invalid += 1
            for tp in list(live):
                highwater = consumer.highwater(tp)
                if highwater is None:
                    if idle >= _IDLE_POLLS:  # no fetch answer for it at all: nothing to read
                        live.discard(tp)
                elif await consumer.position(tp) >= highwater:
                    live.discard(tp)
            if loop.time() > deadline:
                raise TimeoutError(f"reading {topic!r} took more than {timeout_s:.0f} s; is the broker up?")
    finally:
        await consumer.stop()
    return log


def windows_in(log: DriftLog, from_ms: int | None, to_ms: int | None) -> list[WindowReport]:
    """The windows that overlap [from_ms, to_ms), in time order; a window published twice counts once."""
    lo = -(2**63) if from_ms is None else from_ms
    hi = 2**63 if to_ms is None else to_ms
    columns: dict[tuple[str, int, int], dict[str, FeatureDrift]] = {}
    for c in log.columns:
        if c.window_start < hi and c.window_end > lo:
            columns.setdefault((c.model_version, c.window_start, c.window_end), {})[c.feature] = c
    summaries = {(w.model_version, w.window_start, w.window_end): w for w in log.windows}
    out = [
        WindowReport.from_messages(list(cols.values()), summaries.get(key))
        for key, cols in columns.items()
        if KEY_SCORE in cols
    ]
    return sorted(out, key=lambda r: (r.window_start, r.model_version))


# --- the summary ------------------------------------------------------------------------------------


@dataclass(slots=True)
class ColumnSummary:
    """One column (a feature, or the score) over the windows of the report."""

    name: str
    kind: str
    worst: str
    max_psi: float
    worst_window: FeatureDrift  # the window of the highest PSI
    first_warning: int | None  # start of the first window at warning or worse
    first_critical: int | None
    last: FeatureDrift
    min_p_adjusted: float | None
    series: list[FeatureDrift]  # in time order


def summarize(windows: Sequence[WindowReport]) -> list[ColumnSummary]:
    """Per column (the score is one), sorted by worst severity then highest PSI."""
    series: dict[str, list[FeatureDrift]] = {}
    for w in windows:
        for c in w.columns:
            series.setdefault(c.feature, []).append(c)
    out = []
    for name, cs in series.items():
        judged = [c for c in cs if c.severity != "insufficient"] or cs
        top = max(judged, key=lambda c: c.psi)
        ps = [c.p_adjusted for c in judged if c.p_adjusted is not None]
        out.append(
            ColumnSummary(
                name=name,
                kind=cs[0].kind,
                worst=worst_severity([c.severity for c in cs]),
                max_psi=top.psi,
                worst_window=top,
                first_warning=next((c.window_start for c in cs if _RANK[c.severity] >= 2), None),
                first_critical=next((c.window_start for c in cs if c.severity == "critical"), None),
                last=cs[-1],
                min_p_adjusted=min(ps) if ps else None,
                series=cs,
            )
        )
    return sorted(out, key=lambda s: (-_RANK[s.worst], -s.max_psi, s.name))


def fmt_time(ms: int | None) -> str:
    """A time in ms as ``YYYY-MM-DD HH:MM`` (UTC); "—" for none.

    >>> fmt_time(1_767_225_600_000)
    '2026-01-01 00:00'
    """
    if ms is None:
        return "—"
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M")


def one_line(summaries: Sequence[ColumnSummary], windows: Sequence[WindowReport]) -> str:
    """The report in a line: the range, then the columns at critical and warning."""
    by = {s: [c.name for c in summaries if c.worst == s] for s in _RANK}
    span = f"{fmt_time(windows[0].window_start)} → {fmt_time(windows[-1].window_end)} UTC"
    parts = [f"{len(windows)} windows {span}"]
    if by["critical"]:
        parts.append(f"critical: {_names(by['critical'])}")
    if by["warning"]:
        parts.append(f"warning: {_names(by['warning'])}")
    if not by["critical"] and not by["warning"]:
        parts.append("no drift")
    parts.append(f"{len(by['none'])} columns without drift")
    retrain = sum(w.retrain for w in windows)
    if retrain:
        parts.append(f"{retrain} window{'s recommend' if retrain > 1 else ' recommends'} retraining")
    return "; ".join(parts)


def _names(names: list[str], most: int = 5) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


# --- writing the report -----------------------------------------------------------------------------


@dataclass(slots=True)
class ReportFiles:
    index: Path
    images: list[Path]
    summary: str  # one line


def write_report(
    windows: Sequence[WindowReport],
    output: Path,
    *,
    performance: Sequence[PerformanceDrift] = (),
    invalid: int = 0,
    title_range: str = "",
) -> ReportFiles:
    """``output/index.html`` and its PNGs, for ``windows`` (at least one)."""
    if not windows:
        raise ValueError("no windows to report")
    output.mkdir(parents=True, exist_ok=True)
    summaries = summarize(windows)
    images = [_severity_map(windows, summaries, output / "severity.png")]
    images.append(_psi_over_time(windows, summaries, output / "psi_over_time.png"))
    histograms: dict[str, Path] = {}
    for s in summaries:
        if s.worst in ("warning", "critical") or s.name == KEY_SCORE:
            histograms[s.name] = _histogram(s, output / f"hist_{_file_name(s.name)}.png")
    images += histograms.values()
    line = one_line(summaries, windows)
    page = _html(windows, summaries, histograms, performance, invalid, line, title_range)
    index = output / "index.html"
    index.write_text(page, encoding="utf-8")
    return ReportFiles(index, images, line)


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout=layout)
    FigureCanvasAgg(fig)  # Agg: renders without a display
    return fig


def _times(series: Iterable[FeatureDrift]) -> np.ndarray:
    return np.array([np.datetime64(c.window_start, "ms") for c in series])


def _severity_map(windows: Sequence[WindowReport], summaries: list[ColumnSummary], path: Path) -> Path:
    index = {(c.feature, w.window_start, w.model_version): c for w in windows for c in w.columns}
    grid = np.full((len(summaries), len(windows)), np.nan)
    for i, s in enumerate(summaries):
        for j, w in enumerate(windows):
            c = index.get((s.name, w.window_start, w.model_version))
            if c is not None:
                grid[i, j] = _RANK[c.severity]
    fig = _figure(min(7 + 0.25 * len(windows), 20), 1.6 + 0.22 * len(summaries))
    ax = fig.add_subplot()
    cmap = ListedColormap([COLOURS[s] for s in _RANK])
    cmap.set_bad("white")
    ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=-0.5, vmax=3.5, interpolation="none")
    ax.set_yticks(range(len(summaries)), [s.name for s in summaries], fontsize=8)
    step = max(1, len(windows) // 12)
    ax.set_xticks(
        range(0, len(windows), step),
        [fmt_time(w.window_start) for w in windows[::step]],
        rotation=45,
        ha="right",
        fontsize=8,
    )
    ax.set_xticks(np.arange(-0.5, len(windows)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(summaries)), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.5)
    ax.tick_params(which="minor", length=0)
    ax.set_title("severity per window", fontsize=10)
    ax.legend(
        handles=[
            Patch(color=COLOURS[s], label=_LEGEND[s]) for s in ("critical", "warning", "none", "insufficient")
        ],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
        frameon=False,
    )
    fig.savefig(path)
    return path


def _psi_over_time(windows: Sequence[WindowReport], summaries: list[ColumnSummary], path: Path) -> Path:
    cols = min(6, len(summaries))
    rows = -(-len(summaries) // cols)
    # A fixed layout: the constrained one took seconds to place 40 panels.
    fig = _figure(3.0 * cols, 2.2 * rows + 0.9, layout=None)
    fig.subplots_adjust(
        left=0.04,
        right=0.99,
        top=1 - 0.8 / fig.get_figheight(),
        bottom=0.75 / fig.get_figheight(),
        hspace=0.45,
        wspace=0.25,
    )
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    switches = [w.window_start for a, w in itertools.pairwise(windows) if a.model_version != w.model_version]
    for i, (ax, s) in enumerate(zip(axes.flat, summaries, strict=False)):
        times = _times(s.series)
        psi = np.array([c.psi for c in s.series])
        judged = np.array([c.severity != "insufficient" for c in s.series])
        top = max(PSI_CRITICAL * 1.5, float(psi[judged].max(initial=0.0)) * 1.1)
        # Too few rows: PSI is noise; a grey mark, not a point of the line nor of the scale.
        ax.plot(times, np.where(judged, psi, np.nan), color="#555555", linewidth=1)
        ax.scatter(
            times,
            np.minimum(psi, top * 0.97),
            c=[COLOURS[c.severity] for c in s.series],
            marker="o",
            s=12,
            zorder=3,
        )
        ax.axhline(PSI_WARNING, color=COLOURS["warning"], linestyle="--", linewidth=0.8)
        ax.axhline(PSI_CRITICAL, color=COLOURS["critical"], linestyle="--", linewidth=0.8)
        for t in switches:  # a new model version: a new reference
            ax.axvline(np.datetime64(t, "ms"), color="#8888ff", linestyle=":", linewidth=0.8)
        ax.set_ylim(0, top)
        ax.set_title(s.name, fontsize=9, color=COLOURS[s.worst] if s.worst != "none" else "black")
        if s.worst in ("warning", "critical"):
            ax.set_facecolor(BACKGROUNDS[s.worst])
        ax.tick_params(labelsize=7)
        if i + cols >= len(summaries):  # the lowest panel of its column: it shows the times
            ax.tick_params(labelbottom=True)
            for label in ax.get_xticklabels():
                label.set_rotation(30)
                label.set_horizontalalignment("right")
    for ax in list(axes.flat)[len(summaries) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"PSI per window (dashed: warning {PSI_WARNING}, critical {PSI_CRITICAL}; "
        "dotted blue: a new model version; grey: too few rows)",
        y=1 - 0.2 / fig.get_figheight(),
    )
    fig.savefig(path)
    return path


def bin_labels(column: FeatureDrift) -> list[str]:
    """Readable labels of a column's bins.

    >>> bin_labels(_example(0, 0.0).features[0])
    ['≤ 1', '1 – 2', '> 2']
    """
    if column.kind == "binary":
        return ["0", "1", "other"][: len(column.reference_fractions)]
    e = [f"{x:.3g}" for x in column.edges]
    if not e:
        return ["all"]
    return [f"≤ {e[0]}", *(f"{a} – {b}" for a, b in itertools.pairwise(e)), f"> {e[-1]}"]


def _histogram(s: ColumnSummary, path: Path) -> Path:
    c = s.worst_window
    labels, ref, cur = bin_labels(c), np.array(c.reference_fractions), np.array(c.current_fractions)
    if c.kind == "binary" and ref[-1] == 0 and cur[-1] == 0:  # no "other" value on either side
        labels, ref, cur = labels[:2], ref[:2], cur[:2]
    fig = _figure(max(4.5, 0.55 * len(labels) + 2), 3.2)
    ax = fig.add_subplot()
    x = np.arange(len(labels))
    ax.bar(x - 0.2, ref, width=0.4, label="reference", color="#7f9fbf")
    ax.bar(x + 0.2, cur, width=0.4, label="this window", color=COLOURS[c.severity])
    ax.set_xticks(
        x,
        labels,
        rotation=35 if len(labels) > 4 else 0,
        ha="right" if len(labels) > 4 else "center",
        fontsize=8,
    )
    ax.set_ylabel("share of rows")
    ax.legend(fontsize=8)
    ax.set_title(
        f"{c.feature}, window of {fmt_time(c.window_start)} UTC\nPSI {c.psi:.4f} ({c.severity})", fontsize=10
    )
    fig.savefig(path)
    return path


# --- the page ---------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.sev { font-weight: bold; }
.critical { background: #fbd5d5; color: #9b1c1c; }
.warning { background: #ffe8c2; color: #8a4b00; }
.none { background: #dff3df; color: #1c5e1c; }
.insufficient { background: #eeeeee; color: #555; }
.lead { font-size: 1.1em; }
img { max-width: 100%; border: 1px solid #ddd; margin: 0.3em 0; }
.hist { display: inline-block; vertical-align: top; margin-right: 1em; }
"""


def _sev(severity: str) -> str:
    return f'<td class="sev {severity}">{severity}</td>'


def _num(value: float | None, fmt: str = ".3f") -> str:
    return '<td class="num">—</td>' if value is None else f'<td class="num">{value:{fmt}}</td>'


def _html(
    windows: Sequence[WindowReport],
    summaries: list[ColumnSummary],
    histograms: dict[str, Path],
    performance: Sequence[PerformanceDrift],
    invalid: int,
    line: str,
    title_range: str,
) -> str:
    e = html.escape
    models = sorted({w.model_version for w in windows})
    references = sorted({w.reference for w in windows})
    out = [
        "<!doctype html><html><head><meta charset='utf-8'><title>stream-ml drift report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Drift report</h1>",
        f"<p class='lead'>{e(line)}</p>",
        f"<p>Windows from {fmt_time(windows[0].window_start)} to {fmt_time(windows[-1].window_end)} UTC"
        f"{e(title_range)}; model {e(', '.join(models))}; reference: {e(', '.join(references))}. "
        f"Severity on PSI: none &lt; {PSI_WARNING} ≤ warning ≤ {PSI_CRITICAL} &lt; critical. "
        "p-values: KS for numeric columns, chi-squared for binary ones, adjusted across the columns "
        "of a window (Benjamini-Hochberg).</p>",
    ]
    if invalid:
        out.append(f"<p>{invalid} records of the topic failed validation and were skipped.</p>")
    out += [
        "<h2>Columns, worst first</h2><table><tr><th>column</th><th>kind</th><th>worst</th>"
        "<th>max PSI</th><th>max PSI in window</th><th>first warning</th><th>first critical</th>"
        "<th>latest</th><th>latest PSI</th><th>min adj. p</th></tr>",
    ]
    for s in summaries:
        name = e(s.name)
        if s.name in histograms:
            name = f"<a href='#hist-{e(_file_name(s.name))}'>{name}</a>"
        out.append(
            f"<tr class='{s.worst}'><td>{name}</td><td>{s.kind}</td>{_sev(s.worst)}{_num(s.max_psi, '.4f')}"
            f"<td>{fmt_time(s.worst_window.window_start)}</td>"
            f"<td class='first-warning'>{fmt_time(s.first_warning)}</td>"
            f"<td class='first-critical'>{fmt_time(s.first_critical)}</td>{_sev(s.last.severity)}"
            f"{_num(s.last.psi, '.4f')}{_num(s.min_p_adjusted, '.2g')}</tr>"
        )
    out += [
        "</table>",
        "<h2>Severity per window</h2><img src='severity.png' alt='severity of each column per window'>",
        "<h2>PSI over time</h2><img src='psi_over_time.png' alt='PSI of each column per window'>",
    ]
    if histograms:
        out.append("<h2>Reference against the window of highest PSI</h2>")
        for name, path in histograms.items():
            out.append(
                f"<div class='hist' id='hist-{e(_file_name(name))}'><img src='{e(path.name)}' "
                f"alt='histogram of {e(name)}'></div>"
            )
    out.append(
        "<h2>Windows</h2><table><tr><th>start (UTC)</th><th>end</th><th>rows</th><th>late rows</th>"
        "<th>model</th><th>reference</th><th>severity</th><th>retrain</th><th>why</th></tr>"
    )
    for w in windows:
        out.append(
            f"<tr><td>{fmt_time(w.window_start)}</td><td>{fmt_time(w.window_end)}</td>"
            f"{_num(w.rows, ',d')}{_num(w.late_rows, ',d')}<td>{e(w.model_version)}</td>"
            f"<td>{e(w.reference)}</td>{_sev(w.severity)}<td>{'yes' if w.retrain else 'no'}</td>"
            f"<td>{e(w.reason)}</td></tr>"
        )
    out.append("</table>")
    if performance:
        out.append(
            "<h2>Model performance changes (ADWIN on |label − score|)</h2><table><tr><th>at (UTC)</th>"
            "<th>model</th><th>error before</th><th>error after</th><th>labels seen</th></tr>"
        )
        for p in performance:
            out.append(
                f"<tr><td>{fmt_time(p.event_time)}</td><td>{e(p.model_version)}</td>{_num(p.error_before)}"
                f"{_num(p.error_after)}{_num(p.labels, ',d')}</tr>"
            )
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out)


# --- the command ------------------------------------------------------------------------------------


def report(
    bootstrap: str, topic: str, output: Path, from_ms: int | None = None, to_ms: int | None = None
) -> ReportFiles:
    """Read ``topic`` and write the report of the windows overlapping [from_ms, to_ms)."""
    log = asyncio.run(read_drift(bootstrap, topic))
    windows = windows_in(log, from_ms, to_ms)
    if not windows:
        raise LookupError(_nothing_found(log, topic, from_ms, to_ms))
    lo, hi = (f" from {fmt_time(from_ms)}" if from_ms else ""), (f" to {fmt_time(to_ms)}" if to_ms else "")
    perf = [
        p
        for p in log.performance
        if (from_ms is None or p.event_time >= from_ms) and (to_ms is None or p.event_time < to_ms)
    ]
    return write_report(
        windows,
        output,
        performance=perf,
        invalid=log.invalid,
        title_range=f" (asked{lo}{hi})" if lo or hi else "",
    )


def _nothing_found(log: DriftLog, topic: str, from_ms: int | None, to_ms: int | None) -> str:
    if not log.columns:
        return (
            f"no drift reports in topic {topic!r}: run `stream-ml worker feedback` (it publishes a report "
            "per window of served predictions), then run this again"
        )
    first = min(c.window_start for c in log.columns)
    last = max(c.window_end for c in log.columns)
    lo = "the beginning" if from_ms is None else fmt_time(from_ms)
    hi = "the end" if to_ms is None else fmt_time(to_ms)
    return (
        f"no drift reports from {lo} to {hi} UTC; topic {topic!r} has "
        f"windows from {fmt_time(first)} to {fmt_time(last)} UTC: widen --from/--to, or run "
        "`stream-ml worker feedback` to detect drift on newer predictions"
    )


def _example(hour: int, psi_value: float) -> WindowReport:
    """A small report for the examples above (a window of one numeric column and the score)."""
    from stream_ml.monitoring.drift import severity

    start = 1_767_225_600_000 + hour * 3_600_000
    cols = [
        FeatureDrift(
            name, "numeric", start, start + 3_600_000, 500, "v1", "model", value, severity(value),
            0.1, 0.5, None, None, 0.5, [1.0, 2.0], [0.3, 0.4, 0.3], [0.3, 0.4, 0.3],
        )
        for name, value in (("x", psi_value), (KEY_SCORE, 0.0))
    ]  # fmt: skip
    return WindowReport.from_messages(cols)
