"""The route table over a real socket (auth, decoding, problems) and its OpenAPI document."""
from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from openapi_spec_validator import validate

from workers.resilience.ratelimit import TokenBucket
from workers.rest_api.api_keys import ApiKeyStore
from workers.rest_api.auth import Authenticator, Role
from workers.rest_api.openapi import add_docs_routes, build_document
from workers.rest_api.problems import (PROBLEM_CONTENT_TYPE, Problem, problem_middleware,
                                       request_id_middleware)
from workers.rest_api.routes import Call, Reply, RouteTable

from .test_api_keys import MemoryStorage


class Model(msgspec.Struct, forbid_unknown_fields=True):
    model: str
    weight: float = 1.0


class Change(msgspec.Struct, forbid_unknown_fields=True):
    change: Model
    reason: str


class ChangeResult(msgspec.Struct):
    id: str
    model: str


class Item(msgspec.Struct):
    id: str
    name: str


class ListQuery(msgspec.Struct, forbid_unknown_fields=True):
    limit: int = 10
    tag: list[str] = []


class Pong(msgspec.Struct):
    ok: bool


def demo_table() -> RouteTable:
    table = RouteTable()
    items = {"a": Item(id="a", name="first")}

    @table.route("GET", "/v1/ping", role=None, responses={200: Pong}, tags=("meta",))
    async def ping(call: Call) -> Pong:
        """Liveness, public."""
        return Pong(ok=True)

    @table.route("GET", "/v1/items", role=Role.VIEWER, query=ListQuery,
                 responses={200: list[Item]}, tags=("items",))
    async def list_items(call: Call) -> list[Item]:
        """Items, filtered by tag."""
        return [Item(id=str(call.query.limit), name=",".join(call.query.tag))]

    @table.route("GET", "/v1/items/{item_id}", role=Role.VIEWER, responses={200: Item},
                 problems=(404,), tags=("items",))
    async def get_item(call: Call) -> Item:
        """One item."""
        item = items.get(call.params["item_id"])
        if item is None:
            raise Problem(404, "Not Found", f"no item {call.params['item_id']!r}",
                          type_suffix="not-found")
        return item

    @table.route("DELETE", "/v1/items/{item_id}", role=Role.ADMIN, responses={204: None},
                 problems=(404,), tags=("items",))
    async def delete_item(call: Call) -> Reply:
        """Delete an item."""
        return Reply(204)

    @table.route("POST", "/v1/changes", role=Role.OPERATOR, body=Change,
                 responses={201: ChangeResult}, problems=(409,), tags=("changes",))
    async def post_change(call: Call) -> ChangeResult:
        """Propose a change."""
        return ChangeResult(id="c1", model=call.body.change.model)

    @table.route("GET", "/v1/boom", role=None, responses={200: Pong})
    async def boom(call: Call) -> Pong:
        """Fails with an internal error."""
        raise RuntimeError("secret internals: /etc/shadow")

    return table


