"""`stream-ml demo`: the whole loop on one machine, every station a real process.

1. The stack (embedded broker and Redis, unless ``STREAM_ML_KAFKA_BOOTSTRAP`` /
   ``STREAM_ML_REDIS_URL`` name servers to use), a feature worker, a feedback worker and the
   scorer, each started as its own ``stream-ml`` process with its log in ``OUTPUT/logs``.
2. History: ``--history`` synthetic payments and their labels, published flat out, so the
   features are warm and replay has labelled data.
3. Live: payments at ``--rate`` a second, event time ``--time-scale`` × wall time, each scored
   over HTTP by the gateway and then published; labels follow ``--label-delay`` of event time
   later. Half-way a distribution shift starts (``--shift``).
4. At ``--retrain-at`` of the run: ``stream-ml replay`` reads the log back into a dataset,
   ``stream-ml train --promote production`` trains and promotes a model; the scorer picks it up
   on its next registry poll, between two batches, while the calls go on.
5. The end: the workers catch up, ``stream-ml drift report`` writes the report, a summary with
   a check per station is printed and written to ``OUTPUT/summary.json``, and everything the
   demo started is stopped by PID (on Ctrl-C too).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from stream_ml.config import ENV_PREFIX, Settings
from stream_ml.demo.options import DemoOptions
from stream_ml.demo.scrape import Samples, scrape
from stream_ml.events.gateway import Gateway
from stream_ml.events.label import Label
from stream_ml.events.publish import event_time_schedule, publish
from stream_ml.events.sources.synthetic import Shift, SyntheticConfig, SyntheticStream
from stream_ml.events.transaction import Transaction
from stream_ml.kafka import group_caught_up
from stream_ml.registry import Registry
from stream_ml.stack import kafka_bootstrap, local
from stream_ml.stack.processes import Process, free_port, spawn, tail, wait_for_port

SEVERITY = {0: "none", 1: "warning", 2: "critical"}
_FEATURES_GROUP = "stream-ml-demo-features"
_FEEDBACK_GROUP = "stream-ml-demo-feedback"
_START_TIMEOUT_S = 60.0
_CATCH_UP_TIMEOUT_S = 20.0
_RETRAIN_GRACE_S = 90.0  # how long the stream goes on past --duration for a retrain in progress
_SWITCH_WINDOW_S = 2.0
_BATCH_NICENESS = 10  # calls this close to the model switch count as "around the switch"


@dataclass(slots=True)
class Retrain:
    started_s: float | None = None
    done_s: float | None = None
    dataset: dict[str, Any] | None = None
    version: str | None = None
    metrics: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.done_s is not None or self.error is not None


@dataclass(slots=True)
class Status:
    """The latest scrape of every process, and what changed since the one before."""

    scorer: Samples = field(default_factory=Samples)
    features: Samples = field(default_factory=Samples)
    feedback: Samples = field(default_factory=Samples)
    severities: dict[str, int] = field(default_factory=dict)
    first_warning: dict[str, float] = field(default_factory=dict)
    first_critical: dict[str, float] = field(default_factory=dict)


class Demo:
    def __init__(self, settings: Settings, options: DemoOptions, out: Callable[[str], None] = print) -> None:
        self.options = options
        self.out_dir = options.output.resolve()
        self.logs = self.out_dir / "logs"
        self.registry = self.out_dir / "registry"  # never the user's: the demo promotes models
        self.settings = replace(
            settings,
            state_dir=self.out_dir / "stack",
            kafka_port=settings.kafka_port if settings.kafka_bootstrap else free_port(),
            redis_port=settings.redis_port if settings.redis_url else free_port(),
            registry=str(self.registry),
        )
        self._out = out
        self.api_key = secrets.token_urlsafe(24)
        self.ports = {"scorer": free_port(), "features": free_port(), "feedback": free_port()}
        self.processes: list[Process] = []
        self.stack_started = False
        self.status = Status()
        self.initial = Retrain()
        self.retrain = Retrain()
        self.gateway: Gateway | None = None
        self._stop_stream = False
        self._t0 = time.monotonic()
        self.live_s = 0.0
        self._shift_said = False

    # -- the run --------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run the demo; returns the summary (also written to OUTPUT/summary.json)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        self._t0 = time.monotonic()
        previous = signal.signal(signal.SIGTERM, _interrupt)
        try:
            self._start()
            return asyncio.run(self._main())
        finally:
            self._stop()
            signal.signal(signal.SIGTERM, previous)

    def _start(self) -> None:
        o = self.options
        # What a killed demo left running here (its workers; its stack, which holds its log) goes first.
        left = [p for p in _recorded(self.out_dir / "processes.json") if p.is_running()]
        for process in left:
            process.stop()
        left += local.down(self.settings)
        if left:
            self.say(f"stopped what an earlier demo left running here: {', '.join(p.name for p in left)}")
        report = local.up(self.settings)
        self.stack_started = bool(report.started)
        self.say(
            f"stack: Kafka at {report.state.kafka_bootstrap}, Redis at {report.state.redis_url} "
            f"({', '.join(report.started) or 'nothing'} started; logs and outputs in {self.out_dir})"
        )
        self._spawn("features", ["worker", "features", "--group", _FEATURES_GROUP], "features")
        self._spawn(
            "feedback",
            [
                "worker",
                "feedback",
                "--group",
                _FEEDBACK_GROUP,
                "--window-events",
                str(o.window_events),
                "--reference-rows",
                str(o.reference_rows),
                "--snapshot-every",
                str(max(o.duration_s / 3, 10.0)),
            ],
            "feedback",
        )
        scorer = self._spawn(
            "scorer",
            ["serve", "--port", str(self.ports["scorer"]), "--rate-limit", "100000", "--model-poll-s", "0.5"],
            None,
        )
        for p in self.processes:
            wait_for_port(p, "127.0.0.1", _START_TIMEOUT_S)
        self.say(
            f"started: feature worker, feedback worker, scorer on http://127.0.0.1:{scorer.port} "
            f"(pids {', '.join(str(p.pid) for p in self.processes)})"
        )
        # Replaced whole (written aside, then renamed): a reader never sees half a list.
        recorded = self.out_dir / "processes.json"
        aside = recorded.with_suffix(".json.tmp")
        aside.write_text(
            json.dumps([p.to_json() for p in self.processes] + self._stack_processes(), indent=2)
        )
        aside.replace(recorded)

    def _spawn(self, name: str, args: list[str], metrics: str | None) -> Process:
        port = self.ports[metrics or name]
        argv = [sys.executable, "-m", "stream_ml", *args]
        if metrics:
            argv += ["--metrics-port", str(port)]
        process = spawn(name, argv, port, self.logs / f"{name}.log", env=self._env())
        self.processes.append(process)
        return process

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        return env | self.settings.to_env() | {"STREAM_ML_API_KEYS": self.api_key}

    def _stack_processes(self) -> list[dict[str, Any]]:
        current = local.status(self.settings)
        return [p.to_json() for p in current.processes] if current and self.stack_started else []

    def _stop(self) -> None:
        if self.processes or self.stack_started:
            self.say("stopping what the demo started")
        for p in self.processes:  # all at once: each finishes its last batch in parallel
            with contextlib.suppress(ProcessLookupError):
                if p.is_running():
                    os.kill(p.pid, signal.SIGTERM)
        for p in reversed(self.processes):
            p.stop()
        if self.stack_started:
            local.down(self.settings)
            self.say("stopped: the workers, the scorer and the stack")
        elif self.processes:
            self.say("stopped: the workers and the scorer (the stack was not the demo's)")

    async def _main(self) -> dict[str, Any]:
        o = self.options
        bootstrap = kafka_bootstrap(self.settings)
        now_ms = int(time.time() * 1000)
        # History runs up to now at the live pace of event time, so the live part continues it.
        event_rate = o.rate / o.time_scale
        history_ms = int(o.history / event_rate * 1000)
        live_ms = int(o.duration_s * o.time_scale * 1000)
        shift = Shift.parse(o.shift, now_ms + int(o.shift_at * live_ms)) if o.shift else None
        stream = SyntheticStream(
            SyntheticConfig(
                seed=o.seed,
                start_ms=now_ms - history_ms,
                rate=event_rate,
                cards=o.cards,
                merchants=o.merchants,
                fraud_rate=o.fraud_rate,
                label_delay_s=o.label_delay_s,
                shifts=(shift,) if shift else (),
            )
        )
        # One iterator for both parts: a second `items()` would restart the generator's clock.
        items = stream.items()
        first_live: list[Transaction | Label] = []
        history = _until(items, now_ms, first_live)
        live = itertools.chain(first_live, items)
        if o.history:
            report = await publish(self.settings, bootstrap, history, progress=False)
            self.say(
                f"history: {report.transactions:,} payments and {report.labels:,} labels "
                f"({history_ms / 3_600_000:.1f} h of event time) published in {report.seconds:.1f} s"
            )
            self.initial = await self._train("initial", since_ms=now_ms - history_ms // 2)
            if self.initial.version is None:
                raise RuntimeError(f"the initial model could not be trained: {self.initial.error}")
        self.say(
            f"live: {o.rate:g} payments/s for {o.duration_s:g} s, event time ×{o.time_scale:g}; each scored "
            f"over HTTP, then published; labels {o.label_delay_s / o.time_scale:g} s later"
        )
        async with aiohttp.ClientSession() as session:
            await self._scorer_serves(session, self.initial.version)
            self.gateway = gateway = Gateway(
                self.settings,
                bootstrap,
                f"http://127.0.0.1:{self.ports['scorer']}/score",
                self.api_key,
                clock=self._t,
            )
            live0 = self._t()
            schedule = event_time_schedule(now_ms, o.time_scale)
            streaming = asyncio.create_task(gateway.run(self._live(live), schedule))
            retraining: asyncio.Task[None] | None = None
            next_status = live0 + o.status_every_s
            while not streaming.done():
                await asyncio.wait({streaming}, timeout=0.25)
                t = self._t()
                live = t - live0
                if shift and not self._shift_said and live >= o.shift_at * o.duration_s:
                    self._shift_said = True
                    self.say(f"drift injected: {o.shift} from now on (event time)")
                if retraining is None and live >= o.retrain_at * o.duration_s:
                    half = (self._event_time(now_ms, live) - (now_ms - history_ms)) // 2
                    retraining = asyncio.create_task(self._retrain(self._event_time(now_ms, live) - half))
                if t >= next_status:
                    next_status += o.status_every_s
                    await self._scrape(session)
                    self.say(self._status_line(t))
                if live >= o.duration_s and (
                    retraining is None
                    or (self.retrain.finished and self._switch_seen())
                    or live >= o.duration_s + _RETRAIN_GRACE_S
                ):
                    self._stop_stream = True
            streaming.result()
            if retraining is not None and not retraining.done():
                retraining.cancel()
                self.retrain.error = self.retrain.error or "not finished in time"
            self.live_s = self._t() - live0
            self.say("stream ended; waiting for the workers to catch up")
            caught_up = await self._catch_up(bootstrap)
            await self._scrape(session)
        self.say("writing the drift report")
        report_path = await self._drift_report()
        summary = self._summary(caught_up, report_path)
        (self.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    async def _scorer_serves(self, session: aiohttp.ClientSession, version: str | None) -> None:
        """Wait until the scorer answers, with ``version`` as its production model (if given)."""
        url = f"http://127.0.0.1:{self.ports['scorer']}/metrics"
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            served = (await scrape(session, url)).by_label("stream_ml_model_info", "version")
            if served and (version is None or version in served):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(
            f"the scorer did not serve {version or 'a model'} within {_START_TIMEOUT_S:.0f} s; "
            f"see {self.logs / 'scorer.log'}"
        )

    def _live(self, items: Iterator[Transaction | Label]) -> Iterator[Transaction | Label]:
        for item in items:
            if self._stop_stream:
                return
            yield item

    def _switch_seen(self) -> bool:
        v = self.retrain.version
        return v is None or (self.gateway is not None and self.gateway.traffic.versions[v] > 0)

    async def _catch_up(self, bootstrap: str) -> bool:
        s = self.settings
        deadline = time.monotonic() + _CATCH_UP_TIMEOUT_S
        groups = {
            _FEATURES_GROUP: [s.topic_transactions, s.topic_labels],
            _FEEDBACK_GROUP: [s.topic_labels, s.topic_predictions],
        }
        while groups and time.monotonic() < deadline:
            for group, topics in list(groups.items()):
                if await group_caught_up(bootstrap, group, topics):
                    del groups[group]
            if groups:
                await asyncio.sleep(0.5)
        for group in groups:
            self.say(f"  {group} had not caught up after {_CATCH_UP_TIMEOUT_S:.0f} s")
        return not groups

    # -- retraining -----------------------------------------------------------------------

    def _event_time(self, live_start_ms: int, live_s: float) -> int:
        return live_start_ms + int(live_s * self.options.time_scale * 1000)

    async def _retrain(self, since_ms: int) -> None:
        self.retrain = await self._train("retrain", since_ms)

    async def _train(self, name: str, since_ms: int) -> Retrain:
        """Replay the log into a dataset, train on it, promote the model to production.

        The rows are the payments since ``since_ms`` (the latest half of the log; the replay reads
        the warm-up before it too): the first payments of a young log meet cold features, unlike
        what the model will see, and they would make its drift reference cold too.
        """
        r = Retrain(started_s=self._t())
        dataset = self.out_dir / f"dataset-{name}"
        self.say(f"{name}: replaying the log into {dataset}")
        try:
            code, out = await self._command(
                f"{name}-replay",
                ["replay", "-o", str(dataset), "--from", str(since_ms), "--overwrite", "--quiet", "--json"],
            )
            if code != 0:
                raise RuntimeError(f"replay exited with {code}; see {self.logs / f'{name}-replay.log'}")
            replayed = json.loads(out)
            r.dataset = {"counts": replayed["counts"], "manifest": replayed["manifest"]}
            m = replayed["manifest"]
            self.say(
                f"{name}: {m['rows']:,} rows ({m['positives']:,} fraud, "
                f"{m['negatives']:,} legitimate) replayed at {replayed['events_per_s']:,} events/s; training"
            )
            code, _ = await self._command(
                f"{name}-train",
                ["train", str(dataset), "--quiet", "--patience", "3", "--promote", "production"],
            )
            if code != 0:
                raise RuntimeError(f"train exited with {code}; see {self.logs / f'{name}-train.log'}")
            registry = Registry(self.registry)
            r.version = registry.stage("production")
            if r.version is None:
                raise RuntimeError(f"train promoted nothing; see {self.logs / f'{name}-train.log'}")
            r.metrics = _validation(registry.get(r.version).meta["metrics"])
            r.done_s = self._t()
            self.say(f"{name}: trained {r.version} (validation {r.metrics}) and promoted it to production")
        except (RuntimeError, ValueError, KeyError) as exc:
            r.error = str(exc)
            self.say(f"{name} failed: {exc}")
        return r

    async def _command(self, name: str, args: list[str], batch: bool = True) -> tuple[int, str]:
        """Run a ``stream-ml`` command to the end; its stderr (and stdout) go to its log.

        ``batch``: at a lower CPU priority, beside the live traffic.
        """
        log = self.logs / f"{name}.log"
        with open(log, "ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "stream_ml",
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                env=self._env(),
                preexec_fn=_batch_priority if batch else None,
            )
            try:
                stdout, _ = await proc.communicate()
            except asyncio.CancelledError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                raise
        text = stdout.decode(errors="replace")
        with open(log, "a") as f:
            f.write(text)
        return proc.returncode or 0, text

    async def _drift_report(self) -> Path | None:
        path = self.out_dir / "drift-report"
        code, _ = await self._command("drift-report", ["drift", "report", "--output", str(path)], batch=False)
        index = path / "index.html"
        if code != 0 or not index.exists():
            self.say(f"drift report: not written; {tail(str(self.logs / 'drift-report.log'), 3)}")
            return None
        return index

    # -- status ---------------------------------------------------------------------------

    def say(self, line: str) -> None:
        self._out(f"[{self._t():5.1f}s] {line}")

    def _t(self) -> float:
        """Seconds since the demo started: the clock of every line it prints."""
        return time.monotonic() - self._t0

    async def _scrape(self, session: aiohttp.ClientSession) -> None:
        p, st = self.ports, self.status
        st.scorer, st.features, st.feedback = await asyncio.gather(
            scrape(session, f"http://127.0.0.1:{p['scorer']}/metrics"),
            scrape(session, f"http://127.0.0.1:{p['features']}/metrics"),
            scrape(session, f"http://127.0.0.1:{p['feedback']}/metrics"),
        )
        t = self._t()
        newly_critical = []
        for name, value in st.feedback.by_label("stream_ml_feature_drift_severity", "feature").items():
            level = int(value)
            if level >= 1 and name not in st.first_warning:
                st.first_warning[name] = t
            if level >= 2 and name not in st.first_critical:
                st.first_critical[name] = t
                newly_critical.append(name)
            st.severities[name] = level
        if newly_critical:
            self.say(f"drift: critical for the first time: {', '.join(sorted(newly_critical))}")

    def _status_line(self, t: float) -> str:
        assert self.gateway is not None
        traffic, st = self.gateway.traffic, self.status
        since = max(t - self.options.status_every_s, 0.0)
        recent = traffic.latencies_ms(since)
        rate = sum(1 for c in traffic.calls if c.at_s >= since) / max(t - since, 1e-9)
        p50, p99 = (np.percentile(recent, 50), np.percentile(recent, 99)) if len(recent) else (np.nan, np.nan)
        auc = st.feedback.by_label("stream_ml_online_roc_auc", "model")
        served = auc.get(f"production:{traffic.last_version}")
        online = " ".join(
            [f"{m.removeprefix('online-')} {v:.2f}" for m, v in sorted(auc.items()) if m.startswith("online")]
            + ([f"production {served:.2f}"] if served is not None else [])
        )
        psi = st.feedback.by_label("stream_ml_feature_psi", "feature")
        worst = sorted(st.severities.items(), key=lambda kv: (-kv[1], -psi.get(kv[0], 0.0)))
        moved = [f"{n} {SEVERITY[s]}" for n, s in worst if s]
        windows = int(st.feedback.total("stream_ml_drift_windows_total"))
        return (
            f"{traffic.payments:,} payments ({rate:,.0f}/s), score p50 {p50:.1f} ms "
            f"p99 {p99:.1f} ms, {sum(traffic.errors.values())} failed | model {_short(traffic.last_version)} "
            "| features "
            f"{int(st.features.total('stream_ml_feature_events_total', outcome='applied')):,} applied, lag "
            f"{int(st.features.total('stream_ml_feature_consumer_lag_events')):,} | joined "
            f"{int(st.feedback.total('stream_ml_feedback_join_total', outcome='joined')):,} | ROC AUC "
            f"{online or '-'} | drift: {windows} windows, {', '.join(moved[:4]) or 'all none'}"
        )

    # -- summary --------------------------------------------------------------------------

    def _summary(self, caught_up: bool, report: Path | None) -> dict[str, Any]:
        assert self.gateway is not None
        traffic, st, r = self.gateway.traffic, self.status, self.retrain
        lat = traffic.latencies_ms()
        switched_at = traffic.first_answer.get(r.version) if r.version else None
        around = (
            traffic.errors_between(switched_at - _SWITCH_WINDOW_S, switched_at + _SWITCH_WINDOW_S)
            if switched_at is not None
            else None
        )
        failed = sum(traffic.errors.values())
        summary: dict[str, Any] = {
            "output": str(self.out_dir),
            "seconds": round(self._t(), 1),
            "live_seconds": round(self.live_s, 1),
            "payments": traffic.payments,
            "labels_published": traffic.labels,
            "score": {
                "calls": traffic.payments,
                "failed": failed,
                "failed_by_status": {str(k): v for k, v in traffic.errors.items()},
                "p50_ms": _round(np.percentile(lat, 50)) if len(lat) else None,
                "p99_ms": _round(np.percentile(lat, 99)) if len(lat) else None,
                "by_model": dict(traffic.versions),
            },
            "features_applied": int(st.features.total("stream_ml_feature_events_total", outcome="applied")),
            "predictions_logged": int(st.scorer.total("stream_ml_score_predictions_logged_total")),
            "join": {
                k: int(v) for k, v in st.feedback.by_label("stream_ml_feedback_join_total", "outcome").items()
            },
            "online_examples": int(st.feedback.total("stream_ml_online_examples_total")),
            "online_roc_auc": st.feedback.by_label("stream_ml_online_roc_auc", "model"),
            "drift": {
                "windows": int(st.feedback.total("stream_ml_drift_windows_total")),
                "retrain_recommendations": int(st.feedback.total("stream_ml_retrain_recommendations_total")),
                "severity": {n: SEVERITY[s] for n, s in sorted(st.severities.items())},
                "first_critical_s": {n: round(t, 1) for n, t in st.first_critical.items()},
                "report": str(report) if report else None,
            },
            "initial": dataclasses.asdict(self.initial),
            "retrain": dataclasses.asdict(r) | {"served_from_s": switched_at, "failed_around_switch": around},
            "caught_up": caught_up,
        }
        summary["checks"] = {
            "features in Redis": summary["features_applied"] > 0,
            "payments scored": len(lat) > 0 and failed <= 0.01 * traffic.payments,
            "predictions logged": summary["predictions_logged"] > 0,
            "labels joined": summary["join"].get("joined", 0) > 0,
            "online models learnt": summary["online_examples"] > 0,
            "drift windows closed": summary["drift"]["windows"] > 0,
            "drift report written": report is not None,
            "replay-trained model promoted and served": switched_at is not None and around == 0,
        }
        return summary


def describe(summary: dict[str, Any]) -> str:
    """The summary as a person reads it."""
    s, d, r = summary["score"], summary["drift"], summary["retrain"]
    join = summary["join"]
    lines = [
        "",
        f"demo summary ({summary['live_seconds']:g} s of live traffic, {summary['seconds']:g} s in all; "
        f"everything is in {summary['output']})",
        f"  payments        {summary['payments']:,} scored over HTTP then published, "
        f"{summary['labels_published']:,} labels",
        f"  scoring         p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, "
        f"{s['failed']} of {s['calls']:,} calls failed",
        *(f"                  {n:,} calls answered by {v}" for v, n in s["by_model"].items()),
        f"  features        {summary['features_applied']:,} events applied to Redis",
        f"  predictions     {summary['predictions_logged']:,} logged to Kafka",
        f"  feedback        {join.get('joined', 0):,} labels joined, "
        f"{summary['online_examples']:,} online examples; ROC AUC "
        + ", ".join(f"{m} {v:.3f}" for m, v in sorted(summary["online_roc_auc"].items())),
        f"  drift           {d['windows']} windows, {d['retrain_recommendations']} retrain recommendations; "
        + (", ".join(f"{n} {v}" for n, v in d["severity"].items() if v != "none") or "nothing moved"),
    ]
    if r["version"]:
        lines.append(
            f"  retrain         replay {r['dataset']['manifest']['rows']:,} rows → {r['version']}, "
            f"served from {r['served_from_s']:.1f} s with {r['failed_around_switch']} failed calls within "
            f"{_SWITCH_WINDOW_S:g} s of the switch"
            if r["served_from_s"] is not None
            else f"  retrain         {r['version']} promoted but not served before the end"
        )
    else:
        lines.append(f"  retrain         failed: {r['error']}")
    lines.append(f"  drift report    {d['report'] or 'not written'}")
    lines.append("")
    for name, ok in summary["checks"].items():
        lines.append(f"  [{'ok' if ok else 'FAILED'}] {name}")
    return "\n".join(lines)


def _short(version: str | None, width: int = 28) -> str:
    if version is None:
        return "-"
    return version if len(version) <= width else version[: width - 1] + "…"


def _round(value: float) -> float:
    return round(float(value), 1)


def _recorded(path: Path) -> list[Process]:
    """The processes an earlier demo recorded in ``path`` (none if it is missing or unreadable)."""
    try:
        return [Process.from_json(p) for p in json.loads(path.read_text())]
    except (OSError, ValueError, TypeError):
        return []


def _until(
    items: Iterator[Transaction | Label], end_ms: int, rest: list[Transaction | Label]
) -> Iterator[Transaction | Label]:
    """``items`` due before ``end_ms``; the first one after goes into ``rest``."""
    for item in items:
        if (item.event_time if type(item) is Transaction else item.label_time) >= end_ms:
            rest.append(item)
            return
        yield item


def _batch_priority() -> None:
    # Replay and training are batch work: on a small machine they would take the cores the
    # scorer needs to answer within its deadline.
    os.nice(_BATCH_NICENESS)


def _validation(metrics: dict[str, Any]) -> str:
    """The model's validation ROC and PR AUC, as the trainer recorded them in the registry."""
    model = metrics["model"]
    return f"ROC AUC {model['roc_auc']:.4f}, PR AUC {model['pr_auc']:.4f}"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the demo the way Ctrl-C does: through the finally
