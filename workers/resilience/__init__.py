"""Resilience for calls to things outside the process: rate limits, circuit breakers, retries.

Every refusal carries ``retry_after`` (``RateLimited``, ``CircuitOpen``, ``TransientError``), so
a retry policy can wait as long as the refusing side asks. Typical nesting, outermost first:
retry, then breaker, then the call; rate limiting is applied where requests come in.
"""
from __future__ import annotations

from workers.resilience.breaker import CircuitBreaker, CircuitOpen, CircuitState
from workers.resilience.ratelimit import (
    LimiterUnavailable,
    RateLimited,
    SlidingWindowLimiter,
    TokenBucket,
    make_storage,
)
from workers.resilience.retry import (
    RetryPolicy,
    TransientError,
    parse_retry_after,
    retry_after_of,
    wait_full_jitter,
)

__all__ = [
    "CircuitBreaker",
    "CircuitOpen",
    "CircuitState",
    "LimiterUnavailable",
    "RateLimited",
    "RetryPolicy",
    "SlidingWindowLimiter",
    "TokenBucket",
    "TransientError",
    "make_storage",
    "parse_retry_after",
    "retry_after_of",
    "wait_full_jitter",
]
