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

from tests.conftest import Daemon

pytestmark = pytest.mark.timeout(120)

SECRET = "x" * 48
ISSUER = "https://issuer.test"
PROCESSOR = {"tumbling_window_s": 60, "sliding_window_s": 120, "sliding_step_s": 60,
             "allowed_lateness_s": 5, "analysis_interval_s": 60,
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
    d = Daemon(builtins=["storage", "collector", "processor", "rest_api"],
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
    assert status == 200 and "/v1/config/{service}" in page
    api("GET", "/v1/config/export", key=daemon.keys["viewer"])
    status, _, text = api("GET", "/metrics")
    assert status == 200 and "rest_api_requests_total" in text
    assert 'route="/v1/config/export"' in text and "rest_api_in_flight" in text


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
