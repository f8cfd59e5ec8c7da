"""Jira issues for optimizer events, on Jira Cloud (REST v3) or Server/Data Center (REST v2).

API version: ``api_version`` picks v3 for Atlassian's cloud hosts (``*.atlassian.net``,
``*.jira.com``, the ``api.atlassian.com`` gateway) and v2 for any other host. v3 wants rich text
in the Atlassian Document Format (ADF); v2 takes a plain string (rendered as wiki markup).
Search is ``GET /rest/api/3/search/jql`` on Cloud (the older ``/rest/api/3/search`` answers
410 Gone since 2025) and ``GET /rest/api/2/search`` on Server.

Idempotency rests on labels, which Jira can search, so it survives restarts and lost answers:

* every issue gets ``llmo-<sha256(note.key)[:20]>``; ``deliver`` first searches for it and
  returns the issue found instead of creating a second one;
* an issue about an optimization also gets ``llmo-subject-<sha256(subject_id)[:20]>``; a later
  ``promoted`` or ``rolled_back`` note of the same subject becomes a comment on that issue
  (plus the ``transition_on_promoted`` transition when promoted), after which the issue gets the
  note's label too, so that redelivering the note finds it and does not comment twice. A crash
  between the comment and the label can still repeat the comment (at least once, never lost).
"""
from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp

from ipc.config import JiraSection
from workers.integrations import http
from workers.integrations.http import PermanentError, redact
from workers.integrations.notification import (FOLLOW_UPS, Notification, issue_labels,
                                                note_label, subject_label)
from workers.integrations.secrets import SecretError, read_secret, shown
from workers.resilience.retry import TransientError

MAX_SUMMARY = 255          # Jira's limit on the summary field
MAX_DESCRIPTION = 32_000   # Jira refuses text fields beyond 32 767 characters
CLOUD_SUFFIXES = (".atlassian.net", ".jira.com")


def api_version(base_url: str) -> int:
    """3 for Jira Cloud (by host name), 2 for Server/Data Center."""
    host = (urlsplit(base_url).hostname or "").lower()
    return 3 if host.endswith(CLOUD_SUFFIXES) or host == "api.atlassian.com" else 2





def _plain(text: str, fields: Mapping[str, str]) -> str:
    lines = [text] if text else []
    if fields:
        lines += [""] + [f"* {name}: {value}" for name, value in fields.items()]
    return "\n".join(lines)[:MAX_DESCRIPTION]


def _adf_paragraph(text: str) -> dict[str, Any]:
    # ADF refuses empty text nodes: an empty paragraph has no content instead.
    return {"type": "paragraph", "content": [{"type": "text", "text": text}] if text else []}


def _adf_cell(kind: str, text: str) -> dict[str, Any]:
    return {"type": kind, "content": [_adf_paragraph(text)]}


def _adf(text: str, fields: Mapping[str, str]) -> dict[str, Any]:
    """A Cloud rich-text document: a paragraph per line, then the fields as a table."""
    content = [_adf_paragraph(line) for line in text[:MAX_DESCRIPTION].splitlines()
               if line.strip()]
    if fields:
        rows = [{"type": "tableRow", "content": [_adf_cell("tableHeader", "Field"),
                                                 _adf_cell("tableHeader", "Value")]}]
        rows += [{"type": "tableRow", "content": [_adf_cell("tableCell", name),
                                                  _adf_cell("tableCell", value)]}
                 for name, value in fields.items()]
        content.append({"type": "table", "content": rows})
    return {"type": "doc", "version": 1, "content": content}


