"""Rate limiters keyed by tenant or API key.

``TokenBucket`` is in memory and per process: ``limits`` has no token bucket (its strategies
are fixed window, moving window and sliding-window counter), and a bucket needs no I/O, so it
is kept here, small, on an injectable monotonic clock. ``SlidingWindowLimiter`` wraps
``limits.aio`` so that the same window can live in memory or in Redis, where several replicas
share one budget per key.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

import limits
import limits.aio.storage
import limits.aio.strategies
import redis.asyncio
from limits import RateLimitItem
from limits.errors import StorageError

Clock = Callable[[], float]


class RateLimited(Exception):
    """A call over its key's budget; ``retry_after`` says when the budget allows it again."""

    def __init__(self, key: str, retry_after: float) -> None:
        super().__init__(f"rate limit for {key!r} exceeded; retry after {retry_after:.3f}s")
        self.key = key
        self.retry_after = retry_after


class LimiterUnavailable(Exception):
    """The limiter's shared storage (Redis) cannot be reached; the caller picks fail open or
    closed, since only it knows whether over-spending or refusing is worse."""


class TokenBucket:
    """``capacity`` tokens per key, refilled at ``rate`` tokens a second.

    Allows bursts up to ``capacity`` and a sustained ``rate``. Per process only: replicas that
    must share a budget use ``SlidingWindowLimiter`` with Redis. A bucket is not stored until
    it is first used, and full buckets are forgotten once there are more than ``max_keys``
    (a full bucket and a missing one are the same), so unseen keys cost nothing.
    """

    def __init__(self, rate: float, capacity: float, *, clock: Clock = time.monotonic,
                 max_keys: int = 100_000, allow_debt: bool = False) -> None:
        """``allow_debt``: a cost above ``capacity`` is taken once the bucket is full, leaving
        it below zero, so that the sustained rate still holds for callers whose unit of work
        (a batch of events) can be larger than the burst; without it such a cost is a
        ValueError."""
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = rate
        self.capacity = capacity
        self.allow_debt = allow_debt
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def tokens(self, key: str) -> float:
        """Tokens available to ``key`` now."""
        return self._refill(key, self.clock())

    def _refill(self, key: str, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self.capacity
        tokens, at = entry
        return min(self.capacity, tokens + max(0.0, now - at) * self.rate)

    def try_acquire(self, key: str, cost: float = 1.0) -> bool:
        """Take ``cost`` tokens if they are there; never blocks."""
        return self.retry_after(key, cost, take=True) == 0.0

    def retry_after(self, key: str, cost: float = 1.0, *, take: bool = False) -> float:
        """Seconds until ``cost`` tokens are there (0 if now); takes them if ``take`` and 0."""
        if cost > self.capacity and not self.allow_debt:
            raise ValueError(f"cost {cost} exceeds the bucket capacity {self.capacity}")
        needed = min(cost, self.capacity)
        now = self.clock()
        tokens = self._refill(key, now)
        if tokens >= needed:
            if take:
                self._buckets[key] = (tokens - cost, now)
                if len(self._buckets) > self.max_keys:
                    self.prune()
            return 0.0
        return (needed - tokens) / self.rate

    def acquire(self, key: str, cost: float = 1.0) -> None:
        """Take ``cost`` tokens or raise ``RateLimited`` with the wait."""
        wait = self.retry_after(key, cost, take=True)
        if wait:
            raise RateLimited(key, wait)

    def prune(self) -> int:
        """Forget full buckets; returns how many."""
        now = self.clock()
        full = [key for key in self._buckets if self._refill(key, now) >= self.capacity]
        for key in full:
            del self._buckets[key]
        return len(full)

    def reset(self, key: str) -> None:
        self._buckets.pop(key, None)


def make_storage(uri: str, *, key_prefix: str = "optimizer-ratelimit", timeout: float = 2.0
                 ) -> tuple[limits.aio.storage.Storage, redis.asyncio.ConnectionPool | None]:
    """An async ``limits`` storage from ``memory://`` or ``redis://host:port/db``, with the
    Redis connection pool to close when done (None for memory).

    Redis goes through redis-py (a project dependency) rather than ``limits``' default coredis,
    on a pool of our own so that ``close()`` can release its connections. ``timeout`` bounds
    each Redis round trip, so that a hung Redis turns into ``LimiterUnavailable`` rather than
    a hung request.
    """
    if uri == "memory://":
        return limits.aio.storage.MemoryStorage(), None
    if uri.startswith(("redis://", "rediss://")):
        pool = redis.asyncio.ConnectionPool.from_url(uri, socket_timeout=timeout,
                                                     socket_connect_timeout=timeout)
        storage = limits.aio.storage.RedisStorage(
            f"async+{uri}", implementation="redispy", key_prefix=key_prefix,
            wrap_exceptions=True, connection_pool=pool)
        return storage, pool
    raise ValueError(f"unsupported rate-limit storage {uri!r} (memory:// or redis://)")


class SlidingWindowLimiter:
    """At most ``limit`` (e.g. ``"600/minute"``) hits per key in any window of that length.

    ``exact=True`` keeps a log of hits (``limits``' moving window): precise, but memory grows
    with the limit. ``exact=False`` weighs the previous fixed window's count (``limits``'
    sliding-window counter): two counters per key, a little approximate.
    """

    def __init__(self, limit: str | RateLimitItem,
                 storage: str | limits.aio.storage.Storage = "memory://", *,
                 namespace: str = "default", exact: bool = True,
                 wall_clock: Clock = time.time) -> None:
        self.wall_clock = wall_clock  # epoch seconds, as ``limits`` reports window resets
        self.item = limits.parse(limit) if isinstance(limit, str) else limit
        self._pool: redis.asyncio.ConnectionPool | None = None
        if isinstance(storage, str):
            storage, self._pool = make_storage(storage)
        self.storage = storage
        self.namespace = namespace
        strategy = (limits.aio.strategies.MovingWindowRateLimiter if exact
                    else limits.aio.strategies.SlidingWindowCounterRateLimiter)
        self.strategy: limits.aio.strategies.RateLimiter = strategy(self.storage)

    async def _call(self, op: Literal["hit", "test"], key: str, cost: int) -> bool:
        try:
            return await getattr(self.strategy, op)(self.item, self.namespace, key, cost=cost)
        except StorageError as exc:
            raise LimiterUnavailable(f"rate-limit storage: {exc.storage_error!r}") from exc

    async def hit(self, key: str, cost: int = 1) -> bool:
        """Count ``cost`` hits for ``key`` if the window has room; False (and nothing counted)
        if not."""
        return await self._call("hit", key, cost)

    async def test(self, key: str, cost: int = 1) -> bool:
        """Whether ``hit`` would succeed now, without counting."""
        return await self._call("test", key, cost)

    async def acquire(self, key: str, cost: int = 1) -> None:
        """``hit`` or raise ``RateLimited`` with the time until the window has room."""
        if not await self.hit(key, cost):
            raise RateLimited(key, await self.retry_after(key, cost))

    async def remaining(self, key: str) -> int:
        return (await self._stats(key)).remaining

    async def retry_after(self, key: str, cost: int = 1) -> float:
        """Seconds until the oldest counted hit leaves the window (0 if there is room).

        For ``cost`` > 1 this is a lower bound: more than one hit may have to leave.
        """
        stats = await self._stats(key)
        return 0.0 if stats.remaining >= cost else max(0.0, stats.reset_time - self.wall_clock())

    async def _stats(self, key: str) -> limits.WindowStats:
        try:
            return await self.strategy.get_window_stats(self.item, self.namespace, key)
        except StorageError as exc:
            raise LimiterUnavailable(f"rate-limit storage: {exc.storage_error!r}") from exc

    async def clear(self, key: str) -> None:
        try:
            await self.strategy.clear(self.item, self.namespace, key)
        except StorageError as exc:
            raise LimiterUnavailable(f"rate-limit storage: {exc.storage_error!r}") from exc

    async def close(self) -> None:
        """Release the Redis connections of a storage this limiter made from a URI."""
        if self._pool is not None:
            await self._pool.aclose()
