"""workers.resilience: rate limiters, circuit breaker and retry, on injected clocks.

Nothing here sleeps: the token bucket and breaker read a fake monotonic clock, the memory
sliding window reads a patched ``time.time``, and retries record their waits instead of
sleeping. The Redis tests run against a real redis-server on a free port (skipped when the
binary is missing, failed when ``CI=true``).
"""
from __future__ import annotations

import asyncio
import datetime
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import limits.aio.storage.memory
import pytest
from conftest import free_port

from workers.resilience import (
    CircuitBreaker,
    CircuitOpen,
    CircuitState,
    LimiterUnavailable,
    RateLimited,
    RetryPolicy,
    SlidingWindowLimiter,
    TokenBucket,
    TransientError,
    make_storage,
    parse_retry_after,
    retry_after_of,
    wait_full_jitter,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


# --- token bucket ------------------------------------------------------------------------------

def test_token_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=2.0, capacity=5, clock=clock)
    assert [bucket.try_acquire("tenant-a") for _ in range(6)] == [True] * 5 + [False]
    assert bucket.retry_after("tenant-a") == pytest.approx(0.5)
    clock.advance(0.25)
    assert not bucket.try_acquire("tenant-a")
    assert bucket.tokens("tenant-a") == pytest.approx(0.5)
    clock.advance(0.25)
    assert bucket.try_acquire("tenant-a")
    assert not bucket.try_acquire("tenant-a")
    clock.advance(100)  # refill never exceeds the capacity
    assert bucket.tokens("tenant-a") == 5
    assert [bucket.try_acquire("tenant-a") for _ in range(6)] == [True] * 5 + [False]


def test_token_bucket_keys_are_independent_and_cost_counts() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, capacity=3, clock=clock)
    assert bucket.try_acquire("a", cost=3)
    assert not bucket.try_acquire("a")
    assert bucket.try_acquire("b", cost=2) and bucket.try_acquire("b")
    with pytest.raises(RateLimited) as info:
        bucket.acquire("a", cost=2)
    assert info.value.key == "a" and info.value.retry_after == pytest.approx(2.0)
    assert bucket.tokens("a") == 0  # a refused call takes nothing
    with pytest.raises(ValueError):
        bucket.try_acquire("a", cost=4)  # could never succeed


def test_token_bucket_with_debt_takes_a_cost_above_capacity_and_keeps_the_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10.0, capacity=5, clock=clock, allow_debt=True)
    bucket.acquire("a", cost=25)  # full: taken, 20 tokens owed
    assert bucket.tokens("a") == -20
    assert bucket.retry_after("a", cost=25) == pytest.approx(2.5)  # back to full
    clock.advance(2.5)
    bucket.acquire("a", cost=25)  # only once the debt is repaid at 10/s
    assert not bucket.try_acquire("a", cost=1)


def test_token_bucket_forgets_full_buckets() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1.0, capacity=2, clock=clock, max_keys=2)
    bucket.acquire("a")
    bucket.acquire("b")
    clock.advance(1)  # a and b are full again
    bucket.acquire("c")  # the third key prunes the full ones
    assert set(bucket._buckets) == {"c"}
    assert bucket.tokens("a") == 2 and bucket.tokens("c") == 1


# --- sliding window (limits) -------------------------------------------------------------------

class FakeTime:
    """Stands in for the ``time`` module inside limits' memory storage."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_sliding_window_per_key_with_memory_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeTime(1_700_000_000.0)
    monkeypatch.setattr(limits.aio.storage.memory, "time", fake)

    async def scenario() -> None:
        limiter = SlidingWindowLimiter("3/minute", "memory://", namespace="api",
                                       wall_clock=fake.time)
        assert [await limiter.hit("key-1") for _ in range(4)] == [True, True, True, False]
        assert await limiter.hit("key-2")  # another key has its own window
        assert await limiter.remaining("key-2") == 2
        assert not await limiter.test("key-1")
        fake.now += 30
        with pytest.raises(RateLimited) as info:
            await limiter.acquire("key-1")
        assert info.value.retry_after == pytest.approx(30, abs=1)
        fake.now += 31  # the first three hits leave the window together
        assert await limiter.test("key-1")
        assert await limiter.remaining("key-1") == 3
        await limiter.acquire("key-1", cost=2)
        assert not await limiter.hit("key-1", cost=2)
        assert await limiter.hit("key-1")
        await limiter.clear("key-1")
        assert await limiter.remaining("key-1") == 3
        await limiter.close()

    run(scenario())


def test_sliding_window_slides_rather_than_resets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hits spread over the window leave it one by one, unlike a fixed window's reset."""
    fake = FakeTime(1_700_000_000.0)
    monkeypatch.setattr(limits.aio.storage.memory, "time", fake)

    async def scenario() -> None:
        limiter = SlidingWindowLimiter("2/minute", wall_clock=fake.time)
        assert await limiter.hit("k")
        fake.now += 40
        assert await limiter.hit("k")
        assert not await limiter.hit("k")
        fake.now += 21  # only the first hit has left
        assert await limiter.hit("k")
        assert not await limiter.hit("k")

    run(scenario())


