"""The monitoring files in etc/ stay true to the code and to the real tools.

- promtool checks etc/prometheus/prometheus.yml and alerts.yml and runs the rule unit tests of
  alerts_test.yml;
- every metric name that an alert or a dashboard panel uses is a series a running optimizerd
  really exposes on its admin /metrics (after traffic through every service), so rules cannot
  drift from the code;
- a real Prometheus server scrapes a running optimizerd with the shipped scrape config, loads
  the shipped rules (all healthy), and evaluates every alert expression and every dashboard
  query without error.

Tools: promtool and prometheus from the Debian package ``prometheus``.
"""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Daemon, free_port, http_get, wait_until

from .tools import tool

pytestmark = pytest.mark.timeout(300)

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "etc" / "prometheus"
PROM_CONFIG = PROM_DIR / "prometheus.yml"
ALERTS = PROM_DIR / "alerts.yml"
ALERTS_TEST = PROM_DIR / "alerts_test.yml"
DASHBOARD = ROOT / "etc" / "grafana" / "dashboards" / "llm-optimizer.json"
PROVISIONING = ROOT / "etc" / "grafana" / "provisioning"
INSTALL_HINT = "apt-get install -y prometheus (provides promtool and prometheus)"
SEVERITIES = {"critical", "warning", "info"}
# Series that Prometheus makes itself for every target, not exported by optimizerd.
SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h",
                "$instance": ".*", "$service": ".*"}


