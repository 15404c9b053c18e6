"""deploy/ held to the code: what the dashboard and alerts read is what worker/metrics.py
exports; compose, Kubernetes and the image use the topics, ports and settings worker/config.py
knows; the alert rules pass promtool and fire (or stay quiet) on synthetic series.

promtool comes from Debian's prometheus package. Without it the promtool tests skip on a
developer machine and fail under CI (env CI set), where a skip would hide a gap.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from worker.__main__ import main as worker_main
from worker.config import ENV_PREFIX, WorkerConfig, load_config
from worker.metrics import Health, HttpEndpoints, Metrics

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ALERTS = DEPLOY / "prometheus-alerts.yaml"
ALERT_TESTS = DEPLOY / "prometheus-alerts.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "callscribe.json"
COMPOSE = DEPLOY / "compose.yaml"
KUBERNETES = DEPLOY / "kubernetes"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
LOCK = DEPLOY / "requirements.lock"

# Labels Prometheus or the Prometheus Operator add to every scraped series.
TARGET_LABELS = frozenset({"instance", "job", "pod", "namespace", "container", "endpoint"})
# Grafana's own variables, replaced before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m"}


# -- what a PromQL expression reads --------------------------------------------------------


@dataclass(frozen=True)
class Selector:
    """One series selector: a metric name and its label matchers (label, op, value)."""

    name: str
    matchers: tuple[tuple[str, str, str], ...]


_TOKEN = re.compile(
    r"""\s+|\#[^\n]*
    |(?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')
    |(?P<range>\[[^\]]*\])
    |(?P<number>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)
    |(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    |(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){},@])""",
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip


def _tokens(expr: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if m is None:
            raise ValueError(f"cannot read {expr[pos : pos + 20]!r} in {expr!r}")
        pos = m.end()
        if m.lastgroup:
            out.append((m.lastgroup, m.group(m.lastgroup)))
    return out


def promql_selectors(expr: str) -> tuple[list[Selector], set[str]]:
    """The series selectors in ``expr`` and the labels it groups or matches on."""
    toks = _tokens(expr)
    selectors: list[Selector] = []
    grouping: set[str] = set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        follows = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "ident" and text in _GROUPING and follows == "(":
            j = i + 2
            while toks[j][1] != ")":
                if toks[j][0] == "ident":
                    grouping.add(toks[j][1])
                j += 1
            i = j + 1
        elif kind == "ident" and (
            follows == "("
            or text in _KEYWORDS | _GROUPING
            or (text in _AGGREGATIONS and follows in {"by", "without"})
        ):
            i += 1  # a function, an aggregation or a keyword
        elif kind == "ident" or (kind == "op" and text == "{"):
            name = text if kind == "ident" else ""
            j = i + 1 if kind == "ident" else i
            matchers = []
            if j < len(toks) and toks[j][1] == "{":
                j += 1
                while toks[j][1] != "}":
                    if toks[j][1] == ",":
                        j += 1
                        continue
                    label, op, value = toks[j][1], toks[j + 1][1], toks[j + 2][1]
                    if toks[j + 2][0] != "string":
                        raise ValueError(f"bad matcher {label}{op}{value} in {expr!r}")
                    matchers.append((label, op, value[1:-1]))
                    j += 3
                j += 1
            selectors.append(Selector(name, tuple(matchers)))
            i = j
        else:
            i += 1
    return selectors, grouping


# -- what the worker exports ----------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    """Sample names the worker's registry exposes, with their label names and ``le`` bounds."""

    labels: dict[str, frozenset[str]]
    buckets: dict[str, frozenset[str]]


