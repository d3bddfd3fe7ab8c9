"""docker-compose.yml, the Dockerfile and the files under deploy/, checked without Docker.

Every stream-ml service's command is parsed by the real CLI parser and every ``STREAM_ML_*``
variable is checked against the settings, so the compose file cannot drift from the code. The
Prometheus jobs are checked against the services and the ports their commands listen on, the
nginx config against the scorer, the Grafana provisioning against what is mounted, and every
metric a dashboard queries against the metrics the code registers (prometheus_client's registry).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import io
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import prometheus_client
import pytest
import yaml

import stream_ml
from stream_ml import config
from stream_ml.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
TORCH_PIN = "torch==2.13.0"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict) and isinstance(doc.get("services"), dict), "no `services:` mapping"
    return doc


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, from either the mapping or the list form."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _builds_here(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if isinstance(build, dict):
        build = build.get("context", ".")
    return build is not None and str(build).rstrip("/") in {".", ""}


def stream_ml_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services built from this repository, or running the image such a service builds."""
    services = compose["services"]
    images = {s["image"] for s in services.values() if _builds_here(s) and s.get("image")}
    return {
        name: s
        for name, s in services.items()
        if _builds_here(s) or (s.get("image") and s["image"] in images)
    }


def command_error(command: Any) -> str | None:
    """Why ``command`` is not a valid stream-ml invocation, or None when the CLI accepts it."""
    argv = shlex.split(command) if isinstance(command, str) else command
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
        return f"command must be a non-empty list of strings, got {command!r}"
    if argv[0] != "stream-ml":
        return f"command must start with 'stream-ml', got {argv[0]!r}"
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        message = stderr.getvalue().strip().splitlines()
        return f"stream-ml rejects {argv[1:]} (exit {exc.code}): {message[-1] if message else ''}"
    if not callable(getattr(args, "run", None)):
        return f"{argv[1:]} does not select a runnable subcommand"
    return None


def parsed_command(service: dict[str, Any]) -> tuple[list[str], argparse.Namespace]:
    """A stream-ml service's argv and the CLI's parse of it (after command_error found none)."""
    command = service.get("command")
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        return argv, build_parser().parse_args(argv[1:])


def metrics_port(service: dict[str, Any]) -> int | None:
    """The port a stream-ml service serves /metrics on, as its command sets it; None: no metrics.

    Workers have ``--metrics-port`` (0: off); the scorer serves /metrics on its HTTP ``--port``.
    """
    argv, args = parsed_command(service)
    if argv[1] == "serve":
        return int(args.port)
    port = getattr(args, "metrics_port", None)
    return int(port) if port else None


def replicas(service: dict[str, Any]) -> int:
    return int((service.get("deploy") or {}).get("replicas", 1))


def repo_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each bind mount of a path in the repository (``./...``)."""
    mounted = []
    for volume in service.get("volumes") or []:
        if isinstance(volume, dict):
            source, target = volume.get("source", ""), volume.get("target", "")
        else:
            source, _, rest = str(volume).partition(":")
            target = rest.split(":")[0]
        if source.startswith((".", "/")):
            mounted.append((source, target))
    return mounted


def published_ports(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each short-syntax ``ports`` entry."""
    published = []
    for entry in service.get("ports") or []:
        parts = str(entry).split("/")[0].split(":")
        assert len(parts) == 3, f"publish ports as HOST_IP:HOST_PORT:PORT, got {entry!r}"
        published.append((parts[0], int(parts[1]), int(parts[2])))
    return published


def service_by_image(compose: dict[str, Any], prefix: str) -> tuple[str, dict[str, Any]]:
    found = [(n, s) for n, s in compose["services"].items() if str(s.get("image", "")).startswith(prefix)]
    assert len(found) == 1, f"expected one service with an image {prefix}*, found {[n for n, _ in found]}"
    return found[0]


# --- the validator itself: it must reject what the CLI rejects ---------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["stream-ml", "no-such-command"],
        ["stream-ml", "produce", "synthetic", "--no-such-flag"],
        ["stream-ml", "produce", "synthetic", "--rate", "fast"],
        ["stream-ml", "stack"],
        ["stream-ml", "--help"],
        ["python", "-m", "stream_ml"],
        [],
        None,
    ],
)
def test_command_validator_rejects_bad_commands(command: Any) -> None:
    assert command_error(command) is not None


def test_command_validator_names_the_problem() -> None:
    error = command_error(["stream-ml", "no-such-command"])
    assert error is not None and "no-such-command" in error


