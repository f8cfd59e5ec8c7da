"""The Slack and generic-webhook clients against local servers that check every request: Block
Kit shape and mrkdwn escaping for Slack, the HMAC signature and Idempotency-Key dedupe for
webhooks; how each answer (ok, 429, 5xx, 4xx, no answer) is classified; secrets kept out of
errors and status."""
from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ipc.config import SlackSection, WebhookSection
from workers.integrations.http import PermanentError
from workers.integrations.notification import Notification
from workers.integrations.slack import SlackClient
from workers.integrations.webhook import (SignatureError, WebhookClient, payload, sign,
                                          verify_signature)
from workers.resilience.retry import TransientError

SLACK_PATH = "/services/T0001/B0002/s3cretPathToken"
WEBHOOK_SECRET = "whsec-Zq8v2kLr0pN4"
TIMEOUT_S = 10.0  # a loaded machine must not turn an answer into a timeout
HANG_TIMEOUT_S = 0.2  # for the server that never answers
PAYLOAD_KEYS = {"id", "kind", "severity", "title", "text", "service", "subject_id", "time_ns",
                "fields", "body"}

NOTE = Notification(
    key="rolled_back:opt-42:3", kind="rolled_back", severity="critical",
    title="Rollback of <opt-42> & friends", text="p95 latency 2.3 s > 1.5 s <@here>",
    service="chat<api>", subject_id="opt-42", time_ns=1_700_000_000_000_000_000,
    fields={"canary": "10 %", "error rate": "4 % > 1 %"},
    body={"optimization": {"id": "opt-42", "score": 0.5}})

Run = Callable[[aiohttp.ClientSession, str], Awaitable[None]]


@asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[TestServer]:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield server
    finally:
        await server.close()


def run(app: web.Application, path: str, scenario: Run) -> None:
    """``scenario(session, url of path)`` with ``app`` listening on 127.0.0.1."""
    async def go() -> None:
        async with serving(app) as server, aiohttp.ClientSession() as session:
            await scenario(session, str(server.make_url(path)))

    asyncio.run(go())


def failing_app(path: str, mode: str, release: asyncio.Event) -> web.Application:
    """Answers every POST to ``path`` the way ``mode`` says; "hang" waits for ``release``."""
    async def answer(_request: web.Request) -> web.Response:
        if mode == "429":
            return web.Response(status=429, text="rate_limited", headers={"Retry-After": "7"})
        if mode == "500":
            return web.Response(status=500, text="rollup_error")
        if mode == "400":
            return web.Response(status=400, text="invalid_payload")
        await release.wait()
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post(path, answer)
    return app


def timeout_of(mode: str) -> float:
    return HANG_TIMEOUT_S if mode == "hang" else TIMEOUT_S


def expect_error(mode: str, exc: BaseException) -> None:
    if mode == "429":
        assert isinstance(exc, TransientError) and exc.retry_after == 7
    elif mode == "500":
        assert isinstance(exc, TransientError) and "500" in str(exc)
    elif mode == "400":
        assert isinstance(exc, PermanentError) and exc.status == 400
        assert "invalid_payload" in str(exc)
    else:
        assert isinstance(exc, TransientError) and "no answer within 0.2 s" in str(exc)


# --- Slack -------------------------------------------------------------------------------------

MRKDWN_ENTITY = re.compile(r"&(?!amp;|lt;|gt;)")