def exported() -> Exported:
    """Every sample of a fresh ``Metrics``; labelled metrics get one child so they show."""
    metrics = Metrics()
    for metric in vars(metrics).values():
        labelnames = getattr(metric, "_labelnames", ())
        if labelnames:
            metric.labels(*["x"] * len(labelnames))
    labels: dict[str, set[str]] = {}
    buckets: dict[str, set[str]] = {}
    for family in metrics.registry.collect():
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(set(sample.labels) - {"le"})
            if sample.name.endswith("_bucket"):
                labels[sample.name].add("le")
                buckets.setdefault(sample.name, set()).add(sample.labels["le"])
    return Exported(
        {k: frozenset(v) for k, v in labels.items()}, {k: frozenset(v) for k, v in buckets.items()}
    )


def problems(expr: str, worker: Exported) -> list[str]:
    """What in ``expr`` the worker does not export: metric names, labels, bucket bounds."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    selectors, grouping = promql_selectors(expr)
    found: list[str] = []
    known_labels = set(TARGET_LABELS)
    for sel in selectors:
        if sel.name not in worker.labels:
            found.append(f"{sel.name or '{…}'} is not exported by worker/metrics.py")
            continue
        known_labels |= worker.labels[sel.name]
        for label, op, value in sel.matchers:
            if label not in worker.labels[sel.name] | TARGET_LABELS:
                found.append(f"{sel.name} has no label {label}")
            elif label == "le" and op == "=" and value not in worker.buckets[sel.name]:
                found.append(
                    f"{sel.name} has no bucket le={value!r} "
                    f"(bounds: {sorted(worker.buckets[sel.name], key=_bound)})"
                )
    found += [f"no series here has the label {g}" for g in sorted(grouping - known_labels)]
    return found


def _bound(le: str) -> float:
    return float("inf") if le == "+Inf" else float(le)


@pytest.fixture(scope="module")
def worker_series() -> Exported:
    return exported()


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every panel query and template variable."""
    dash = json.loads(DASHBOARD.read_text())
    out = [
        (panel["title"], target["expr"])
        for panel in dash["panels"]
        for target in panel.get("targets", [])
    ]
    for var in dash["templating"]["list"]:
        m = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["definition"])
        assert m, f"template variable {var['name']}: cannot read {var['definition']!r}"
        out.append((f"variable {var['name']}", m.group(1)))
    return out


# -- (a) metric names ----------------------------------------------------------------------


def test_promql_reader_finds_names_matchers_and_groupings() -> None:
    selectors, grouping = promql_selectors(
        'sum by (reason) (rate(a_total{x="1", le=~"5.0"}[5m] offset 10m)) / on () group_left '
        'sum(rate(b_bucket{instance=~"$i"}[$__rate_interval])) > 1e3 and absent(c > 0)'
    )
    assert [s.name for s in selectors] == ["a_total", "b_bucket", "c"]
    assert selectors[0].matchers == (("x", "=", "1"), ("le", "=~", "5.0"))
    assert grouping == {"reason"}


def test_worker_exports_the_process_and_lag_series(worker_series: Exported) -> None:
    for name in (
        "callscribe_consumer_lag_records",
        "callscribe_process_start_time_seconds",
        "callscribe_end_to_end_latency_seconds_bucket",
    ):
        assert name in worker_series.labels
    assert "5.0" in worker_series.buckets["callscribe_end_to_end_latency_seconds_bucket"]


def test_alert_rules_read_only_exported_series(worker_series: Exported) -> None:
    found = {rule["alert"]: problems(rule["expr"], worker_series) for rule in alert_rules()}
    assert {alert: p for alert, p in found.items() if p} == {}


def test_dashboard_reads_only_exported_series(worker_series: Exported) -> None:
    found = [(t, p) for t, expr in dashboard_queries() if (p := problems(expr, worker_series))]
    assert found == []


@pytest.mark.parametrize(
    ("expr", "complaint"),
    [
        ("rate(callscribe_dead_letter_total[5m])", "callscribe_dead_letter_total is not exported"),
        ("sum by (partiton) (callscribe_consumer_lag_records)", "the label partiton"),
        ('callscribe_transactions_total{outcome="abort"}', "has no label outcome"),
        ('callscribe_end_to_end_latency_seconds_bucket{le="5"}', "has no bucket le='5'"),
        ("up == 0", "up is not exported"),
    ],
)
def test_a_renamed_metric_label_or_bucket_is_caught(
    worker_series: Exported, expr: str, complaint: str
) -> None:
    assert any(complaint in p for p in problems(expr, worker_series)), problems(expr, worker_series)


