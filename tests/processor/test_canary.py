"""Canary rollouts driven by synthetic traffic in event time (fixed seeds, no sleeps).

Each interval has 20,000 calls of service "chat". Each call draws a request key from a fixed
pool and takes the variant the current config gives that key (``resolve_variant``, computed
once per key as its bucket, then compared with the config's variant ranges for the whole
batch). Baseline calls: latency lognormal (median 800 ms, sigma 0.5), 2 % errors, quality
Beta(8, 2), cost about $0.002 per call (lognormal sigma 0.1). A canary's effect scales these.
"""
from __future__ import annotations

import asyncio
import math
from collections import Counter

import msgspec
import numpy as np
import pytest

from ipc.events import LLMEvent
from ipc.variants import LLMConfig, bucket_of, resolve_variant, variant_ranges
from workers.processor.canary import (
    TRANSITIONS,
    CanaryDeployer,
    CanarySettings,
    Phase,
    RolloutError,
)
from workers.processor.configs import ConfigManager, MemoryDocStore
from workers.processor.reservoir import ProportionCounter, Reservoir

SERVICE = "chat"
T0 = 1_700_000_000 * 1_000_000_000
INTERVAL = 60 * 1_000_000_000
CALLS = 20_000
KEYS = [f"req-{i}" for i in range(50_000)]
BUCKETS = np.array([bucket_of(SERVICE, key) for key in KEYS])
BASE = LLMConfig(service=SERVICE, model="gpt-4o", parameters={"temperature": 0.3},
                 cache={"ttl_s": 300})


class Traffic:
    """One seeded stream of intervals; ``effect`` changes the canary's calls."""

    def __init__(self, seed: int, error_rate: float = 0.02, latency_scale: float = 1.0,
                 quality_scale: float = 1.0, cost_scale: float = 1.0) -> None:
        self.rng = np.random.default_rng(seed)
        self.canary = dict(error_rate=error_rate, latency_scale=latency_scale,
                           quality_scale=quality_scale, cost_scale=cost_scale)
        self.baseline = dict(error_rate=0.02, latency_scale=1.0, quality_scale=1.0,
                             cost_scale=1.0)

    def calls(self, n: int, error_rate: float, latency_scale: float, quality_scale: float,
              cost_scale: float) -> dict[str, np.ndarray]:
        rng = self.rng
        return {"latency_ms": rng.lognormal(math.log(800), 0.5, n) * latency_scale,
                "errors": rng.random(n) < error_rate,
                "quality": rng.beta(8, 2, n) * quality_scale,
                "cost_usd": 0.002 * rng.lognormal(0, 0.1, n) * cost_scale}

    def interval(self, deployer: CanaryDeployer, config: LLMConfig, start_ns: int) -> None:
        buckets = BUCKETS[self.rng.integers(0, len(KEYS), CALLS)]
        in_canary = np.zeros(CALLS, dtype=bool)
        for name, low, high in variant_ranges(config):
            if name == "canary":
                in_canary = (buckets >= low) & (buckets < high)
        for variant, mask, effect in ((None, ~in_canary, self.baseline),
                                      ("canary", in_canary, self.canary)):
            if mask.any():
                deployer.observe_many(SERVICE, variant, start_ns,
                                      **self.calls(int(mask.sum()), **effect))


class Run:
    """A deployer over in-memory stores, with the transitions it emitted."""

    def __init__(self, settings: CanarySettings | None = None) -> None:
        self.configs = ConfigManager(MemoryDocStore())
        self.docs = MemoryDocStore()
        self.emitted: list[dict] = []
        self.deployer = CanaryDeployer(self.configs, self.docs, self.emitted.append, settings)

    async def start(self, change: dict, proposal: str = "p1") -> None:
        base = await self.configs.put(BASE, "initial", 0)
        await self.deployer.start(SERVICE, proposal, base, change, T0)

    async def drive(self, traffic: Traffic, intervals: int, first: int = 0) -> None:
        """Intervals ``first`` .. ``intervals - 1`` of traffic, advancing after each."""
        for i in range(first, intervals):
            if SERVICE not in self.deployer.active:
                return
            config = await self.configs.get(SERVICE)
            traffic.interval(self.deployer, config, T0 + i * INTERVAL)
            await self.deployer.advance(T0 + (i + 1) * INTERVAL)

    @property
    def outcome(self) -> str:
        return self.emitted[-1]["kind"] if self.emitted else "none"