def test_document_is_valid_openapi_31() -> None:
    doc = build_document(demo_table(), title="Demo", version="1.0")
    validate(doc)
    schemas = doc["components"]["schemas"]
    assert {"Change", "Model", "ChangeResult", "Item", "Pong", "ProblemDetails"} <= set(schemas)
    assert "ListQuery" not in schemas  # spelled out as parameters instead
    assert "$defs" not in json.dumps(doc)
    post = doc["paths"]["/v1/changes"]["post"]
    assert post["requestBody"]["content"]["application/json"]["schema"] == \
        {"$ref": "#/components/schemas/Change"}
    assert {"201", "400", "401", "403", "409", "413", "415", "422", "429", "503"} == \
        set(post["responses"])
    assert post["x-required-role"] == "operator"
    assert post["security"] == [{"bearerAuth": []}, {"apiKeyAuth": []}]
    ping = doc["paths"]["/v1/ping"]["get"]
    assert ping["security"] == [] and set(ping["responses"]) == {"200", "503"}
    listing = doc["paths"]["/v1/items"]["get"]
    assert [(p["name"], p["in"], p["required"]) for p in listing["parameters"]] == \
        [("limit", "query", False), ("tag", "query", False)]
    assert listing["responses"]["200"]["content"]["application/json"]["schema"] == \
        {"type": "array", "items": {"$ref": "#/components/schemas/Item"}}
    item = doc["paths"]["/v1/items/{item_id}"]
    assert item["get"]["parameters"][0] == {"name": "item_id", "in": "path", "required": True,
                                            "schema": {"type": "string"}}
    assert "content" not in item["delete"]["responses"]["204"]
    assert set(doc["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyAuth"}
    problem = doc["components"]["responses"]["Unauthorized"]["content"][PROBLEM_CONTENT_TYPE]
    assert problem["schema"] == {"$ref": "#/components/schemas/ProblemDetails"}


def test_a_route_is_declared_once() -> None:
    table = demo_table()

    async def ping(call: Call) -> None:
        return None

    with pytest.raises(ValueError, match="ping"):
        table.route("GET", "/v1/other", role=None, responses={200: None})(ping)

    async def other(call: Call) -> None:
        return None

    with pytest.raises(ValueError, match="twice"):
        table.route("GET", "/v1/items/{x}", role=None, responses={200: None})(other)


Scenario = Callable[[TestClient, dict[str, str]], Awaitable[None]]


def serve(scenario: Scenario, limiter: TokenBucket | None = None) -> None:
    """Run the scenario against the demo API on a real socket, with a key per role."""
    async def go() -> None:
        store = ApiKeyStore(MemoryStorage())
        keys = {role.value: (await store.create(role.value, role))[1] for role in Role}
        table = demo_table()
        app = web.Application(middlewares=[request_id_middleware, problem_middleware],
                              client_max_size=4096)
        table.install(app, Authenticator(store, None), limiter)
        add_docs_routes(app, table, title="Demo", version="1.0")
        async with TestClient(TestServer(app)) as client:
            await scenario(client, keys)
    asyncio.run(go())


async def problem_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == PROBLEM_CONTENT_TYPE
    body = await response.json(content_type=PROBLEM_CONTENT_TYPE)
    assert body["status"] == status and body["title"] and body["detail"]
    assert body["request_id"] == response.headers["X-Request-Id"]
    return body


def key(value: str) -> dict[str, str]:
    return {"X-API-Key": value}


def test_bodies_are_decoded_into_the_declared_type() -> None:
    async def scenario(client: TestClient, keys: dict[str, str]) -> None:
        ok = await client.post("/v1/changes", headers=key(keys["operator"]),
                               json={"change": {"model": "gpt-x"}, "reason": "cheaper"})
        assert ok.status == 201 and await ok.json() == {"id": "c1", "model": "gpt-x"}
        bad = await client.post("/v1/changes", headers=key(keys["operator"]),
                                json={"change": {"model": 1}, "reason": "r"})
        body = await problem_of(bad, 422)
        assert body["path"] == "change.model" and "change.model" in body["detail"]
        missing = await client.post("/v1/changes", headers=key(keys["admin"]),
                                    json={"change": {}, "reason": "r"})
        assert (await problem_of(missing, 422))["path"] == "change.model"
        unknown = await client.post("/v1/changes", headers=key(keys["admin"]),
                                    json={"change": {"model": "m", "x": 1}, "reason": "r"})
        assert (await problem_of(unknown, 422))["path"] == "change.x"
        broken = await client.post("/v1/changes", headers={**key(keys["admin"]),
                                                           "Content-Type": "application/json"},
                                   data=b"{not json")
        await problem_of(broken, 400)
        text = await client.post("/v1/changes", headers=key(keys["admin"]), data=b"hi")
        await problem_of(text, 415)
        large = await client.post("/v1/changes", headers={**key(keys["admin"]),
                                                          "Content-Type": "application/json"},
                                  data=b" " * 10_000)
        await problem_of(large, 413)
    serve(scenario)


def test_queries_are_decoded_into_the_declared_type() -> None:
    async def scenario(client: TestClient, keys: dict[str, str]) -> None:
        ok = await client.get("/v1/items?limit=3&tag=a&tag=b", headers=key(keys["viewer"]))
        assert await ok.json() == [{"id": "3", "name": "a,b"}]
        one = await client.get("/v1/items?tag=a", headers=key(keys["viewer"]))
        assert await one.json() == [{"id": "10", "name": "a"}]
        bad = await client.get("/v1/items?limit=many", headers=key(keys["viewer"]))
        assert (await problem_of(bad, 422))["path"] == "limit"
        unknown = await client.get("/v1/items?colour=red", headers=key(keys["viewer"]))
        assert (await problem_of(unknown, 422))["path"] == "colour"
    serve(scenario)


def test_authentication_and_roles() -> None:
    async def scenario(client: TestClient, keys: dict[str, str]) -> None:
        anonymous = await client.get("/v1/items")
        body = await problem_of(anonymous, 401)
        assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
        assert body["type"].endswith("credentials-missing")
        wrong = await client.get("/v1/items", headers={"Authorization": "Bearer llmo_nope"})
        assert (await problem_of(wrong, 401))["type"].endswith("api-key-invalid")
        viewer = await client.post("/v1/changes", headers=key(keys["viewer"]),
                                   json={"change": {"model": "m"}, "reason": "r"})
        assert "operator" in (await problem_of(viewer, 403))["detail"]
        operator = await client.delete("/v1/items/a", headers=key(keys["operator"]))
        assert "admin" in (await problem_of(operator, 403))["detail"]
        admin = await client.delete("/v1/items/a", headers=key(keys["admin"]))
        assert admin.status == 204 and await admin.read() == b""
        public = await client.get("/v1/ping")
        assert public.status == 200 and await public.json() == {"ok": True}
    serve(scenario)


def test_problem_shapes(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(client: TestClient, keys: dict[str, str]) -> None:
        missing = await client.get("/v1/items/zz", headers=key(keys["viewer"]))
        body = await problem_of(missing, 404)
        assert body["type"] == "urn:llm-optimizer:problem:not-found"
        assert body["instance"] == "/v1/items/zz"
        no_route = await client.get("/v1/nowhere")
        assert (await problem_of(no_route, 404))["type"] == "about:blank"
        method = await client.put("/v1/ping")
        await problem_of(method, 405)
        assert "GET" in method.headers["Allow"]
        with caplog.at_level(logging.ERROR, logger="workers.rest_api"):
            boom = await client.get("/v1/boom", headers={"X-Request-Id": "req-42"})
        body = await problem_of(boom, 500)
        assert boom.headers["X-Request-Id"] == "req-42" and "req-42" in body["detail"]
        assert "secret" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
        assert "req-42" in caplog.text and "secret internals" in caplog.text
        odd = await client.get("/v1/ping", headers={"X-Request-Id": "x" * 500})
        assert odd.status == 200 and len(odd.headers["X-Request-Id"]) == 32
    serve(scenario)


def test_rate_limit_answers_429_with_retry_after() -> None:
    bucket = TokenBucket(rate=0.5, capacity=2, clock=lambda: 0.0)

    async def scenario(client: TestClient, keys: dict[str, str]) -> None:
        for _ in range(2):
            assert (await client.get("/v1/items", headers=key(keys["viewer"]))).status == 200
        limited = await client.get("/v1/items", headers=key(keys["viewer"]))
        body = await problem_of(limited, 429)
        assert limited.headers["Retry-After"] == "2" and body["retry_after"] == 2
        # the budget is per credential
        assert (await client.get("/v1/items", headers=key(keys["admin"]))).status == 200
    serve(scenario, bucket)


def test_docs_are_served() -> None:
    async def scenario(client: TestClient, keys: dict[str, str]) -> None:
        document = await (await client.get("/openapi.json")).json()
        validate(document)
        page = await client.get("/docs")
        assert page.content_type == "text/html"
        text = await page.text()
        assert "/v1/changes" in text and "operator" in text and "<script" not in text
    serve(scenario)