def test_dashboard_shows_what_an_sre_watches() -> None:
    exprs = " ".join(expr for _, expr in dashboard_queries())
    wanted = {
        "throughput": "callscribe_records_total",
        "latency percentiles": "histogram_quantile(0.99, sum by (le) (rate(callscribe_end_to_end",
        "lag": "callscribe_consumer_lag_records",
        "active calls": "callscribe_active_streams",
        "batch fill": "callscribe_step_streams_sum",
        "real-time factor": "callscribe_real_time_factor",
        "GPU memory": "callscribe_gpu_memory_bytes",
        "dead letters by reason": "sum by (reason) (rate(callscribe_dead_letters_total",
        "rebalances": "callscribe_rebalances_total",
        "recovery time": "callscribe_recovery_seconds_bucket",
        "transaction aborts": 'result="abort"',
    }
    assert [what for what, needle in wanted.items() if needle not in exprs] == []


def test_every_alert_has_a_case_that_fires() -> None:
    cases = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in cases
        for case in test["alert_rule_test"]
        if case.get("exp_alerts")
    }
    assert {rule["alert"] for rule in alert_rules()} - fired == {"CallscribeLatencySLOSlowBurn"}


# -- (c) promtool ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing under CI: apt-get install prometheus")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    return path


def _promtool(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_promtool_checks_the_alert_rules(promtool: str) -> None:
    done = _promtool(promtool, "check", "rules", ALERTS.name, cwd=DEPLOY)
    assert done.returncode == 0, done.stdout + done.stderr


def test_alerts_fire_on_synthetic_series(promtool: str) -> None:
    """Lag growing fires, steady lag does not; dead-letter spike; no consumers; and the rest."""
    done = _promtool(promtool, "test", "rules", ALERT_TESTS.name, cwd=DEPLOY)
    assert done.returncode == 0, done.stdout + done.stderr


def test_synthetic_series_catch_a_lag_alert_that_fires_on_steady_lag(
    promtool: str, tmp_path: Path
) -> None:
    """Without its growth condition the lag alert fires on steady lag, and the cases say so."""
    rules = ALERTS.read_text()
    growth = "\n          and\n          deriv(max by (partition) (callscribe_consumer_lag_records)"
    assert growth in rules
    (tmp_path / ALERTS.name).write_text(re.sub(re.escape(growth) + r".*\n", "\n", rules, count=1))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    done = _promtool(promtool, "test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert done.returncode != 0
    assert 'partition="1"' in done.stdout + done.stderr


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    rules = []
    for i, (_, expr) in enumerate(dashboard_queries()):
        for variable, value in {**GRAFANA_VARIABLES, "$instance": ".*"}.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"dashboard:query{i}", "expr": expr})
    (tmp_path / "dashboard.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    done = _promtool(promtool, "check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr


# -- (b) compose and Kubernetes against the config ------------------------------------------


def _settings(env: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in env.items() if k.startswith(ENV_PREFIX)}


def _config_from(env: dict[str, str]) -> WorkerConfig:
    """The worker's config from these variables alone; every one must name a setting."""
    known = {f"{ENV_PREFIX}{name.upper()}" for name in _config_field_names()}
    assert sorted(set(env) - known) == [], "CALLSCRIBE_* variables worker/config.py lacks"
    return load_config(None, environ=env)


def _config_field_names() -> set[str]:
    from worker.config import _fields

    return {name for name, _, _ in _fields()}


def _flags_accepted(command: str, capsys: pytest.CaptureFixture[str]) -> set[str]:
    with pytest.raises(SystemExit):
        worker_main([command, "--help"])
    return set(re.findall(r"(--[a-z0-9-]+)", capsys.readouterr().out))


TOPICS_AND_GROUP = (
    "input_topic",
    "output_topic",
    "dead_letter_topic",
    "progress_topic",
    "group_id",
)


def _topics(config: WorkerConfig) -> dict[str, str]:
    """The names producers, readers and dashboards share with the worker."""
    return {k: getattr(config, k) for k in TOPICS_AND_GROUP}


def _flags(args: list[str]) -> list[str]:
    return [a for a in args if a.startswith("--")]


def _args_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_settings_are_config_fields_and_valid(compose: dict[str, Any]) -> None:
    for name in ("create-topics", "worker"):
        config = _config_from(_settings(compose["services"][name]["environment"]))
        assert config.bootstrap_servers.startswith("kafka:"), name


def test_compose_commands_use_real_flags(
    compose: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    for name in ("create-topics", "worker"):
        command = compose["services"][name]["command"]
        unknown = set(_flags(command)) - _flags_accepted(command[0], capsys)
        assert unknown == set(), f"{name}: {sorted(unknown)}"


def test_compose_wiring_matches_the_code(compose: dict[str, Any]) -> None:
    services = compose["services"]
    worker_env = _settings(services["worker"]["environment"])
    worker = _config_from(worker_env)
    topics = _config_from(_settings(services["create-topics"]["environment"]))
    # The code's names: the producer tools and the README use the defaults.
    assert _topics(worker) == _topics(topics) == _topics(WorkerConfig())
    assert worker.instance_id, "a static member id keeps a restart from rebalancing"

    # Kafka: the version the tests run, advertised where the worker connects.
    pom = (DEPLOY / "kafka" / "pom.xml").read_text()
    version = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom).group(1)
    assert services["kafka"]["image"] == f"apache/kafka:{version}"
    advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert re.search(rf"//{re.escape(worker.bootstrap_servers)}(,|$)", advertised), advertised

    # The worker's metrics port, published and scraped.
    port = worker.metrics_port
    assert f"{port}:{port}" in services["worker"]["ports"]
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = [
        t
        for job in prometheus["scrape_configs"]
        for c in job["static_configs"]
        for t in c["targets"]
    ]
    assert targets == [f"worker:{port}"]

    # Drain before SIGKILL; one GPU.
    grace = int(services["worker"]["stop_grace_period"].removesuffix("s"))
    assert grace > worker.shutdown_grace_sec
    (device,) = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert services["worker"]["depends_on"]["create-topics"]["condition"] == (
        "service_completed_successfully"
    )


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path → file on this machine, for the bind mounts of a compose service."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            out[target] = (DEPLOY / source).resolve()
    return out


def test_compose_mounts_the_rules_and_the_provisioned_dashboard(compose: dict[str, Any]) -> None:
    prometheus = _mounts(compose["services"]["prometheus"])
    assert all(p.exists() for p in prometheus.values()), prometheus
    config = yaml.safe_load(prometheus["/etc/prometheus/prometheus.yml"].read_text())
    assert [prometheus[f] for f in config["rule_files"]] == [ALERTS]

    grafana = _mounts(compose["services"]["grafana"])
    assert all(p.exists() for p in grafana.values()), grafana
    provisioning = grafana["/etc/grafana/provisioning"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "callscribe.yaml").read_text())[
        "providers"
    ]
    assert grafana[provider["options"]["path"]] == DASHBOARD.parent
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    dash = json.loads(DASHBOARD.read_text())
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    assert uids == {source["uid"]}


