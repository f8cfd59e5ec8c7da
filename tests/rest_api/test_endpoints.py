"""The REST API in a running optimizerd, over real HTTP: wiring (health, metrics, OpenAPI,
compression, CORS, limits), every route allowed and denied per role, JWTs, configs with
conflicts and field paths, optimizations through the processor, findings, metrics, events,
the SSE stream, admin and audit.

One daemon serves the whole module (starting one costs seconds); tests use their own services
so that they do not depend on each other's order.
"""
from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import jwt as pyjwt
import pytest
from openapi_spec_validator import validate

from tests.conftest import Daemon, http_get, post_events, wait_until

pytestmark = pytest.mark.timeout(120)

SECRET = "x" * 48
ISSUER = "https://issuer.test"
PROCESSOR = {"tumbling_window_s": 60, "sliding_window_s": 120, "sliding_step_s": 60,
             "allowed_lateness_s": 5, "analysis_interval_s": 60,
             "decisions": {"min_samples": 50},
             "canary": {"min_samples": 10, "promote_min_samples": 20, "stages": [50.0, 100.0]}}


class Api:
    """A tiny blocking HTTP client: (status, headers, JSON or text) without raising."""

    def __init__(self, base: str) -> None:
        self.base = base

    def __call__(self, method: str, path: str, *, key: str | None = None, body: Any = None,
                 headers: dict[str, str] | None = None, raw: bool = False
                 ) -> tuple[int, Any, Any]:
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = f"Bearer {key}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers=sent)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, hdrs, payload = answer.status, answer.headers, answer.read()
        except urllib.error.HTTPError as exc:
            status, hdrs, payload = exc.code, exc.headers, exc.read()
        if raw or not payload:
            return status, hdrs, payload
        kind = hdrs.get("Content-Type", "")
        return status, hdrs, json.loads(payload) if "json" in kind else payload.decode()


@pytest.fixture(scope="module")
def daemon():
    d = Daemon(builtins=["storage", "collector", "processor", "rest_api", "integrations"],
               extra={"processor": dict(PROCESSOR)})
    secret = Path(d.dir) / "jwt.secret"
    secret.write_text(SECRET)
    d.doc["rest_api"].update({
        "cors_origins": ["https://console.test"], "rate_limit_per_s": 50.0,
        "rate_limit_burst": 100,
        "jwt": {"issuer": ISSUER, "audience": "llm-optimizer", "secret_file": str(secret),
                "max_ttl_s": 3600}})
    d.write_config()
    try:
        d.start(timeout=60)
        d.api = Api(f"http://{d.doc['rest_api']['listen']}")
        d.collector = f"http://{d.doc['collector']['listen']}/v1/events"
        d.keys = {role: create_key(d, role) for role in ("viewer", "operator", "admin")}
        yield d
    finally:
        d.cleanup()


def create_key(d: Daemon, role: str, name: str = "") -> str:
    result = d.ctl("api-key", "create", "--role", role, *(["--name", name] if name else []))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def token(claims: dict[str, Any], secret: str = SECRET) -> str:
    now = int(time.time())
    full = {"iss": ISSUER, "aud": "llm-optimizer", "sub": "alice", "role": "viewer",
            "iat": now, "exp": now + 600, **claims}
    return pyjwt.encode(full, secret, algorithm="HS256")


def put_config(d: Daemon, service: str, model: str = "gpt-4o", expected: int = 0,
               **extra: Any) -> tuple[int, Any]:
    status, _, body = d.api("PUT", f"/v1/config/{service}", key=d.keys["operator"],
                            body={"expected_version": expected,
                                  "config": {"model": model, **extra}})
    return status, body


# --- wiring ------------------------------------------------------------------------------------

def test_health_ready_metrics_docs_are_public(daemon):
    api = daemon.api
    assert api("GET", "/health")[0] == 200
    status, _, body = api("GET", "/ready")
    assert (status, body["ready"]) == (200, True)
    status, headers, doc = api("GET", "/openapi.json")
    assert status == 200
    validate(doc)
    assert "/v1/config/{service}" in doc["paths"]
    status, _, page = api("GET", "/docs")
    assert status == 200 and "/v1/optimizations" in page
    api("GET", "/v1/config/export", key=daemon.keys["viewer"])
    status, _, text = api("GET", "/metrics")
    assert status == 200 and "rest_api_requests_total" in text
    assert 'route="/v1/config/export"' in text and "rest_api_in_flight" in text
    status, aggregated = http_get(daemon.admin_url("/metrics"))  # the supervisor's
    assert status == 200 and b'rest_api_requests_total{method="GET"' in aggregated


