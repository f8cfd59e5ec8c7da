"""Generic webhooks: each notification POSTed as signed JSON to a URL of the team's choosing
(``[integrations.webhooks.NAME] url, secret``).

Request::

    POST <url>
    Content-Type: application/json
    X-Optimizer-Event: <kind>
    Idempotency-Key: <id>                 same for every attempt of one event: dedupe on it
    X-Optimizer-Timestamp: <unix seconds>  when this attempt was signed
    X-Optimizer-Signature: v1=<hex HMAC-SHA256(secret, b"<timestamp>." + body)>

    {"body": {...}, "fields": {...}, "id": ..., "kind": ..., "service": ..., "severity": ...,
     "subject_id": ..., "text": ..., "time_ns": ..., "title": ...}

The signature covers the exact body bytes, so a receiver verifies it on the raw body before
parsing it, and the timestamp, so a captured request cannot be replayed once it is older than
the receiver's window (``verify_signature``: 5 minutes by default, either way, for clock skew).
Delivery is at least once; a receiver answers 2xx to a repeated ``Idempotency-Key`` without
acting on it again. 429 and 5xx are retried (honouring ``Retry-After``), other 4xx are not.
Webhooks are always signed: one without a secret is refused.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from ipc.config import WebhookSection
from workers.integrations.http import PermanentError, call, redact
from workers.integrations.notification import Notification
from workers.integrations.secrets import read_secret, shown
from workers.resilience.retry import TransientError

SCHEME = "v1"
TOLERANCE_S = 300
_SIGNATURE = re.compile(r"v1=([0-9a-fA-F]{64})")


class SignatureError(ValueError):
    """A webhook request whose signature or timestamp does not hold up."""


def sign(secret: bytes | str, timestamp: str, body: bytes) -> str:
    """The ``X-Optimizer-Signature`` value of ``body`` sent at ``timestamp``."""
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"{SCHEME}={digest}"


def verify_signature(secret: bytes | str, timestamp: str | None, body: bytes,
                     signature_header: str | None, *, now: float | None = None,
                     tolerance_s: int = TOLERANCE_S) -> None:
    """Check a received request (headers ``X-Optimizer-Timestamp`` and
    ``X-Optimizer-Signature``, the raw body); ``SignatureError`` says what is wrong."""
    if not timestamp or not timestamp.isascii() or not timestamp.isdigit():
        raise SignatureError("X-Optimizer-Timestamp is missing or not unix seconds")
    match = _SIGNATURE.fullmatch(signature_header.strip()) if signature_header else None
    if match is None:
        raise SignatureError("X-Optimizer-Signature is missing or not v1=<64 hex digits>")
    now = time.time() if now is None else now
    if abs(now - int(timestamp)) > tolerance_s:
        raise SignatureError(f"X-Optimizer-Timestamp is more than {tolerance_s} s away from now")
    expected = sign(secret, timestamp, body).encode()
    if not hmac.compare_digest(expected, f"{SCHEME}={match.group(1).lower()}".encode()):
        raise SignatureError("X-Optimizer-Signature does not match the body")


def payload(note: Notification) -> bytes:
    """The body bytes of ``note``, serialized once: these exact bytes are signed and sent."""
    return json.dumps({
        "id": note.key, "kind": note.kind, "severity": note.severity, "title": note.title,
        "text": note.text, "service": note.service, "subject_id": note.subject_id,
        "time_ns": note.time_ns, "fields": note.fields, "body": note.body,
    }, separators=(",", ":"), sort_keys=True).encode()


class WebhookClient:
    """Posts signed notifications to one receiver; at least once, deduplicated by the receiver
    on ``Idempotency-Key``."""

    def __init__(self, name: str, section: WebhookSection, timeout_s: float) -> None:
        key = f"integrations.webhooks.{name}"
        self.name = f"webhook:{name}"
        self._secret = read_secret(f"{key}.secret", section.secret, section.secret_file)
        self._timeout_s = timeout_s
        self._enabled = section.enabled
        self._url = section.url
        parts = urlsplit(section.url)
        if section.url and (parts.scheme not in ("http", "https") or not parts.hostname):
            raise ValueError(f"{key}.url must be an http:// or https:// URL with a host")
        if section.enabled and not section.url:
            raise ValueError(f"{key}.url is empty")
        if section.enabled and not self._secret:
            raise ValueError(f"{key}.secret is empty: set it or {key}.secret_file "
                             "(webhooks are always signed)")
        # Shown without credentials or query, which may carry a token of the receiver's.
        self._target = urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path,
                                   "", ""))
        self._key = key
        self._url_password = parts.password or ""

    @property
    def secrets(self) -> list[str]:
        return [secret for secret in (self._secret, self._url_password) if secret]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "enabled": self._enabled, "target": self._target,
                "secret": shown(self._secret)}

    async def deliver(self, session: aiohttp.ClientSession, note: Notification) -> dict[str, Any]:
        """One signed POST of ``note``; TransientError or PermanentError when the receiver did
        not take it."""
        if not self._url or not self._secret:
            raise PermanentError(f"{self._key} needs url and secret", 0)
        body = payload(note)
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "X-Optimizer-Event": note.kind,
                   "Idempotency-Key": note.key, "X-Optimizer-Timestamp": timestamp,
                   "X-Optimizer-Signature": sign(self._secret, timestamp, body)}
        try:
            await call(session, "POST", self._url, data=body, headers=headers,
                       timeout_s=self._timeout_s)
        except TransientError as exc:
            raise TransientError(redact(str(exc), self.secrets),
                                 retry_after=exc.retry_after) from None
        except PermanentError as exc:
            raise PermanentError(redact(str(exc), self.secrets), exc.status) from None
        return {"target": self._target, "id": note.key}