def run(*args: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


# --- the files and what they use ---------------------------------------------------------------

def alert_rules() -> list[dict[str, Any]]:
    with open(ALERTS) as f:
        doc = yaml.safe_load(f)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    with open(DASHBOARD) as f:
        return json.load(f)


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard (panels and variables), Grafana's variables
    replaced by values Prometheus accepts."""
    doc = dashboard()
    exprs = [t["expr"] for p in all_panels(doc["panels"]) for t in p.get("targets", [])]
    for var in doc["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert found, f"variable {var['name']}: unexpected query {query}"
            exprs.append(found.group(1))
    out = []
    for expr in exprs:
        for var, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        out.append(expr)
    return out


KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
            "unless", "offset", "bool", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside strings, label
    matchers, ranges and grouping clauses, that are neither functions nor keywords."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^{}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w$.:])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", e):
        if not m.group(2) and m.group(1).lower() not in KEYWORDS:
            names.add(m.group(1))
    return names


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.95, sum by (route, le) (rate(rest_api_request_seconds_bucket'
            '{instance=~"$instance", route!~"a_b"}[5m]))) > 1.5e9 and on (instance) '
            'delta(x_total[1d] offset 1h) > bool 0 unless up == 0')
    assert metric_names(expr) == {"rest_api_request_seconds_bucket", "x_total", "up"}


def github_anchor(heading: str) -> str:
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def test_prometheus_config_passes_promtool() -> None:
    result = run(tool("promtool", INSTALL_HINT), "check", "config", str(PROM_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_alert_rules_pass_promtool() -> None:
    result = run(tool("promtool", INSTALL_HINT), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout + result.stderr


def test_alert_rule_unit_tests_pass() -> None:
    result = run(tool("promtool", INSTALL_HINT), "test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr
    with open(ALERTS_TEST) as f:
        tests = yaml.safe_load(f)["tests"]
    tested = {case["alertname"] for t in tests for case in t.get("alert_rule_test", [])}
    cases = [case for t in tests for case in t.get("alert_rule_test", [])]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert len(firing) >= 10 and len(quiet) >= 5  # alerts that fire, and ones that must not
    assert tested <= {r["alert"] for r in alert_rules()}


def test_every_alert_has_for_severity_annotations_and_a_runbook() -> None:
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules), "duplicate alert names"
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), f"{name}: no for:"
        assert rule["labels"]["severity"] in SEVERITIES, name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        assert "{{ $labels." in notes["summary"] + notes["description"], name
        doc, _, anchor = notes["runbook"].partition("#")
        path = ROOT / doc
        assert path.is_file(), f"{name}: runbook {doc} does not exist"
        anchors = {github_anchor(line.lstrip("#")) for line in path.read_text().splitlines()
                   if line.startswith("#")}
        assert anchor in anchors, f"{name}: no heading #{anchor} in {doc}"


def test_grpc_latency_leaves_out_exactly_the_streaming_methods() -> None:
    """The method regex of the gRPC latency alert and panel names the streaming RPCs of the
    protos: a new streaming RPC must be added there."""
    streaming, unary = set(), set()
    for proto in (ROOT / "protos").rglob("*.proto"):
        text = re.sub(r"//[^\n]*", "", proto.read_text())
        for m in re.finditer(r"rpc\s+(\w+)\s*\(\s*(stream\s+)?[\w.]+\s*\)\s*returns\s*"
                             r"\(\s*(stream\s+)?[\w.]+\s*\)", text):
            (streaming if m.group(2) or m.group(3) else unary).add(m.group(1))
    assert streaming and unary
    [rule] = [r for r in alert_rules() if r["alert"] == "OptimizerGrpcLatencyHigh"]
    regexes = set(re.findall(r'method!~"([^"]+)"', rule["expr"]))
    regexes |= {m for e in dashboard_queries() for m in re.findall(r'method!~"([^"]+)"', e)}
    assert len(regexes) == 1, regexes
    pattern = re.compile(regexes.pop())
    for name in streaming:
        assert pattern.fullmatch(f"/llm_optimizer.v1.Svc/{name}"), f"{name} not left out"
    for name in unary:
        assert not pattern.fullmatch(f"/llm_optimizer.v1.Svc/{name}"), f"{name} left out"


def test_dashboard_is_well_formed() -> None:
    doc = dashboard()
    assert doc["schemaVersion"] >= 36 and doc["uid"] == "llm-optimizer" and doc["title"]
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    panels = list(all_panels(doc["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are not unique"
    for panel in panels:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, panel["title"]
        if panel["type"] in ("row", "text"):
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, \
            panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}" and target["expr"]
    titles = {p["title"] for p in panels}
    for wanted in ("Services up", "Restarts", "Heartbeat age", "Resident memory", "CPU",
                   "Events accepted", "Dead letters", "REST latency p95", "gRPC latency p95",
                   "Consumer lag", "Deliveries", "Outbox", "Circuit breakers"):
        assert wanted in titles, wanted


def test_grafana_provisioning_files() -> None:
    with open(PROVISIONING / "datasources" / "llm-optimizer.yaml") as f:
        sources = yaml.safe_load(f)
    assert sources["apiVersion"] == 1
    [source] = sources["datasources"]
    assert source["type"] == "prometheus" and source["uid"] and source["url"].startswith("http")
    assert source["isDefault"] is True  # the dashboard's DS_PROMETHEUS defaults to it
    with open(PROVISIONING / "dashboards" / "llm-optimizer.yaml") as f:
        providers = yaml.safe_load(f)
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].startswith("/")


# --- a running optimizerd with traffic through every service -----------------------------------

class Receiver:
    """A webhook destination on a free port, answering 200 to everything, in its own thread."""

    def __init__(self) -> None:
        from aiohttp import web

        self.hits: list[bytes] = []
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

        async def hook(request: web.Request) -> web.Response:
            self.hits.append(await request.read())
            return web.json_response({"received": True})

        async def serve() -> None:
            app = web.Application()
            app.router.add_post("/hook", hook)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(serve(), self.loop).result(10)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def post_json(url: str, body: Any, **headers: str) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code


def llm_event(ident: str, ago_s: float = 0.0) -> dict[str, Any]:
    return {"event_id": ident, "time": time.time() - ago_s, "service": "monitoring",
            "model": "gpt-4o",
            "input_tokens": 100, "output_tokens": 20, "latency_ms": 300.0, "status": "ok"}


def non_llm_span() -> dict[str, Any]:
    now = time.time_ns()
    return {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name",
                                     "value": {"stringValue": "monitoring"}}]},
        "scopeSpans": [{"spans": [{
            "traceId": "0af7651916cd43dd8448eb211c80319c", "spanId": "b7ad6b7169203331",
            "name": "GET /", "kind": 2, "startTimeUnixNano": str(now - 1_000_000),
            "endTimeUnixNano": str(now),
            "attributes": [{"key": "http.method", "value": {"stringValue": "GET"}}]}]}]}]}


def exposed_names(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines()
            if line and not line.startswith("#")}


@pytest.fixture(scope="module")
def daemon() -> Iterator[tuple[Daemon, str]]:
    """optimizerd with every built-in service and a webhook destination, after traffic that
    makes every worker series appear: (daemon, its /metrics text)."""
    import grpc

    from ipc import storage as s
    from protos.llm_optimizer.v1 import health_pb2, health_pb2_grpc
    from workers.storage_client import SyncStorageClient

    receiver = Receiver()
    # Generous heartbeat and start timeouts: this test is about metrics, not supervision, and
    # must not see a worker restarted because a loaded machine delayed one heartbeat.
    d = Daemon(builtins=True,
               supervisor={"heartbeat_interval": 0.5, "heartbeat_timeout": 10.0,
                           "start_timeout": 60.0},
               extra={"collector": {"rate_limit_events_per_s": 0.01, "rate_limit_burst": 1}})
    secret = Path(d.dir) / "hook.secret"
    secret.write_text("monitoring-hook-secret-0123456789")
    d.doc["integrations"]["webhooks"] = {"ops": {
        "enabled": True, "url": f"http://127.0.0.1:{receiver.port}/hook",
        "secret_file": str(secret), "events": ["anomaly_found"], "min_severity": "info",
        "rate_limit_per_min": 0}}
    d.write_config()
    try:
        d.start(timeout=90)
        collector = f"http://{d.doc['collector']['listen']}"
        # accepted, then rejected (a dead letter), then over the rate limit (429)
        assert post_json(collector + "/v1/events", {"events": [llm_event("m-1", ago_s=600)]},
                         **{"x-api-key": "a"}) == 200
        assert post_json(collector + "/v1/events", {"events": [{"event_id": "m-2"}]},
                         **{"x-api-key": "b"}) == 200
        assert post_json(collector + "/v1/events", {"events": [llm_event("m-3", ago_s=600)]},
                         **{"x-api-key": "c"}) == 200
        assert post_json(collector + "/v1/events", {"events": [llm_event("m-4")]},
                         **{"x-api-key": "c"}) == 429
        assert post_json(collector + "/v1/traces", non_llm_span(), **{"x-api-key": "d"}) == 200
        # a call ten minutes after those in event time: the processor closes their window
        assert post_json(collector + "/v1/events", {"events": [llm_event("m-5")]},
                         **{"x-api-key": "e"}) == 200
        rest = f"http://{d.doc['rest_api']['listen']}"
        assert http_get(rest + "/health")[0] == 200
        assert http_get(rest + "/v1/findings")[0] == 401
        with grpc.insecure_channel(d.doc["grpc_api"]["listen"]) as channel:
            stub = health_pb2_grpc.HealthServiceStub(channel)
            assert stub.Readiness(health_pb2.ReadinessRequest(), timeout=10).ready
        # a finding on optimizer-events: the integrations service delivers it to the webhook
        t0 = time.time_ns()
        record = json.dumps({"type": "finding", "id": "mon-1", "time_ns": t0, "body": {
            "id": "mon-1", "kind": "spend_spike", "service": "monitoring", "model": "gpt-4o",
            "operation": "chat", "severity": "warning", "title": "Spend spike",
            "detail": "spend per minute tripled", "evidence": {"ratio": 3.0},
            "window_start_ns": t0, "window_end_ns": t0 + 60 * 10**9}}).encode()
        client = SyncStorageClient(d.runtime)
        try:
            client.call(s.LogAppend(log="optimizer-events", records=[record]))
        finally:
            client.close()
        wait_until(lambda: receiver.hits, 30, message="the finding at the webhook")

        def scrape() -> str | None:
            status, body = http_get(d.admin_url("/metrics"))
            text = body.decode()
            if status == 200 and "integrations_deliveries_total{" in text \
                    and "optimizer_storage_log_lag_records{" in text \
                    and "processor_llm_calls_total{" in text:
                return text
            return None
        yield d, wait_until(scrape, 30, interval=0.2, message="worker series on /metrics")
    finally:
        d.cleanup()
        receiver.close()


def test_every_metric_used_is_exported(daemon) -> None:
    _, text = daemon
    exposed = exposed_names(text) | SYNTHETIC
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in metric_names(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for expr in dashboard_queries():
        for name in metric_names(expr):
            used.setdefault(name, set()).add("dashboard")
    assert len(used) >= 30
    missing = {name: sorted(where) for name, where in used.items() if name not in exposed}
    assert not missing, f"not exported by optimizerd: {missing}"


# --- the real Prometheus ------------------------------------------------------------------------

def api(base: str, path: str, **params: str) -> dict[str, Any]:
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read() or b"{}") | {"http_status": exc.code}


def test_real_prometheus_scrapes_and_evaluates_every_rule(daemon) -> None:
    binary = tool("prometheus", INSTALL_HINT)
    d, _ = daemon
    with open(PROM_CONFIG) as f:
        config = yaml.safe_load(f)
    # The shipped config, pointed at this daemon, evaluating every second.
    config["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s",
                             "evaluation_interval": "1s"})
    config["rule_files"] = [str(ALERTS)]
    [job] = config["scrape_configs"]
    assert job["job_name"] == "llm-optimizer"
    job["static_configs"] = [{"targets": [f"127.0.0.1:{d.admin_port}"]}]
    workdir = Path(tempfile.mkdtemp(prefix="prom-", dir="/tmp"))
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(workdir / "prometheus.log", "wb")
    proc = subprocess.Popen([binary, f"--config.file={workdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={workdir / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def tail() -> str:
        log.flush()
        return (workdir / "prometheus.log").read_text(errors="replace")[-3000:]

    def answering(path: str, **params: str) -> dict[str, Any] | None:
        assert proc.poll() is None, f"prometheus exited with {proc.returncode}:\n{tail()}"
        try:
            return api(base, path, **params)
        except (OSError, ValueError):
            return None

    try:
        def target_up() -> bool:
            doc = answering("/api/v1/targets")
            active = (doc or {}).get("data", {}).get("activeTargets", [])
            return bool(active) and all(t["health"] == "up" for t in active)
        wait_until(target_up, 60, interval=0.2,
                   message=lambda: f"target not up: {answering('/api/v1/targets')}\n{tail()}")

        # The relabelling of prometheus.yml: optimizerd's process index is `process`.
        def up_series() -> list[dict[str, Any]]:
            doc = answering("/api/v1/query", query="optimizerd_service_up")
            return (doc or {}).get("data", {}).get("result", [])
        series = wait_until(lambda: len(up_series()) >= 6 and up_series(), 30, interval=0.2)
        for one in series:
            labels = one["metric"]
            assert labels["process"] == "0" and labels["job"] == "llm-optimizer", labels
            assert labels["instance"] == f"127.0.0.1:{d.admin_port}", labels
            assert "exported_instance" not in labels, labels
        assert {one["metric"]["service"] for one in series} == {
            "storage", "collector", "processor", "rest_api", "grpc_api", "integrations"}

        exprs = [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]
        exprs += [("dashboard", e) for e in dashboard_queries()]
        for where, expr in exprs:
            doc = answering("/api/v1/query", query=expr)
            assert doc is not None and doc.get("status") == "success", (where, expr, doc)

        rule_count = len(alert_rules())

        def rules_healthy() -> list[dict[str, Any]] | None:
            doc = answering("/api/v1/rules", type="alert")
            groups = (doc or {}).get("data", {}).get("groups", [])
            rules = [r for g in groups for r in g["rules"]]
            if len(rules) == rule_count and all(r["health"] == "ok" for r in rules):
                return rules
            return None
        rules = wait_until(rules_healthy, 30, interval=0.2,
                           message=lambda: f"{answering('/api/v1/rules')}\n{tail()}")
        assert {r["name"] for r in rules} == {r["alert"] for r in alert_rules()}
        assert not [r for r in rules if r.get("lastError")]
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)
