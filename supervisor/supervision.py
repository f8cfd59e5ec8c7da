"""The supervision policy: which process to start, stop, restart or give up on, and when.

``Supervision`` owns every ServiceInstance and the timers that drive them. It is told about
events (a worker's message, a process exit, a timer) and reacts through the state machine; it
never sleeps and never polls. ``reconcile()`` is called after every batch of events and moves
each instance toward what is wanted: started in dependency order once its dependencies are
READY, stopped in reverse order once its dependents are down.
"""
from __future__ import annotations

import logging
import os
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

from ipc import messages as m
from ipc.config import Config, ServiceSection
from ipc.dependencies import start_order
from supervisor.backoff import RestartPolicy
from supervisor.instance import ServiceInstance, describe_exit
from supervisor.resources import ResourceSampler
from supervisor.spawner import SpawnedProcess, Spawner
from supervisor.states import RUNNING_STATES, State
from supervisor.timers import Timers

log = logging.getLogger("optimizerd.supervisor")
HUNG_KILL_GRACE = 1.0    # a hung process cannot stop itself: SIGTERM, then SIGKILL this soon
STOP_KILL_GRACE = 2.0    # after SIGTERM on a graceful stop, before SIGKILL
RELOAD_ANSWER_TIMEOUT = 5.0


class Hooks:
    """What Supervision needs from the daemon around it."""

    send: Callable[[str, m.Message], None]           # to a worker, by token
    watch_process: Callable[[SpawnedProcess], None]  # sentinel and pipes into the poller
    process_gone: Callable[[SpawnedProcess], None]   # metrics clean-up after an exit
    worker_spec: Callable[[ServiceInstance], bytes]  # what the new process is told


