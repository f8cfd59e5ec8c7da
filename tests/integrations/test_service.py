"""The integrations worker in a running optimizerd, against local fakes of Slack, Jira and a
signed webhook receiver: a rollback decided by the processor's judge arrives as a Slack message
and a Jira issue; the outbox survives a SIGKILL mid-delivery and the message is processed once
(same idempotency key); 5xx opens the breaker (degraded) and it recovers; 429 waits Retry-After;
the REST and gRPC APIs list, test and reconfigure integrations without ever showing a
secret."""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from google.protobuf import field_mask_pb2

from ipc import storage as s
from protos.llm_optimizer.v1 import integrations_pb2 as I
from protos.llm_optimizer.v1 import integrations_pb2_grpc, optimization_pb2_grpc
from protos.llm_optimizer.v1 import optimization_pb2 as O
from tests.conftest import Daemon, free_port, post_events, wait_until
from workers.grpc_api.convert import struct
from workers.integrations.webhook import verify_signature
from workers.storage_client import SyncStorageClient

from .fakes import TOKEN, FakeJira

pytestmark = pytest.mark.timeout(240)

SLACK_PATH = "/services/T000/B000/sl4ckS3cretPath"
HOOK_SECRET = "hook-s3cret-abcdef0123456789"
CLAUDE_KEY = "sk-ant-test-0123456789abcdef"
T0 = 1_795_600_800
PROCESSOR = {"tumbling_window_s": 60, "sliding_window_s": 120, "sliding_step_s": 60,
             "allowed_lateness_s": 5, "analysis_interval_s": 60,
             "decisions": {"min_samples": 50},
             "canary": {"min_samples": 10, "promote_min_samples": 20, "stages": [50.0, 100.0]}}