def slack_problems(request: web.Request, body: Any) -> list[str]:
    """What a real Slack would refuse or render wrong in this request."""
    problems = []
    if request.content_type != "application/json":
        problems.append(f"content type {request.content_type}")
    if not isinstance(body, dict) or set(body) != {"text", "blocks"}:
        return problems + ["top level is not {text, blocks}"]
    types = [block["type"] for block in body["blocks"]]
    if types[0] != "header" or types[-1] != "context" or len(types) > 50:
        problems.append(f"blocks {types}")
    header = body["blocks"][0]["text"]
    if header["type"] != "plain_text" or not 0 < len(header["text"]) <= 150:
        problems.append("header")
    mrkdwn = [body["text"]]
    for block in body["blocks"][1:]:
        if block["type"] == "section" and "text" in block:
            if not 0 < len(block["text"]["text"]) <= 3000:
                problems.append("section text length")
            mrkdwn.append(block["text"]["text"])
        elif block["type"] == "section":
            if not 0 < len(block["fields"]) <= 10:
                problems.append("more than 10 fields")
            mrkdwn += [field["text"] for field in block["fields"]
                       if field["type"] == "mrkdwn" and len(field["text"]) <= 2000]
        elif block["type"] == "context":
            mrkdwn += [element["text"] for element in block["elements"]]
    for text in mrkdwn:
        if "<" in text or ">" in text or MRKDWN_ENTITY.search(text):
            problems.append(f"unescaped {text!r}")
    return problems


