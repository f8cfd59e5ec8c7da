"""The Jira and GitHub clients against local fakes of both APIs that check every request
(method, path, auth, version headers, JSON shape) and keep the issues in memory: creation,
idempotent redelivery (what the outbox relies on after a crash), follow-up comments and
transitions, rate limits, server errors, timeouts, refused tokens, and secrets kept out of
errors and status."""
from __future__ import annotations

import asyncio
import base64
import re
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from ipc.config import GithubSection, JiraSection
from workers.integrations.github import GithubClient
from workers.integrations.http import PermanentError
from workers.integrations.jira import JiraClient, api_version
from workers.integrations.notification import Notification, note_label, subject_label
from workers.integrations.secrets import SecretError
from workers.resilience.retry import TransientError

from .fakes import TOKEN, Fake, FakeGithub, FakeJira, Scripted

EMAIL = "bot@acme.test"


def note(key: str = "evt-1", kind: Any = "proposal_created", subject: str = "opt-7",
         title: str = "Proposal for chat-api") -> Notification:
    return Notification(key=key, kind=kind, severity="warning", title=title,
                        text="Switch to a smaller model.\nSaves 30 %.", service="chat-api",
                        subject_id=subject, fields={"Service": "chat-api", "Saving": "30 % | $4"})


class ToLoopback(AbstractResolver):
    """Resolves every host to 127.0.0.1, so that a fake answers for acme.atlassian.net."""

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        return [{"hostname": host, "host": "127.0.0.1", "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        return None


def run(fake_of: Callable[[], Fake],
        scenario: Callable[[Any, aiohttp.ClientSession, int], Awaitable[None]]) -> None:
    async def go() -> None:
        fake = fake_of()
        server = TestServer(fake.app, host="127.0.0.1")
        await server.start_server()
        try:
            connector = aiohttp.TCPConnector(resolver=ToLoopback())
            async with aiohttp.ClientSession(connector=connector) as session:
                await scenario(fake, session, server.port)
        finally:
            fake.release.set()
            await server.close()

    asyncio.run(go())


def jira_v2(port: int, token: str = TOKEN, **overrides: Any) -> JiraClient:
    section = JiraSection(enabled=True, base_url=f"http://127.0.0.1:{port}/jira", project="OPS",
                          api_token=token, **overrides)
    return JiraClient(section, timeout_s=2.0)


def jira_v3(port: int, token: str = TOKEN, **overrides: Any) -> JiraClient:
    section = JiraSection(enabled=True, base_url=f"http://acme.atlassian.net:{port}",
                          project="OPS", email=EMAIL, api_token=token, **overrides)
    return JiraClient(section, timeout_s=2.0)


def basic() -> str:
    return "Basic " + base64.b64encode(f"{EMAIL}:{TOKEN}".encode()).decode()


FLAVOURS = {"v2-bearer": (lambda: FakeJira(2, "/jira", f"Bearer {TOKEN}"), jira_v2),
            "v3-basic": (lambda: FakeJira(3, "", basic()), jira_v3)}


@pytest.mark.parametrize(("url", "version"), [
    ("https://acme.atlassian.net", 3), ("https://ACME.atlassian.net:443/", 3),
    ("https://legacy.jira.com", 3), ("https://api.atlassian.com/ex/jira/1234", 3),
    ("https://jira.acme.com/jira", 2), ("http://127.0.0.1:8080", 2),
    ("https://atlassian.net.evil.test", 2)])
def test_api_version_by_host(url: str, version: int) -> None:
    assert api_version(url) == version


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_jira_creates_once_and_finds_it_again(flavour: str) -> None:
    fake_of, client_of = FLAVOURS[flavour]

    async def scenario(fake: FakeJira, session: aiohttp.ClientSession, port: int) -> None:
        client = client_of(port)
        made = await client.deliver(session, note(title="x" * 300))
        assert made["issue"] == "OPS-1" and made["action"] == "created"
        assert made["url"] == f"{client.base_url}/browse/OPS-1"
        issue = fake.issues["OPS-1"]
        assert len(issue["summary"]) == 255
        assert issue["labels"] == ["llm-optimizer", note_label("evt-1"), subject_label("opt-7")]
        assert re.fullmatch(r"llmo-[0-9a-f]{20}", note_label("evt-1"))
        if fake.version == 3:
            table = issue["description"]["content"][-1]
            assert table["type"] == "table" and len(table["content"]) == 3
            cell = table["content"][2]["content"][1]["content"][0]["content"][0]
            assert cell == {"type": "text", "text": "30 % | $4"}
        else:
            assert issue["description"].startswith("Switch to a smaller model.")
            assert "* Saving: 30 % | $4" in issue["description"]
        # A redelivery (the outbox after a crash) finds the issue instead of opening another.
        again = await client.deliver(session, note(title="x" * 300))
        assert again == {**made, "action": "found"} and list(fake.issues) == ["OPS-1"]
        posts = [r for r in fake.requests if r[0] == "POST"]
        assert len(posts) == 1
        search = "search/jql" if fake.version == 3 else "search"
        assert fake.requests[0][1].startswith(f"{'/jira' if fake.version == 2 else ''}"
                                              f"/rest/api/{fake.version}/{search}?jql=labels")

    run(fake_of, scenario)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_jira_follow_up_comments_and_transitions_once(flavour: str) -> None:
    fake_of, client_of = FLAVOURS[flavour]

    async def scenario(fake: FakeJira, session: aiohttp.ClientSession, port: int) -> None:
        client = client_of(port, transition_on_promoted="done")
        await client.deliver(session, note())
        promoted = note(key="evt-2", kind="promoted", title="Promoted")
        made = await client.deliver(session, promoted)
        assert made["issue"] == "OPS-1" and made["action"] == "commented"
        assert fake.issues["OPS-1"]["status"] == "Done"
        assert note_label("evt-2") in fake.issues["OPS-1"]["labels"]
        assert len(fake.comments["OPS-1"]) == 1
        again = await client.deliver(session, promoted)
        assert again["action"] == "found" and len(fake.comments["OPS-1"]) == 1
        # Another promotion note of a Done issue comments without asking for the transition.
        await client.deliver(session, note(key="evt-3", kind="promoted", title="Again"))
        assert len(fake.comments["OPS-1"]) == 2
        assert sum(1 for r in fake.requests if r[1].endswith("/transitions")) == 2
        # A rollback of a subject without an issue opens one.
        other = await client.deliver(session, note(key="evt-4", kind="rolled_back",
                                                   subject="opt-8"))
        assert other["issue"] == "OPS-2" and other["action"] == "created"

    run(fake_of, scenario)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_jira_comment_and_unknown_transition(flavour: str) -> None:
    fake_of, client_of = FLAVOURS[flavour]

    async def scenario(fake: FakeJira, session: aiohttp.ClientSession, port: int) -> None:
        client = client_of(port)
        await client.deliver(session, note())
        await client.comment(session, "OPS-1", "Canary at 5 %.")
        body = fake.comments["OPS-1"][0]
        assert body == "Canary at 5 %." if fake.version == 2 else \
            body["content"][0]["content"][0]["text"] == "Canary at 5 %."
        await client.transition(session, "OPS-1", "in progress")
        assert fake.issues["OPS-1"]["status"] == "In Progress"
        with pytest.raises(PermanentError) as caught:
            await client.transition(session, "OPS-1", "Shipped")
        assert "'Shipped'" in str(caught.value) and "In Progress, Done" in str(caught.value)
        # Through deliver, the error names the setting at fault.
        misnamed = client_of(port, transition_on_promoted="Shipped")
        with pytest.raises(PermanentError, match="integrations.jira.transition_on_promoted"):
            await misnamed.deliver(session, note(key="evt-9", kind="promoted"))

    run(fake_of, scenario)


def refuse_with(status: int, **headers: str) -> Scripted:
    async def answer(_request: web.Request) -> web.Response:
        return web.json_response({"message": "no"}, status=status, headers=headers)
    return answer


def timeout_for(fake: Fake, answer: Scripted) -> float:
    """0.2 s for the answer that never comes; else long enough for a loaded machine."""
    return 0.2 if answer == fake.hold else 10.0


def fail_cases(fake: Fake) -> list[tuple[Scripted, float | None, str]]:
    """Answers that must end as TransientError: the retry_after and message each must carry."""
    return [(refuse_with(429, **{"Retry-After": "7"}), 7.0, ": 429 "),
            (refuse_with(503), None, ": 503 "), (refuse_with(500), None, ": 500 "),
            (fake.hold, None, "no answer within 0.2 s")]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_jira_transient_and_permanent_failures(flavour: str) -> None:
    fake_of, client_of = FLAVOURS[flavour]

    async def scenario(fake: FakeJira, session: aiohttp.ClientSession, port: int) -> None:
        client = client_of(port)
        for answer, retry_after, said in fail_cases(fake):
            client.timeout_s = timeout_for(fake, answer)
            fake.scripted.append(answer)
            with pytest.raises(TransientError) as caught:
                await client.deliver(session, note())
            assert caught.value.retry_after == retry_after and said in str(caught.value)
            assert TOKEN not in str(caught.value)
        fake.release.set()
        assert not fake.issues
        wrong = client_of(port, token=TOKEN + "-old")
        with pytest.raises(PermanentError) as refused:
            await wrong.deliver(session, note())
        assert refused.value.status == 401 and "Bad credentials" in str(refused.value)
        for secret in (TOKEN, *wrong.secrets):
            assert secret not in str(refused.value)
            assert secret not in repr(client.describe()) + repr(wrong.describe())
        assert client.describe()["api_token"] == "set"

    run(fake_of, scenario)


def github(port: int, token: str = TOKEN) -> GithubClient:
    section = GithubSection(enabled=True, base_url=f"http://127.0.0.1:{port}/api/v3",
                            repository="acme/llm-app", token=token)
    return GithubClient(section, timeout_s=2.0)


def test_github_opens_once_and_follows_up() -> None:
    async def scenario(fake: FakeGithub, session: aiohttp.ClientSession, port: int) -> None:
        client = github(port)
        made = await client.deliver(session, note())
        assert made == {"issue": 1, "url": "https://github.test/acme/llm-app/issues/1",
                        "action": "created"}
        issue = fake.issues[0]
        assert issue["labels"] == ["llm-optimizer", note_label("evt-1"), subject_label("opt-7")]
        assert issue["title"] == "Proposal for chat-api"
        assert issue["body"].startswith("Switch to a smaller model.\nSaves 30 %.\n\n")
        assert "| Saving | 30 % \\| $4 |" in issue["body"]
        again = await client.deliver(session, note())
        assert again == {**made, "action": "found"} and len(fake.issues) == 1
        assert fake.requests[0] == ("GET", "/api/v3/repos/acme/llm-app/issues?labels="
                                    f"{note_label('evt-1')}&state=all&per_page=1")
        promoted = note(key="evt-2", kind="rolled_back", title="Rolled back")
        follow = await client.deliver(session, promoted)
        assert follow["issue"] == 1 and follow["action"] == "commented"
        assert fake.comments[1][0].startswith("**Rolled back**")
        assert note_label("evt-2") in issue["labels"]
        assert (await client.deliver(session, promoted))["action"] == "found"
        assert len(fake.comments[1]) == 1 and len(fake.issues) == 1
        await client.comment(session, 1, "by hand")
        labels = await client.add_labels(session, 1, ["canary"])
        assert {"name": "canary"} in labels and fake.comments[1][1] == "by hand"

    run(FakeGithub, scenario)


def test_github_rate_limits_and_failures() -> None:
    async def scenario(fake: FakeGithub, session: aiohttp.ClientSession, port: int) -> None:
        client = github(port)
        reset = int(time.time()) + 120
        fake.scripted.append(refuse_with(403, **{"X-RateLimit-Remaining": "0",
                                                 "X-RateLimit-Reset": str(reset)}))
        with pytest.raises(TransientError) as primary:
            await client.deliver(session, note())
        assert primary.value.retry_after is not None
        assert reset - time.time() - 2 <= primary.value.retry_after <= reset - time.time() + 1

        async def secondary(_request: web.Request) -> web.Response:
            return web.json_response({"message": "You have exceeded a secondary rate limit."},
                                     status=403, headers={"X-RateLimit-Remaining": "4000"})
        fake.scripted.append(secondary)
        with pytest.raises(TransientError) as second:
            await client.deliver(session, note())
        assert second.value.retry_after == 60.0
        for answer, retry_after, said in fail_cases(fake):
            client.timeout_s = timeout_for(fake, answer)
            fake.scripted.append(answer)
            with pytest.raises(TransientError) as caught:
                await client.deliver(session, note())
            assert caught.value.retry_after == retry_after and said in str(caught.value)
            assert TOKEN not in str(caught.value)
        fake.release.set()
        client.timeout_s = 10.0
        fake.scripted.append(refuse_with(403))
        with pytest.raises(PermanentError):
            await client.deliver(session, note())
        assert not fake.issues
        wrong = github(port, token=TOKEN + "-old")
        with pytest.raises(PermanentError) as refused:
            await wrong.deliver(session, note())
        assert refused.value.status == 401 and "Bad credentials" in str(refused.value)
        assert TOKEN not in str(refused.value)
        assert TOKEN not in repr(client.describe()) + repr(wrong.describe())
        assert client.describe()["token"] == "set"

    run(FakeGithub, scenario)


def test_incomplete_sections_name_the_key(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match=r"integrations\.jira\.project is empty"):
        JiraClient(JiraSection(enabled=True, base_url="https://acme.atlassian.net",
                               api_token=TOKEN), 1.0)
    with pytest.raises(SecretError, match=r"integrations\.jira\.api_token is empty"):
        JiraClient(JiraSection(enabled=True, base_url="https://x.test", project="OPS"), 1.0)
    with pytest.raises(ValueError, match=r"integrations\.jira\.labels"):
        JiraClient(JiraSection(enabled=True, base_url="https://x.test", project="OPS",
                               api_token=TOKEN, labels=["llm optimizer"]), 1.0)
    with pytest.raises(ValueError, match=r"integrations\.github\.repository is empty"):
        GithubClient(GithubSection(enabled=True, token=TOKEN), 1.0)
    with pytest.raises(SecretError, match=r"integrations\.github\.token is empty"):
        GithubClient(GithubSection(enabled=True, repository="acme/app"), 1.0)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    client = GithubClient(GithubSection(enabled=True, repository="acme/app",
                                        token_file=str(token_file)), 1.0)
    assert client.secrets == [TOKEN] and client.describe()["token"] == "set"
    idle = JiraClient(JiraSection(), 1.0)
    assert idle.describe()["api_token"] == "not set" and idle.secrets == []
