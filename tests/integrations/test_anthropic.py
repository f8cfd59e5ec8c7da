"""The Anthropic client against a local fake of the Messages API that checks every request the
way the real API would (method, path, the three headers, the body's shape): suggestions parsed
from fenced JSON, JSON inside prose and plain prose; its own usage and cost accounted exactly;
429/529/timeouts transient, 401 permanent with the API's error type; the key never shown."""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client import REGISTRY

from ipc.config import AnthropicSection
from workers.integrations.anthropic import (SYSTEM_PROMPT, AnthropicClient, Suggestion,
                                            SuggestionRequest, parse_suggestions)
from workers.integrations.http import PermanentError
from workers.resilience.retry import TransientError

KEY = "sk-ant-test-0123456789abcdef"
REQUEST = SuggestionRequest(service="checkout", model="gpt-4o", operation="chat",
                            avg_input_tokens=1800, avg_output_tokens=250,
                            cost_per_call_usd=0.0082, repeat_share=0.64, quality_mean=0.91,
                            prompt_sample="You are a helpful checkout assistant. " * 3,
                            question="Why is this so expensive?")
ITEMS = [{"title": "Cache the system prompt", "rationale": "64% of prompts repeat",
          "expected_savings_pct": 40, "change": "enable prompt caching on the prefix"},
         {"title": "Try a smaller model", "rationale": "quality 0.91 leaves room",
          "expected_savings_pct": "70%", "change": "gpt-4o-mini"}]