@pytest.mark.parametrize("exact", [True, False], ids=["moving-window", "window-counter"])
def test_sliding_window_is_shared_through_redis(redis_url: str, exact: bool) -> None:
    """Two limiters (as on two replicas) spend one budget per key."""
    async def scenario() -> None:
        namespace = f"shared-{exact}"
        first = SlidingWindowLimiter("5/hour", redis_url, namespace=namespace, exact=exact)
        second = SlidingWindowLimiter("5/hour", redis_url, namespace=namespace, exact=exact)
        try:
            results = []
            for i in range(6):
                results.append(await (first if i % 2 else second).hit("tenant-x"))
            assert results == [True] * 5 + [False]
            assert not await first.test("tenant-x") and not await second.test("tenant-x")
            assert await first.remaining("tenant-x") == 0
            with pytest.raises(RateLimited) as info:
                await second.acquire("tenant-x")
            assert 0 < info.value.retry_after <= 3600
            assert await second.hit("tenant-y")  # keys stay separate across replicas too
            assert await first.remaining("tenant-y") == 4
            await first.clear("tenant-x")
            assert await second.hit("tenant-x")
        finally:
            await first.close()
            await second.close()

    run(scenario())


def test_sliding_window_reports_unreachable_redis() -> None:
    async def scenario() -> None:
        limiter = SlidingWindowLimiter("5/minute", f"redis://127.0.0.1:{free_port()}/0")
        with pytest.raises(LimiterUnavailable):
            await limiter.hit("k")
        await limiter.close()

    run(scenario())


