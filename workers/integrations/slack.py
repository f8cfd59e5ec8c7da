"""Slack: one Block Kit message per notification, POSTed to an incoming webhook.

The message is a header (the title), a section with the text, a section with the fields as a
two-column table and a context line (kind, severity, service); ``text`` is the title again, the
fallback Slack shows in notifications. Slack answers 200 ``ok``; 429 with ``Retry-After`` when
rate limited; 400 ``invalid_payload``, 403 ``invalid_token``, 404 ``no_service``, 410
``channel_is_archived`` and the like for what no retry fixes.

The webhook URL is the credential (whoever has it can post to the channel): only its host is
shown, and its path is taken out of every error message.
"""
from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import aiohttp

from ipc.config import SlackSection
from workers.integrations.http import PermanentError, call, redact
from workers.integrations.notification import Notification
from workers.integrations.secrets import read_secret, shown
from workers.resilience.retry import TransientError

KEY = "integrations.slack.webhook_url"
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost"})
# Block Kit limits (https://api.slack.com/reference/block-kit/blocks).
MAX_HEADER = 150
MAX_SECTION = 3000
MAX_FIELD = 2000
MAX_FIELDS = 10


def escape(text: str) -> str:
    """Slack's mrkdwn escaping: ``&``, ``<`` and ``>`` only (``<...>`` are links/mentions)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _fit(text: str, limit: int, *, escaped: bool) -> str:
    """``text`` cut to ``limit`` characters with an ellipsis, never inside an ``&amp;``-style
    entity when ``escaped``."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 1]
    if escaped:
        amp = cut.rfind("&")
        if amp != -1 and ";" not in cut[amp:]:
            cut = cut[:amp]
    return cut + "…"


def _mrkdwn(text: str, limit: int) -> dict[str, str]:
    return {"type": "mrkdwn", "text": _fit(escape(text), limit, escaped=True)}


def blocks(note: Notification) -> list[dict[str, Any]]:
    """The Block Kit blocks of ``note``; empty sections are left out (Slack refuses them)."""
    title = note.title.strip() or note.kind
    made: list[dict[str, Any]] = [{"type": "header", "text": {
        "type": "plain_text", "text": _fit(title, MAX_HEADER, escaped=False), "emoji": True}}]
    if note.text.strip():
        made.append({"type": "section", "text": _mrkdwn(note.text, MAX_SECTION)})
    pairs = list(note.fields.items())
    if len(pairs) > MAX_FIELDS:
        pairs = pairs[:MAX_FIELDS - 1] + [("…", f"{len(pairs) - MAX_FIELDS + 1} more fields")]
    if pairs:
        made.append({"type": "section", "fields": [
            {"type": "mrkdwn", "text": _fit(f"*{escape(label)}*\n{escape(value)}", MAX_FIELD,
                                            escaped=True)}
            for label, value in pairs]})
    context = [f"*kind:* {note.kind}", f"*severity:* {note.severity}"]
    if note.service:
        context.append(f"*service:* {note.service}")
    made.append({"type": "context", "elements": [_mrkdwn(item, MAX_SECTION)
                                                 for item in context]})
    return made


def message(note: Notification) -> dict[str, Any]:
    """The JSON body POSTed for ``note``."""
    return {"text": escape(note.title.strip() or note.kind), "blocks": blocks(note)}


def _check_url(url: str) -> None:
    """https, or http to this machine (tests, a local relay); the message names the key, the
    scheme and the host, never the path that holds the secret."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not host or parts.scheme not in ("https", "http") or \
            (parts.scheme == "http" and host not in LOCAL_HOSTS):
        raise ValueError(f"{KEY} must be an https:// URL (http:// only for 127.0.0.1 or "
                         f"localhost); got scheme {parts.scheme!r}, host {host!r}")


class SlackClient:
    """Posts notifications to one Slack channel through its incoming webhook.

    Delivery is at least once: incoming webhooks take no idempotency key, so a message whose
    answer was lost (a timeout after Slack posted it) is posted again when the outbox retries.
    """

    name = "slack"

    def __init__(self, section: SlackSection, timeout_s: float) -> None:
        self._url = read_secret(KEY, section.webhook_url, section.webhook_url_file)
        self._timeout_s = timeout_s
        self._enabled = section.enabled
        if self._url:
            _check_url(self._url)
        elif section.enabled:
            raise ValueError(f"{KEY} is empty: set it or {KEY}_file")
        parts = urlsplit(self._url)
        self._host = parts.netloc.rpartition("@")[2]
        self._path = parts.path if len(parts.path) > 1 else ""

    @property
    def secrets(self) -> list[str]:
        """The path first, so that redacted texts keep the host."""
        return [secret for secret in (self._path, self._url) if secret]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "enabled": self._enabled, "target": self._host,
                "webhook_url": shown(self._url)}

    async def deliver(self, session: aiohttp.ClientSession, note: Notification) -> dict[str, Any]:
        """One POST of ``note``; TransientError or PermanentError (without the URL's path)
        when Slack did not take it."""
        if not self._url:
            raise PermanentError(f"{KEY} is empty: set it or {KEY}_file", 0)
        try:
            await call(session, "POST", self._url, json=message(note), timeout_s=self._timeout_s)
        except TransientError as exc:
            raise TransientError(redact(str(exc), self.secrets),
                                 retry_after=exc.retry_after) from None
        except PermanentError as exc:
            raise PermanentError(redact(str(exc), self.secrets), exc.status) from None
        return {"target": self._host}
