"""GitHub issues for optimizer events (REST API 2022-11-28; GitHub Enterprise through
``base_url``, e.g. ``https://HOST/api/v3``).

Idempotency rests on labels, which the issue list filters by, so it survives restarts and lost
answers, as with Jira: every issue gets ``llmo-<sha256(note.key)[:20]>`` and ``deliver`` lists
the issues carrying it (open or closed) before opening one. An issue about an optimization also
gets ``llmo-subject-<sha256(subject_id)[:20]>``; a later ``promoted`` or ``rolled_back`` note of
the same subject becomes a comment on that issue, which then gets the note's label too (a crash
in between can repeat the comment, never lose it).

Rate limits: ``http.call`` turns 429 and an exhausted primary limit (403 with
``X-RateLimit-Remaining: 0``) into ``TransientError`` waiting for ``Retry-After`` or
``X-RateLimit-Reset``. A secondary rate limit can come as a 403 without those headers; its
message says "rate limit", and GitHub asks for at least a minute's wait then.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from ipc.config import GithubSection
from workers.integrations import http
from workers.integrations.http import PermanentError, redact
from workers.integrations.notification import (FOLLOW_UPS, Notification, issue_labels,
                                                note_label, subject_label)
from workers.integrations.secrets import SecretError, read_secret, shown
from workers.resilience.retry import TransientError

API_VERSION = "2022-11-28"
MAX_TITLE = 256
MAX_BODY = 65_000          # GitHub refuses bodies beyond 65 536 characters
SECONDARY_LIMIT_WAIT_S = 60.0





def _cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def markdown(text: str, fields: Mapping[str, str]) -> str:
    """The text, then the fields as a Markdown table."""
    parts = [text] if text else []
    if fields:
        rows = ["| Field | Value |", "| --- | --- |"]
        rows += [f"| {_cell(name)} | {_cell(value)} |" for name, value in fields.items()]
        parts.append("\n".join(rows))
    return "\n\n".join(parts)[:MAX_BODY]


class GithubClient:
    """Opens, finds, comments on and labels GitHub issues; one HTTP attempt per request."""

    name = "github"

    def __init__(self, section: GithubSection, timeout_s: float) -> None:
        self.section = section
        self.timeout_s = timeout_s
        self.base_url = section.base_url.rstrip("/")
        self._token = read_secret("integrations.github.token", section.token, section.token_file)
        if section.enabled:
            for key in ("base_url", "repository"):
                if not getattr(section, key):
                    raise ValueError(f"integrations.github.{key} is empty")
            if not self._token:
                raise SecretError("integrations.github.token is empty: set it or "
                                  "integrations.github.token_file")
        self._headers = {"Authorization": f"Bearer {self._token}",
                         "Accept": "application/vnd.github+json",
                         "X-GitHub-Api-Version": API_VERSION,
                         "User-Agent": "llm-auto-optimizer"}

    @property
    def secrets(self) -> list[str]:
        return [self._token] if self._token else []

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "enabled": self.section.enabled, "target": self.base_url,
                "repository": self.section.repository, "token": shown(self._token)}

    async def _call(self, session: aiohttp.ClientSession, method: str, path: str,
                    json: Any = None) -> Any:
        url = f"{self.base_url}/repos/{self.section.repository}/{path}"
        try:
            return await http.call(session, method, url, json=json, headers=self._headers,
                                   timeout_s=self.timeout_s)
        except TransientError as exc:
            raise TransientError(redact(str(exc), self.secrets), exc.retry_after) from None
        except PermanentError as exc:
            message = redact(str(exc), self.secrets)
            if exc.status in (403, 429) and "rate limit" in message.lower():
                raise TransientError(message, SECONDARY_LIMIT_WAIT_S) from None
            raise PermanentError(message, exc.status) from None

    async def find_issue(self, session: aiohttp.ClientSession,
                         label: str) -> dict[str, Any] | None:
        """The latest issue (open or closed) carrying ``label``, or None."""
        query = urlencode({"labels": label, "state": "all", "per_page": "1"}, quote_via=quote)
        found = await self._call(session, "GET", f"issues?{query}")
        return found[0] if found else None

    async def comment(self, session: aiohttp.ClientSession, number: int, text: str,
                      fields: Mapping[str, str] | None = None) -> dict[str, Any]:
        return await self._call(session, "POST", f"issues/{number}/comments",
                                {"body": markdown(text, fields or {})})

    async def add_labels(self, session: aiohttp.ClientSession, number: int,
                         labels: list[str]) -> list[dict[str, Any]]:
        """Adds ``labels`` to the issue (GitHub creates unknown ones); its labels after."""
        return await self._call(session, "POST", f"issues/{number}/labels", {"labels": labels})

    @staticmethod
    def _answer(issue: dict[str, Any], action: str) -> dict[str, Any]:
        return {"issue": issue["number"], "url": issue.get("html_url", ""), "action": action}

    async def deliver(self, session: aiohttp.ClientSession,
                      note: Notification) -> dict[str, Any]:
        """The issue of ``note``: found by its label, a comment on its subject's issue for a
        follow-up, or opened (see the module docstring)."""
        label = note_label(note.key)
        found = await self.find_issue(session, label)
        if found is not None:
            return self._answer(found, "found")
        if note.kind in FOLLOW_UPS and note.subject_id:
            subject = await self.find_issue(session, subject_label(note.subject_id))
            if subject is not None:
                await self.comment(session, subject["number"], f"**{note.title}**\n\n{note.text}",
                                   note.fields)
                await self.add_labels(session, subject["number"], [label])
                return self._answer(subject, "commented")
        labels = issue_labels(self.section.labels, note)
        created = await self._call(session, "POST", "issues", {
            "title": " ".join(note.title.split())[:MAX_TITLE] or note.kind,
            "body": markdown(note.text, note.fields), "labels": labels})
        return self._answer(created, "created")