def test_sliding_window_gives_up_on_a_hung_redis() -> None:
    """A Redis that accepts connections but never answers costs one timeout, not a hang."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # connections complete in the backlog; nothing ever replies
        port = listener.getsockname()[1]

        async def scenario() -> None:
            storage, pool = make_storage(f"redis://127.0.0.1:{port}/0", timeout=0.2)
            limiter = SlidingWindowLimiter("5/minute", storage)
            try:
                with pytest.raises(LimiterUnavailable):
                    await asyncio.wait_for(limiter.hit("k"), 10)
            finally:
                assert pool is not None
                await pool.aclose()

        run(scenario())


def test_sliding_window_refuses_unknown_storage() -> None:
    with pytest.raises(ValueError):
        SlidingWindowLimiter("5/minute", "memcached://localhost")


# --- circuit breaker ---------------------------------------------------------------------------

class Boom(Exception):
    pass


def make_breaker(clock: FakeClock, **options: Any) -> tuple[CircuitBreaker, list[tuple[str, str]]]:
    changes: list[tuple[str, str]] = []

    def observe(breaker: CircuitBreaker, old: CircuitState, new: CircuitState) -> None:
        assert breaker.name == "upstream"
        changes.append((old.value, new.value))

    settings: dict[str, Any] = {"failure_threshold": 3, "recovery_timeout": 10.0,
                                "success_threshold": 2, "half_open_max_calls": 1}
    settings.update(options)
    return CircuitBreaker("upstream", clock=clock, state_changes=observe, **settings), changes


async def fail(breaker: CircuitBreaker) -> None:
    with pytest.raises(Boom):
        async with breaker:
            raise Boom()


async def succeed(breaker: CircuitBreaker) -> None:
    async with breaker:
        pass


def test_breaker_opens_half_opens_and_closes() -> None:
    clock = FakeClock()
    breaker, changes = make_breaker(clock)

    async def scenario() -> None:
        await fail(breaker)
        await fail(breaker)
        await succeed(breaker)  # a success resets the consecutive count
        assert breaker.failures == 0
        for _ in range(3):
            await fail(breaker)
        assert breaker.state is CircuitState.OPEN
        clock.advance(4)
        with pytest.raises(CircuitOpen) as info:
            await succeed(breaker)
        assert info.value.retry_after == pytest.approx(6)
        clock.advance(6)
        assert breaker.state is CircuitState.HALF_OPEN
        await succeed(breaker)
        assert breaker.state is CircuitState.HALF_OPEN  # success_threshold is 2
        await succeed(breaker)
        assert breaker.state is CircuitState.CLOSED

    run(scenario())
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_breaker_half_open_failure_reopens_for_a_full_timeout() -> None:
    clock = FakeClock()
    breaker, changes = make_breaker(clock, failure_threshold=1)

    async def scenario() -> None:
        await fail(breaker)
        clock.advance(10)
        assert breaker.state is CircuitState.HALF_OPEN
        await fail(breaker)
        assert breaker.state is CircuitState.OPEN
        with pytest.raises(CircuitOpen) as info:
            await succeed(breaker)
        assert info.value.retry_after == pytest.approx(10)

    run(scenario())
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "open")]


def test_breaker_half_open_admits_a_limited_number_of_trials() -> None:
    clock = FakeClock()
    breaker, _ = make_breaker(clock, failure_threshold=1, half_open_max_calls=2,
                              success_threshold=2)

    async def scenario() -> None:
        await fail(breaker)
        clock.advance(10)
        release = asyncio.Event()
        entered = 0

        @breaker
        async def trial() -> str:
            nonlocal entered
            entered += 1
            await release.wait()
            return "ok"

        trials = [asyncio.create_task(trial()) for _ in range(2)]
        while entered < 2:
            await asyncio.sleep(0)
        with pytest.raises(CircuitOpen) as info:
            await trial()  # both trial slots are taken
        assert info.value.retry_after == 0
        release.set()
        assert await asyncio.gather(*trials) == ["ok", "ok"]
        assert breaker.state is CircuitState.CLOSED

    run(scenario())


def test_breaker_ignores_other_errors_and_cancellation_frees_the_trial() -> None:
    clock = FakeClock()
    breaker, _ = make_breaker(clock, failure_threshold=1, failure_types=(Boom,))

    async def scenario() -> None:
        with pytest.raises(ValueError):
            async with breaker:
                raise ValueError("our own bad request")
        assert breaker.state is CircuitState.CLOSED
        await fail(breaker)
        clock.advance(10)
        with pytest.raises(asyncio.CancelledError):
            async with breaker:
                raise asyncio.CancelledError()
        assert breaker.state is CircuitState.HALF_OPEN
        await succeed(breaker)  # the slot the cancelled trial held is free again
        await succeed(breaker)
        assert breaker.state is CircuitState.CLOSED

    run(scenario())


def test_breaker_ignores_results_of_calls_from_an_earlier_state() -> None:
    clock = FakeClock()
    breaker, _ = make_breaker(clock, failure_threshold=1)
    early = breaker.admit()  # a slow call started while closed
    breaker.record_failure(breaker.admit())
    assert breaker.state is CircuitState.OPEN
    clock.advance(9)
    breaker.record_failure(early)  # does not push the reopening later
    clock.advance(1)
    assert breaker.state is CircuitState.HALF_OPEN
    breaker.record_success(early)  # and is no trial
    assert breaker.state is CircuitState.HALF_OPEN


def test_breaker_decorator_and_reset() -> None:
    clock = FakeClock()
    breaker, changes = make_breaker(clock, failure_threshold=2)

    @breaker
    async def call(ok: bool) -> int:
        if not ok:
            raise Boom()
        return 7

    async def scenario() -> None:
        assert await call(True) == 7
        for _ in range(2):
            with pytest.raises(Boom):
                await call(False)
        with pytest.raises(CircuitOpen):
            await call(True)
        breaker.reset()
        assert await call(True) == 7

    run(scenario())
    assert changes == [("closed", "open"), ("open", "closed")]


def test_breaker_validates_settings() -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", failure_threshold=0)
    with pytest.raises(ValueError):
        CircuitBreaker("x", recovery_timeout=-1)


# --- retry -------------------------------------------------------------------------------------

class Recorder:
    """A sleep that only records what it was asked to wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def flaky(failures: list[BaseException], result: str = "done") -> Callable[[], Awaitable[str]]:
    calls = iter(failures)

    async def call() -> str:
        call.attempts += 1  # type: ignore[attr-defined]
        exc = next(calls, None)
        if exc is not None:
            raise exc
        return result

    call.attempts = 0  # type: ignore[attr-defined]
    return call


def test_retry_succeeds_after_transient_failures() -> None:
    sleep = Recorder()
    fn = flaky([TransientError("503"), TransientError("503")])
    policy = RetryPolicy(attempts=5, base=0.5, cap=10)
    result = run(policy.call(fn, retry_on=(TransientError,), sleep=sleep, rng=random.Random(1)))
    assert result == "done"
    assert fn.attempts == 3  # type: ignore[attr-defined]
    assert len(sleep.waits) == 2


def test_retry_gives_up_with_the_last_error() -> None:
    sleep = Recorder()
    errors = [TransientError(f"failure {i}") for i in range(10)]
    fn = flaky(errors)
    with pytest.raises(TransientError) as info:
        run(RetryPolicy(attempts=4).call(fn, retry_on=(TransientError,), sleep=sleep))
    assert info.value is errors[3]
    assert fn.attempts == 4 and len(sleep.waits) == 3  # type: ignore[attr-defined]