class Fake:
    """The Messages API: checks each request, then answers what the test queued."""

    def __init__(self) -> None:
        self.answers: list[Callable[[], Awaitable[web.Response]]] = []
        self.bodies: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.release = asyncio.Event()

    def check(self, request: web.Request, body: Any) -> None:
        expected = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
        for name, value in expected.items():
            if request.headers.get(name) != value:
                self.problems.append(f"{name}: {request.headers.get(name)!r}")
        if request.content_type != "application/json":
            self.problems.append(f"content-type: {request.content_type}")
        if not isinstance(body, dict) or set(body) != {"model", "max_tokens", "system",
                                                        "messages"}:
            self.problems.append(f"body keys: {body!r}")
            return
        if body["model"] != "claude-sonnet-4-5" or body["max_tokens"] != 700:
            self.problems.append(f"model/max_tokens: {body['model']} {body['max_tokens']}")
        if body["system"] != SYSTEM_PROMPT:
            self.problems.append("system prompt")
        messages = body["messages"]
        if not (isinstance(messages, list) and len(messages) == 1
                and messages[0].get("role") == "user"
                and isinstance(messages[0].get("content"), str)):
            self.problems.append(f"messages: {messages!r}")

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.check(request, body)
        self.bodies.append(body)
        return await self.answers.pop(0)()

    def reply(self, text: str, input_tokens: int, output_tokens: int) -> None:
        async def answer() -> web.Response:
            return web.json_response({
                "id": f"msg_01Test{len(self.bodies)}", "type": "message", "role": "assistant",
                "content": [{"type": "text", "text": text}], "model": "claude-sonnet-4-5",
                "stop_reason": "end_turn", "stop_sequence": None,
                "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens}})
        self.answers.append(answer)

    def fail(self, status: int, error_type: str, message: str,
             headers: dict[str, str] | None = None) -> None:
        async def answer() -> web.Response:
            return web.json_response({"type": "error",
                                      "error": {"type": error_type, "message": message}},
                                     status=status, headers=headers)
        self.answers.append(answer)

    def hang(self) -> None:
        async def answer() -> web.Response:
            await self.release.wait()
            return web.json_response({})
        self.answers.append(answer)


Scenario = Callable[[AnthropicClient, aiohttp.ClientSession, Fake], Awaitable[None]]


def serve(scenario: Scenario, timeout_s: float = 5.0) -> None:
    async def go() -> None:
        fake = Fake()
        app = web.Application()
        app.router.add_route("*", "/v1/messages", fake.handle)
        async with TestServer(app, host="127.0.0.1") as server, \
                aiohttp.ClientSession() as session:
            section = AnthropicSection(enabled=True, base_url=str(server.make_url("/")),
                                       api_key=KEY, max_tokens=700, input_usd_per_mtok=3.0,
                                       output_usd_per_mtok=15.0)
            client = AnthropicClient(section, timeout_s)
            try:
                await scenario(client, session, fake)
            finally:
                fake.release.set()
            assert fake.problems == []
            assert KEY not in json.dumps(client.describe()) + json.dumps(client.usage())

    asyncio.run(go())


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_request_shape_and_fenced_json_suggestions() -> None:
    async def scenario(client: AnthropicClient, session: aiohttp.ClientSession,
                       fake: Fake) -> None:
        fake.reply("Here you go:\n```json\n" + json.dumps(ITEMS, indent=2) + "\n```\n", 1200, 300)
        got = await client.suggest(session, REQUEST)
        assert isinstance(got, Suggestion)
        assert [item.title for item in got.items] == ["Cache the system prompt",
                                                      "Try a smaller model"]
        assert [item.expected_savings_pct for item in got.items] == [40.0, 70.0]
        assert got.items[1].change == "gpt-4o-mini"
        assert (got.model, got.message_id, got.stop_reason) == ("claude-sonnet-4-5",
                                                                "msg_01Test1", "end_turn")
        content = fake.bodies[0]["messages"][0]["content"]
        for fact in ("checkout", "gpt-4o", "1800", "250", "64.0%", "0.910",
                     "You are a helpful checkout assistant.", "Why is this so expensive?"):
            assert fact in content

    serve(scenario)


def test_json_inside_prose_and_plain_text_fallback() -> None:
    async def scenario(client: AnthropicClient, session: aiohttp.ClientSession,
                       fake: Fake) -> None:
        fake.reply("Based on the numbers [see above], I suggest:\n" + json.dumps(ITEMS[:1])
                   + "\nLet me know if this helps.", 10, 20)
        fake.reply("Caching the prefix would help most; the prompt sample was redacted.", 10, 20)
        redacted = SuggestionRequest(service="s", model="m", operation="o", avg_input_tokens=1,
                                     avg_output_tokens=1, cost_per_call_usd=0.0,
                                     repeat_share=0.0)
        bare = await client.suggest(session, redacted)
        assert len(bare.items) == 1 and bare.items[0].title == "Cache the system prompt"
        assert bare.items[0].rationale == "64% of prompts repeat"
        prose = await client.suggest(session, redacted)
        assert len(prose.items) == 1
        assert prose.items[0].rationale.startswith("Caching the prefix would help most")
        assert prose.items[0].expected_savings_pct is None
        assert "not available (redacted)" in fake.bodies[0]["messages"][0]["content"]
        assert "Mean quality score: not reported" in fake.bodies[0]["messages"][0]["content"]

    serve(scenario)


def test_parse_suggestions_edge_cases() -> None:
    assert parse_suggestions("") == []
    odd = parse_suggestions('[{"title": "", "expected_savings_pct": 250, "change": {"a": 1}}]')
    assert odd[0].title == "Suggestion" and odd[0].expected_savings_pct == 100.0
    assert odd[0].change == '{"a": 1}'
    assert parse_suggestions("[1, 2] then [oops")[0].rationale == "[1, 2] then [oops"


def test_usage_and_cost_totals_after_two_calls() -> None:
    async def scenario(client: AnthropicClient, session: aiohttp.ClientSession,
                       fake: Fake) -> None:
        tokens_in, tokens_out = (sample("integrations_anthropic_tokens_total", kind=kind)
                                 for kind in ("input", "output"))
        dollars = sample("integrations_anthropic_cost_usd_total")
        fake.reply(json.dumps(ITEMS), 1000, 200)
        fake.reply(json.dumps(ITEMS), 3000, 600)
        first = await client.suggest(session, REQUEST)
        assert first.cost_usd == pytest.approx(1000 * 3 / 1e6 + 200 * 15 / 1e6)  # 0.006
        await client.suggest(session, REQUEST)
        usage = client.usage()
        assert usage == {"calls": 2, "errors": 0, "input_tokens": 4000, "output_tokens": 800,
                         "cost_usd": pytest.approx(4000 * 3 / 1e6 + 800 * 15 / 1e6)}  # 0.024
        assert sample("integrations_anthropic_tokens_total", kind="input") - tokens_in == 4000
        assert sample("integrations_anthropic_tokens_total", kind="output") - tokens_out == 800
        assert sample("integrations_anthropic_cost_usd_total") - dollars == pytest.approx(0.024)

    serve(scenario)


def test_rate_limited_and_overloaded_are_transient() -> None:
    async def scenario(client: AnthropicClient, session: aiohttp.ClientSession,
                       fake: Fake) -> None:
        fake.fail(429, "rate_limit_error", "Number of request tokens has exceeded your limit.",
                  {"retry-after": "17"})
        fake.fail(529, "overloaded_error", "Overloaded")
        with pytest.raises(TransientError) as limited:
            await client.suggest(session, REQUEST)
        assert limited.value.retry_after == 17.0
        assert "429 rate_limit_error" in str(limited.value)
        with pytest.raises(TransientError) as overloaded:
            await client.suggest(session, REQUEST)
        assert "529 overloaded_error: Overloaded" in str(overloaded.value)
        assert client.usage()["calls"] == 2 and client.usage()["errors"] == 2
        assert KEY not in str(limited.value) + str(overloaded.value)

    serve(scenario)


def test_bad_key_is_permanent_with_error_type_but_not_the_key() -> None:
    async def scenario(client: AnthropicClient, session: aiohttp.ClientSession,
                       fake: Fake) -> None:
        fake.fail(401, "authentication_error", "invalid x-api-key")
        fake.fail(400, "invalid_request_error", f"echoing {KEY} back")
        with pytest.raises(PermanentError) as refused:
            await client.suggest(session, REQUEST)
        assert refused.value.status == 401
        assert "authentication_error: invalid x-api-key" in str(refused.value)
        with pytest.raises(PermanentError) as echoed:
            await client.suggest(session, REQUEST)
        assert echoed.value.status == 400 and "invalid_request_error" in str(echoed.value)
        assert KEY not in str(refused.value) + str(echoed.value)
        assert client.usage()["errors"] == 2

    serve(scenario)


def test_timeout_is_transient() -> None:
    async def scenario(client: AnthropicClient, session: aiohttp.ClientSession,
                       fake: Fake) -> None:
        fake.hang()
        with pytest.raises(TransientError) as slow:
            await client.suggest(session, REQUEST)
        assert "no answer within 0.2 s" in str(slow.value) and KEY not in str(slow.value)
        assert client.usage()["errors"] == 1

    serve(scenario, timeout_s=0.2)


def test_config_errors_name_the_key_and_describe_hides_it(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"integrations\.anthropic\.api_key"):
        AnthropicClient(AnthropicSection(enabled=True), 1.0)
    with pytest.raises(ValueError, match=r"integrations\.anthropic\.base_url"):
        AnthropicClient(AnthropicSection(enabled=True, api_key=KEY, base_url="ftp://x"), 1.0)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    client = AnthropicClient(AnthropicSection(enabled=True, api_key_file=str(key_file)), 1.0)
    assert client.secrets == [KEY]
    assert client.describe() == {"target": "api.anthropic.com", "model": "claude-sonnet-4-5",
                                 "max_tokens": 1024, "api_key": "set"}
    assert AnthropicClient(AnthropicSection(), 1.0).describe()["api_key"] == "not set"
