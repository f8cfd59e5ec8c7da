"""Unit tests, no processes: state table, backoff, restart intensity, dependency order."""
from __future__ import annotations

import itertools
import random

import pytest

from ipc.config import Config, ExtraServiceSection, SupervisorSection
from ipc.dependencies import DependencyCycleError, start_order, start_tiers
from supervisor.backoff import JITTER, RestartIntensity, RestartPolicy
from supervisor.instance import ServiceInstance
from supervisor.states import (DOWN_STATES, RUNNING_STATES, TRANSITIONS, IllegalTransition, State,
                               check_transition)

S = State
# The specification, written out independently of supervisor/states.py: a change to the table
# there must be a deliberate change here too.
EXPECTED = {
    (S.STOPPED, S.STARTING),
    (S.STARTING, S.READY), (S.STARTING, S.STOPPING), (S.STARTING, S.BACKOFF),
    (S.STARTING, S.STOPPED), (S.STARTING, S.FAILED),
    (S.READY, S.STOPPING), (S.READY, S.BACKOFF), (S.READY, S.STOPPED), (S.READY, S.FAILED),
    (S.STOPPING, S.STOPPED), (S.STOPPING, S.BACKOFF), (S.STOPPING, S.FAILED),
    (S.BACKOFF, S.STOPPED),
    (S.FAILED, S.STOPPED),
}


# --- states ------------------------------------------------------------------------------------

def test_transition_table_is_the_specified_one():
    assert set(TRANSITIONS) == EXPECTED


@pytest.mark.parametrize("old,new", sorted(itertools.product(State, State),
                                           key=lambda p: (p[0].value, p[1].value)),
                         ids=lambda s: s.value)
def test_every_pair_is_accepted_or_refused_by_the_table(old, new):
    if (old, new) in EXPECTED:
        check_transition("svc", old, new)
    else:
        with pytest.raises(IllegalTransition) as err:
            check_transition("svc", old, new)
        assert f"svc: illegal transition {old.value} -> {new.value}" in str(err.value)


def test_state_groups_partition_the_states():
    assert RUNNING_STATES | DOWN_STATES == set(State)
    assert not RUNNING_STATES & DOWN_STATES


def test_table_walk_reaches_every_state_and_every_state_can_get_back_to_stopped():
    def reachable(start: State, edges) -> set[State]:
        seen, todo = {start}, [start]
        while todo:
            s = todo.pop()
            for a, b in edges:
                if a == s and b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    assert reachable(S.STOPPED, TRANSITIONS) == set(State)
    reverse = {(b, a) for a, b in TRANSITIONS}
    assert reachable(S.STOPPED, reverse) == set(State)
    assert not any(a == b for a, b in TRANSITIONS), "no self-transitions"
    # A down process is only ever started from STOPPED (backoff and failed go through it).
    assert {b for a, b in TRANSITIONS if a in DOWN_STATES} <= {S.STOPPED, S.STARTING}


def _instance() -> ServiceInstance:
    section = ExtraServiceSection(entrypoint="workers.stub:StubWorker")
    policy = RestartPolicy.effective(SupervisorSection(), section)
    return ServiceInstance("svc", 0, section, policy)


def test_transition_to_walks_a_full_life_and_keeps_history():
    inst = _instance()
    walk = [S.STARTING, S.READY, S.BACKOFF, S.STOPPED, S.STARTING, S.STOPPING, S.FAILED,
            S.STOPPED, S.STARTING, S.READY, S.STOPPING, S.STOPPED]
    for new in walk:
        inst.transition_to(new, f"to {new.value}")
    assert inst.state == S.STOPPED
    assert [(h.old, h.new) for h in inst.history] == list(zip(
        [S.STOPPED.value] + [s.value for s in walk[:-1]], [s.value for s in walk]))
    assert all(h.reason == f"to {h.new}" for h in inst.history)
    stamps = [h.at for h in inst.history]
    assert stamps == sorted(stamps)


def test_transition_to_refuses_an_illegal_move_and_leaves_the_state():
    inst = _instance()
    with pytest.raises(IllegalTransition):
        inst.transition_to(S.READY)  # stopped -> ready skips starting
    assert inst.state == S.STOPPED and not inst.history
    inst.transition_to(S.STARTING)
    inst.transition_to(S.READY)
    inst.transition_to(S.FAILED)
    for bad in (S.STARTING, S.READY, S.BACKOFF, S.STOPPING):
        with pytest.raises(IllegalTransition):
            inst.transition_to(bad)
    assert inst.state == S.FAILED


# --- backoff -----------------------------------------------------------------------------------

def _policy(**kw) -> RestartPolicy:
    values = dict(heartbeat_timeout=1.0, backoff_base=0.1, backoff_max=30.0, max_restarts=5,
                  restart_window=60.0, failure_threshold=3, stable_after=10.0)
    values.update(kw)
    return RestartPolicy(**values)


