"""Restart policy: exponential backoff with jitter, and the restart-intensity limit."""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass

from ipc.config import ServiceSection, SupervisorSection

JITTER = 0.2
_rng = random.Random()


@dataclass(frozen=True)
class RestartPolicy:
    heartbeat_timeout: float
    backoff_base: float
    backoff_max: float
    max_restarts: int
    restart_window: float
    failure_threshold: int
    stable_after: float

    @classmethod
    def effective(cls, sup: SupervisorSection, section: ServiceSection) -> RestartPolicy:
        """The service's overrides where set, [supervisor] values elsewhere."""
        def pick(key: str):  # noqa: ANN202 - int or float, as the key is
            own = getattr(section, key)
            return getattr(sup, key) if own is None else own
        return cls(heartbeat_timeout=pick("heartbeat_timeout"), backoff_base=pick("backoff_base"),
                   backoff_max=pick("backoff_max"), max_restarts=pick("max_restarts"),
                   restart_window=pick("restart_window"),
                   failure_threshold=pick("failure_threshold"), stable_after=sup.stable_after)

    def delay(self, consecutive_failures: int, rng: random.Random = _rng) -> float:
        """min(base * 2^n, max), then +-20% jitter so that crashed peers do not restart in step."""
        raw = min(self.backoff_base * (2 ** min(consecutive_failures, 62)), self.backoff_max)
        return raw * rng.uniform(1 - JITTER, 1 + JITTER)


class RestartIntensity:
    """Counts automatic restarts in a sliding window (OTP's intensity/period)."""

    def __init__(self) -> None:
        self.times: deque[float] = deque()

    def allow(self, now: float, policy: RestartPolicy) -> bool:
        """Record a restart at ``now`` if the limit allows one more; False means give up."""
        while self.times and now - self.times[0] > policy.restart_window:
            self.times.popleft()
        if len(self.times) >= policy.max_restarts:
            return False
        self.times.append(now)
        return True

    def clear(self) -> None:
        self.times.clear()