def test_retry_does_not_retry_other_errors() -> None:
    sleep = Recorder()
    fn = flaky([KeyError("bad"), TransientError("never reached")])
    with pytest.raises(KeyError):
        run(RetryPolicy().call(fn, retry_on=(TransientError,), sleep=sleep))
    assert fn.attempts == 1 and sleep.waits == []  # type: ignore[attr-defined]
    fn = flaky([TransientError("x", retry_after=None)] * 2)
    def predicate(exc: BaseException) -> bool:
        return isinstance(exc, TransientError)

    assert run(RetryPolicy().call(fn, retry_on=predicate, sleep=sleep)) == "done"


def test_full_jitter_waits_stay_within_the_exponential_ceiling() -> None:
    base, cap, attempts = 0.1, 2.0, 9
    for seed in range(30):
        sleep = Recorder()
        fn = flaky([TransientError("x")] * (attempts - 1))
        policy = RetryPolicy(attempts=attempts, base=base, cap=cap, max_delay=None)
        run(policy.call(fn, retry_on=(TransientError,), sleep=sleep, rng=random.Random(seed)))
        assert len(sleep.waits) == attempts - 1
        for n, wait in enumerate(sleep.waits):
            assert 0 <= wait <= min(cap, base * 2 ** n)


def test_full_jitter_draws_from_zero_to_the_ceiling() -> None:
    class Extremes(random.Random):
        def __init__(self, pick: str) -> None:
            super().__init__()
            self.pick = pick
            self.asked: list[tuple[float, float]] = []

        def uniform(self, a: float, b: float) -> float:
            self.asked.append((a, b))
            return a if self.pick == "low" else b

    for pick in ("low", "high"):
        rng = Extremes(pick)
        sleep = Recorder()
        fn = flaky([TransientError("x")] * 6)
        policy = RetryPolicy(attempts=7, base=0.25, cap=4.0, max_delay=None)
        run(policy.call(fn, retry_on=(TransientError,), sleep=sleep, rng=rng))
        ceilings = [0.25, 0.5, 1.0, 2.0, 4.0, 4.0]
        assert rng.asked == [(0.0, c) for c in ceilings]
        assert sleep.waits == ([0.0] * 6 if pick == "low" else ceilings)
    wait = wait_full_jitter(base=1.0, cap=30.0, max_retry_after=60.0)
    assert wait.ceiling(1000) == 30.0  # no overflow for a large attempt number


def test_retry_honours_retry_after() -> None:
    sleep = Recorder()
    fn = flaky([TransientError("429", retry_after=7.5), TransientError("503"),
                RateLimited("k", 1.25)])
    policy = RetryPolicy(attempts=5, base=0.1, cap=0.2, max_delay=None)
    assert run(policy.call(fn, retry_on=(TransientError, RateLimited), sleep=sleep,
                           rng=random.Random(3))) == "done"
    assert sleep.waits[0] == 7.5
    assert 0 <= sleep.waits[1] <= 0.2
    assert sleep.waits[2] == 1.25


def test_retry_after_is_capped_and_a_too_long_one_exhausts_the_budget() -> None:
    sleep = Recorder()
    fn = flaky([TransientError("429", retry_after=1000)])
    policy = RetryPolicy(attempts=3, max_delay=None, max_retry_after=20)
    run(policy.call(fn, retry_on=(TransientError,), sleep=sleep))
    assert sleep.waits == [20]
    sleep = Recorder()
    error = TransientError("429", retry_after=90)
    fn = flaky([error])
    with pytest.raises(TransientError) as info:
        run(RetryPolicy(attempts=3, max_delay=60).call(fn, retry_on=(TransientError,),
                                                       sleep=sleep))
    assert info.value is error and sleep.waits == []  # waiting 90 s would overrun 60 s


def test_retry_after_from_headers_and_dates() -> None:
    class HttpError(Exception):
        def __init__(self, headers: dict[str, str]) -> None:
            super().__init__("429")
            self.headers = headers

    assert retry_after_of(HttpError({"Retry-After": "12"})) == 12
    assert retry_after_of(HttpError({})) is None
    assert retry_after_of(ValueError()) is None
    assert retry_after_of(CircuitOpen("x", 3.0)) == 3.0
    now = datetime.datetime(2026, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0
    assert parse_retry_after("-5") == 0
    assert parse_retry_after("soon") is None


def test_retrying_works_as_a_tenacity_loop() -> None:
    """``retrying()`` is a plain tenacity AsyncRetrying, for loops like the storage worker's."""
    sleep = Recorder()
    outcomes = [TransientError("a"), TransientError("b")]

    async def scenario() -> int:
        attempts = 0
        async for attempt in RetryPolicy(attempts=5).retrying((TransientError,), sleep=sleep):
            with attempt:
                attempts += 1
                if outcomes:
                    raise outcomes.pop(0)
        return attempts

    assert run(scenario()) == 3
    assert len(sleep.waits) == 2
