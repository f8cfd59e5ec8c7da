"""Local fakes of the Jira and GitHub REST APIs that check every request (method, path, auth,
version headers, JSON shape), keep the issues in memory, and can answer scripted failures or
hold an answer; shared by the client tests and the integrations service tests."""
from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

TOKEN = "tok-s3cr3t-0123456789"
TRANSITIONS = {"21": "In Progress", "31": "Done"}
Scripted = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Fake:
    """What both fakes share: auth check, scripted failures, request log, a held answer."""

    def __init__(self, expected_auth: str) -> None:
        self.expected_auth = expected_auth
        self.scripted: list[Scripted] = []
        self.requests: list[tuple[str, str]] = []
        self.release = asyncio.Event()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append((request.method, request.path_qs))
        auth = request.headers.get("Authorization", "")
        if auth != self.expected_auth:
            # Echoes the credentials it got, as some servers do: the client must redact them.
            return web.json_response({"message": f"Bad credentials: {auth}"}, status=401)
        if self.scripted:
            return await self.scripted.pop(0)(request)
        if request.method in ("POST", "PUT"):
            assert request.content_type == "application/json"
        return await handler(request)

    async def hold(self, _request: web.Request) -> web.StreamResponse:
        await self.release.wait()
        return web.json_response({})


class FakeJira(Fake):
    """Jira REST v2 (Server, under a context path) or v3 (Cloud: ADF, /search/jql)."""

    def __init__(self, version: int, prefix: str, expected_auth: str) -> None:
        super().__init__(expected_auth)
        self.version = version
        self.issues: dict[str, dict[str, Any]] = {}
        self.comments: dict[str, list[Any]] = {}
        self.app = web.Application(middlewares=[self.middleware])
        api = f"{prefix}/rest/api/{version}"
        search = "search/jql" if version == 3 else "search"
        self.app.router.add_get(f"{api}/{search}", self.search)
        self.app.router.add_post(f"{api}/issue", self.create)
        self.app.router.add_put(f"{api}/issue/{{key}}", self.edit)
        self.app.router.add_post(f"{api}/issue/{{key}}/comment", self.comment)
        self.app.router.add_get(f"{api}/issue/{{key}}/transitions", self.transitions)
        self.app.router.add_post(f"{api}/issue/{{key}}/transitions", self.transit)

    def check_text(self, value: Any) -> None:
        if self.version == 2:
            assert isinstance(value, str)
            return
        assert value["type"] == "doc" and value["version"] == 1
        for node in value["content"]:
            assert node["type"] in ("paragraph", "table")

    async def search(self, request: web.Request) -> web.Response:
        assert request.query["maxResults"] == "1"
        assert set(request.query["fields"].split(",")) >= {"key"}
        match = re.fullmatch(r'labels\s*=\s*"([^"]+)"', request.query["jql"])
        assert match, request.query["jql"]
        hits = [{"id": str(n), "key": key,
                 "fields": {"status": {"name": issue["status"]}}}
                for n, (key, issue) in enumerate(self.issues.items())
                if match[1] in issue["labels"]][:1]
        return web.json_response({"issues": hits} if self.version == 3 else
                                 {"startAt": 0, "maxResults": 1, "total": len(hits),
                                  "issues": hits})

    async def create(self, request: web.Request) -> web.Response:
        fields = (await request.json())["fields"]
        assert fields["project"] == {"key": "OPS"} and fields["issuetype"] == {"name": "Task"}
        assert isinstance(fields["summary"], str) and 0 < len(fields["summary"]) <= 255
        assert all(isinstance(label, str) and " " not in label for label in fields["labels"])
        self.check_text(fields["description"])
        key = f"OPS-{len(self.issues) + 1}"
        self.issues[key] = {**fields, "status": "To Do"}
        return web.json_response({"id": "1000", "key": key, "self": f"/issue/{key}"},
                                 status=201)

    async def edit(self, request: web.Request) -> web.Response:
        update = (await request.json())["update"]
        for op in update["labels"]:
            self.issues[request.match_info["key"]]["labels"].append(op["add"])
        return web.Response(status=204)

    async def comment(self, request: web.Request) -> web.Response:
        body = (await request.json())["body"]
        self.check_text(body)
        self.comments.setdefault(request.match_info["key"], []).append(body)
        return web.json_response({"id": "1"}, status=201)

    async def transitions(self, _request: web.Request) -> web.Response:
        return web.json_response({"transitions": [{"id": tid, "name": name}
                                                  for tid, name in TRANSITIONS.items()]})

    async def transit(self, request: web.Request) -> web.Response:
        chosen = (await request.json())["transition"]
        assert set(chosen) == {"id"}
        self.issues[request.match_info["key"]]["status"] = TRANSITIONS[chosen["id"]]
        return web.Response(status=204)


class FakeGithub(Fake):
    """GitHub's issues API, served under /api/v3 as GitHub Enterprise does."""

    def __init__(self) -> None:
        super().__init__(f"Bearer {TOKEN}")
        self.issues: list[dict[str, Any]] = []
        self.comments: dict[int, list[str]] = {}
        self.app = web.Application(middlewares=[self.version_check, self.middleware])
        repo = "/api/v3/repos/acme/llm-app/issues"
        self.app.router.add_get(repo, self.list)
        self.app.router.add_post(repo, self.create)
        self.app.router.add_post(repo + "/{n}/comments", self.comment)
        self.app.router.add_post(repo + "/{n}/labels", self.label)

    @web.middleware
    async def version_check(self, request: web.Request, handler: Any) -> web.StreamResponse:
        assert request.headers["Accept"] == "application/vnd.github+json"
        assert request.headers["X-GitHub-Api-Version"] == "2022-11-28"
        assert request.headers["User-Agent"] == "llm-auto-optimizer"
        return await handler(request)

    def view(self, issue: dict[str, Any]) -> dict[str, Any]:
        return {**issue, "labels": [{"name": name} for name in issue["labels"]],
                "html_url": f"https://github.test/acme/llm-app/issues/{issue['number']}"}

    async def list(self, request: web.Request) -> web.Response:
        assert request.query["state"] == "all" and request.query["per_page"] == "1"
        wanted = request.query["labels"]
        hits = [self.view(i) for i in reversed(self.issues) if wanted in i["labels"]]
        return web.json_response(hits[:1])

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        assert set(body) == {"title", "body", "labels"}
        assert isinstance(body["title"], str) and isinstance(body["body"], str)
        issue = {**body, "number": len(self.issues) + 1, "state": "open"}
        self.issues.append(issue)
        return web.json_response(self.view(issue), status=201)

    async def comment(self, request: web.Request) -> web.Response:
        body = await request.json()
        assert set(body) == {"body"}
        self.comments.setdefault(int(request.match_info["n"]), []).append(body["body"])
        return web.json_response({"id": 1, "body": body["body"]}, status=201)

    async def label(self, request: web.Request) -> web.Response:
        labels = (await request.json())["labels"]
        issue = self.issues[int(request.match_info["n"]) - 1]
        issue["labels"] += labels
        return web.json_response([{"name": name} for name in issue["labels"]])