def test_every_other_route_needs_a_credential(daemon):
    status, headers, body = daemon.api("GET", "/v1/config/export")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert body["type"].endswith("credentials-missing") and body["request_id"]
    status, _, body = daemon.api("GET", "/v1/config/export", key="llmo_aaaaaaaaaaaa_" + "b" * 43)
    assert status == 401 and body["type"].endswith("api-key-invalid")


def test_compression_and_cors(daemon):
    for service in ("compress-a", "compress-b", "compress-c"):
        put_config(daemon, service, parameters={"note": "x" * 500})
    key = daemon.keys["viewer"]
    for encoding in ("br", "gzip"):
        status, headers, _ = daemon.api("GET", "/v1/config/export", key=key, raw=True,
                                        headers={"Accept-Encoding": encoding})
        assert status == 200 and headers["Content-Encoding"] == encoding
    status, headers, _ = daemon.api(
        "OPTIONS", "/v1/config/export", headers={"Origin": "https://console.test",
                                                 "Access-Control-Request-Method": "GET"})
    assert status == 204 and headers["Access-Control-Allow-Origin"] == "https://console.test"
    status, headers, _ = daemon.api("GET", "/v1/config/export", key=key,
                                    headers={"Origin": "https://evil.test"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


# --- JWT ---------------------------------------------------------------------------------------

def test_jwt_valid_expired_wrong_audience_and_ctl_token(daemon):
    api = daemon.api
    assert api("GET", "/v1/config/export", key=token({}))[0] == 200
    expired = token({"iat": int(time.time()) - 900, "exp": int(time.time()) - 300})
    status, _, body = api("GET", "/v1/config/export", key=expired)
    assert status == 401 and body["type"].endswith("token-expired")
    status, _, body = api("GET", "/v1/config/export", key=token({"aud": "someone-else"}))
    assert status == 401 and body["type"].endswith("token-wrong-audience")
    status, _, body = api("GET", "/v1/config/export", key=token({}, secret="y" * 48))
    assert status == 401 and body["type"].endswith("token-bad-signature")
    status, _, body = api("PUT", "/v1/config/jwt-svc", key=token({}),
                          body={"expected_version": 0, "config": {"model": "m"}})
    assert status == 403 and body["type"].endswith("role-insufficient")
    made = daemon.ctl("-c", daemon.config_path, "token", "create", "--subject", "ci",
                      "--role", "operator", "--ttl", "600")
    assert made.returncode == 0, made.stderr
    assert put_config_with(daemon, made.stdout.strip(), "jwt-svc")[0] == 201


def put_config_with(d: Daemon, credential: str, service: str) -> tuple[int, Any]:
    status, _, body = d.api("PUT", f"/v1/config/{service}", key=credential,
                            body={"expected_version": 0, "config": {"model": "m"}})
    return status, body


# --- configs -----------------------------------------------------------------------------------

def test_config_versions_conflict_invalid_diff_rollback(daemon):
    api, op, viewer = daemon.api, daemon.keys["operator"], daemon.keys["viewer"]
    assert api("GET", "/v1/config/cfg-a", key=viewer)[0] == 404
    assert put_config(daemon, "cfg-a", "gpt-4o")[0] == 201
    for version in range(1, 5):
        status, body = put_config(daemon, "cfg-a", f"model-{version}", expected=version,
                                  parameters={"temperature": version / 10})
        assert status == 200 and body["version"] == version + 1
    status, body = put_config(daemon, "cfg-a", "late", expected=2)
    assert status == 409 and "version 5" in body["detail"]
    status, body = put_config(daemon, "cfg-a", "x", expected=5,
                              variants=[{"name": "b", "weight_bp": 20000}])
    assert status == 422 and body["path"] == "config.variants[0].weight_bp"
    status, body = put_config(daemon, "cfg-a", "x", expected=5, parameters={"top_p": -1})
    assert status == 422 and body["path"] == "config.parameters.top_p"
    status, _, body = api("PUT", "/v1/config/cfg-a", key=op, body={"config": {"model": "x"}})
    assert status == 422 and body["path"] == "expected_version"
    status, _, body = api("PUT", "/v1/config/cfg-a", key=viewer,
                          body={"expected_version": 5, "config": {"model": "x"}})
    assert status == 403
    # pagination, newest first
    seen, cursor = [], None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, _, page = api("GET", f"/v1/config/cfg-a/versions{query}", key=viewer)
        assert status == 200
        seen += [item["version"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [5, 4, 3, 2, 1]
    assert api("GET", "/v1/config/cfg-a/versions?cursor=@@", key=viewer)[0] == 422
    status, _, body = api("GET", "/v1/config/cfg-a/versions/2", key=viewer)
    assert (status, body["model"]) == (200, "model-1")
    assert api("GET", "/v1/config/cfg-a/versions/9", key=viewer)[0] == 404
    status, _, diff = api("GET", "/v1/config/cfg-a/diff?from=1&to=3", key=viewer)
    assert status == 200
    assert {"path": "model", "old": "gpt-4o", "new": "model-2"} in diff
    status, _, body = api("GET", "/v1/config/cfg-a/diff?from=1", key=viewer)
    assert status == 422 and body["path"] == "to"
    status, _, body = api("POST", "/v1/config/cfg-a/rollback", key=op, body={"version": 1})
    assert (status, body["version"], body["model"]) == (200, 6, "gpt-4o")


def test_export_import_and_resolve(daemon):
    api, op, viewer = daemon.api, daemon.keys["operator"], daemon.keys["viewer"]
    put_config(daemon, "imp-a", "gpt-4o",
               variants=[{"name": "canary", "weight_bp": 5000, "overrides": {"model": "m2"}}])
    status, _, exported = api("GET", "/v1/config/export", key=viewer)
    assert status == 200
    mine = [c for c in exported["configs"] if c["service"] == "imp-a"]
    assert mine and mine[0]["variants"][0]["weight_bp"] == 5000
    body = {"configs": [mine[0], {"service": "imp-b", "model": "claude"}]}
    status, _, result = api("POST", "/v1/config/import", key=op, body=body)
    assert status == 200 and result["unchanged"] == ["imp-a"]
    assert [c["service"] for c in result["written"]] == ["imp-b"]
    bad = {"configs": [{"service": "imp-c", "model": "ok"}, {"service": "imp-d", "model": ""}]}
    status, _, problem = api("POST", "/v1/config/import", key=op, body=bad)
    assert status == 422 and problem["path"] == "configs[1].model"
    assert api("GET", "/v1/config/imp-c", key=viewer)[0] == 404  # nothing written
    variants = set()
    viewer = create_key(daemon, "viewer", "resolver")  # a budget of its own
    for i in range(40):
        status, _, res = api("GET", f"/v1/config/imp-a/resolve?key=user-{i}", key=viewer)
        assert status == 200
        again = api("GET", f"/v1/config/imp-a/resolve?key=user-{i}", key=viewer)[2]
        assert again == res
        assert res["config"]["model"] == ("m2" if res["variant"] == "canary" else "gpt-4o")
        variants.add(res["variant"])
    assert variants == {"canary", "baseline"}


# --- roles: every route, allowed and denied -----------------------------------------------------

ROLE_ORDER = ("viewer", "operator", "admin")
FILL = {"service": "roles-svc", "version": "1", "id": "p.0123456789abcdef01234567",
        "key_id": "aaaaaaaaaaaa", "name": "strategy.caching", "job_id": "j.0123456789abcdef",
        "integration": "slack"}


def test_every_route_allowed_and_denied_per_role(daemon):
    doc = daemon.api("GET", "/openapi.json")[2]
    checked = 0
    for template, methods in doc["paths"].items():
        if template.endswith("/stream"):
            continue  # an endless answer; its role is checked in the SSE test
        path = template.format(**FILL)
        for method, op in methods.items():
            needed = op.get("x-required-role")
            if needed is None:
                continue
            body = {} if "requestBody" in op else None
            for role in ROLE_ORDER:
                status, _, answer = daemon.api(method.upper(), path, key=daemon.keys[role],
                                               body=body)
                if ROLE_ORDER.index(role) < ROLE_ORDER.index(needed):
                    assert status == 403, (method, path, role, answer)
                else:
                    assert status not in (401, 403, 429, 500), (method, path, role, answer)
            checked += 1
    assert checked >= 20


def test_rate_limit_answers_429_with_retry_after(daemon):
    key = create_key(daemon, "viewer", "greedy")
    results = []

    def hit() -> None:
        results.append(daemon.api("GET", "/v1/findings?limit=1", key=key)[:2])

    import threading
    threads = [threading.Thread(target=hit) for _ in range(250)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    limited = [headers for status, headers in results if status == 429]
    assert limited and int(limited[0]["Retry-After"]) >= 1
    # another credential keeps its own budget
    assert daemon.api("GET", "/v1/config/export", key=daemon.keys["viewer"])[0] == 200


# --- optimizations -----------------------------------------------------------------------------

def seed(daemon, ns: str, doc_id: str, body: dict) -> None:
    from ipc import storage as s
    from workers.storage_client import SyncStorageClient
    client = SyncStorageClient(daemon.runtime)
    try:
        client.call(s.DocPut(ns=ns, id=doc_id, body=json.dumps(body).encode()))
    finally:
        client.close()


def proposal(pid: str, service: str, status: str, strategy: str = "caching") -> dict:
    return {"id": pid, "strategy": strategy, "service": service, "operation": "chat",
            "model": "gpt-4o", "title": f"{strategy} for {service}", "rationale": "r",
            "expected_impact": {"cost_pct": -10.0}, "constraints": {"min_samples": 1},
            "change": {"cache": {"enabled": True}}, "needs_experiment": False,
            "evidence": {"repeat_share": 0.3}, "created_ns": 1, "status": status,
            "status_detail": "", "first_ns": 1, "updated_ns": 2}


def test_optimizations_list_filter_detail_and_refusals(daemon):
    api, viewer, op = daemon.api, daemon.keys["viewer"], daemon.keys["operator"]
    for i, status in enumerate(["open", "open", "deploying", "promoted", "dismissed"]):
        seed(daemon, "optimizations", f"p.{i:024x}",
             proposal(f"caching:opt-svc:chat:{i}", "opt-svc", status))
    seen, cursor = [], None
    while True:
        query = "?service=opt-svc&limit=2" + (f"&cursor={cursor}" if cursor else "")
        status, _, page = api("GET", f"/v1/optimizations{query}", key=viewer)
        assert status == 200
        seen += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == 5 and len({o["id"] for o in seen}) == 5
    status, _, page = api("GET", "/v1/optimizations?service=opt-svc&status=open", key=viewer)
    assert [o["status"] for o in page["items"]] == ["open", "open"]
    status, _, detail = api("GET", f"/v1/optimizations/p.{0:024x}", key=viewer)
    assert status == 200 and detail["rationale"] == "r" and detail["rollouts"] == []
    assert api("GET", f"/v1/optimizations/p.{99:024x}", key=viewer)[0] == 404
    # the processor does not know these proposals: 404 from its answer
    status, _, problem = api("POST", f"/v1/optimizations/p.{0:024x}/deploy", key=op)
    assert status == 404 and "no proposal" in problem["detail"]
    for action in ("cancel", "rollback"):  # "deploying" here, but the processor runs none
        status, _, problem = api("POST", f"/v1/optimizations/p.{2:024x}/{action}", key=op)
        assert status == 409 and "no rollout running" in problem["detail"]
    status, _, problem = api("POST", f"/v1/optimizations/p.{4:024x}/cancel", key=op)
    assert status == 409 and "already dismissed" in problem["detail"]
    status, _, problem = api("POST", f"/v1/optimizations/p.{0:024x}/rollback", key=op)
    assert status == 409 and "nothing of it is deployed" in problem["detail"]


def sse_events(daemon, key: str, query: str = "", last_id: str | None = None,
               want: int = 1, timeout: float = 20.0, opened: Any = None) -> list[dict]:
    """The first ``want`` events of a stream, as {"id", "event", "data"}; ``opened`` (a
    threading.Event) is set once the stream has answered, i.e. its start offset is fixed."""
    import http.client
    host, port = daemon.doc["rest_api"]["listen"].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = {"Authorization": f"Bearer {key}"}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    conn.request("GET", f"/v1/events/stream{query}", headers=headers)
    answer = conn.getresponse()
    assert answer.status == 200, answer.read()
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    if opened is not None:
        opened.set()
    events, current = [], {}
    try:
        while len(events) < want:
            line = answer.fp.readline().decode().rstrip("\n")
            if not line:
                if "data" in current:
                    events.append(current)
                current = {}
                continue
            name, _, value = line.partition(": ")
            if name in ("id", "event"):
                current[name] = value
            elif name == "data":
                current["data"] = json.loads(value)
    finally:
        conn.close()
    return events


def test_experiment_streams_config_and_rollout_events_and_blocks_config_writes(daemon):
    import threading
    api, viewer, op = daemon.api, daemon.keys["viewer"], daemon.keys["operator"]
    assert api("GET", "/v1/events/stream", key=None)[0] == 401
    received: list = []
    opened = threading.Event()  # the stream starts at the log's end: open it first
    reader = threading.Thread(target=lambda: received.extend(
        sse_events(daemon, viewer, "?service=sse-svc", want=2, opened=opened)))
    reader.start()
    wait_until(lambda: opened.is_set() or not reader.is_alive(), 20)
    assert opened.is_set(), "the SSE stream did not open"
    assert put_config(daemon, "sse-svc", "gpt-4o")[0] == 201
    status, _, check = api("POST", "/v1/optimizations/validate", key=op,
                           body={"service": "sse-svc", "change": {"model": ""}})
    assert status == 200 and not check["valid"] and check["path"] == "change.model"
    status, _, check = api("POST", "/v1/optimizations/validate", key=op,
                           body={"service": "sse-svc", "change": {"model": "gpt-4o-mini"}})
    assert check["valid"] and check["config"]["model"] == "gpt-4o-mini"
    status, _, started = api("POST", "/v1/optimizations", key=op,
                             body={"service": "sse-svc", "change": {"model": "gpt-4o-mini"}})
    assert status == 202 and started["kind"] == "started", started
    reader.join(20)
    assert [e["event"] for e in received] == ["config", "rollout"], received
    assert received[1]["data"]["body"]["kind"] == "started"
    # resume after the config event: the rollout event comes again
    again = sse_events(daemon, viewer, "?service=sse-svc", last_id=received[0]["id"])
    assert again[0]["id"] == received[1]["id"]
    # a rollout owns its service's config
    status, body = put_config(daemon, "sse-svc", "other", expected=2)
    assert status == 409 and "rollout" in body["detail"]
    status, _, body = api("POST", "/v1/optimizations", key=op,
                          body={"service": "sse-svc", "change": {"model": "x"}})
    assert status == 409 and "active rollout" in body["detail"]
    status, _, body = api("POST", "/v1/optimizations", key=op,
                          body={"service": "sse-svc", "change": {"colour": "x"}})
    assert status in (409, 422)
    status, _, check = api("POST", "/v1/optimizations/validate", key=op,
                           body={"service": "sse-svc", "change": {"model": "y"}})
    assert check["rollout_running"] is True
    status, _, page = api("GET", "/v1/rollouts?service=sse-svc&phase=running", key=viewer)
    assert status == 200 and len(page["items"]) == 1
    rollout = page["items"][0]
    assert rollout["change"] == {"model": "gpt-4o-mini"}
    assert rollout["transitions"][0]["kind"] == "started"
    status, _, one = api("GET", f"/v1/rollouts/{rollout['id']}", key=viewer)
    assert status == 200 and one == rollout
    assert api("GET", "/v1/rollouts/rollout:none:x", key=viewer)[0] == 404


# --- findings, metrics, events -----------------------------------------------------------------

T0 = 1_795_600_800


def test_findings_filters_and_pagination(daemon):
    api, viewer = daemon.api, daemon.keys["viewer"]
    for i in range(6):
        seed(daemon, "findings", f"f.find-svc.{i}", {
            "id": f"f.find-svc.{i}", "variant": "", "new": True,
            "kind": "latency_regression" if i % 2 else "spend_spike", "service": "find-svc",
            "model": "gpt-4o", "operation": "chat",
            "severity": "critical" if i < 2 else "warning", "title": "t", "detail": "d",
            "evidence": {"p": 0.001}, "window_start_ns": (T0 + 60 * i) * 10 ** 9,
            "window_end_ns": (T0 + 60 * i + 60) * 10 ** 9})
    status, _, page = api("GET", "/v1/findings?service=find-svc&severity=critical", key=viewer)
    assert status == 200 and len(page["items"]) == 2
    status, _, page = api("GET", "/v1/findings?service=find-svc&kind=spend_spike", key=viewer)
    assert {f["kind"] for f in page["items"]} == {"spend_spike"} and len(page["items"]) == 3
    start_ms = (T0 + 60 * 4) * 1000
    status, _, page = api("GET", f"/v1/findings?service=find-svc&start={start_ms}", key=viewer)
    assert len(page["items"]) == 3  # windows ending at or after start: i = 3, 4, 5
    first = api("GET", "/v1/findings?service=find-svc&limit=4", key=viewer)[2]
    rest = api("GET", f"/v1/findings?service=find-svc&limit=4&cursor={first['next_cursor']}",
               key=viewer)[2]
    assert len(first["items"]) == 4 and len(rest["items"]) == 2
    status, _, problem = api("GET", "/v1/findings?severity=bad", key=viewer)
    assert status == 422 and problem["path"] == "severity"


def test_events_windows_and_summary(daemon):
    api, viewer = daemon.api, daemon.keys["viewer"]
    events = [{"event_id": f"ev-{i}", "time": T0 + i * 2.0, "service": "met-svc",
               "model": "gpt-4o" if i % 2 else "gpt-4o-mini", "input_tokens": 100,
               "output_tokens": 10, "latency_ms": 100.0 + i, "quality": 0.8}
              for i in range(150)]  # 300 s of event time: windows close
    post_events(daemon.collector, events)
    status, _, page = api("GET", "/v1/events?service=met-svc&model=gpt-4o&limit=20",
                          key=viewer)
    assert status == 200 and len(page["items"]) == 20
    assert {e["model"] for e in page["items"]} == {"gpt-4o"}
    got = page["items"]
    while not page["end_of_log"]:
        page = api("GET", f"/v1/events?service=met-svc&model=gpt-4o&limit=50"
                          f"&cursor={page['next_cursor']}", key=viewer)[2]
        got += page["items"]
    assert len(got) == 75 and len({e["event_id"] for e in got}) == 75
    end_ms = (T0 + 20) * 1000
    page = api("GET", f"/v1/events?service=met-svc&end={end_ms}", key=viewer)[2]
    assert len(page["items"]) == 10

    def windows() -> list:
        answer = api("GET", "/v1/metrics/windows?service=met-svc&model=gpt-4o", key=viewer)
        return answer[2]["series"]

    series = wait_until(windows, 30, interval=0.2)
    assert series[0]["model"] == "gpt-4o" and series[0]["variant"] == "baseline"
    assert all(w["summary"]["count"] > 0 for w in series[0]["windows"])
    status, _, summary = api("GET", "/v1/metrics/summary?service=met-svc", key=viewer)
    assert status == 200 and summary["totals"]["calls"] > 0
    assert set(summary["by_model"]) == {"gpt-4o", "gpt-4o-mini"}
    assert summary["totals"]["quality_mean"] == pytest.approx(0.8)
    assert api("GET", "/v1/metrics/summary", key=viewer)[0] == 422


# --- admin -------------------------------------------------------------------------------------

def test_admin_stats_keys_and_audit(daemon):
    api, admin = daemon.api, daemon.keys["admin"]
    status, _, stats = api("GET", "/v1/admin/stats", key=admin)
    assert status == 200 and {s["name"] for s in stats["services"]} >= {"rest_api", "processor"}
    status, headers, made = api("POST", "/v1/admin/api-keys", key=admin,
                                body={"name": "robot", "role": "operator"})
    assert status == 201 and made["key"].startswith("llmo_")
    assert headers["Cache-Control"] == "no-store"
    assert api("GET", "/v1/config/export", key=made["key"])[0] == 200
    keys = api("GET", "/v1/admin/api-keys", key=admin)[2]
    assert any(k["id"] == made["id"] for k in keys) and all("key" not in k for k in keys)
    status, _, revoked = api("DELETE", f"/v1/admin/api-keys/{made['id']}", key=admin)
    assert status == 200 and revoked["revoked"] is True
    assert api("GET", "/v1/config/export", key=made["key"])[0] == 401
    assert api("DELETE", "/v1/admin/api-keys/zzzzzzzzzzzz", key=admin)[0] == 404
    listed = daemon.ctl("api-key", "list", "--json")
    assert listed.returncode == 0 and made["id"] in listed.stdout
    assert made["key"] not in listed.stdout
    revoke = daemon.ctl("api-key", "revoke", "zzzzzzzzzzzz")
    assert revoke.returncode == 2
    records, cursor = [], None
    while True:
        query = "?limit=50" + (f"&cursor={cursor}" if cursor else "")
        page = api("GET", f"/v1/admin/audit{query}", key=admin)[2]
        if not page["items"]:
            break
        records += page["items"]
        cursor = page["next_cursor"]
    mine = [r for r in records if r["path"] == "/v1/admin/api-keys" and r["method"] == "POST"]
    assert mine and mine[-1]["status"] == 201 and mine[-1]["role"] == "admin"
    assert all(r["method"] != "GET" for r in records)
    assert any(r["status"] == 403 and r["role"] == "viewer" for r in records)


def test_feature_flags_switch_at_once_refuse_rollouts_and_persist(daemon):
    api, admin = daemon.api, daemon.keys["admin"]
    status, _, flags = api("GET", "/v1/admin/flags", key=admin)
    assert status == 200 and {"proposals", "auto_deploy", "rollouts",
                              "strategy.caching"} <= {f["name"] for f in flags}
    assert all(f["enabled"] and f["description"] for f in flags)
    assert put_config(daemon, "flag-svc")[0] == 201
    status, _, flag = api("PUT", "/v1/admin/flags/rollouts", key=admin, body={"enabled": False})
    assert status == 200 and flag["enabled"] is False and flag["updated_by"]
    status, _, problem = api("POST", "/v1/optimizations", key=daemon.keys["operator"],
                             body={"service": "flag-svc", "change": {"model": "gpt-4o-mini"}})
    assert status == 409 and "feature flag 'rollouts' is off" in problem["detail"]
    status, _, problem = api("PUT", "/v1/admin/flags/no.such", key=admin, body={"enabled": True})
    assert status == 404 and "flags are:" in problem["detail"]
    status, _, problem = api("PUT", "/v1/admin/flags/rollouts", key=admin,
                             body={"enabled": "no"})
    assert status == 422 and problem["path"] == "enabled"
    assert daemon.ctl("restart", "processor").returncode == 0
    wait_until(lambda: api("GET", "/v1/admin/flags", key=admin)[0] == 200, timeout=30,
               message="the processor back after its restart")
    flags = {f["name"]: f for f in api("GET", "/v1/admin/flags", key=admin)[2]}
    assert flags["rollouts"]["enabled"] is False  # kept across the restart
    status, _, flag = api("PUT", "/v1/admin/flags/rollouts", key=admin, body={"enabled": True})
    assert status == 200 and flag["enabled"] is True
    status, _, transition = api("POST", "/v1/optimizations", key=daemon.keys["operator"],
                                body={"service": "flag-svc", "change": {"model": "gpt-4o-mini"}})
    assert status == 202 and transition["kind"] == "started"
    assert api("POST", "/v1/optimizations/validate", key=daemon.keys["operator"],
               body={"service": "flag-svc", "change": {"model": "x"}})[2]["rollout_running"]


def test_background_jobs_run_list_and_refuse(daemon):
    api, admin = daemon.api, daemon.keys["admin"]
    status, _, job = api("POST", "/v1/admin/jobs", key=admin, body={"kind": "compact"})
    assert status == 202 and job["state"] in ("queued", "running") and job["by"]
    done = wait_until(lambda: (lambda j: j if j["state"] not in ("queued", "running") else None)(
        api("GET", f"/v1/admin/jobs/{job['id']}", key=admin)[2]), timeout=60,
        message="the compact job to finish")
    assert done["state"] == "succeeded" and done["finished_ms"] >= done["started_ms"] > 0
    status, _, jobs = api("GET", "/v1/admin/jobs?limit=5", key=admin)
    assert status == 200 and jobs[0]["id"] == job["id"]
    status, _, problem = api("POST", f"/v1/admin/jobs/{job['id']}/cancel", key=admin)
    assert status == 409 and "not queued or running" in problem["detail"]
    assert api("GET", "/v1/admin/jobs/j.0000000000000000", key=admin)[0] == 404
    status, _, problem = api("POST", "/v1/admin/jobs", key=admin,
                             body={"kind": "backup", "args": {"path": "relative/dir"}})
    assert status == 422 and problem["path"] == "args"
    status, _, problem = api("POST", "/v1/admin/jobs", key=admin, body={"kind": "defrag"})
    assert status == 422 and problem["path"] == "kind"
    assert api("GET", "/v1/admin/jobs", key=daemon.keys["operator"])[0] == 403


# --- a real proposal, deployed, promoted and rolled back (last: it moves event time on) ----------

def calls(service: str, start: float, minutes: int, per_minute: int, seed: int,
          canary_share: float = 0.0) -> list[dict]:
    import random
    rng = random.Random(seed)
    out = []
    for i in range(minutes * per_minute):
        canary = rng.random() < canary_share
        out.append({"event_id": f"{service}-{seed}-{i}", "time": start + i * 60 / per_minute,
                    "service": service, "model": "gpt-4o", "input_tokens": 1000,
                    "output_tokens": 100, "latency_ms": rng.lognormvariate(6, 0.3),
                    "quality": min(1.0, max(0.0, rng.gauss(0.8, 0.05))),
                    "prompt_fingerprint": f"fp-{rng.randrange(5)}",
                    **({"variant": "canary"} if canary else {})})
    return out


def test_proposal_deploy_promotion_stream_and_rollback(daemon):
    import threading
    api, viewer, op = daemon.api, daemon.keys["viewer"], daemon.keys["operator"]
    t1 = T0 + 7200
    assert put_config(daemon, "cache-svc", "gpt-4o")[0] == 201
    for minute in range(12):
        post_events(daemon.collector, calls("cache-svc", t1 + 60 * minute, 1, 100, minute))

    def proposal_of_service() -> list:
        page = api("GET", "/v1/optimizations?service=cache-svc&strategy=caching", key=viewer)
        return page[2]["items"]

    found = wait_until(proposal_of_service, 30, interval=0.3)[0]
    assert found["status"] == "open" and found["change"]["cache"]["enabled"] is True
    received: list = []
    opened = threading.Event()
    reader = threading.Thread(target=lambda: received.extend(
        sse_events(daemon, viewer, "?service=cache-svc&type=rollout", want=3, timeout=40,
                   opened=opened)))
    reader.start()
    # the stream starts at the log's end: deploy only once it has answered (offset fixed)
    wait_until(lambda: opened.is_set() or not reader.is_alive(), 20)
    assert opened.is_set(), "the SSE stream did not open"
    status, _, started = api("POST", f"/v1/optimizations/{found['id']}/deploy", key=op)
    assert status == 202 and started["kind"] == "started", started
    status, _, problem = api("POST", f"/v1/optimizations/{found['id']}/deploy", key=op)
    assert status == 409
    detail = api("GET", f"/v1/optimizations/{found['id']}", key=viewer)[2]
    assert detail["status"] == "deploying"
    assert detail["rollouts"][0]["transitions"][0]["kind"] == "started"
    # identical traffic on both sides: each stage passes, the change is promoted
    for minute in range(12, 22):
        post_events(daemon.collector, calls("cache-svc", t1 + 60 * minute, 1, 100, minute, 0.5))
        if not reader.is_alive():
            break
    reader.join(40)
    kinds = [e["data"]["body"]["kind"] for e in received]
    assert kinds[0] == "started" and kinds[-1] == "promoted", kinds
    detail = wait_until(lambda: (d := api("GET", f"/v1/optimizations/{found['id']}",
                                          key=viewer)[2])["status"] == "promoted" and d, 10)
    assert detail["rollouts"][0]["phase"] == "promoted"
    promoted_config = api("GET", "/v1/config/cache-svc", key=viewer)[2]
    assert promoted_config["cache"]["enabled"] is True and not promoted_config["variants"]
    status, _, restored = api("POST", f"/v1/optimizations/{found['id']}/rollback", key=op)
    assert status == 200 and restored["cache"] == {}, restored
    assert restored["version"] == promoted_config["version"] + 1
    status, _, problem = api("POST", f"/v1/optimizations/{found['id']}/rollback", key=op)
    assert status == 409 and "changed since the promotion" in problem["detail"]