def test_command_validator_accepts_real_commands() -> None:
    assert command_error(["stream-ml", "stack", "up"]) is None
    assert command_error(["stream-ml", "produce", "synthetic", "--rate", "5", "--partitions", "2"]) is None


# --- docker-compose.yml -----------------------------------------------------------------------


def test_kafka_runs_in_kraft_mode(compose: dict[str, Any]) -> None:
    kafka = compose["services"].get("kafka")
    assert kafka is not None, "no `kafka` service"
    assert str(kafka.get("image", "")).startswith("apache/kafka:")
    env = _environment(kafka)
    roles = {r.strip() for r in env.get("KAFKA_PROCESS_ROLES", "").split(",")}
    assert "controller" in roles, f"KAFKA_PROCESS_ROLES={env.get('KAFKA_PROCESS_ROLES')!r}: not KRaft"
    assert not any("ZOOKEEPER" in k for k in env), "KRaft needs no ZooKeeper settings"
    for key in ("KAFKA_NODE_ID", "KAFKA_CONTROLLER_QUORUM_VOTERS", "KAFKA_CONTROLLER_LISTENER_NAMES"):
        assert env.get(key), f"kafka: {key} is not set"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in env.get("KAFKA_LISTENERS", "")
    assert env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "").lower() == "false"
    assert "healthcheck" in kafka


def test_stream_ml_services_run_real_commands(compose: dict[str, Any]) -> None:
    services = stream_ml_services(compose)
    assert {"topics", "producer"} <= set(services), f"stream-ml services found: {sorted(services)}"
    errors = {name: command_error(s.get("command")) for name, s in services.items()}
    failures = [f"service {name!r}: {error}" for name, error in errors.items() if error]
    if failures:
        pytest.fail("\n".join(failures))


def test_stream_ml_variables_are_settings(compose: dict[str, Any]) -> None:
    known = {config.env_name(f.name) for f in dataclasses.fields(config.Settings)}
    # Anywhere in the file (anchors, services, comments): a misspelt variable is silently ignored.
    used = set(re.findall(rf"\b{config.ENV_PREFIX}[A-Z0-9_]+", COMPOSE.read_text()))
    assert used, "docker-compose.yml sets no STREAM_ML_* variable"
    assert used <= known, f"not settings: {sorted(used - known)}; known: {sorted(known)}"


def test_stream_ml_services_reach_kafka_and_redis(compose: dict[str, Any]) -> None:
    services = compose["services"]
    advertised = _environment(services["kafka"]).get("KAFKA_ADVERTISED_LISTENERS", "")
    for name, service in stream_ml_services(compose).items():
        env = _environment(service)
        settings = config.Settings.from_env(env)  # values of the right type
        assert settings.kafka_bootstrap, f"{name}: STREAM_ML_KAFKA_BOOTSTRAP unset (would start a stack)"
        assert settings.redis_url, f"{name}: STREAM_ML_REDIS_URL unset (would start a stack)"
        for server in settings.kafka_bootstrap.split(","):
            assert f"://{server}" in advertised, f"{name}: {server} is not an advertised Kafka listener"
        redis_host = re.sub(r"^rediss?://(?:[^@/]*@)?([^:/]+).*$", r"\1", settings.redis_url)
        assert redis_host in services, f"{name}: Redis host {redis_host!r} is no service"


def test_producer_waits_for_the_topics(compose: dict[str, Any]) -> None:
    depends = compose["services"]["producer"].get("depends_on") or {}
    assert isinstance(depends, dict), "producer: depends_on needs the long form with a condition"
    assert depends.get("topics", {}).get("condition") == "service_completed_successfully"


def test_prometheus_config_is_mounted_from_the_repo(compose: dict[str, Any]) -> None:
    prometheus = [s for s in compose["services"].values() if str(s.get("image", "")).startswith("prom/")]
    assert prometheus, "no Prometheus service"
    mounted = repo_mounts(prometheus[0])
    assert mounted, "Prometheus mounts no file from the repository"
    for source, target in mounted:
        path = (ROOT / source).resolve()
        assert path.is_file(), f"{source} (mounted at {target}) does not exist"
        if target == "/etc/prometheus/prometheus.yml":
            cfg = yaml.safe_load(path.read_text())
            assert isinstance(cfg, dict) and isinstance(cfg.get("scrape_configs"), list)
            assert cfg["scrape_configs"], f"{source}: scrape_configs is empty"
    assert "/etc/prometheus/prometheus.yml" in {t for _, t in mounted}