class JiraClient:
    """Opens, finds, comments and transitions Jira issues; one HTTP attempt per request."""

    name = "jira"

    def __init__(self, section: JiraSection, timeout_s: float) -> None:
        self.section = section
        self.timeout_s = timeout_s
        self.base_url = section.base_url.rstrip("/")
        self.version = api_version(self.base_url)
        self._token = read_secret("integrations.jira.api_token", section.api_token,
                                  section.api_token_file)
        if section.enabled:
            for key in ("base_url", "project", "issue_type"):
                if not getattr(section, key):
                    raise ValueError(f"integrations.jira.{key} is empty")
            if not self._token:
                raise SecretError("integrations.jira.api_token is empty: set it or "
                                  "integrations.jira.api_token_file")
            spaced = [label for label in section.labels if not label or " " in label]
            if spaced:
                raise ValueError(f"integrations.jira.labels: Jira labels cannot be empty or "
                                 f"hold spaces: {spaced}")
        # Basic auth is encoded here: aiohttp 3.14 deprecates its BasicAuth helper.
        self._basic = base64.b64encode(f"{section.email}:{self._token}".encode()).decode() \
            if section.email else ""
        self._headers = {"Accept": "application/json", "Authorization":
                         f"Basic {self._basic}" if section.email else f"Bearer {self._token}"}

    @property
    def secrets(self) -> list[str]:
        # The token, and the same in the encoded form basic auth sends, should a server echo it.
        return [s for s in (self._token, self._basic) if s]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "enabled": self.section.enabled, "target": self.base_url,
                "api": f"v{self.version}", "project": self.section.project,
                "auth": "basic" if self.section.email else "bearer",
                "api_token": shown(self._token)}

    def _url(self, path: str) -> str:
        return f"{self.base_url}/rest/api/{self.version}/{path}"

    def _document(self, text: str, fields: Mapping[str, str]) -> str | dict[str, Any]:
        return _adf(text, fields) if self.version == 3 else _plain(text, fields)

    async def _call(self, session: aiohttp.ClientSession, method: str, path: str,
                    json: Any = None) -> Any:
        try:
            return await http.call(session, method, self._url(path), json=json,
                                   headers=self._headers, timeout_s=self.timeout_s)
        except TransientError as exc:
            raise TransientError(redact(str(exc), self.secrets), exc.retry_after) from None
        except PermanentError as exc:
            raise PermanentError(redact(str(exc), self.secrets), exc.status) from None

    def _answer(self, key: str, action: str) -> dict[str, Any]:
        return {"issue": key, "url": f"{self.base_url}/browse/{key}", "action": action}

    async def find_issue(self, session: aiohttp.ClientSession,
                         label: str) -> dict[str, Any] | None:
        """The first issue carrying ``label`` (``key`` and ``fields.status``), or None."""
        search = "search/jql" if self.version == 3 else "search"
        query = urlencode({"jql": f'labels = "{label}"', "maxResults": "1",
                           "fields": "key,status"}, quote_via=quote)
        found = await self._call(session, "GET", f"{search}?{query}")
        issues = (found or {}).get("issues") or []
        return issues[0] if issues else None

    async def comment(self, session: aiohttp.ClientSession, issue_key: str, text: str,
                      fields: Mapping[str, str] | None = None) -> dict[str, Any]:
        return await self._call(session, "POST", f"issue/{issue_key}/comment",
                                {"body": self._document(text, fields or {})})

    async def transition(self, session: aiohttp.ClientSession, issue_key: str,
                         name: str) -> None:
        """Applies the transition called ``name`` (any case) if the issue's workflow offers it
        now; PermanentError naming the transitions offered otherwise."""
        offered = (await self._call(session, "GET", f"issue/{issue_key}/transitions") or {}) \
            .get("transitions", [])
        chosen = next((t for t in offered if str(t.get("name", "")).lower() == name.lower()),
                      None)
        if chosen is None:
            names = ", ".join(str(t.get("name")) for t in offered) or "none"
            raise PermanentError(f"Jira issue {issue_key} has no transition {name!r} now "
                                 f"(available: {names})", 409)
        await self._call(session, "POST", f"issue/{issue_key}/transitions",
                         {"transition": {"id": chosen["id"]}})

    async def _add_label(self, session: aiohttp.ClientSession, issue_key: str,
                         label: str) -> None:
        await self._call(session, "PUT", f"issue/{issue_key}",
                         {"update": {"labels": [{"add": label}]}})

    async def _follow_up(self, session: aiohttp.ClientSession, issue: dict[str, Any],
                         note: Notification, label: str) -> dict[str, Any]:
        key = issue["key"]
        await self.comment(session, key, f"{note.title}\n{note.text}", note.fields)
        target = self.section.transition_on_promoted
        status = str(((issue.get("fields") or {}).get("status") or {}).get("name", ""))
        if note.kind == "promoted" and target and status.lower() != target.lower():
            try:
                await self.transition(session, key, target)
            except PermanentError as exc:
                raise PermanentError(f"integrations.jira.transition_on_promoted = {target!r}: "
                                     f"{exc}", exc.status) from None
        await self._add_label(session, key, label)
        return self._answer(key, "commented")

    async def deliver(self, session: aiohttp.ClientSession,
                      note: Notification) -> dict[str, Any]:
        """The issue of ``note``: found by its label, a comment on its subject's issue for a
        follow-up, or created (see the module docstring)."""
        label = note_label(note.key)
        found = await self.find_issue(session, label)
        if found is not None:
            return self._answer(found["key"], "found")
        if note.kind in FOLLOW_UPS and note.subject_id:
            subject = await self.find_issue(session, subject_label(note.subject_id))
            if subject is not None:
                return await self._follow_up(session, subject, note, label)
        labels = issue_labels(self.section.labels, note)
        fields = {"project": {"key": self.section.project},
                  "issuetype": {"name": self.section.issue_type},
                  "summary": " ".join(note.title.split())[:MAX_SUMMARY] or note.kind,
                  "description": self._document(note.text, note.fields),
                  "labels": labels}
        created = await self._call(session, "POST", "issue", {"fields": fields})
        return self._answer(created["key"], "created")