def simulate(seed: int, change: dict, intervals: int = 12, **effect: float) -> Run:
    run = Run()

    async def go() -> None:
        await run.start(change)
        await run.drive(Traffic(seed, **effect), intervals)

    asyncio.run(go())
    return run


# --- samples ---------------------------------------------------------------------------------

def test_reservoir_is_uniform_bounded_and_seeded():
    kept = Counter()
    for seed in range(300):
        reservoir = Reservoir(50, seed)
        reservoir.add_many(np.arange(500))
        assert len(reservoir.values()) == 50 and reservoir.seen == 500
        kept.update(reservoir.values().astype(int) // 100)
    # each fifth of the stream keeps about a fifth of the sample
    assert all(abs(kept[i] / (300 * 50) - 0.2) < 0.02 for i in range(5)), kept
    one, many = Reservoir(64, 7), Reservoir(64, 7)
    for value in range(64):
        one.add(value)
    many.add_many(np.arange(64))
    assert np.array_equal(one.values(), many.values())


def test_reservoir_state_round_trips_and_continues_identically():
    a = Reservoir(100, 3)
    a.add_many(np.arange(1000))
    b = Reservoir.from_state(msgspec.msgpack.decode(msgspec.msgpack.encode(a.to_state()),
                                                    type=type(a.to_state())))
    a.add_many(np.arange(1000, 3000))
    b.add_many(np.arange(1000, 3000))
    assert np.array_equal(a.values(), b.values()) and a.seen == b.seen == 3000


def test_proportion_counter_is_exact():
    counter = ProportionCounter()
    counter.add_many([True, False, False, True])
    counter.add(True)
    assert (counter.hits, counter.total, counter.proportion) == (3, 5, 0.6)
    assert counter.as_samples().sum() == 3


# --- the state machine -----------------------------------------------------------------------

def test_transitions_table_only_leaves_running_to_finish():
    assert TRANSITIONS["started"] == (Phase.NEW, Phase.RUNNING)
    assert {after for _, after in TRANSITIONS.values()} == {
        Phase.RUNNING, Phase.PROMOTED, Phase.ROLLED_BACK}
    assert all(before in (Phase.NEW, Phase.RUNNING) for before, _ in TRANSITIONS.values())


def test_start_writes_a_canary_variant_and_refuses_a_second_rollout():
    run = Run()

    async def go() -> None:
        await run.start({"model": "gpt-4o-mini"})
        config = await run.configs.get(SERVICE)
        assert [(v.name, v.weight_bp) for v in config.variants] == [("canary", 500)]
        assert config.variants[0].overrides == {"model": "gpt-4o-mini"}
        with pytest.raises(RolloutError, match="already has an active rollout"):
            await run.deployer.start(SERVICE, "p2", config, {"model": "x"}, T0)
        found = await run.docs.get("rollout:chat:p1")
        assert found is not None and msgspec.json.decode(found[1])["phase"] == "running"

    asyncio.run(go())
    assert run.emitted[0]["kind"] == "started" and run.emitted[0]["weight_bp"] == 500


def test_observe_routes_single_events_by_variant():
    run = Run()
    asyncio.run(run.start({"model": "gpt-4o-mini"}))

    def event(variant: str | None, time_ns: int = T0) -> LLMEvent:
        return LLMEvent(event_id="e", time_ns=time_ns, service=SERVICE, model="m",
                        input_tokens=1, output_tokens=1, latency_ms=100.0, status="error",
                        variant=variant, quality=0.5, cost_usd=0.01)

    for variant in (None, "baseline", "canary", "other"):
        run.deployer.observe(event(variant))
    run.deployer.observe(event("canary", T0 - 1))  # before the stage: ignored
    baseline, canary = run.deployer._samples[SERVICE]
    assert (baseline.errors.hits, canary.errors.hits) == (2, 1)
    assert canary.reservoirs["quality"].values().tolist() == [0.5]


def test_idle_stage_times_out_and_rolls_back():
    run = Run(CanarySettings(idle_timeout_intervals=3))

    async def go() -> list:
        await run.start({"model": "gpt-4o-mini"})
        return await run.deployer.advance(T0 + 5 * INTERVAL)

    done = asyncio.run(go())
    assert [t.kind for t in done] == ["rolled_back"]
    assert done[0].time_ns == T0 + 3 * INTERVAL and "timed out" in done[0].reason
    assert asyncio.run(run.configs.get(SERVICE)).variants == []


# --- simulated rollouts ----------------------------------------------------------------------

def test_aa_canaries_are_rarely_rolled_back():
    outcomes = Counter(simulate(1000 + seed, {"parameters": {"temperature": 0.3}}).outcome
                       for seed in range(200))
    print(f"\nA/A over 200 canaries: {dict(outcomes)}")
    assert outcomes["rolled_back"] <= 2  # at most 1 %
    assert outcomes["promoted"] + outcomes["stage_advanced"] + outcomes["rolled_back"] == 200


REGRESSIONS = {"errors +2 points": {"error_rate": 0.04},
               "p95 latency +30%": {"latency_scale": 1.3},
               "quality -5%": {"quality_scale": 0.95}}


@pytest.mark.parametrize("name", list(REGRESSIONS))
def test_regressions_are_rolled_back_early_at_low_weight(name):
    caught, when = 0, Counter()
    for seed in range(50):
        run = simulate(2000 + seed, {"parameters": {"temperature": 1.0}}, intervals=6,
                       **REGRESSIONS[name])
        last = run.emitted[-1]
        intervals = (last["time_ns"] - T0) // INTERVAL
        early = (last["kind"] == "rolled_back" and intervals <= 3
                 and all(t["weight_bp"] <= 1000 for t in run.emitted[:-1]))
        caught += early
        when[intervals if last["kind"] == "rolled_back" else "missed"] += 1
    print(f"\n{name}: {caught}/50 rolled back within 3 intervals at <= 10%; "
          f"rollback interval counts {dict(when)}")
    assert caught >= 48  # >= 95 %


def test_a_good_canary_is_promoted_through_every_stage():
    run = simulate(7, {"model": "gpt-4o-mini"}, intervals=20, cost_scale=0.5,
                   latency_scale=0.9)
    kinds = [t["kind"] for t in run.emitted]
    assert kinds == ["started", "stage_advanced", "stage_advanced", "stage_advanced",
                     "promoted"]
    assert [t["weight_bp"] for t in run.emitted] == [500, 2500, 5000, 10_000, 0]
    final = asyncio.run(run.configs.get(SERVICE))
    assert final.model == "gpt-4o-mini" and final.variants == []
    assert final.parameters == BASE.parameters and final.cache == BASE.cache
    assert run.emitted[-1]["judge"]["verdict"] == "pass"
    found = asyncio.run(run.docs.get("rollout:chat:p1"))
    assert found is not None
    doc = msgspec.json.decode(found[1])
    assert doc["phase"] == "promoted" and len(doc["transitions"]) == 5
    # the vectorized routing of the simulation is resolve_variant's
    history = asyncio.run(run.configs.history(SERVICE))
    canary25 = next(c for c in history if c.variants and c.variants[0].weight_bp == 2500)
    low, high = variant_ranges(canary25)[0][1:]
    for key, bucket in zip(KEYS[:2000], BUCKETS[:2000], strict=True):
        expected = "canary" if low <= bucket < high else "baseline"
        assert resolve_variant(canary25, key) == expected


def test_checkpoint_mid_rollout_continues_with_the_same_outcome():
    change = {"model": "gpt-4o-mini"}
    effect = {"cost_scale": 0.5}
    straight = simulate(11, change, intervals=20, **effect)

    resumed = Run()

    async def go() -> None:
        await resumed.start(change)
        traffic = Traffic(11, **effect)
        await resumed.drive(traffic, 4)  # 5 % and 25 % passed; 50 % is collecting
        assert resumed.deployer.active[SERVICE].stage == 2
        config = await resumed.configs.get(SERVICE)
        traffic.interval(resumed.deployer, config, T0 + 4 * INTERVAL)  # mid-interval
        state = resumed.deployer.state_to_bytes()
        fresh = CanaryDeployer.from_state_bytes(
            state, ConfigManager(resumed.configs.store), resumed.docs, resumed.emitted.append)
        resumed.deployer, resumed.configs = fresh, fresh.configs
        await fresh.advance(T0 + 5 * INTERVAL)
        await resumed.drive(traffic, 20, first=5)

    asyncio.run(go())
    strip = ["kind", "time_ns", "weight_bp", "config_version", "canary_samples",
             "baseline_samples", "judge"]
    assert [[t[k] for k in strip] for t in resumed.emitted] == [
        [t[k] for k in strip] for t in straight.emitted]
    assert straight.outcome == "promoted"