def test_published_ports_are_in_the_header(compose: dict[str, Any]) -> None:
    """The header comment tells how to reach what is published: each host port is named in it."""
    lines = COMPOSE.read_text().splitlines()
    header = "\n".join(ln for ln in lines[: next(i for i, ln in enumerate(lines) if not ln.startswith("#"))])
    for name, service in compose["services"].items():
        for _, host_port, _ in published_ports(service):
            assert f"localhost:{host_port}" in header, f"{name}: localhost:{host_port} not in the header"


def test_replicated_services_publish_no_fixed_host_port(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if replicas(service) > 1:
            assert not service.get("ports"), f"{name}: {replicas(service)} replicas cannot share a host port"


# --- Prometheus: every stream-ml process, on the port its command serves metrics on ------------


@pytest.fixture(scope="module")
def prometheus_config(compose: dict[str, Any]) -> dict[str, Any]:
    _, prometheus = service_by_image(compose, "prom/prometheus")
    mounts = {target: source for source, target in repo_mounts(prometheus)}
    return yaml.safe_load((ROOT / mounts["/etc/prometheus/prometheus.yml"]).read_text())


def scrape_targets(job: dict[str, Any]) -> Iterator[tuple[str, int, str]]:
    """(host, port, "static" or "dns") of each target of a scrape job."""
    for static in job.get("static_configs") or []:
        for target in static.get("targets") or []:
            host, _, port = str(target).rpartition(":")
            yield host, int(port), "static"
    for dns in job.get("dns_sd_configs") or []:
        assert dns.get("type") == "A", f"job {job['job_name']}: a compose service's replicas are A records"
        for name in dns.get("names") or []:
            yield name, int(dns["port"]), "dns"


def test_metrics_port_is_read_from_the_command() -> None:
    assert metrics_port({"command": ["stream-ml", "worker", "features", "--metrics-port", "9200"]}) == 9200
    assert metrics_port({"command": ["stream-ml", "worker", "features", "--metrics-port", "0"]}) is None
    assert metrics_port({"command": ["stream-ml", "serve", "--port", "8123"]}) == 8123
    assert metrics_port({"command": ["stream-ml", "produce", "synthetic", "--rate", "5"]}) is None


def test_prometheus_jobs_target_services_on_their_metrics_ports(
    compose: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    services, ours = compose["services"], stream_ml_services(compose)
    jobs = [job["job_name"] for job in prometheus_config["scrape_configs"]]
    assert len(jobs) == len(set(jobs)), f"job names repeat: {jobs}"
    problems = []
    for job in prometheus_config["scrape_configs"]:
        name = job["job_name"]
        other = sorted(k for k in job if k.endswith("_sd_configs") and k != "dns_sd_configs")
        if other:
            problems.append(f"job {name}: {other} is not checked here; use static or dns_sd_configs")
        targets = list(scrape_targets(job))
        if not targets:
            problems.append(f"job {name}: no targets")
        for host, port, how in targets:
            if host == "localhost":  # Prometheus itself, on its default port
                if (name, port) != ("prometheus", 9090):
                    problems.append(f"job {name}: localhost:{port} is no container's address")
            elif host not in services:
                problems.append(f"job {name}: {host} is no compose service")
            elif host not in ours:
                problems.append(f"job {name}: {host} is not a stream-ml service")
            elif port != metrics_port(ours[host]):
                problems.append(
                    f"job {name}: {host}:{port}, but its command serves metrics on {metrics_port(ours[host])}"
                )
            elif how == "static" and replicas(services[host]) > 1:
                problems.append(
                    f"job {name}: a static target reaches one of {host}'s replicas: dns_sd_configs"
                )
    if problems:
        pytest.fail("\n".join(problems))


def test_every_stream_ml_process_with_metrics_is_scraped(
    compose: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    scraped = {(h, p) for job in prometheus_config["scrape_configs"] for h, p, _ in scrape_targets(job)}
    with_metrics = {n: metrics_port(s) for n, s in stream_ml_services(compose).items()}
    with_metrics = {n: p for n, p in with_metrics.items() if p is not None}
    assert {"features", "feedback", "scorer", "producer"} <= set(with_metrics), with_metrics
    # `topics` is a one-shot command: it has nothing to export.
    missing = sorted(f"{n}:{p}" for n, p in with_metrics.items() if (n, p) not in scraped)
    assert not missing, f"not scraped by any Prometheus job: {missing}"


# --- the load balancer in front of the scorer replicas -----------------------------------------


def nginx_directives(text: str) -> list[tuple[str, list[str]]]:
    """(name, arguments) of each simple directive (``name args;``), comments dropped."""
    text = re.sub(r"#[^\n]*", "", text)
    assert text.count("{") == text.count("}"), "nginx config: unbalanced braces"
    return [(m[1], m[2].split()) for m in re.finditer(r"(?:\A|(?<=[;{}]))\s*([a-z_]+)\s+([^;{}]*);", text)]


def test_nginx_balances_every_scorer_replica(compose: dict[str, Any]) -> None:
    services, ours = compose["services"], stream_ml_services(compose)
    name, lb = service_by_image(compose, "nginx:")
    mounts = {target: ROOT / source for source, target in repo_mounts(lb)}
    assert "/etc/nginx/nginx.conf" in mounts, f"{name}: mounts no nginx.conf from the repository"
    conf = mounts["/etc/nginx/nginx.conf"]
    assert conf.is_file(), f"{conf} does not exist"
    directives = nginx_directives(conf.read_text())
    assert directives, f"{conf}: no directives found"
    variables = {args[0]: args[1] for d, args in directives if d == "set" and len(args) == 2}
    passes = [args[0] for d, args in directives if d == "proxy_pass"]
    assert passes, f"{conf}: no proxy_pass"
    scorers = {n for n, s in ours.items() if parsed_command(s)[0][1] == "serve"}
    for raw in passes:
        # A variable makes nginx resolve the name at request time (resolver below): every replica,
        # also those started later. A name written in proxy_pass is resolved once, at start.
        assert "$" in raw, f"{conf}: proxy_pass {raw} is resolved once; put the address in a variable"
        url = urlparse(re.sub(r"\$(\w+)", lambda m: variables.get(f"${m[1]}", m[0]), raw))
        assert url.hostname in scorers, f"{conf}: proxy_pass {raw} -> {url.hostname}, not a scorer {scorers}"
        assert url.port == metrics_port(services[url.hostname]), (
            f"{conf}: proxy_pass to port {url.port}; the scorer's command listens on "
            f"{metrics_port(services[url.hostname])}"
        )
        assert replicas(services[url.hostname]) > 1, f"{url.hostname} runs one replica: nothing to balance"
    resolvers = [args for d, args in directives if d == "resolver"]
    assert resolvers and "127.0.0.11" in resolvers[0], f"{conf}: resolver must be Docker's DNS, 127.0.0.11"
    listens = {int(args[0].rpartition(":")[2]) for d, args in directives if d == "listen"}
    ports = published_ports(lb)
    assert ports, f"{name}: publishes no port"
    for host_ip, _, container_port in ports:
        assert host_ip == "127.0.0.1", f"{name}: publish on 127.0.0.1 only (a local demo)"
        assert container_port in listens, f"{name}: publishes {container_port}; nginx listens on {listens}"
    assert set(lb.get("depends_on") or []) & scorers, f"{name}: depends_on the scorer"


def test_nginx_parser_finds_directives() -> None:
    text = "user x;\nhttp { resolver 127.0.0.11 valid=5s; # proxy_pass http://x;\n location / { set $s a:1;"
    text += " proxy_pass http://$s; } }"
    assert nginx_directives(text) == [
        ("user", ["x"]),
        ("resolver", ["127.0.0.11", "valid=5s"]),
        ("set", ["$s", "a:1"]),
        ("proxy_pass", ["http://$s"]),
    ]
    with pytest.raises(AssertionError):
        nginx_directives("http { server {")


# --- Grafana: provisioning and the dashboards ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Grafana:
    name: str
    service: dict[str, Any]
    mounts: dict[str, Path]  # container path -> repository path

    def in_repo(self, container_path: str) -> Path | None:
        """The repository path that a container path comes from, through the mounts."""
        for target, source in self.mounts.items():
            if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
                return source / container_path[len(target) :].lstrip("/")
        return None

    def provisioning(self, kind: str) -> list[dict[str, Any]]:
        folder = self.in_repo(f"/etc/grafana/provisioning/{kind}")
        assert folder is not None and folder.is_dir(), f"no provisioning/{kind} mounted"
        files = sorted(p for p in folder.iterdir() if p.suffix in (".yml", ".yaml"))
        assert files, f"{folder}: no provisioning file"
        docs = [yaml.safe_load(p.read_text()) for p in files]
        for path, doc in zip(files, docs, strict=True):
            assert isinstance(doc, dict) and doc.get("apiVersion") == 1, f"{path}: apiVersion 1 expected"
        return docs


@pytest.fixture(scope="module")
def grafana(compose: dict[str, Any]) -> Grafana:
    name, service = service_by_image(compose, "grafana/grafana:")
    mounts = {target: (ROOT / source).resolve() for source, target in repo_mounts(service)}
    for target, source in mounts.items():
        assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
    assert "/etc/grafana/provisioning" in mounts, f"{name}: provisioning not mounted from the repository"
    return Grafana(name, service, mounts)


@pytest.fixture(scope="module")
def datasource_uid(grafana: Grafana, compose: dict[str, Any]) -> str:
    sources = [d for doc in grafana.provisioning("datasources") for d in doc.get("datasources") or []]
    prometheus = [d for d in sources if d.get("type") == "prometheus"]
    assert len(prometheus) == 1, f"expected one Prometheus datasource, got {prometheus}"
    source = prometheus[0]
    assert source.get("uid"), "the Prometheus datasource needs a fixed uid: the dashboards name it"
    url = urlparse(source.get("url", ""))
    name, service = service_by_image(compose, "prom/prometheus")
    assert url.hostname == name, f"datasource url {source.get('url')}: the Prometheus service is {name!r}"
    assert url.port in {p for _, _, p in published_ports(service)}, f"datasource url port {url.port}"
    return str(source["uid"])


@pytest.fixture(scope="module")
def dashboards(grafana: Grafana) -> dict[Path, dict[str, Any]]:
    providers = [p for doc in grafana.provisioning("dashboards") for p in doc.get("providers") or []]
    assert providers, "no dashboard provider"
    found: dict[Path, dict[str, Any]] = {}
    for provider in providers:
        assert provider.get("type", "file") == "file", provider
        path = (provider.get("options") or {}).get("path", "")
        folder = grafana.in_repo(path)
        assert folder is not None, f"provider {provider.get('name')}: {path} is not mounted from the repo"
        assert folder.is_dir(), f"provider {provider.get('name')}: {folder} does not exist"
        files = sorted(folder.rglob("*.json"))
        assert files, f"provider {provider.get('name')}: no dashboard in {folder}"
        found.update({f: json.loads(f.read_text()) for f in files})
    return found


def test_grafana_loads_the_stream_ml_dashboard(dashboards: dict[Path, dict[str, Any]]) -> None:
    names = {p.relative_to(ROOT).as_posix() for p in dashboards}
    assert "deploy/grafana/dashboards/stream-ml.json" in names, names


def test_grafana_access_is_for_a_local_demo(grafana: Grafana) -> None:
    env = _environment(grafana.service)
    if env.get("GF_AUTH_ANONYMOUS_ENABLED", "").lower() == "true":
        assert env.get("GF_AUTH_ANONYMOUS_ORG_ROLE") == "Viewer", "anonymous users may only look"
    password = env.get("GF_SECURITY_ADMIN_PASSWORD", "")
    assert password.startswith("${"), f"the admin password comes from the environment, got {password!r}"
    assert published_ports(grafana.service) == [("127.0.0.1", 3000, 3000)]
    home = env.get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        path = grafana.in_repo(home)
        assert path is not None and path.is_file(), f"home dashboard {home} is not mounted"


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels") or []:
        yield panel
        yield from panel.get("panels") or []  # a collapsed row holds its panels


def datasources(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasources(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasources(item)


def test_dashboards_are_well_formed(dashboards: dict[Path, dict[str, Any]], datasource_uid: str) -> None:
    uids = [d.get("uid") for d in dashboards.values()]
    assert all(uids) and len(set(uids)) == len(uids), f"dashboard uids: {uids}"
    for path, dashboard in dashboards.items():
        assert "${DS_" not in path.read_text(), f"{path}: an export for sharing; use the datasource uid"
        for source in datasources(dashboard):
            if isinstance(source, dict) and source.get("type") == "grafana":
                continue  # the built-in annotations
            assert source == {"type": "prometheus", "uid": datasource_uid}, f"{path}: datasource {source}"
        ids = [p.get("id") for p in panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{path}: panel ids repeat"
        cells: dict[tuple[int, int], str] = {}
        for panel in dashboard.get("panels") or []:
            pos = panel["gridPos"]
            assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, f"{panel['title']}: {pos}"
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    assert (x, y) not in cells, f"{path}: {panel['title']!r} overlaps {cells[(x, y)]!r}"
                    cells[(x, y)] = panel["title"]
        for panel in panels(dashboard):
            if panel["type"] != "row":
                exprs = [t.get("expr") for t in panel.get("targets") or []]
                assert exprs and all(exprs), f"{path}: panel {panel['title']!r} has no query"


# --- the dashboards query only metrics that the code exports ------------------------------------

# Series that Prometheus makes itself for every target.
PROMETHEUS_SERIES = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


@dataclasses.dataclass(frozen=True)
class Series:
    cumulative: bool  # a counter's _total, a histogram's _bucket/_sum/_count: rate() it
    labels: frozenset[str]


_SUFFIXES = {
    "counter": {"_total": True, "_created": False},
    "gauge": {"": False},
    "histogram": {"_bucket": True, "_sum": True, "_count": True, "_created": False},
    "summary": {"": False, "_sum": True, "_count": True, "_created": False},
    "info": {"_info": False},
    "stateset": {"": False},
    "unknown": {"": False},
}


def metric_modules() -> list[str]:
    """Every stream_ml module that uses prometheus_client."""
    package = Path(stream_ml.__file__).parent
    return sorted(
        ".".join(("stream_ml", *path.relative_to(package).with_suffix("").parts))
        for path in package.rglob("*.py")
        if path.name != "__main__.py" and "prometheus_client" in path.read_text()
    )


@pytest.fixture(scope="module")
def exported() -> dict[str, Series]:
    """Every series name a stream-ml process can export, with its label names.

    From prometheus_client's registry after importing every module that defines metrics: the
    registry knows the type of each, and so the suffixes of its series (a counter defined as
    ``x`` or ``x_total`` is the series ``x_total``; a histogram ``x`` is ``x_bucket``, ...).
    """
    labels: dict[str, frozenset[str]] = {}
    for name in metric_modules():
        for obj in vars(importlib.import_module(name)).values():
            if isinstance(obj, prometheus_client.metrics.MetricWrapperBase):
                for family in obj.describe():
                    labels[family.name] = frozenset(obj._labelnames)
    assert labels, f"no metrics found in {metric_modules()}"
    series: dict[str, Series] = {}
    for family in prometheus_client.REGISTRY.collect():
        names = labels.get(family.name) or frozenset(k for s in family.samples for k in s.labels)
        for suffix, cumulative in _SUFFIXES[family.type].items():
            extra = {"le"} if suffix == "_bucket" else {"quantile"} if family.type == "summary" else set()
            series[family.name + suffix] = Series(cumulative, names | extra)
    return series


_STRING = re.compile(r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`""")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_NAME = re.compile(r"(?<![\w:$.\x00])([A-Za-z_:][\w:]*)(?![\w:])\s*(\{[^{}]*\})?")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*\x00(\d+)\x00")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "start", "end"}


@dataclasses.dataclass(frozen=True)
class Query:
    selectors: list[tuple[str, list[tuple[str, str, str]]]]  # metric, [(label, op, value)]
    grouping: set[str]  # labels named in by/without/on/ignoring/group_*


def parse_promql(expr: str) -> Query:
    """The metric selectors and grouping labels of a PromQL expression (enough for dashboards).

    Names followed by ``(`` are functions or aggregations, not metrics; strings, ranges and
    grouping clauses are taken out first so that nothing in them is read as a metric.
    """
    strings: list[str] = []

    def stash(match: re.Match[str]) -> str:
        strings.append(match[0][1:-1])
        return f"\x00{len(strings) - 1}\x00"

    text = _STRING.sub(stash, expr)
    grouping = {g.strip() for m in _GROUPING.finditer(text) for g in m[1].split(",") if g.strip()}
    text = re.sub(r"\[[^\]]*\]", " ", _GROUPING.sub(" ", text))
    selectors = []
    for m in _NAME.finditer(text):
        if m[1] in _KEYWORDS or text[m.end() :].lstrip().startswith("("):
            continue
        matchers = [(label, op, strings[int(i)]) for label, op, i in _MATCHER.findall(m[2] or "")]
        selectors.append((m[1], matchers))
    return Query(selectors, grouping)


@pytest.mark.parametrize(
    ("expr", "metrics", "grouping"),
    [
        (
            "histogram_quantile(0.99, sum by (le) (rate(stream_ml_score_request_seconds_bucket[$__range])))",
            ["stream_ml_score_request_seconds_bucket"],
            {"le"},
        ),
        (
            'sum(rate(a_total{reason="x"}[5m])) / sum(rate(b_count[5m])) > bool 0',
            ["a_total", "b_count"],
            set(),
        ),
        ('up{job=~"features|scorer"} offset 1h and on (instance, job) c', ["up", "c"], {"instance", "job"}),
        ('label_replace(x, "dst", "$1", "src", "(.*)")', ["x"], set()),
        ("sum(max_over_time(gauge[1h])) without (partition)", ["gauge"], {"partition"}),
    ],
)
def test_promql_parser_finds_metrics(expr: str, metrics: list[str], grouping: set[str]) -> None:
    query = parse_promql(expr)
    assert [name for name, _ in query.selectors] == metrics
    assert query.grouping == grouping


def test_promql_parser_reads_matchers() -> None:
    query = parse_promql('rate(x_total{job="scorer", reason!~"a|b"}[1m])')
    assert query.selectors == [("x_total", [("job", "=", "scorer"), ("reason", "!~", "a|b")])]


def test_exported_series_carry_their_suffixes(exported: dict[str, Series]) -> None:
    # Names as written in the code are not always the series: the check must see the difference.
    assert "stream_ml_score_request_seconds_bucket" in exported
    assert "stream_ml_score_request_seconds" not in exported  # a histogram: only its parts
    assert "stream_ml_feature_events_total" in exported
    assert "stream_ml_feature_events" not in exported  # a counter: only _total
    assert exported["stream_ml_feature_consumer_lag_events"] == Series(
        False, frozenset({"topic", "partition"})
    )
    assert exported["stream_ml_score_rejected_total"].cumulative


def query_problems(expr: str, legend: str, exported: dict[str, Series], jobs: set[str]) -> list[str]:
    """What is wrong with one dashboard query; empty when nothing is."""
    query = parse_promql(expr)
    if not query.selectors:
        return [f"{expr}: no metric"]
    problems = []
    allowed = {"job", "instance"}
    for name, _ in query.selectors:
        if name in exported:
            allowed |= exported[name].labels
        elif name not in PROMETHEUS_SERIES:
            near = sorted(n for n in exported if n.startswith(name.rsplit("_", 1)[0]))[:4]
            problems.append(f"{name} is not exported by stream-ml (near: {near})")
    for name, matchers in query.selectors:
        for label, op, value in matchers:
            if label not in allowed:
                problems.append(f"{name}: no label {label!r}")
            if label == "job" and op in ("=", "=~"):
                wanted = value.split("|") if op == "=~" else [value]
                problems += [
                    f"job {j!r} is no Prometheus job ({sorted(jobs)})" for j in wanted if j not in jobs
                ]
        if name in exported:
            uses = len(re.findall(rf"(?<![\w:]){name}(?![\w:])", expr))
            rated = len(re.findall(rf"\b(?:rate|irate|increase)\(\s*{name}(?![\w:])", expr))
            if exported[name].cumulative and rated < uses:
                problems.append(f"{name} is cumulative: use rate() or increase()")
            if not exported[name].cumulative and rated:
                problems.append(f"{name} is a gauge: rate() and increase() of it mean nothing")
        if name.endswith("_bucket") and not ("histogram_quantile(" in expr and "le" in query.grouping):
            problems.append(f"{name}: histogram_quantile over sum by (le)")
    unknown = (query.grouping | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))) - allowed
    if unknown:
        problems.append(f"labels {sorted(unknown)} are on none of {[n for n, _ in query.selectors]}")
    return problems


def test_query_check_catches_mistakes(exported: dict[str, Series]) -> None:
    jobs = {"scorer"}
    ok = "histogram_quantile(0.5, sum by (le) (rate(stream_ml_score_request_seconds_bucket[5m])))"
    assert query_problems(ok, "p50", exported, jobs) == []
    for expr, legend in [
        ("rate(stream_ml_feature_events[5m])", ""),  # counter without _total
        ("stream_ml_score_request_seconds", ""),  # histogram without a suffix
        ("rate(stream_ml_no_such_metric_total[5m])", ""),
        ("stream_ml_score_rejected_total", ""),  # a counter not rated
        ("rate(stream_ml_feature_consumer_lag_events[5m])", ""),  # a gauge rated
        ("sum by (topic) (rate(stream_ml_score_rejected_total[5m]))", ""),  # no such label
        ("sum by (reason) (rate(stream_ml_score_rejected_total[5m]))", "{{reasons}}"),
        ('rate(stream_ml_score_rejected_total{job="scorers"}[5m])', ""),
        ("sum(rate(stream_ml_score_request_seconds_bucket[5m]))", ""),  # buckets without a quantile
    ]:
        assert query_problems(expr, legend, exported, jobs), expr


def test_dashboards_query_only_exported_metrics(
    dashboards: dict[Path, dict[str, Any]], exported: dict[str, Series], prometheus_config: dict[str, Any]
) -> None:
    jobs = {job["job_name"] for job in prometheus_config["scrape_configs"]}
    problems = []
    for path, dashboard in dashboards.items():
        for panel in panels(dashboard):
            for target in panel.get("targets") or []:
                for problem in query_problems(target["expr"], target.get("legendFormat", ""), exported, jobs):
                    problems.append(f"{path.name}: {panel['title']!r}: {problem}")
    if problems:
        pytest.fail("\n".join(problems))


# What the stream-ml dashboard must show (issue 7), by the series that carries it.
DASHBOARD_MUST_SHOW = {
    "scorer latency": "stream_ml_score_request_seconds_bucket",
    "scorer batch sizes": "stream_ml_score_batch_size_requests_bucket",
    "scorer request rate": "stream_ml_score_request_seconds_count",
    "scorer refusals (429, 503)": "stream_ml_score_rejected_total",
    "feature worker throughput": "stream_ml_feature_events_total",
    "feature worker lag": "stream_ml_feature_consumer_lag_events",
    "feature freshness": "stream_ml_feature_freshness_seconds_bucket",
    "feedback worker throughput": "stream_ml_feedback_records_total",
    "feedback worker lag": "stream_ml_feedback_consumer_lag_events",
    "PSI per feature": "stream_ml_feature_psi",
    "drift severity per feature": "stream_ml_feature_drift_severity",
    "online ROC AUC": "stream_ml_online_roc_auc",
    "online PR AUC": "stream_ml_online_pr_auc",
    "retrain recommendations": "stream_ml_retrain_recommendations_total",
}


def test_stream_ml_dashboard_shows_the_loop(dashboards: dict[Path, dict[str, Any]]) -> None:
    dashboard = dashboards[ROOT / "deploy" / "grafana" / "dashboards" / "stream-ml.json"]
    targets = [(p, t) for p in panels(dashboard) for t in p.get("targets") or []]
    shown = {name for _, t in targets for name, _ in parse_promql(t["expr"]).selectors}
    missing = {what: name for what, name in DASHBOARD_MUST_SHOW.items() if name not in shown}
    assert not missing, f"the dashboard does not show: {missing}"
    latency = [p for p, t in targets if "stream_ml_score_request_seconds_bucket" in t["expr"]]
    quantiles = {
        q
        for p, t in targets
        if p in latency
        for q in re.findall(r"histogram_quantile\(\s*([\d.]+)\s*,", t["expr"])
    }
    assert {"0.5", "0.99"} <= quantiles, f"scorer latency quantiles: {quantiles}"
    by_model = [t for _, t in targets if "stream_ml_online_roc_auc" in t["expr"]]
    assert all("{{model}}" in t.get("legendFormat", "") for t in by_model), "ROC AUC: one line per model"
    by_feature = [t for _, t in targets if "stream_ml_feature_psi" in t["expr"]]
    assert all("{{feature}}" in t.get("legendFormat", "") for t in by_feature), "PSI: one line per feature"


# --- Dockerfile -------------------------------------------------------------------------------


def _instructions(dockerfile: str) -> list[str]:
    """Instructions with continuation lines joined and comments dropped."""
    lines = [ln for ln in dockerfile.splitlines() if not ln.lstrip().startswith("#")]
    return [" ".join(i.split()) for i in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if i.strip()]


def test_dockerfile_installs_torch_before_the_project() -> None:
    steps = _instructions(DOCKERFILE.read_text())
    assert steps and steps[0].startswith("FROM python:3.11"), steps[:1]
    runs = [(i, s) for i, s in enumerate(steps) if s.startswith("RUN ")]
    torch = [i for i, s in runs if "pip install" in s and TORCH_PIN in s]
    project = [i for i, s in runs if re.search(r"pip install\b[^;&|]*\s\.(\s|$|;|&)", s)]
    assert torch, f"no `pip install {TORCH_PIN}` step"
    assert project, "no `pip install .` step"
    assert torch[0] < project[0], "torch must be installed before the project"
    copies = [i for i, s in enumerate(steps) if s.startswith(("COPY ", "ADD "))]
    assert all(torch[0] < i for i in copies), "torch's layer must come before the project is copied in"


def test_dockerfile_names_no_package_index() -> None:
    text = DOCKERFILE.read_text()
    assert "index-url" not in text and "find-links" not in text and "://" not in text


def test_dockerignore_keeps_local_state_out() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    for entry in (".venv", ".git", "__pycache__", ".pytest_cache", ".ruff_cache"):
        assert entry in ignored, f".dockerignore: {entry} missing"