class Supervision:
    def __init__(self, config: Config, spawner: Spawner, hooks: Hooks, timers: Timers):
        self.config = config
        self.spawner, self.hooks, self.timers = spawner, hooks, timers
        self.instances: dict[str, list[ServiceInstance]] = {}
        self.by_token: dict[str, ServiceInstance] = {}
        self.by_sentinel: dict[int, ServiceInstance] = {}
        self.order: list[str] = []
        self.resources = ResourceSampler()
        self.samples: dict[int, tuple[float, int]] = {}
        self.dependents_restart_pending: set[str] = set()
        self.reload_outcomes: dict[str, str] = {}  # service -> "reloaded" | "restarted"
        self.apply_config(config)

    # --- configuration ---------------------------------------------------------------------

    def mark_dirty(self) -> None:
        self.dirty = True

    def stop_all(self) -> None:
        """Shutdown: every process is to stop, in reverse dependency order."""
        for inst in self.all_instances():
            inst.want_running = False
        self.dirty = True

    def apply_config(self, config: Config) -> None:
        """Adopt the services of ``config``: new ones are added, gone ones set to stop."""
        self.config = config
        self.dirty = True
        enabled = config.enabled_services()
        for name, section in enabled.items():
            policy = RestartPolicy.effective(config.supervisor, section)
            current = self.instances.setdefault(name, [])
            for inst in current:
                inst.section, inst.policy = section, policy
                inst.want_running = inst.index < section.processes
            for index in range(len(current), section.processes):
                current.append(ServiceInstance(name, index, section, policy,
                                               on_change=self.mark_dirty))
        for name, current in self.instances.items():
            if name not in enabled:
                for inst in current:
                    inst.want_running = False
        self.order = start_order({n: s.depends_on for n, s in enabled.items()}
                                 | {n: [] for n in self.instances if n not in enabled})

    def section_of(self, name: str) -> ServiceSection:
        return self.instances[name][0].section

    def dependents_of(self, name: str) -> list[str]:
        return [n for n, insts in self.instances.items()
                if insts and name in insts[0].section.depends_on]

    def all_instances(self) -> list[ServiceInstance]:
        return [inst for name in self.order for inst in self.instances.get(name, [])]

    def forget_stopped(self) -> None:
        """Drop instances that were removed by a reload and have stopped."""
        for name in list(self.instances):
            kept = [i for i in self.instances[name] if i.want_running or i.state != State.STOPPED]
            if kept:
                self.instances[name] = kept
            else:
                del self.instances[name]
                self.order.remove(name)

    # --- queries ---------------------------------------------------------------------------

    def service_ready(self, name: str) -> bool:
        insts = self.instances.get(name, [])
        return bool(insts) and all(i.state == State.READY for i in insts if i.want_running)

    def all_ready(self) -> bool:
        wanted = [i for i in self.all_instances() if i.want_running]
        return all(i.state == State.READY for i in wanted)

    def all_stopped(self) -> bool:
        return all(i.state == State.STOPPED for i in self.all_instances())

    # --- reconciliation --------------------------------------------------------------------

    def reconcile(self) -> None:
        """Move every process toward what is wanted; a no-op unless something changed since
        the last pass (a transition, a config, a shutdown), so heartbeats cost no walk."""
        if not self.dirty:
            return
        self.dirty = False
        for name in self.order:
            deps_ready = all(self.service_ready(d) for d in self.section_of(name).depends_on)
            for inst in self.instances[name]:
                if inst.want_running:
                    if inst.state == State.STOPPED and deps_ready:
                        self.spawn(inst)
                elif inst.state in (State.BACKOFF, State.FAILED):
                    inst.cancel_timers()
                    inst.transition_to(State.STOPPED, "stop requested")
                elif inst.state in (State.STARTING, State.READY) and \
                        not self.has_running_dependents_to_stop(name):
                    self.begin_stop(inst, "stop requested")
        self.forget_stopped()

    def has_running_dependents_to_stop(self, name: str) -> bool:
        """Stop in reverse dependency order: wait while a dependent that is stopping too runs."""
        return any(i.state in RUNNING_STATES and not i.want_running
                   for dep in self.dependents_of(name) for i in self.instances[dep])

    # --- starting --------------------------------------------------------------------------

    def spawn(self, inst: ServiceInstance) -> None:
        inst.token = uuid.uuid4().hex
        inst.cancel_timers()
        inst.health, inst.reason, inst.status, inst.unhealthy_streak = "ok", "", {}, 0
        inst.heartbeat_seq = 0
        inst.restart_after_stop = inst.treat_exit_as_failure = False
        inst.transition_to(State.STARTING)
        try:
            inst.proc = self.spawner.spawn(inst.label, self.hooks.worker_spec(inst))
        except Exception as exc:  # the fork server itself failed: count it as a crash
            log.exception("cannot start %s", inst.label)
            inst.proc = None
            self.on_failure(inst, f"spawn failed: {exc}")
            return
        now = time.monotonic()
        inst.started_at = inst.last_heartbeat = now
        self.by_token[inst.token] = inst
        self.by_sentinel[inst.proc.sentinel] = inst
        self.hooks.watch_process(inst.proc)
        log.debug("%s: pid %d", inst.label, inst.proc.pid)
        token = inst.token
        inst.timers.append(self.timers.at(now + self.config.supervisor.start_timeout,
                                          lambda: self.check_start_timeout(inst, token)))
        self.schedule_hang_check(inst)

    def check_start_timeout(self, inst: ServiceInstance, token: str) -> None:
        if inst.token == token and inst.state == State.STARTING:
            self.kill_hung(inst, f"not READY after {self.config.supervisor.start_timeout:g} s")

    # --- worker messages -------------------------------------------------------------------

    def on_message(self, message: m.WorkerMessage) -> ServiceInstance | None:
        """Apply a worker's message; returns the instance it came from, None if unknown."""
        inst = self.by_token.get(message.token)
        if inst is None or inst.proc is None:
            log.debug("message from an unknown or former process: %s", type(message).__name__)
            return None
        inst.last_heartbeat = time.monotonic()
        if isinstance(message, m.Hello):
            if message.pid != inst.pid:
                log.warning("%s: HELLO claims pid %d, expected %s", inst.label, message.pid,
                            inst.pid)
        elif isinstance(message, m.Ready):
            self.on_ready(inst)
        elif isinstance(message, m.Heartbeat):
            self.on_heartbeat(inst, message)
        elif isinstance(message, m.ReloadResult):
            self.on_reload_result(inst, message)
        elif isinstance(message, m.RestartRequest):
            self.restart(inst, f"asked to be restarted: {message.reason}", as_failure=True)
        return inst

    def on_ready(self, inst: ServiceInstance) -> None:
        if inst.state != State.STARTING:
            return
        now = time.monotonic()
        inst.ready_at = now
        inst.start_duration = now - inst.started_at
        inst.transition_to(State.READY, f"in {inst.start_duration * 1000:.0f} ms")
        token = inst.token
        inst.timers.append(self.timers.at(now + inst.policy.stable_after,
                                          lambda: self.mark_stable(inst, token)))
        if inst.service in self.dependents_restart_pending and self.service_ready(inst.service):
            self.dependents_restart_pending.discard(inst.service)
            for dep in self.dependents_of(inst.service):
                for other in self.instances[dep]:
                    if other.state in (State.STARTING, State.READY):
                        self.restart(other, f"dependency {inst.service} restarted")

    def mark_stable(self, inst: ServiceInstance, token: str) -> None:
        if inst.token == token and inst.state == State.READY:
            inst.consecutive_failures = 0

    def on_heartbeat(self, inst: ServiceInstance, beat: m.Heartbeat) -> None:
        inst.heartbeat_seq = beat.seq
        inst.status = beat.status
        if beat.health != inst.health or beat.reason != inst.reason:
            log.info("%s: health %s%s", inst.label, beat.health,
                     f" ({beat.reason})" if beat.reason else "")
        inst.health, inst.reason = beat.health, beat.reason
        now = time.monotonic()
        # The worker only needs to hear from us well within its silence timeout (several
        # heartbeat timeouts); acknowledging every beat would double the idle traffic. That
        # timeout comes from [supervisor] as it was at the worker's start, not from this
        # service's override or a reloaded value: never wait longer than its floor allows.
        if now - inst.last_ack >= min(inst.policy.heartbeat_timeout / 2,
                                      m.MIN_SILENCE_TIMEOUT / 4):
            self.hooks.send(inst.token, m.HeartbeatAck(seq=beat.seq))
            inst.last_ack = now
        if beat.health != "unhealthy":
            inst.unhealthy_streak = 0
            return
        inst.unhealthy_streak += 1
        if inst.unhealthy_streak >= inst.policy.failure_threshold and \
                inst.state in (State.STARTING, State.READY):
            self.restart(inst, f"unhealthy for {inst.unhealthy_streak} heartbeats: {beat.reason}",
                         as_failure=True)

    # --- hangs, stops and restarts ---------------------------------------------------------

    def schedule_hang_check(self, inst: ServiceInstance) -> None:
        token = inst.token
        due = inst.last_heartbeat + inst.policy.heartbeat_timeout
        inst.timers.append(self.timers.at(due, lambda: self.check_hang(inst, token)))

    def check_hang(self, inst: ServiceInstance, token: str) -> None:
        if inst.token != token or inst.state not in (State.STARTING, State.READY):
            return
        silent = time.monotonic() - inst.last_heartbeat
        if silent >= inst.policy.heartbeat_timeout:
            self.kill_hung(inst, f"no heartbeat for {silent:.1f} s")
        else:
            self.schedule_hang_check(inst)

    def kill_hung(self, inst: ServiceInstance, reason: str) -> None:
        """A process that cannot be trusted to stop itself: SIGTERM, SIGKILL soon after."""
        inst.treat_exit_as_failure = True
        inst.cancel_timers()
        inst.transition_to(State.STOPPING, reason)
        self.signal(inst, signal.SIGTERM)
        self.signal(inst, signal.SIGCONT)  # a stopped process only acts on SIGTERM once resumed
        self.escalate(inst, time.monotonic() + HUNG_KILL_GRACE, signal.SIGKILL)

    def begin_stop(self, inst: ServiceInstance, reason: str) -> None:
        """Graceful stop: STOP with a deadline, then SIGTERM, then SIGKILL."""
        inst.cancel_timers()
        deadline = self.config.supervisor.shutdown_timeout
        inst.transition_to(State.STOPPING, reason)
        now = time.monotonic()
        if inst.heartbeat_seq or inst.state == State.READY:
            self.hooks.send(inst.token, m.Stop(deadline_s=deadline))
            self.escalate(inst, now + deadline, signal.SIGTERM)
            self.escalate(inst, now + deadline + STOP_KILL_GRACE, signal.SIGKILL)
        else:  # not connected yet: a STOP could be lost, SIGTERM is not
            self.signal(inst, signal.SIGTERM)
            self.escalate(inst, now + STOP_KILL_GRACE, signal.SIGKILL)

    def escalate(self, inst: ServiceInstance, when: float, signum: int) -> None:
        token = inst.token

        def fire() -> None:
            if inst.token == token and inst.state == State.STOPPING:
                log.warning("%s: still running, sending %s", inst.label,
                            signal.Signals(signum).name)
                self.signal(inst, signum)
        inst.timers.append(self.timers.at(when, fire))

    def signal(self, inst: ServiceInstance, signum: int) -> None:
        if inst.pid is None:
            return
        try:
            os.kill(inst.pid, signum)
        except ProcessLookupError:
            log.debug("%s: pid %d already gone", inst.label, inst.pid)

    def restart(self, inst: ServiceInstance, reason: str, as_failure: bool = False) -> None:
        """Stop gracefully and start again. ``as_failure`` counts it against the restart limits
        and waits out the backoff, like a crash; otherwise it starts again at once."""
        if inst.state in (State.STARTING, State.READY):
            self.begin_stop(inst, reason)
            inst.treat_exit_as_failure = as_failure
            inst.restart_after_stop = not as_failure
        elif inst.state in (State.BACKOFF, State.FAILED):  # an operator's word: start now
            inst.cancel_timers()
            inst.intensity.clear()
            inst.consecutive_failures = 0
            inst.transition_to(State.STOPPED, reason)  # reconcile starts it, deps permitting
        if inst.section.restart_dependents:
            self.dependents_restart_pending.add(inst.service)

    # --- exits -----------------------------------------------------------------------------

    def on_exit(self, sentinel: int) -> None:
        inst = self.by_sentinel.pop(sentinel, None)
        if inst is None or inst.proc is None:
            return
        proc = inst.proc
        code = proc.exit_code()
        inst.last_exit = describe_exit(code)
        self.by_token.pop(inst.token, None)
        self.samples.pop(proc.pid, None)
        self.resources.forget(proc.pid)
        self.hooks.process_gone(proc)
        inst.proc = None
        inst.cancel_timers()
        if inst.section.restart_dependents and inst.want_running:
            self.dependents_restart_pending.add(inst.service)
        if inst.state == State.STOPPING and not inst.treat_exit_as_failure:
            inst.transition_to(State.STOPPED, inst.last_exit)
            if inst.restart_after_stop and inst.want_running:
                inst.restarts += 1
        elif not inst.want_running:
            inst.transition_to(State.STOPPED, inst.last_exit)
        elif inst.state == State.STOPPING:  # killed as hung or unhealthy
            self.on_failure(inst, f"{inst.history[-1].reason}; {inst.last_exit}")
        else:
            self.on_failure(inst, inst.last_exit)

    def on_failure(self, inst: ServiceInstance, reason: str) -> None:
        """An unplanned end: back off and restart, or give up past the restart intensity."""
        now = time.monotonic()
        policy = inst.policy
        if not inst.intensity.allow(now, policy):
            inst.transition_to(State.FAILED, f"{reason}; more than {policy.max_restarts} "
                               f"restarts within {policy.restart_window:g} s, giving up")
            return
        delay = policy.delay(inst.consecutive_failures)
        inst.consecutive_failures += 1
        inst.restarts += 1
        inst.transition_to(State.BACKOFF, f"{reason}; restarting in {delay:.2f} s")
        inst.timers.append(self.timers.at(now + delay, lambda: self.after_backoff(inst)))

    def after_backoff(self, inst: ServiceInstance) -> None:
        if inst.state != State.BACKOFF:
            return
        inst.transition_to(State.STOPPED, "backoff over")  # reconcile starts it, deps permitting

    # --- reload ----------------------------------------------------------------------------

    def send_reload(self, inst: ServiceInstance, config_doc: dict[str, Any]) -> None:
        inst.reload_pending = True
        token = inst.token
        self.hooks.send(token, m.Reload(config=config_doc))

        def no_answer() -> None:
            if inst.token == token and inst.reload_pending:
                inst.reload_pending = False
                self.reload_outcomes[inst.service] = "restarted"
                self.restart(inst, "no answer to RELOAD")
        inst.timers.append(self.timers.at(time.monotonic() + RELOAD_ANSWER_TIMEOUT, no_answer))

    def on_reload_result(self, inst: ServiceInstance, result: m.ReloadResult) -> None:
        inst.reload_pending = False
        if result.applied:
            log.info("%s: reloaded live", inst.label)
            self.reload_outcomes.setdefault(inst.service, "reloaded")
        else:
            self.reload_outcomes[inst.service] = "restarted"
            self.restart(inst, f"reload: {result.reason}")

    # --- resources -------------------------------------------------------------------------

    def sample_resources(self) -> None:
        """CPU and RSS of every running process; restart one above its max_rss_mb."""
        for inst in self.all_instances():
            if inst.pid is None:
                continue
            sample = self.resources.sample(inst.pid)
            if sample is None:
                continue
            self.samples[inst.pid] = sample
            limit = inst.section.max_rss_mb
            rss_mb = sample[1] / (1 << 20)
            if limit and rss_mb > limit and inst.state == State.READY:
                self.restart(inst, f"RSS {rss_mb:.0f} MiB above max_rss_mb {limit}")