class Receivers:
    """Fake Slack and a webhook receiver, in a thread of their own, that record what they get;
    the webhook verifies each signature, and can hold or fail answers on demand."""

    def __init__(self) -> None:
        self.slack: list[dict[str, Any]] = []
        self.claude: list[dict[str, Any]] = []
        self.hooks: list[tuple[str, dict[str, Any]]] = []  # (Idempotency-Key, payload)
        self.hook_times: list[float] = []
        self.fail_with: list[tuple[int, dict[str, str]]] = []  # next answers, then ok
        self.always_fail = False
        self.hold = False
        self.held = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.release = asyncio.Event()
        self.jira = FakeJira(2, "/jira", f"Bearer {TOKEN}")
        self.port, self.jira_port = free_port(), free_port()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.serve(), self.loop).result(10)

    async def serve(self) -> None:
        app = web.Application()
        app.router.add_post(SLACK_PATH, self.on_slack)
        app.router.add_post("/hook", self.on_hook)
        app.router.add_post("/v1/messages", self.on_claude)
        self.runners = [web.AppRunner(app), web.AppRunner(self.jira.app)]
        for runner, port in zip(self.runners, (self.port, self.jira_port), strict=True):
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()

    async def on_slack(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/json"
        self.slack.append(await request.json())
        return web.Response(text="ok")

    async def on_claude(self, request: web.Request) -> web.Response:
        assert request.headers["x-api-key"] == CLAUDE_KEY
        assert request.headers["anthropic-version"] == "2023-06-01"
        body = await request.json()
        self.claude.append(body)
        answer = [{"title": "Cache the system prompt", "rationale": "the prefix repeats",
                   "expected_savings_pct": 35, "change": "cache: enabled"}]
        return web.json_response({
            "id": "msg_01", "type": "message", "role": "assistant", "model": body["model"],
            "content": [{"type": "text", "text": json.dumps(answer)}],
            "stop_reason": "end_turn", "usage": {"input_tokens": 420, "output_tokens": 80}})

    async def on_hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        verify_signature(HOOK_SECRET, request.headers.get("X-Optimizer-Timestamp"), body,
                         request.headers.get("X-Optimizer-Signature"))
        self.hooks.append((request.headers["Idempotency-Key"], json.loads(body)))
        self.hook_times.append(time.monotonic())
        if self.hold:
            self.hold = False
            self.held.set()
            await self.release.wait()
        if self.always_fail:
            return web.Response(status=503, text="down for maintenance")
        if self.fail_with:
            status, headers = self.fail_with.pop(0)
            return web.Response(status=status, headers=headers, text="slow down")
        return web.json_response({"received": True})

    def keys(self, prefix: str) -> list[str]:
        return [key for key, _ in self.hooks if key.startswith(prefix)]

    def close(self) -> None:
        async def stop() -> None:
            self.release.set()
            for runner in self.runners:
                await runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Api:
    def __init__(self, base: str, keys: dict[str, str]) -> None:
        self.base, self.keys = base, keys

    def __call__(self, method: str, path: str, role: str = "viewer", body: Any = None
                 ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {self.keys[role]}"}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        request = urllib.request.Request(self.base + path, data=data, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Daemon, Receivers, Api]]:
    receivers = Receivers()
    d = Daemon(builtins=["storage", "collector", "processor", "rest_api", "grpc_api",
                         "integrations"],
               extra={"processor": dict(PROCESSOR)},
               env={"LLM_OPTIMIZER__INTEGRATIONS__SLACK__WEBHOOK_URL":
                    f"http://127.0.0.1:{receivers.port}{SLACK_PATH}",
                    "LLM_OPTIMIZER__INTEGRATIONS__ANTHROPIC__API_KEY": CLAUDE_KEY})
    token_file, hook_file = Path(d.dir) / "jira.token", Path(d.dir) / "hook.secret"
    token_file.write_text(TOKEN + "\n")
    hook_file.write_text(HOOK_SECRET)
    d.doc["integrations"].update({
        "retry_base_s": 0.05, "breaker_failures": 3, "breaker_recovery_s": 1.0,
        "anthropic": {"enabled": True, "base_url": f"http://127.0.0.1:{receivers.port}",
                      "model": "claude-sonnet-4-5"},
        "slack": {"enabled": True, "events": ["canary_started", "rolled_back"]},
        "jira": {"enabled": True, "base_url": f"http://127.0.0.1:{receivers.jira_port}/jira",
                 "project": "OPS", "api_token_file": str(token_file),
                 "events": ["rolled_back"]},
        "webhooks": {"ops": {"enabled": True, "url": f"http://127.0.0.1:{receivers.port}/hook",
                             "secret_file": str(hook_file), "events": ["anomaly_found"],
                             "min_severity": "warning", "rate_limit_per_min": 0}}})
    d.write_config()
    try:
        d.start(timeout=60)
        keys = {}
        for role in ("viewer", "operator", "admin"):
            made = d.ctl("api-key", "create", "--role", role)
            assert made.returncode == 0, made.stderr
            keys[role] = made.stdout.strip().splitlines()[-1]
        yield d, receivers, Api(f"http://{d.doc['rest_api']['listen']}", keys)
    finally:
        d.cleanup()
        receivers.close()


def finding(ident: str, severity: str = "critical") -> bytes:
    """An optimizer-events record as the processor appends it for a new finding."""
    return json.dumps({"type": "finding", "id": ident, "time_ns": T0 * 10**9, "body": {
        "id": ident, "kind": "spend_spike", "service": "billing", "model": "gpt-4o",
        "operation": "chat", "severity": severity, "title": f"Spend spike {ident}",
        "detail": "spend per minute tripled", "evidence": {"ratio": 3.1},
        "window_start_ns": T0 * 10**9, "window_end_ns": (T0 + 60) * 10**9}}).encode()


def append_findings(d: Daemon, *records: bytes) -> None:
    client = SyncStorageClient(d.runtime)
    try:
        client.call(s.LogAppend(log="optimizer-events", records=list(records)))
    finally:
        client.close()


def test_a_rollback_decided_by_the_judge_reaches_slack_and_jira(setup):
    d, receivers, api = setup
    status, _ = api("PUT", "/v1/config/rb-svc", "operator",
                    {"expected_version": 0, "config": {"model": "gpt-4o"}})
    assert status == 201
    status, started = api("POST", "/v1/optimizations", "operator",
                          {"service": "rb-svc", "change": {"model": "gpt-4o-mini"}})
    assert status == 202 and started["kind"] == "started"
    wait_until(lambda: any("Canary started" in m["text"] for m in receivers.slack), 30,
               message="the canary start on Slack")
    rng = random.Random(7)
    for minute in range(10):  # the canary fails 40% of its calls, the baseline none
        batch = []
        for i in range(100):
            canary = i % 2 == 0
            batch.append({"event_id": f"rb-{minute}-{i}", "time": T0 + 60 * minute + i * 0.6,
                          "service": "rb-svc", "model": "gpt-4o", "input_tokens": 800,
                          "output_tokens": 100, "latency_ms": 600.0,
                          **({"variant": "canary"} if canary else {}),
                          "status": "error" if canary and rng.random() < 0.4 else "ok"})
        post_events(f"http://{d.doc['collector']['listen']}/v1/events", batch)
        if any("Rolled back" in m["text"] for m in receivers.slack):
            break
    message = wait_until(lambda: next((m for m in receivers.slack
                                       if "Rolled back" in m["text"]), None), 60,
                         message="the rollback on Slack")
    header = message["blocks"][0]
    assert header["type"] == "header" and "rb-svc" in header["text"]["text"]
    issue = wait_until(lambda: next((i for i in receivers.jira.issues.values()
                                     if "Rolled back" in i["summary"]), None), 30,
                       message="the rollback as a Jira issue")
    assert "rb-svc" in issue["summary"] and "llm-optimizer" in issue["labels"]
    assert any(label.startswith("llmo-") for label in issue["labels"])
    rollouts = api("GET", "/v1/rollouts?service=rb-svc")[1]["items"]
    assert rollouts[0]["phase"] == "rolled_back"  # the judge's decision, not an operator's


def test_the_outbox_survives_a_sigkill_mid_delivery_and_delivers_once(setup):
    d, receivers, api = setup
    receivers.hold = True
    append_findings(d, finding("f-kill"))
    assert receivers.held.wait(30), "the webhook got nothing"
    old = d.services()["integrations"]["pid"]
    os.kill(old, signal.SIGKILL)  # the request is in flight, its answer never read
    receivers.loop.call_soon_threadsafe(receivers.release.set)
    d.wait_service("integrations", lambda x: x["state"] == "ready" and x["pid"] != old, 30)
    wait_until(lambda: len(receivers.keys("finding:f-kill")) == 2, 30,
               message="the entry delivered again after the restart")
    assert set(receivers.keys("finding:f-kill")) == {"finding:f-kill"}  # one idempotency key
    wait_until(lambda: api("GET", "/v1/integrations/webhook:ops")[1]["pending"] == 0, 20)
    assert len(receivers.keys("finding:f-kill")) == 2


def test_server_errors_open_the_breaker_and_it_recovers(setup):
    d, receivers, api = setup
    receivers.always_fail = True
    append_findings(d, finding("f-down"))
    health = wait_until(lambda: (lambda h: h if h["state"] == "degraded" else None)(
        api("GET", "/v1/integrations/webhook:ops/health")[1]), 30,
        message="the breaker open after 3 failures")
    assert health["breaker"] in ("open", "half_open") and "503" in health["last_error"]
    receivers.always_fail = False
    wait_until(lambda: api("GET", "/v1/integrations/webhook:ops/health")[1]["state"]
               == "healthy", 30, message="closed again after a trial delivery")
    wait_until(lambda: api("GET", "/v1/integrations/webhook:ops")[1]["pending"] == 0, 20)
    assert set(receivers.keys("finding:f-down")) == {"finding:f-down"}


def test_429_waits_for_retry_after(setup):
    d, receivers, _api = setup
    receivers.fail_with = [(429, {"Retry-After": "2"})]
    start = len(receivers.hook_times)
    append_findings(d, finding("f-busy"))
    wait_until(lambda: len(receivers.keys("finding:f-busy")) == 2, 30)
    first, second = receivers.hook_times[start:start + 2]
    assert second - first >= 1.9  # the server's Retry-After, not the 0.05 s backoff


def test_findings_below_the_severity_floor_are_not_sent(setup):
    d, receivers, api = setup
    append_findings(d, finding("f-minor", severity="info"), finding("f-major"))
    wait_until(lambda: receivers.keys("finding:f-major"), 30)
    assert not receivers.keys("finding:f-minor")


def test_rest_lists_tests_and_reconfigures_without_secrets(setup):
    d, receivers, api = setup
    status, listed = api("GET", "/v1/integrations")
    assert status == 200
    states = {i["name"]: i["state"] for i in listed}
    assert states == {"slack": "healthy", "jira": "healthy", "github": "disabled",
                      "webhook:ops": "healthy", "anthropic": "healthy"}
    text = json.dumps(listed)
    for secret in (SLACK_PATH, TOKEN, HOOK_SECRET, CLAUDE_KEY):
        assert secret not in text
    status, result = api("POST", "/v1/integrations/slack/test", "operator")
    assert status == 200 and result["ok"] is True
    assert any("Test message" in m["text"] for m in receivers.slack)
    assert api("POST", "/v1/integrations/nope/test", "operator")[0] == 404
    assert api("PUT", "/v1/integrations/jira", "operator", {"enabled": False})[0] == 403
    status, jira = api("PUT", "/v1/integrations/jira", "admin", {"enabled": False})
    assert status == 200 and jira["state"] == "disabled"
    status, problem = api("PUT", "/v1/integrations/jira", "admin", {"min_severity": "loud"})
    assert status == 422 and problem["path"] == "min_severity"
    assert d.ctl("restart", "integrations").returncode == 0
    status, jira = api("GET", "/v1/integrations/jira")
    assert status == 200 and jira["state"] == "disabled"  # kept across the restart
    status, jira = api("PUT", "/v1/integrations/jira", "admin", {"enabled": True})
    assert status == 200 and jira["state"] == "healthy"
    log = Path(d.log_path).read_text()
    for secret in (SLACK_PATH, TOKEN, HOOK_SECRET, CLAUDE_KEY):
        assert secret not in log


def test_grpc_integration_service_over_the_same_operations(setup):
    d, receivers, api = setup
    metadata = (("authorization", f"Bearer {api.keys['admin']}"),)
    with grpc.insecure_channel(d.doc["grpc_api"]["listen"]) as channel:
        stub = integrations_pb2_grpc.IntegrationServiceStub(channel)
        listed = stub.ListIntegrations(I.ListIntegrationsRequest(), metadata=metadata)
        by_id = {i.id: i for i in listed.integrations}
        assert set(by_id) == {"anthropic", "github", "jira", "slack", "webhook:ops"}
        assert by_id["slack"].health.state == I.HEALTH_STATE_HEALTHY
        assert list(by_id["slack"].secret_names) == ["webhook_url"]
        assert SLACK_PATH not in str(listed) and HOOK_SECRET not in str(listed)
        only = stub.ListIntegrations(I.ListIntegrationsRequest(
            kind=I.INTEGRATION_KIND_WEBHOOK), metadata=metadata)
        assert [i.id for i in only.integrations] == ["webhook:ops"]
        tested = stub.TestIntegration(I.TestIntegrationRequest(id="slack", send_message=True),
                                      metadata=metadata)
        assert tested.ok and tested.latency.ToNanoseconds() > 0
        updated = stub.UpdateIntegration(I.UpdateIntegrationRequest(
            integration=I.Integration(id="github", enabled=False,
                                      settings=struct({"min_severity": "critical"})),
            update_mask=field_mask_pb2.FieldMask(paths=["settings.min_severity"])),
            metadata=metadata)
        assert updated.health.state == I.HEALTH_STATE_DISABLED
        assert api("GET", "/v1/integrations/github")[1]["routing"]["min_severity"] == "critical"
        for call, request_ in ((stub.CreateIntegration, I.CreateIntegrationRequest()),
                               (stub.DeleteIntegration, I.DeleteIntegrationRequest(id="jira"))):
            with pytest.raises(grpc.RpcError) as caught:
                call(request_, metadata=metadata)
            assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            assert "config file" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            stub.UpdateIntegration(I.UpdateIntegrationRequest(integration=I.Integration(
                id="jira", secrets={"api_token": "x"})), metadata=metadata)
        assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as caught:
            stub.GetIntegration(I.GetIntegrationRequest(id="nope"), metadata=metadata)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        viewer = (("authorization", f"Bearer {api.keys['viewer']}"),)
        with pytest.raises(grpc.RpcError) as caught:
            stub.UpdateIntegration(I.UpdateIntegrationRequest(
                integration=I.Integration(id="jira")), metadata=viewer)
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
        events = stub.SubscribeIntegrationEvents(I.SubscribeIntegrationEventsRequest(
            integration_ids=["webhook:ops"], kinds=[I.IntegrationEvent.KIND_DELIVERED]),
            metadata=metadata, timeout=60)
        events.initial_metadata()  # the stream is open; its first poll is the baseline
        got = threading.Event()

        def feed() -> None:  # deliveries until one lands after the baseline
            n = 0
            while not got.is_set() and n < 100:
                append_findings(d, finding(f"f-grpc-{n}"))
                n += 1
                got.wait(0.5)

        feeder = threading.Thread(target=feed)
        feeder.start()
        try:
            event = next(iter(events))
        finally:
            got.set()
            feeder.join(30)
            events.cancel()
        assert event.integration_id == "webhook:ops" and event.details["count"] >= 1


def test_a_session_gets_claudes_suggestions_with_their_cost(setup):
    d, receivers, api = setup
    metadata = (("authorization", f"Bearer {api.keys['operator']}"),)
    with grpc.insecure_channel(d.doc["grpc_api"]["listen"]) as channel:
        stub = optimization_pb2_grpc.OptimizationServiceStub(channel)
        query = O.SessionRequest(query=O.SessionQuery(
            query_id="q-claude", service="rb-svc", prompt="cut cost by a third",
            context=struct({"audience": "support agents"})))
        answers = list(stub.OptimizationSession(iter([query]), metadata=metadata, timeout=60))
    claude = [a.suggestion for a in answers if a.WhichOneof("kind") == "suggestion"
              and a.suggestion.source == O.SUGGESTION_SOURCE_ANTHROPIC]
    assert [s.title for s in claude] == ["Cache the system prompt"]
    assert claude[0].expected_impact.cost_reduction_pct == 35
    [done] = [a.complete for a in answers if a.WhichOneof("kind") == "complete"]
    assert any("420 input and 80 output tokens" in note for note in done.notes)
    asked = receivers.claude[-1]
    assert asked["model"] == "claude-sonnet-4-5" and asked["messages"][0]["role"] == "user"
    text = asked["messages"][0]["content"]
    assert "Service: rb-svc" in text and "cut cost by a third" in text and "support" in text
    usage = api("GET", "/v1/integrations/anthropic")[1]["usage"]
    assert usage["calls"] >= 1 and usage["input_tokens"] >= 420 and usage["cost_usd"] > 0


def test_integrations_wait_for_an_unreachable_store_instead_of_failing(make_daemon):
    """PostgreSQL away at start: storage is degraded, and integrations come up (degraded,
    waiting for storage, retrying) rather than crash-looping into `failed`."""
    d = make_daemon(builtins=["storage", "integrations"], extra={"storage": {
        "backend": "postgres",
        "postgres_dsn": f"postgresql://optimizer@127.0.0.1:{free_port()}/optimizer"}}).start()
    entry = d.wait_service("integrations", lambda x: x["state"] == "ready"
                           and "waiting for storage" in (x["reason"] or ""), 30)
    assert entry["health"] == "degraded"
    wait_until(lambda: Path(d.log_path).read_text().count(
        "integrations: waiting for storage") >= 3, 30, message="three retries logged")
    entry = d.services()["integrations"]
    assert entry["state"] == "ready" and entry["restarts"] == 0