def slack_app(seen: list[Any]) -> web.Application:
    async def webhook(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        if slack_problems(request, body):
            return web.Response(status=400, text="invalid_payload")
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post(SLACK_PATH, webhook)
    return app


def slack_client(url: str, timeout_s: float = TIMEOUT_S) -> SlackClient:
    return SlackClient(SlackSection(enabled=True, webhook_url=url), timeout_s)


def test_slack_posts_an_escaped_block_kit_message() -> None:
    seen: list[Any] = []

    async def scenario(session: aiohttp.ClientSession, url: str) -> None:
        client = slack_client(url)
        assert await client.deliver(session, NOTE) == {"target": client.describe()["target"]}

    run(slack_app(seen), SLACK_PATH, scenario)
    body = seen[0]
    assert body["text"] == "Rollback of &lt;opt-42&gt; &amp; friends"
    header, text, fields, context = body["blocks"]
    assert header["text"]["text"] == NOTE.title  # plain text: shown as is
    assert text["text"] == {"type": "mrkdwn",
                            "text": "p95 latency 2.3 s &gt; 1.5 s &lt;@here&gt;"}
    assert fields["fields"] == [{"type": "mrkdwn", "text": "*canary*\n10 %"},
                                {"type": "mrkdwn", "text": "*error rate*\n4 % &gt; 1 %"}]
    assert [e["text"] for e in context["elements"]] == [
        "*kind:* rolled_back", "*severity:* critical", "*service:* chat&lt;api&gt;"]


def test_slack_cuts_long_messages_to_block_kit_limits() -> None:
    seen: list[Any] = []
    note = Notification(key="k", kind="anomaly_found", severity="warning", title="T" * 400,
                        text="a<b " * 2000, fields={f"f{i}": "v" for i in range(12)})

    async def scenario(session: aiohttp.ClientSession, url: str) -> None:
        await slack_client(url).deliver(session, note)

    run(slack_app(seen), SLACK_PATH, scenario)
    header, text, fields, context = seen[0]["blocks"]
    assert len(header["text"]["text"]) == 150 and header["text"]["text"].endswith("…")
    assert text["text"]["text"] == "a&lt;b " * 428 + "a…"  # not cut inside "&lt;"
    assert len(fields["fields"]) == 10 and fields["fields"][-1]["text"] == "*…*\n3 more fields"
    assert [e["text"] for e in context["elements"]] == ["*kind:* anomaly_found",
                                                        "*severity:* warning"]


@pytest.mark.parametrize("mode", ["429", "500", "400", "hang"])
def test_slack_failures_are_classified_without_the_url_path(mode: str) -> None:
    async def scenario(session: aiohttp.ClientSession, url: str) -> None:
        with pytest.raises((TransientError, PermanentError)) as caught:
            await slack_client(url, timeout_of(mode)).deliver(session, NOTE)
        release.set()
        expect_error(mode, caught.value)
        assert "s3cretPathToken" not in str(caught.value) and SLACK_PATH not in str(caught.value)
        assert "127.0.0.1" in str(caught.value)

    release = asyncio.Event()
    run(failing_app(SLACK_PATH, mode, release), SLACK_PATH, scenario)


def test_slack_configuration_is_checked_without_showing_the_url(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"integrations\.slack\.webhook_url is empty"):
        SlackClient(SlackSection(enabled=True), 1.0)
    for bad in ("http://hooks.slack.com" + SLACK_PATH, "ftp://127.0.0.1" + SLACK_PATH,
                "hooks.slack.com" + SLACK_PATH):
        with pytest.raises(ValueError, match=r"integrations\.slack\.webhook_url must be") as e:
            SlackClient(SlackSection(enabled=True, webhook_url=bad), 1.0)
        assert "s3cret" not in str(e.value)
    secret_file = tmp_path / "slack"
    secret_file.write_text("https://hooks.slack.com" + SLACK_PATH + "\n")
    client = SlackClient(SlackSection(enabled=True, webhook_url_file=str(secret_file)), 1.0)
    assert client.describe() == {"name": "slack", "enabled": True,
                                 "target": "hooks.slack.com", "webhook_url": "set"}
    assert SLACK_PATH in client.secrets
    idle = SlackClient(SlackSection(), 1.0)
    assert idle.describe()["webhook_url"] == "not set"

    async def deliver_idle() -> None:
        async with aiohttp.ClientSession() as session:
            await idle.deliver(session, NOTE)

    with pytest.raises(PermanentError, match=r"integrations\.slack\.webhook_url is empty"):
        asyncio.run(deliver_idle())
    assert SlackClient(SlackSection(webhook_url="http://localhost:8080/relay"), 1.0)


# --- Generic webhooks --------------------------------------------------------------------------

def receiver_app(secret: str, keys: list[str], bodies: list[bytes]) -> web.Application:
    """A receiver as documented for ours: verify, then act once per Idempotency-Key."""
    async def hook(request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            verify_signature(secret, request.headers.get("X-Optimizer-Timestamp"), raw,
                             request.headers.get("X-Optimizer-Signature"))
        except SignatureError as exc:
            return web.Response(status=401, text=str(exc))
        assert request.content_type == "application/json"
        document = json.loads(raw)
        assert set(document) == PAYLOAD_KEYS
        assert request.headers["X-Optimizer-Event"] == document["kind"]
        assert request.headers["Idempotency-Key"] == document["id"]
        bodies.append(raw)
        if document["id"] not in keys:
            keys.append(document["id"])
        return web.json_response({"received": True})

    app = web.Application()
    app.router.add_post("/hooks/optimizer", hook)
    return app


def webhook_client(url: str, secret: str = WEBHOOK_SECRET,
                   timeout_s: float = TIMEOUT_S) -> WebhookClient:
    return WebhookClient("ops", WebhookSection(enabled=True, url=url, secret=secret), timeout_s)


def test_webhook_is_signed_and_deduplicated_by_the_receiver() -> None:
    keys: list[str] = []
    bodies: list[bytes] = []

    async def scenario(session: aiohttp.ClientSession, url: str) -> None:
        client = webhook_client(url)
        first = await client.deliver(session, NOTE)
        second = await client.deliver(session, NOTE)
        assert first == second == {"target": url, "id": NOTE.key}

    run(receiver_app(WEBHOOK_SECRET, keys, bodies), "/hooks/optimizer", scenario)
    assert keys == [NOTE.key] and len(bodies) == 2
    assert bodies[0] == payload(NOTE)  # the bytes signed are the bytes sent
    assert json.loads(bodies[0]) == {
        "id": NOTE.key, "kind": "rolled_back", "severity": "critical", "title": NOTE.title,
        "text": NOTE.text, "service": "chat<api>", "subject_id": "opt-42",
        "time_ns": NOTE.time_ns, "fields": NOTE.fields, "body": NOTE.body}


def test_webhook_with_the_wrong_secret_is_refused_without_showing_it() -> None:
    async def scenario(session: aiohttp.ClientSession, url: str) -> None:
        with pytest.raises(PermanentError) as caught:
            await webhook_client(url, secret="not-the-receivers-key").deliver(session, NOTE)
        assert caught.value.status == 401 and "does not match" in str(caught.value)
        assert "not-the-receivers-key" not in str(caught.value)

    run(receiver_app(WEBHOOK_SECRET, [], []), "/hooks/optimizer", scenario)


@pytest.mark.parametrize("mode", ["429", "500", "400", "hang"])
def test_webhook_failures_are_classified_without_the_secret(mode: str) -> None:
    async def scenario(session: aiohttp.ClientSession, url: str) -> None:
        with pytest.raises((TransientError, PermanentError)) as caught:
            await webhook_client(url, timeout_s=timeout_of(mode)).deliver(session, NOTE)
        release.set()
        expect_error(mode, caught.value)
        assert WEBHOOK_SECRET not in str(caught.value)

    release = asyncio.Event()
    run(failing_app("/hooks/optimizer", mode, release), "/hooks/optimizer", scenario)


def test_webhook_configuration_refuses_unsigned_and_hides_secrets(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"integrations\.webhooks\.ops\.secret is empty"):
        WebhookClient("ops", WebhookSection(enabled=True, url="https://x.test/h"), 1.0)
    with pytest.raises(ValueError, match=r"integrations\.webhooks\.ops\.url is empty"):
        WebhookClient("ops", WebhookSection(enabled=True, secret=WEBHOOK_SECRET), 1.0)
    with pytest.raises(ValueError, match=r"integrations\.webhooks\.ops\.url must be"):
        WebhookClient("ops", WebhookSection(enabled=True, url="x.test/h", secret="s"), 1.0)
    key_file = tmp_path / "key"
    key_file.write_text(WEBHOOK_SECRET + "\n")
    client = WebhookClient("ops", WebhookSection(
        enabled=True, url="https://bot:pw@hooks.example.com/in?token=t0k",
        secret_file=str(key_file)), 1.0)
    assert client.name == "webhook:ops"
    assert client.describe() == {"name": "webhook:ops", "enabled": True,
                                 "target": "https://hooks.example.com/in", "secret": "set"}
    assert client.secrets == [WEBHOOK_SECRET, "pw"]


# --- Signature scheme --------------------------------------------------------------------------

def test_verify_signature_accepts_only_fresh_untampered_requests() -> None:
    body = payload(NOTE)
    ts = "1700000000"
    good = sign(WEBHOOK_SECRET, ts, body)
    assert re.fullmatch(r"v1=[0-9a-f]{64}", good)
    verify_signature(WEBHOOK_SECRET, ts, body, good, now=1700000000 + 300)
    verify_signature(WEBHOOK_SECRET.encode(), ts, body, good.upper().replace("V1", "v1"),
                     now=1700000000 - 300)
    refused = [
        (WEBHOOK_SECRET, ts, body + b" ", good, 1700000000, "does not match"),
        ("other-secret", ts, body, good, 1700000000, "does not match"),
        (WEBHOOK_SECRET, ts, body, good, 1700000000 + 301, "more than 300 s"),
        (WEBHOOK_SECRET, ts, body, good, 1700000000 - 301, "more than 300 s"),
        (WEBHOOK_SECRET, "1700000001", body, good, 1700000000, "does not match"),
        (WEBHOOK_SECRET, ts, body, "", 1700000000, "missing"),
        (WEBHOOK_SECRET, ts, body, None, 1700000000, "missing"),
        (WEBHOOK_SECRET, ts, body, good[3:], 1700000000, "not v1="),
        (WEBHOOK_SECRET, ts, body, "v0=" + good[3:], 1700000000, "not v1="),
        (WEBHOOK_SECRET, ts, body, good[:-1] + "é", 1700000000, "not v1="),
        (WEBHOOK_SECRET, "", body, good, 1700000000, "Timestamp is missing"),
        (WEBHOOK_SECRET, "17e8", body, good, 1700000000, "not unix seconds"),
    ]
    for secret, timestamp, raw, header, now, why in refused:
        with pytest.raises(SignatureError, match=why):
            verify_signature(secret, timestamp, raw, header, now=now)
    assert issubclass(SignatureError, ValueError)
