"""The REST API's HTTP middlewares in process: in-flight bound and timeout (503 with
Retry-After), CORS, brotli/gzip negotiation, per-route metrics, storage failures as 503,
bearer tokens refused when no JWT issuer is configured, and rate-limit budgets shared through
Redis."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import brotli
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import REGISTRY

from ipc import storage as s
from ipc.config import RestApiSection
from workers.resilience.ratelimit import RateLimited, SlidingWindowLimiter
from workers.rest_api.api_keys import ApiKeyStore
from workers.rest_api.auth import Authenticator, Role
from workers.rest_api.endpoints.plumbing import (compression, make_cors, make_limits,
                                                 storage_problems)
from workers.rest_api.endpoints.server import make_limiter
from workers.rest_api.problems import problem_middleware, request_id_middleware
from workers.rest_api.routes import Call, RouteTable

from .test_api_keys import MemoryStorage

Scenario = Callable[[TestClient], Awaitable[None]]


def serve(scenario: Scenario, *, max_in_flight: int = 10, timeout_s: float = 5.0) -> None:
    release = asyncio.Event()

    async def slow(_request: web.Request) -> web.Response:
        await release.wait()
        return web.json_response({"ok": True})

    async def big(_request: web.Request) -> web.Response:
        return web.json_response({"text": "abc" * 2000})

    async def down(_request: web.Request) -> web.Response:
        raise s.Unavailable("storage is down")

    async def go() -> None:
        app = web.Application(middlewares=[
            request_id_middleware, make_cors(["https://ok.test"]), compression,
            make_limits(max_in_flight, timeout_s), problem_middleware, storage_problems])
        app.router.add_get("/slow", slow)
        app.router.add_get("/big/{n}", big)
        app.router.add_get("/down", down)
        table = RouteTable()

        @table.route("GET", "/v1/thing", role=Role.VIEWER, responses={200: None})
        async def thing(_call: Call) -> None:
            return None

        table.install(app, Authenticator(ApiKeyStore(MemoryStorage()), None))
        async with TestClient(TestServer(app)) as client:
            client.release = release
            await scenario(client)
            release.set()

    asyncio.run(go())


def test_in_flight_bound_answers_503_with_retry_after() -> None:
    async def scenario(client: TestClient) -> None:
        first = asyncio.create_task(client.get("/slow"))
        await asyncio.sleep(0.1)
        answer = await client.get("/big/1")
        assert answer.status == 503 and answer.headers["Retry-After"] == "1"
        assert (await answer.json())["type"].endswith("overloaded")
        client.release.set()
        assert (await first).status == 200
        assert (await client.get("/big/1")).status == 200

    serve(scenario, max_in_flight=1)


def test_request_timeout_answers_503() -> None:
    async def scenario(client: TestClient) -> None:
        answer = await client.get("/slow")
        assert answer.status == 503 and (await answer.json())["type"].endswith("timeout")

    serve(scenario, timeout_s=0.2)


def test_compression_cors_metrics_and_storage_problems() -> None:
    async def scenario(client: TestClient) -> None:
        answer = await client.get("/big/1", headers={"Accept-Encoding": "gzip, br;q=0.9"},
                                  auto_decompress=False)
        assert answer.headers["Content-Encoding"] == "br"
        assert b"abcabc" in brotli.decompress(await answer.read())
        answer = await client.get("/big/1", headers={"Accept-Encoding": "gzip, br;q=0"})
        assert answer.headers["Content-Encoding"] == "gzip"
        answer = await client.get("/big/1", headers={"Accept-Encoding": "identity"})
        assert "Content-Encoding" not in answer.headers
        answer = await client.options("/big/1", headers={
            "Origin": "https://ok.test", "Access-Control-Request-Method": "GET"})
        assert answer.status == 204
        assert answer.headers["Access-Control-Allow-Origin"] == "https://ok.test"
        answer = await client.get("/big/1", headers={"Origin": "https://no.test"})
        assert "Access-Control-Allow-Origin" not in answer.headers
        answer = await client.get("/down")
        assert answer.status == 503 and answer.headers["Retry-After"] == "1"
        answer = await client.get("/v1/thing", headers={"Authorization": "Bearer a.b.c"})
        assert answer.status == 401
        assert (await answer.json())["type"].endswith("jwt-disabled")

    serve(scenario)
    count = REGISTRY.get_sample_value("rest_api_requests_total", {
        "route": "/big/{n}", "method": "GET", "status": "200"})
    assert count is not None and count >= 3
    assert REGISTRY.get_sample_value("rest_api_requests_total", {
        "route": "/down", "method": "GET", "status": "503"}) >= 1


def test_rate_limit_budget_is_shared_through_redis(redis_url: str) -> None:  # noqa: F811
    """``rate_limit_storage = "redis://..."``: two processes spend one budget per key."""
    section = RestApiSection(rate_limit_per_s=1.0, rate_limit_burst=3,
                             rate_limit_storage=redis_url)

    async def scenario() -> None:
        first, second = make_limiter(section), make_limiter(section)
        assert isinstance(first, SlidingWindowLimiter)
        try:
            for limiter in (first, second, first):
                await limiter.acquire("key:shared")
            with pytest.raises(RateLimited) as caught:
                await second.acquire("key:shared")
            assert 0 < caught.value.retry_after <= 3
            await second.acquire("key:other")
        finally:
            await first.close()
            await second.close()

    asyncio.run(scenario())
