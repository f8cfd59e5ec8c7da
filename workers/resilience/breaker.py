"""A circuit breaker: stop calling a dependency that keeps failing, and probe it now and then.

CLOSED lets calls through and counts consecutive failures; ``failure_threshold`` of them open
the circuit. OPEN refuses calls at once with ``CircuitOpen`` until ``recovery_timeout`` has
passed, then HALF_OPEN lets at most ``half_open_max_calls`` trial calls through at a time:
``success_threshold`` successes close it, one failure opens it again.

A result counts only for the state it was admitted in: a slow call started while CLOSED that
fails after the circuit opened does not push the reopening further away, and one that succeeds
does not count as a trial.
"""
from __future__ import annotations

import contextvars
import enum
import functools
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import ParamSpec, Self, TypeVar

Clock = Callable[[], float]
P = ParamSpec("P")
T = TypeVar("T")


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitOpen(Exception):
    """A call refused without trying; ``retry_after`` is the time until the circuit lets a trial
    through (0 when it is half-open and only waiting for trials in flight)."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"circuit {name!r} is open; retry after {retry_after:.3f}s")
        self.name = name
        self.retry_after = retry_after


StateChanges = Callable[["CircuitBreaker", CircuitState, CircuitState], None]


class CircuitBreaker:
    """Use as ``async with breaker:`` around a call, or ``@breaker`` on an async function.

    ``failure_types`` are the exceptions that count as the dependency failing; others (a bad
    request of ours, cancellation) pass through without counting either way. ``state_changes``
    is called as ``(breaker, old, new)`` on every transition, for metrics and health.
    """

    def __init__(self, name: str, *, failure_threshold: int = 5, recovery_timeout: float = 30.0,
                 success_threshold: int = 1, half_open_max_calls: int = 1,
                 failure_types: tuple[type[BaseException], ...] = (Exception,),
                 clock: Clock = time.monotonic, state_changes: StateChanges | None = None
                 ) -> None:
        if failure_threshold < 1 or success_threshold < 1 or half_open_max_calls < 1:
            raise ValueError("thresholds and half_open_max_calls must be at least 1")
        if recovery_timeout < 0:
            raise ValueError("recovery_timeout must not be negative")
        self.name = name
        self.failure_threshold = failure_threshold
        self.recovery_timeout = recovery_timeout
        self.success_threshold = success_threshold
        self.half_open_max_calls = half_open_max_calls
        self.failure_types = failure_types
        self.clock = clock
        self.state_changes = state_changes
        self._state = CircuitState.CLOSED
        self._generation = 0  # bumped on each transition; results of older calls are ignored
        self._failures = 0
        self._successes = 0
        self._trials = 0      # half-open calls in flight
        self._opened_at = 0.0
        self._entered: contextvars.ContextVar[tuple[int, ...]] = contextvars.ContextVar(
            f"breaker-{name}", default=())

    @property
    def state(self) -> CircuitState:
        """The state now; an OPEN circuit whose timeout has passed reads as HALF_OPEN."""
        if (self._state is CircuitState.OPEN
                and self.clock() - self._opened_at >= self.recovery_timeout):
            self._transition(CircuitState.HALF_OPEN)
        return self._state

    @property
    def failures(self) -> int:
        """Consecutive failures counted while closed."""
        return self._failures

    def _transition(self, new: CircuitState) -> None:
        old = self._state
        if old is new:
            return
        self._state = new
        self._generation += 1
        self._failures = self._successes = self._trials = 0
        if new is CircuitState.OPEN:
            self._opened_at = self.clock()
        if self.state_changes is not None:
            self.state_changes(self, old, new)

    def admit(self) -> int:
        """Let one call through or raise ``CircuitOpen``; returns the token to report with."""
        state = self.state
        if state is CircuitState.OPEN:
            raise CircuitOpen(self.name,
                              self._opened_at + self.recovery_timeout - self.clock())
        if state is CircuitState.HALF_OPEN:
            if self._trials >= self.half_open_max_calls:
                raise CircuitOpen(self.name, 0.0)
            self._trials += 1
        return self._generation

    def record_success(self, token: int) -> None:
        if token != self._generation:
            return
        if self._state is CircuitState.CLOSED:
            self._failures = 0
        elif self._state is CircuitState.HALF_OPEN:
            self._trials -= 1
            self._successes += 1
            if self._successes >= self.success_threshold:
                self._transition(CircuitState.CLOSED)

    def record_failure(self, token: int) -> None:
        if token != self._generation:
            return
        if self._state is CircuitState.CLOSED:
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._transition(CircuitState.OPEN)
        elif self._state is CircuitState.HALF_OPEN:
            self._transition(CircuitState.OPEN)

    def release(self, token: int) -> None:
        """A call admitted with ``token`` ended without a verdict (cancelled, not our failure)."""
        if token == self._generation and self._state is CircuitState.HALF_OPEN:
            self._trials -= 1

    def record(self, token: int, exc: BaseException | None) -> None:
        """Report how an admitted call ended: ``exc`` None for success."""
        if exc is None:
            self.record_success(token)
        elif isinstance(exc, self.failure_types):
            self.record_failure(token)
        else:
            self.release(token)

    def reset(self) -> None:
        """Close the circuit by hand (an operator knows the dependency is back)."""
        self._transition(CircuitState.CLOSED)
        self._failures = 0

    async def __aenter__(self) -> Self:
        # The token travels in a context variable: each task has its own, so concurrent and
        # nested ``async with`` on one breaker do not mix up their calls.
        self._entered.set(self._entered.get() + (self.admit(),))
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        *rest, token = self._entered.get()
        self._entered.set(tuple(rest))
        self.record(token, exc)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            token = self.admit()
            try:
                result = await fn(*args, **kwargs)
            except BaseException as exc:
                self.record(token, exc)
                raise
            self.record(token, None)
            return result

        return guarded
