"""Retry with exponential backoff and full jitter, on tenacity.

Full jitter (a wait drawn uniformly from ``[0, min(cap, base * 2**n)]`` before retry n+1)
spreads the retries of many clients that failed together, so they do not come back in step.
A server that says when to come back (``Retry-After``) is believed instead, within limits.
"""
from __future__ import annotations

import asyncio
import datetime
import email.utils
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import tenacity

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


class TransientError(Exception):
    """A failure worth retrying, optionally with the server's ``Retry-After`` in seconds."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def parse_retry_after(value: str, now: datetime.datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date; None if neither."""
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    now = now or datetime.datetime.now(datetime.UTC)
    return max(0.0, (when - now).total_seconds())


def retry_after_of(exc: BaseException | None) -> float | None:
    """The wait an exception asks for: a ``retry_after`` attribute (ours, ``RateLimited``,
    ``CircuitOpen``) or a ``Retry-After`` header on it (aiohttp's ``ClientResponseError``)."""
    if exc is None:
        return None
    value = getattr(exc, "retry_after", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return max(0.0, float(value))
    headers = getattr(exc, "headers", None)
    if isinstance(headers, Mapping):
        header = headers.get("Retry-After")
        if isinstance(header, str):
            return parse_retry_after(header)
    return None


class wait_full_jitter(tenacity.wait.wait_base):
    """``uniform(0, min(cap, base * 2**n))`` before retry n+1, or the exception's Retry-After
    (at most ``max_retry_after``) when it has one."""

    def __init__(self, base: float, cap: float, max_retry_after: float,
                 rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = cap
        self.max_retry_after = max_retry_after
        self.rng = rng or random.Random()

    def ceiling(self, retry: int) -> float:
        """The largest jittered wait before retry ``retry`` + 1 (retry counts from 0)."""
        return min(self.cap, self.base * 2.0 ** min(retry, 64))

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        outcome = retry_state.outcome
        asked = retry_after_of(outcome.exception() if outcome is not None else None)
        if asked is not None:
            return min(asked, self.max_retry_after)
        return self.rng.uniform(0.0, self.ceiling(retry_state.attempt_number - 1))


Retryable = tuple[type[BaseException], ...] | Callable[[BaseException], bool]


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``attempts`` in all (the first call included), waits from ``base``
    doubling up to ``cap``, and no retry that would start later than ``max_delay`` after the
    first call (None: no time budget). A Retry-After over ``max_retry_after`` is cut to it."""

    attempts: int = 5
    base: float = 0.2
    cap: float = 30.0
    max_delay: float | None = 120.0
    max_retry_after: float = 300.0

    def retrying(self, retry_on: Retryable, *, sleep: Sleep = asyncio.sleep,
                 rng: random.Random | None = None,
                 before_sleep: Callable[[tenacity.RetryCallState], Any] | None = None
                 ) -> tenacity.AsyncRetrying:
        """A tenacity ``AsyncRetrying`` for this policy; giving up re-raises the last error.

        ``retry_on`` is a tuple of exception types or a predicate on the exception.
        """
        if isinstance(retry_on, tuple):
            retry: tenacity.retry_base = tenacity.retry_if_exception_type(retry_on)
        else:
            retry = tenacity.retry_if_exception(retry_on)
        stop: tenacity.stop.stop_base = tenacity.stop_after_attempt(self.attempts)
        if self.max_delay is not None:
            stop = stop | tenacity.stop_before_delay(self.max_delay)
        return tenacity.AsyncRetrying(
            wait=wait_full_jitter(self.base, self.cap, self.max_retry_after, rng),
            stop=stop, retry=retry, sleep=sleep, reraise=True, before_sleep=before_sleep)

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, retry_on: Retryable,
                   sleep: Sleep = asyncio.sleep, rng: random.Random | None = None,
                   **kwargs: Any) -> T:
        """``await fn(*args, **kwargs)``, retried by this policy."""
        return await self.retrying(retry_on, sleep=sleep, rng=rng)(fn, *args, **kwargs)
