"""Outbound HTTP for the integration clients: one call, its outcome classified so that the
retry policy and the circuit breaker (``workers.resilience``) know what to do with it.

* 2xx: the decoded JSON body (or None for an empty one).
* 429, 5xx, timeouts and connection failures: ``TransientError`` with the server's
  ``Retry-After`` (seconds or an HTTP date) when it sent one. A 403 with
  ``X-RateLimit-Remaining: 0`` (GitHub's exhausted limit: the wait is until
  ``X-RateLimit-Reset``) or with ``Retry-After`` (its secondary limit) counts as 429.
* Other 4xx: ``PermanentError``: retrying would not help (bad token, unknown project).

Error messages carry the method, the URL without its query and at most ``MAX_ERROR_BODY``
characters of the answer, never request headers: secrets travel in headers or in URLs, and
``redact`` takes the known secret strings out of any text before it is logged or stored.
"""
from __future__ import annotations

import json as json_module
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from workers.resilience.retry import TransientError, parse_retry_after

MAX_ERROR_BODY = 300
MAX_ANSWER_BYTES = 4 << 20


class PermanentError(Exception):
    """The destination refused the request for a reason a retry cannot fix."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def redact(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text


def _where(method: str, url: str) -> str:
    """The request for messages: no query, no user or password."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return f"{method} {urlunsplit((parts.scheme, netloc, parts.path, '', ''))}"


def _retry_after(headers: Mapping[str, str]) -> float | None:
    asked = parse_retry_after(headers.get("Retry-After", "")) if "Retry-After" in headers \
        else None
    if asked is None and headers.get("X-RateLimit-Remaining") == "0":
        try:
            asked = max(0.0, float(headers["X-RateLimit-Reset"]) - time.time())
        except (KeyError, ValueError):
            asked = None
    return asked


async def call(session: aiohttp.ClientSession, method: str, url: str, *,
               json: Any = None, data: bytes | None = None,
               headers: Mapping[str, str] | None = None, timeout_s: float = 10.0,
               auth: aiohttp.BasicAuth | None = None) -> Any:
    """One request; see the module docstring for what it returns and raises."""
    where = _where(method, url)
    try:
        async with session.request(method, url, json=json, data=data, headers=headers,
                                   auth=auth, timeout=aiohttp.ClientTimeout(total=timeout_s),
                                   allow_redirects=False) as answer:
            raw = await answer.content.read(MAX_ANSWER_BYTES)
            status, answer_headers = answer.status, answer.headers
    except TimeoutError:
        raise TransientError(f"{where}: no answer within {timeout_s:g} s") from None
    except aiohttp.ClientError as exc:
        raise TransientError(f"{where}: {type(exc).__name__}: {exc}") from None
    text = raw[:MAX_ERROR_BODY].decode("utf-8", "replace")
    # GitHub's rate limits answer 403: the primary one with X-RateLimit-Remaining: 0, the
    # secondary one with Retry-After.
    limited = status == 403 and (answer_headers.get("X-RateLimit-Remaining") == "0"
                                 or "Retry-After" in answer_headers)
    if status == 429 or status >= 500 or limited:
        raise TransientError(f"{where}: {status} {text}", retry_after=_retry_after(answer_headers))
    if status >= 300:
        raise PermanentError(f"{where}: {status} {text}", status)
    if not raw:
        return None
    try:
        return json_module.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