@pytest.fixture(scope="module")
def kube() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) → object, from the files the kustomization lists (and only those)."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present
    objects = {}
    for name in sorted(listed):
        for doc in yaml.safe_load_all((KUBERNETES / name).read_text()):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def _one(kube: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, Any]:
    (obj,) = [o for (k, _), o in kube.items() if k == kind]
    return obj


def _pod_config(kube: dict[tuple[str, str], dict[str, Any]]) -> tuple[dict[str, Any], WorkerConfig]:
    sts = _one(kube, "StatefulSet")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    env = {}
    for source in container.get("envFrom", []):
        env.update(kube[("ConfigMap", source["configMapRef"]["name"])]["data"])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value", f"{sts['metadata']['name']}-0")
    return container, _config_from(_settings(env))


def test_kubernetes_worker_matches_the_config(kube: dict[tuple[str, str], dict[str, Any]]) -> None:
    sts = _one(kube, "StatefulSet")
    pod = sts["spec"]["template"]["spec"]
    container, config = _pod_config(kube)
    (instance,) = [v for v in container["env"] if v["name"] == f"{ENV_PREFIX}INSTANCE_ID"]
    assert instance["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert pod["terminationGracePeriodSeconds"] >= config.shutdown_grace_sec + 5
    # Static membership pays only if a restarted pod (model load included) rejoins in time.
    assert config.session_timeout_ms >= 120_000
    assert "replicas" not in sts["spec"], "KEDA's ScaledObject owns the replica count"
    for key in ("requests", "limits"):
        assert container["resources"][key]["nvidia.com/gpu"] == 1
    (port,) = container["ports"]
    assert port["containerPort"] == config.metrics_port
    probes = [container[p]["httpGet"] for p in ("startupProbe", "livenessProbe", "readinessProbe")]
    assert {p["port"] for p in probes} == {port["name"]}
    assert {p["path"] for p in probes} == {"/healthz", "/readyz"}
    (mount,) = container["volumeMounts"]
    assert Path(mount["mountPath"]) == config.model_cache_dir
    assert _topics(config) == _topics(WorkerConfig())
    uid = _dockerfile_user()
    assert pod["securityContext"]["runAsUser"] == uid
    assert pod["securityContext"]["fsGroup"] == uid  # the volume is writable by that user


def test_kubernetes_selectors_reach_the_worker_pods(
    kube: dict[tuple[str, str], dict[str, Any]],
) -> None:
    sts = _one(kube, "StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = kube[("Service", sts["spec"]["serviceName"])]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= labels.items()
    for kind in ("PodDisruptionBudget", "PodMonitor"):
        assert _one(kube, kind)["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert _one(kube, "PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    (endpoint,) = _one(kube, "PodMonitor")["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_keda_scales_on_the_worker_group_up_to_the_partitions(
    kube: dict[tuple[str, str], dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    sts = _one(kube, "StatefulSet")
    _, config = _pod_config(kube)
    scaled = _one(kube, "ScaledObject")["spec"]
    assert scaled["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": sts["metadata"]["name"],
    }
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert (meta["bootstrapServers"], meta["consumerGroup"], meta["topic"]) == (
        config.bootstrap_servers,
        config.group_id,
        config.input_topic,
    )
    assert meta["allowIdleConsumers"] == "false"

    job = _one(kube, "Job")["spec"]["template"]["spec"]
    (creator,) = job["containers"]
    assert creator["envFrom"] == _pod_config(kube)[0]["envFrom"]
    unknown = set(_flags(creator["args"])) - _flags_accepted(creator["args"][0], capsys)
    assert unknown == set()
    partitions = int(_args_value(creator["args"], "--partitions"))
    assert scaled["minReplicaCount"] >= 1
    assert scaled["maxReplicaCount"] <= partitions, "workers past the partition count sit idle"


def test_probe_paths_are_served() -> None:
    endpoints = HttpEndpoints(Metrics(), Health(stale_after_sec=60), "127.0.0.1", 0)
    endpoints.start()
    try:
        for path, want in (("/healthz", 200), ("/readyz", 503), ("/metrics", 200)):
            try:
                status = urllib.request.urlopen(
                    f"http://127.0.0.1:{endpoints.port}{path}", timeout=10
                ).status
            except urllib.error.HTTPError as exc:
                status = exc.code
            assert status == want, path
    finally:
        endpoints.stop()


# -- the image ------------------------------------------------------------------------------


def _instructions() -> Iterator[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            yield word.upper(), rest.strip()


def _dockerfile_args() -> dict[str, str]:
    return dict(
        rest.split("=", 1) for word, rest in _instructions() if word == "ARG" and "=" in rest
    )


def _dockerfile_user() -> int:
    (user,) = [rest for word, rest in _instructions() if word == "USER"]
    uid = user.split(":")[0]
    uid = _dockerfile_args().get(uid.strip("${}"), uid)
    return int(uid)


def _dockerfile_env() -> dict[str, str]:
    env = {}
    for word, rest in _instructions():
        if word == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    return env


def test_image_copies_only_the_worker() -> None:
    copies = [rest.split() for word, rest in _instructions() if word == "COPY"]
    sources = {src for args in copies if not args[0].startswith("--from") for src in args[:-1]}
    assert sources == {"schemas", "worker", "deploy/requirements.lock"}
    ignore = [ln for ln in DOCKERIGNORE.read_text().splitlines() if ln and ln[0] != "#"]
    assert ignore[0] == "*", "an allow-list: nothing enters the build context unless named"
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert allowed == sources
    benches = {p.relative_to(REPO).as_posix() for p in (REPO / "worker").rglob("bench*.py")}
    assert benches <= set(ignore), "benchmarks stay out of the image"


def test_image_runs_as_a_user_that_owns_the_model_cache() -> None:
    uid = _dockerfile_user()
    assert uid != 0
    env = _dockerfile_env()
    cache = env[f"{ENV_PREFIX}MODEL_CACHE_DIR"]
    (volume,) = [rest for word, rest in _instructions() if word == "VOLUME"]
    assert volume == cache
    assert env["HF_HOME"].startswith(cache + "/")
    runs = " ".join(rest for word, rest in _instructions() if word == "RUN")
    assert f"chown ${{UID}}:${{UID}} {cache}" in runs or f"chown {uid}:{uid} {cache}" in runs
    order = [word for word, _ in _instructions()]
    assert order.index("VOLUME") > max(i for i, w in enumerate(order) if w == "RUN"), (
        "a RUN after VOLUME would not reach the volume"
    )


def test_image_settings_and_healthcheck_match_the_config() -> None:
    env = _dockerfile_env()
    config = _config_from(_settings(env))
    assert int(env[f"{ENV_PREFIX}METRICS_PORT"]) == config.metrics_port == 9400
    (check,) = [rest for word, rest in _instructions() if word == "HEALTHCHECK"]
    assert "/healthz" in check and f"{ENV_PREFIX}METRICS_PORT" in check
    (base,) = [rest for word, rest in _instructions() if word == "FROM" and "AS" not in rest]
    assert _dockerfile_args()[base.strip("${}")].startswith("nvidia/cuda:")
    (expose,) = [rest for word, rest in _instructions() if word == "EXPOSE"]
    assert int(expose) == config.metrics_port


def test_lock_pins_every_runtime_dependency_within_its_range() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lock_requirements", DEPLOY / "lock_requirements.py"
    )
    lock_requirements = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lock_requirements)
    pins = {}
    for line in LOCK.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for raw in project["dependencies"]:
        req = Requirement(raw)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in {LOCK.name}"
        assert req.specifier.contains(pins[name], prereleases=True), (raw, pins[name])
    dev = {canonicalize_name(Requirement(r).name) for r in project["optional-dependencies"]["dev"]}
    assert dev & set(pins) == set(), "dev tools stay out of the image"
    # The whole run-time closure (extras' requirements too, e.g. confluent-kafka[schemaregistry]
    # needs authlib, cachetools…), as installed where the tests ran: else run `make lock`.
    assert pins == lock_requirements.runtime_closure(), f"{LOCK.name} is stale: run make lock"