@pytest.mark.parametrize("n", range(0, 12))
def test_backoff_delay_is_base_times_two_to_the_n_capped_with_jitter(n):
    policy = _policy(backoff_base=0.1, backoff_max=30.0)
    rng = random.Random(n)
    raw = min(0.1 * 2 ** n, 30.0)
    delays = [policy.delay(n, rng) for _ in range(400)]
    assert all(raw * (1 - JITTER) - 1e-9 <= d <= raw * (1 + JITTER) + 1e-9 for d in delays)
    # The jitter is real: it spreads over most of the +-20% band.
    assert max(delays) - min(delays) > raw * JITTER
    assert JITTER == pytest.approx(0.2)


def test_backoff_extremes_of_jitter_and_huge_n():
    policy = _policy(backoff_base=0.5, backoff_max=4.0)

    class Edge(random.Random):
        def __init__(self, pick):
            super().__init__(0)
            self.pick = pick

        def uniform(self, a, b):
            return a if self.pick == "low" else b

    assert policy.delay(0, Edge("low")) == pytest.approx(0.4)
    assert policy.delay(0, Edge("high")) == pytest.approx(0.6)
    assert policy.delay(3, Edge("high")) == pytest.approx(4.0 * 1.2)  # capped at max first
    assert policy.delay(10_000, Edge("low")) == pytest.approx(4.0 * 0.8)  # no overflow


def test_effective_policy_takes_service_overrides_else_supervisor_values():
    sup = SupervisorSection(backoff_base=0.3, max_restarts=7, heartbeat_timeout=4.0)
    own = ExtraServiceSection(entrypoint="m:C", max_restarts=2, backoff_base=1.5)
    p = RestartPolicy.effective(sup, own)
    assert (p.max_restarts, p.backoff_base, p.heartbeat_timeout) == (2, 1.5, 4.0)
    p = RestartPolicy.effective(sup, ExtraServiceSection(entrypoint="m:C"))
    assert (p.max_restarts, p.backoff_base) == (7, 0.3)
    # 0 is a real override (never restart), not "unset".
    assert RestartPolicy.effective(sup, ExtraServiceSection(entrypoint="m:C",
                                                            max_restarts=0)).max_restarts == 0


# --- restart intensity -------------------------------------------------------------------------

def test_sixth_restart_within_window_is_refused_with_max_restarts_5():
    policy = _policy(max_restarts=5, restart_window=60.0)
    intensity = RestartIntensity()
    assert [intensity.allow(100.0 + i, policy) for i in range(5)] == [True] * 5
    assert intensity.allow(105.0, policy) is False
    assert intensity.allow(159.0, policy) is False  # the first one is 59 s old: still counted


def test_restarts_outside_the_window_no_longer_count():
    policy = _policy(max_restarts=5, restart_window=60.0)
    intensity = RestartIntensity()
    for i in range(5):
        assert intensity.allow(100.0 + i, policy)
    assert intensity.allow(160.5, policy)      # 100.0 has left the window
    assert not intensity.allow(160.6, policy)  # 101..104 and 160.5 are in it
    assert intensity.allow(164.5, policy)      # 101 and 102 and 103 and 104 have left


def test_max_restarts_zero_refuses_at_once_and_clear_resets():
    policy = _policy(max_restarts=0)
    intensity = RestartIntensity()
    assert not intensity.allow(1.0, policy)
    policy = _policy(max_restarts=1)
    assert intensity.allow(1.0, policy) and not intensity.allow(2.0, policy)
    intensity.clear()
    assert intensity.allow(3.0, policy)


# --- dependencies ------------------------------------------------------------------------------

def test_default_services_start_in_tiers():
    deps = {n: s.depends_on for n, s in Config().enabled_services().items()}
    assert start_tiers(deps) == [["storage"], ["collector", "integrations"], ["processor"],
                                 ["grpc_api", "rest_api"]]
    order = start_order(deps)
    for name, needs in deps.items():
        assert all(order.index(d) < order.index(name) for d in needs)


def test_order_ignores_dependencies_that_are_not_services():
    assert start_tiers({"a": [], "b": ["a", "gone"], "c": ["b"]}) == [["a"], ["b"], ["c"]]
    assert start_tiers({"x": [], "y": []}) == [["x", "y"]]
    assert start_tiers({}) == []


@pytest.mark.parametrize("graph", [
    {"a": ["b"], "b": ["a"]},
    {"a": ["b"], "b": ["c"], "c": ["a"], "d": []},
    {"a": ["a"]},
    {"root": [], "a": ["root", "c"], "b": ["a"], "c": ["b"], "leaf": ["a"]},
])
def test_cycle_error_names_the_cycle_in_dependency_direction(graph):
    with pytest.raises(DependencyCycleError) as err:
        start_tiers(graph)
    cycle = err.value.cycle
    assert cycle[0] == cycle[-1] and len(cycle) >= 2
    for a, b in zip(cycle, cycle[1:]):
        assert b in graph[a], f"{a} does not depend on {b}; cycle given as {cycle}"
    assert str(err.value) == "dependency cycle: " + " -> ".join(cycle)
    assert isinstance(err.value, ValueError)
