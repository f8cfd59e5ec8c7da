"""One supervised process of a service: its state machine, health, timers and history."""
from __future__ import annotations

import logging
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ipc.config import ServiceSection
from supervisor.backoff import RestartIntensity, RestartPolicy
from supervisor.spawner import SpawnedProcess
from supervisor.states import State, check_transition
from supervisor.timers import Timer

log = logging.getLogger("optimizerd.supervisor")
HISTORY_LENGTH = 20


@dataclass(frozen=True)
class Transition:
    at: float  # wall clock, for people
    old: str
    new: str
    reason: str


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


@dataclass
class ServiceInstance:
    service: str
    index: int
    section: ServiceSection
    policy: RestartPolicy
    state: State = State.STOPPED
    health: str = "ok"
    reason: str = ""
    want_running: bool = True
    proc: SpawnedProcess | None = None
    token: str = ""
    started_at: float = 0.0       # monotonic, at spawn
    ready_at: float = 0.0
    last_heartbeat: float = 0.0
    last_ack: float = 0.0         # when we last answered a heartbeat
    start_duration: float = 0.0   # spawn to READY of the last start
    heartbeat_seq: int = 0
    status: dict[str, Any] = field(default_factory=dict)
    unhealthy_streak: int = 0
    consecutive_failures: int = 0
    restarts: int = 0
    intensity: RestartIntensity = field(default_factory=RestartIntensity)
    restart_after_stop: bool = False   # a planned restart: start again right after the exit
    treat_exit_as_failure: bool = False  # killed for hanging or being unhealthy
    reload_pending: bool = False
    last_exit: str = ""
    history: deque[Transition] = field(default_factory=lambda: deque(maxlen=HISTORY_LENGTH))
    timers: list[Timer] = field(default_factory=list)
    on_change: Callable[[], None] | None = field(default=None, repr=False)  # after a transition

    @property
    def label(self) -> str:
        return self.service if self.section.processes == 1 else f"{self.service}#{self.index}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def transition_to(self, new: State, reason: str = "") -> None:
        """The only way to change state: checked against the table, logged, kept in history."""
        old = self.state
        check_transition(self.label, old, new)
        self.state = new
        self.history.append(Transition(time.time(), old.value, new.value, reason))
        level = logging.WARNING if new in (State.BACKOFF, State.FAILED) else logging.INFO
        log.log(level, "%s: %s -> %s%s", self.label, old.value, new.value,
                f" ({reason})" if reason else "")
        if self.on_change is not None:
            self.on_change()

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()
