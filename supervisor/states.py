"""The life cycle of one supervised process: named states and the legal transitions, as data."""
from __future__ import annotations

import enum


class State(enum.Enum):
    STARTING = "starting"  # forked, has not said READY yet
    READY = "ready"        # said READY; may be degraded, still ready
    STOPPING = "stopping"  # told to stop (STOP, then SIGTERM, then SIGKILL)
    STOPPED = "stopped"    # not running, by intent
    BACKOFF = "backoff"    # exited unexpectedly; restart scheduled
    FAILED = "failed"      # gave up: restart intensity exceeded; needs an operator


RUNNING_STATES = frozenset({State.STARTING, State.READY, State.STOPPING})
DOWN_STATES = frozenset({State.STOPPED, State.BACKOFF, State.FAILED})

TRANSITIONS: frozenset[tuple[State, State]] = frozenset({
    (State.STOPPED, State.STARTING),
    (State.STARTING, State.READY),
    (State.STARTING, State.STOPPING),  # stop requested, start timeout, hung
    (State.STARTING, State.BACKOFF),   # exited during start
    (State.STARTING, State.STOPPED),   # exited while no longer wanted
    (State.STARTING, State.FAILED),    # exited during start, no restarts left
    (State.READY, State.STOPPING),
    (State.READY, State.BACKOFF),      # crashed
    (State.READY, State.STOPPED),      # exited while no longer wanted
    (State.READY, State.FAILED),       # crashed, no restarts left
    (State.STOPPING, State.STOPPED),   # exited as asked
    (State.STOPPING, State.BACKOFF),   # was killed as hung or unhealthy: restart like a crash
    (State.STOPPING, State.FAILED),    # ... with no restarts left
    (State.BACKOFF, State.STOPPED),    # backoff over (then started), or stop requested
    (State.FAILED, State.STOPPED),     # optimizerctl restart (then started again), or removed
})


class IllegalTransition(RuntimeError):
    def __init__(self, name: str, old: State, new: State):
        super().__init__(f"{name}: illegal transition {old.value} -> {new.value}")


def check_transition(name: str, old: State, new: State) -> None:
    if (old, new) not in TRANSITIONS:
        raise IllegalTransition(name, old, new)
