"""The per-process response cache of the REST API, in process: a cached GET is answered without
the handler for its TTL, but only after authentication; each query has its own entry; a
state-changing call clears it at once; an expired entry is read again; compressed answers of a
cached page stay correct."""
from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from workers.rest_api import response_cache
from workers.rest_api.api_keys import ApiKeyStore
from workers.rest_api.auth import Authenticator, Role
from workers.rest_api.endpoints.plumbing import compression
from workers.rest_api.problems import problem_middleware
from workers.rest_api.response_cache import ResponseCache
from workers.rest_api.routes import Call, RouteTable

from .test_api_keys import MemoryStorage

Scenario = Callable[[TestClient, dict[str, str], dict[str, int]], Awaitable[None]]


def serve(scenario: Scenario, ttl_s: float = 60.0) -> None:
    state = {"value": 0, "reads": 0}

    async def go() -> None:
        table = RouteTable()

        @table.route("GET", "/v1/counter", role=Role.VIEWER, responses={200: dict},
                     cached=True)
        async def read_counter(call: Call) -> dict:
            state["reads"] += 1
            return {"value": state["value"], "pad": call.request.query.get("pad", "") * 800}

        @table.route("POST", "/v1/counter", role=Role.OPERATOR, responses={200: dict})
        async def bump_counter(_call: Call) -> dict:
            state["value"] += 1
            return {"value": state["value"]}

        keys = ApiKeyStore(MemoryStorage())
        _, key = await keys.create("ci", Role.OPERATOR)
        app = web.Application(middlewares=[compression, problem_middleware])
        table.install(app, Authenticator(keys, None), cache=ResponseCache(ttl_s))
        async with TestClient(TestServer(app)) as client:
            await scenario(client, {"Authorization": f"Bearer {key}"}, state)

    asyncio.run(go())


def test_a_cached_read_skips_the_handler_and_a_write_clears_it() -> None:
    async def scenario(client: TestClient, auth: dict[str, str], state: dict[str, int]) -> None:
        for _ in range(3):
            answer = await client.get("/v1/counter", headers=auth)
            assert answer.status == 200 and (await answer.json())["value"] == 0
        assert state["reads"] == 1
        assert (await client.get("/v1/counter?pad=x", headers=auth)).status == 200
        assert state["reads"] == 2  # another query, another entry
        assert (await client.get("/v1/counter")).status == 401  # never served unauthenticated
        assert (await client.post("/v1/counter", headers=auth)).status == 200
        answer = await client.get("/v1/counter", headers=auth)
        assert (await answer.json())["value"] == 1 and state["reads"] == 3

    serve(scenario)


def test_an_expired_entry_is_read_again(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(response_cache.time, "monotonic", lambda: clock[0])

    async def scenario(client: TestClient, auth: dict[str, str], state: dict[str, int]) -> None:
        await client.get("/v1/counter", headers=auth)
        clock[0] += 0.9
        await client.get("/v1/counter", headers=auth)
        assert state["reads"] == 1
        clock[0] += 0.2
        await client.get("/v1/counter", headers=auth)
        assert state["reads"] == 2

    serve(scenario, ttl_s=1.0)


def test_a_zero_ttl_caches_nothing() -> None:
    async def scenario(client: TestClient, auth: dict[str, str], state: dict[str, int]) -> None:
        for _ in range(3):
            await client.get("/v1/counter", headers=auth)
        assert state["reads"] == 3

    serve(scenario, ttl_s=0.0)


def test_compressed_answers_of_a_cached_page_stay_whole() -> None:
    async def scenario(client: TestClient, auth: dict[str, str], state: dict[str, int]) -> None:
        bodies = []
        for _ in range(2):
            answer = await client.get("/v1/counter?pad=ab", auto_decompress=False,
                                      headers={**auth, "Accept-Encoding": "gzip"})
            assert answer.headers["Content-Encoding"] == "gzip"
            bodies.append(gzip.decompress(await answer.read()))
        assert bodies[0] == bodies[1] and b"abab" in bodies[0] and state["reads"] == 1

    serve(scenario)
