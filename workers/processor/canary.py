"""Canary rollouts: a change goes out to a growing share of a service's traffic, judged against
the rest at every analysis interval, and is rolled back at the first sign of harm.

One rollout per service. ``start`` writes a config version with a variant "canary" (overrides:
the change) at the first stage's weight. Callers route each request with ``resolve_variant``,
so calls carry ``variant="canary"`` or the baseline's (``None`` / "baseline"); ``observe`` files
them into bounded per-side samples. ``advance(now_ns)`` runs in event time: at each
interval boundary of the current stage, once the canary has ``min_samples`` calls, the judge
compares canary with baseline. A fail rolls back at once (the canary variant is removed);
a pass moves to the next stage only once the stage has ``pass_min_samples`` canary calls (so
that a harmful change is not waved through on thin evidence); an inconclusive verdict keeps
collecting. The last stage passing promotes the change into the base config. A stage whose
canary gets no call for ``idle_timeout_intervals`` intervals is rolled back.

Samples across stages: the canary's samples start fresh at each stage (its share and thus its
load changed, and a verdict should be about the current weight); the baseline's are kept for the
whole rollout (its config never changes), which is also what lets the last stage (100 %, no
baseline traffic left) be judged at all.

Every transition is persisted as a rollout document (id ``rollout:<service>:<proposal_id>``;
the storage worker allows no "/" in ids) and handed to ``emit``. ``state_to_bytes`` /
``from_state_bytes`` carry active rollouts, samples and random state included, across a restart.
"""
from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np
from msgspec import Struct, field

from ipc.events import LLMEvent
from ipc.variants import BASELINE, BUCKETS, LLMConfig, Variant, with_overrides
from workers.processor.configs import NAME_PATTERN, ConfigManager, DocConflict, DocStore
from workers.processor.judge import JudgeConfig, JudgeResult, MetricSpec, judge
from workers.processor.reservoir import ProportionCounter, Reservoir, ReservoirState

CANARY = "canary"
CONTINUOUS = ("latency_ms", "quality", "cost_usd")  # reservoir-sampled; "errors" is counted
METRIC_NAMES = frozenset({"errors", *CONTINUOUS})
DEFAULT_METRICS = (
    MetricSpec("errors", "increase_is_bad", tolerance=0.004, critical=True, kind="proportion"),
    MetricSpec("latency_ms", "increase_is_bad", tolerance=0.10),
    MetricSpec("quality", "decrease_is_bad", tolerance=0.02, critical=True),
    MetricSpec("cost_usd", "increase_is_bad", tolerance=0.05),
)


class RolloutError(Exception):
    """A rollout that cannot be started as asked."""


class Phase(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    PROMOTED = "promoted"
    ROLLED_BACK = "rolled_back"


# The legal transitions, as data: kind -> (phase before, phase after).
TRANSITIONS: dict[str, tuple[Phase, Phase]] = {
    "started": (Phase.NEW, Phase.RUNNING),
    "stage_advanced": (Phase.RUNNING, Phase.RUNNING),
    "promoted": (Phase.RUNNING, Phase.PROMOTED),
    "rolled_back": (Phase.RUNNING, Phase.ROLLED_BACK),
}


class CanarySettings(Struct, frozen=True):
    stages: tuple[int, ...] = (500, 2500, 5000, 10_000)  # canary weight per stage, in bp
    interval_ns: int = 60 * 1_000_000_000  # analysis interval, event time
    min_samples: int = 200  # canary calls in a stage before the judge runs
    pass_min_samples: int = 2500  # canary calls in a stage before a pass advances it
    idle_timeout_intervals: int = 10  # intervals without a canary call before a rollback
    reservoir_capacity: int = 4000  # kept values per side and continuous metric
    judge: JudgeConfig = JudgeConfig(confidence=0.98, max_pairs=100_000)
    metrics: tuple[MetricSpec, ...] = DEFAULT_METRICS

    def __post_init__(self) -> None:
        if not self.stages or any(not 0 < w <= BUCKETS for w in self.stages):
            raise ValueError(f"stages must be weights in 1..{BUCKETS} bp, got {self.stages}")
        if list(self.stages) != sorted(self.stages):
            raise ValueError(f"stages must not shrink, got {self.stages}")
        if self.interval_ns <= 0 or self.min_samples < 1 or self.idle_timeout_intervals < 1:
            raise ValueError("interval_ns, min_samples and idle_timeout_intervals must be > 0")
        unknown = {spec.name for spec in self.metrics} - METRIC_NAMES
        if unknown:
            raise ValueError(f"unknown metric(s) {sorted(unknown)}; known: "
                             f"{sorted(METRIC_NAMES)}")


class Transition(Struct, frozen=True, kw_only=True):
    kind: str  # a key of TRANSITIONS
    service: str
    proposal_id: str
    time_ns: int  # event time of the decision
    phase: str
    stage: int
    weight_bp: int  # canary weight after the transition (0 once finished)
    config_version: int
    canary_samples: int  # canary calls of the stage judged (errors counter total)
    baseline_samples: int
    reason: str
    judge: dict[str, Any] | None = None  # JudgeResult.to_dict(), the evidence

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)


class SamplesState(Struct, array_like=True):
    errors: ProportionCounter
    reservoirs: dict[str, ReservoirState]


class Samples:
    """One side's calls: errors counted exactly, continuous metrics in seeded reservoirs."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.errors = ProportionCounter()
        self.reservoirs = {name: Reservoir(capacity, seed + i)
                           for i, name in enumerate(CONTINUOUS)}

    def add(self, latency_ms: float, error: bool, quality: float | None,
            cost_usd: float | None) -> None:
        self.errors.add(error)
        self.reservoirs["latency_ms"].add(latency_ms)
        if quality is not None:
            self.reservoirs["quality"].add(quality)
        if cost_usd is not None:
            self.reservoirs["cost_usd"].add(cost_usd)

    def add_many(self, latency_ms: np.ndarray, errors: np.ndarray, quality: np.ndarray,
                 cost_usd: np.ndarray) -> None:
        """Arrays of one length; NaN marks a missing quality or cost."""
        self.errors.add_many(errors)
        self.reservoirs["latency_ms"].add_many(latency_ms)
        self.reservoirs["quality"].add_many(quality[~np.isnan(quality)])
        self.reservoirs["cost_usd"].add_many(cost_usd[~np.isnan(cost_usd)])

    def metric(self, name: str) -> np.ndarray:
        return self.errors.as_samples() if name == "errors" else self.reservoirs[name].values()

    def count(self, name: str) -> int:
        return self.errors.total if name == "errors" else self.reservoirs[name].seen

    def to_state(self) -> SamplesState:
        return SamplesState(msgspec.structs.replace(self.errors),
                            {name: r.to_state() for name, r in self.reservoirs.items()})

    @classmethod
    def from_state(cls, state: SamplesState) -> Samples:
        samples = cls.__new__(cls)
        samples.errors = msgspec.structs.replace(state.errors)
        samples.reservoirs = {name: Reservoir.from_state(r) for name, r in state.reservoirs.items()}
        return samples


class Rollout(Struct, kw_only=True):
    """One service's rollout; plain data, so that it is its own checkpoint."""

    service: str
    proposal_id: str
    change: dict[str, Any]
    phase: str = Phase.NEW.value
    stage: int = 0
    started_ns: int
    stage_started_ns: int
    next_boundary_ns: int
    idle_intervals: int = 0  # consecutive intervals without a canary call
    canary_at_boundary: int = 0  # canary calls of the stage at the last boundary
    config_version: int = 0
    doc_version: int = 0
    transitions: list[Transition] = field(default_factory=list)
    baseline: SamplesState | None = None  # filled in by state_to_bytes only
    canary: SamplesState | None = None

    @property
    def doc_id(self) -> str:
        return f"rollout:{self.service}:{self.proposal_id}"


class _Checkpoint(Struct):
    settings: CanarySettings
    rollouts: list[Rollout]


def _seed(*parts: object) -> int:
    text = "\0".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1


class CanaryDeployer:
    """Runs canary rollouts, one per service; see the module doc."""

    def __init__(self, configs: ConfigManager, rollouts: DocStore,
                 emit: Callable[[dict[str, Any]], None] | None = None,
                 settings: CanarySettings | None = None) -> None:
        self.configs = configs
        self.rollouts = rollouts  # where rollout documents go (ns "rollouts" in production)
        self.emit = emit or (lambda _transition: None)
        self.settings = settings or CanarySettings()
        self.active: dict[str, Rollout] = {}
        self._samples: dict[str, tuple[Samples, Samples]] = {}  # service -> (baseline, canary)

    # --- starting ------------------------------------------------------------------------

    async def start(self, service: str, proposal_id: str, baseline_config: LLMConfig,
                    change: dict[str, Any], now_ns: int) -> Transition:
        """Write the canary config (expected version: ``baseline_config.version``) and begin."""
        if service in self.active:
            raise RolloutError(f"service {service!r} already has an active rollout "
                               f"({self.active[service].proposal_id})")
        if baseline_config.service != service:
            raise RolloutError(f"baseline config is for {baseline_config.service!r}, "
                               f"not {service!r}")
        if any(v.name == CANARY for v in baseline_config.variants):
            raise RolloutError(f"the config of {service!r} already has a {CANARY!r} variant")
        rollout = Rollout(service=service, proposal_id=proposal_id, change=dict(change),
                          started_ns=now_ns, stage_started_ns=now_ns,
                          next_boundary_ns=now_ns + self.settings.interval_ns)
        if not NAME_PATTERN.match(rollout.doc_id):
            raise RolloutError(f"proposal id {proposal_id!r}: use A-Z a-z 0-9 _ . : -")
        try:
            with_overrides(baseline_config, change)
        except ValueError as exc:
            raise RolloutError(f"change: {exc}") from None
        weight = self.settings.stages[0]
        config = msgspec.structs.replace(
            baseline_config, updated_ns=now_ns,
            variants=[*baseline_config.variants, Variant(CANARY, weight, dict(change))])
        stored = await self.configs.put(
            config, f"canary {proposal_id}: started at {weight / 100:g}%",
            baseline_config.version)
        self._samples[service] = (self._new_samples(rollout, BASELINE),
                                  self._new_samples(rollout, CANARY))
        return await self._transition(rollout, "started", now_ns, stored.version,
                                      f"canary at {weight / 100:g}% of traffic")

    def _new_samples(self, rollout: Rollout, side: str) -> Samples:
        seed = _seed(rollout.service, rollout.proposal_id, side, rollout.stage)
        return Samples(self.settings.reservoir_capacity, seed)

    # --- observing -----------------------------------------------------------------------

    def _side(self, service: str, variant: str | None, time_ns: int) -> Samples | None:
        rollout = self.active.get(service)
        if rollout is None or time_ns < rollout.stage_started_ns:
            return None  # no rollout, or a call routed under an earlier stage's weights
        baseline, canary = self._samples[service]
        if variant == CANARY:
            return canary
        return baseline if variant in (None, BASELINE) else None

    def observe(self, event: LLMEvent) -> None:
        side = self._side(event.service, event.variant, event.time_ns)
        if side is not None:
            side.add(event.latency_ms, event.status == "error", event.quality, event.cost_usd)

    def observe_many(self, service: str, variant: str | None, time_ns: int,
                     latency_ms: Sequence[float], errors: Sequence[bool],
                     quality: Sequence[float] | None = None,
                     cost_usd: Sequence[float] | None = None) -> None:
        """A batch of one variant's calls, the earliest at ``time_ns``; NaN (or None for the
        whole array) marks a missing quality or cost."""
        side = self._side(service, variant, time_ns)
        if side is None:
            return
        latency = np.asarray(latency_ms, dtype=float)
        missing = np.full(latency.shape, np.nan)
        side.add_many(latency, np.asarray(errors, dtype=bool),
                      missing if quality is None else np.asarray(quality, dtype=float),
                      missing if cost_usd is None else np.asarray(cost_usd, dtype=float))

    # --- deciding ------------------------------------------------------------------------

    async def advance(self, now_ns: int) -> list[Transition]:
        """Handle every interval boundary up to ``now_ns`` (event time) of every rollout."""
        done: list[Transition] = []
        for service in sorted(self.active):
            rollout = self.active[service]
            while rollout.phase == Phase.RUNNING.value and now_ns >= rollout.next_boundary_ns:
                transition = await self._boundary(rollout)
                if transition is not None:
                    done.append(transition)
        return done

    async def abort(self, service: str, reason: str, now_ns: int) -> Transition:
        """Roll back a running rollout at once, at an operator's request."""
        rollout = self.active.get(service)
        if rollout is None:
            raise RolloutError(f"service {service!r} has no rollout running")
        return await self._finish(rollout, "rolled_back", max(now_ns, rollout.stage_started_ns),
                                  None, f"aborted: {reason}")

    def judge_now(self, service: str) -> JudgeResult:
        """The verdict on the current stage's samples (what the next boundary would see)."""
        baseline, canary = self._samples[service]
        specs = [spec for spec in self.settings.metrics if baseline.count(spec.name)]
        samples = {spec.name: (baseline.metric(spec.name), canary.metric(spec.name))
                   for spec in specs}
        return judge(specs, samples, self.settings.judge)

    async def _boundary(self, rollout: Rollout) -> Transition | None:
        settings = self.settings
        at = rollout.next_boundary_ns
        calls = self._samples[rollout.service][1].errors.total
        idle = 0 if calls > rollout.canary_at_boundary else rollout.idle_intervals + 1
        if idle >= settings.idle_timeout_intervals:
            return await self._finish(rollout, "rolled_back", at, None,
                                      f"timed out: no canary call for {idle} intervals")
        result = self.judge_now(rollout.service) if calls >= settings.min_samples else None
        if result is not None and result.verdict == "fail":
            return await self._finish(rollout, "rolled_back", at, result, result.reason)
        if (result is not None and result.verdict == "pass"
                and calls >= settings.pass_min_samples):
            if rollout.stage + 1 == len(settings.stages):
                return await self._finish(rollout, "promoted", at, result,
                                          f"every stage passed; {result.reason}")
            return await self._next_stage(rollout, at, result)
        rollout.idle_intervals, rollout.canary_at_boundary = idle, calls
        rollout.next_boundary_ns = at + settings.interval_ns
        return None

    async def _next_stage(self, rollout: Rollout, at: int, result: JudgeResult) -> Transition:
        weight = self.settings.stages[rollout.stage + 1]
        current = await self.configs.get(rollout.service)
        if not any(v.name == CANARY for v in current.variants):
            return await self._finish(rollout, "rolled_back", at, result, _removed(current))
        variants = [msgspec.structs.replace(v, weight_bp=weight) if v.name == CANARY else v
                    for v in current.variants]
        stored = await self.configs.put(
            msgspec.structs.replace(current, variants=variants, updated_ns=at),
            f"canary {rollout.proposal_id}: stage {rollout.stage + 2} at {weight / 100:g}%",
            current.version)
        evidence = self._counts(rollout)
        rollout.stage += 1
        rollout.stage_started_ns, rollout.next_boundary_ns = at, at + self.settings.interval_ns
        rollout.idle_intervals = rollout.canary_at_boundary = 0
        baseline, _ = self._samples[rollout.service]
        self._samples[rollout.service] = (baseline, self._new_samples(rollout, CANARY))
        return await self._transition(rollout, "stage_advanced", at, stored.version,
                                      f"passed ({result.reason}); now {weight / 100:g}%",
                                      result, evidence)

    async def _finish(self, rollout: Rollout, kind: str, at: int, result: JudgeResult | None,
                      reason: str) -> Transition:
        """Promote the change into the base config, or remove the canary variant."""
        current = await self.configs.get(rollout.service)
        others = [v for v in current.variants if v.name != CANARY]
        version = current.version
        if len(others) < len(current.variants):
            if kind == "promoted":
                new = with_overrides(current, rollout.change, variants=others)
                note = "promoted"
            else:
                new = msgspec.structs.replace(current, variants=others)
                note = f"rolled back: {reason}"
            new = msgspec.structs.replace(new, updated_ns=at)
            version = (await self.configs.put(new, f"canary {rollout.proposal_id} {note}",
                                              current.version)).version
        elif kind == "promoted":
            kind, reason = "rolled_back", _removed(current)
        return await self._transition(rollout, kind, at, version, reason, result,
                                      self._counts(rollout))

    def _counts(self, rollout: Rollout) -> tuple[int, int]:
        baseline, canary = self._samples[rollout.service]
        return canary.errors.total, baseline.errors.total

    async def _transition(self, rollout: Rollout, kind: str, at: int, config_version: int,
                          reason: str, result: JudgeResult | None = None,
                          counts: tuple[int, int] = (0, 0)) -> Transition:
        """Check the move against TRANSITIONS, persist the rollout document, then emit."""
        before, after = TRANSITIONS[kind]
        if rollout.phase != before.value:
            raise RolloutError(f"{rollout.doc_id}: {kind} is not allowed in phase "
                               f"{rollout.phase}")
        running = after == Phase.RUNNING
        transition = Transition(
            kind=kind, service=rollout.service, proposal_id=rollout.proposal_id, time_ns=at,
            phase=after.value, stage=rollout.stage, config_version=config_version,
            weight_bp=self.settings.stages[rollout.stage] if running else 0,
            canary_samples=counts[0], baseline_samples=counts[1], reason=reason,
            judge=result.to_dict() if result is not None else None)
        rollout.phase, rollout.config_version = after.value, config_version
        rollout.transitions.append(transition)
        try:
            rollout.doc_version = await self.rollouts.put(
                rollout.doc_id, msgspec.json.encode(rollout), rollout.doc_version)
        except DocConflict as exc:
            raise RolloutError(f"{rollout.doc_id} was written elsewhere: {exc}") from None
        if running:
            self.active[rollout.service] = rollout
        else:
            self.active.pop(rollout.service, None)
            self._samples.pop(rollout.service, None)
        self.emit(transition.to_dict())
        return transition

    # --- checkpoints ---------------------------------------------------------------------

    def state_to_bytes(self) -> bytes:
        """Settings and active rollouts with their samples (reservoirs and random state)."""
        rollouts = []
        for service, rollout in sorted(self.active.items()):
            baseline, canary = self._samples[service]
            rollouts.append(msgspec.structs.replace(rollout, baseline=baseline.to_state(),
                                                    canary=canary.to_state()))
        return msgspec.msgpack.encode(_Checkpoint(self.settings, rollouts))

    @classmethod
    def from_state_bytes(cls, data: bytes, configs: ConfigManager, rollouts: DocStore,
                         emit: Callable[[dict[str, Any]], None] | None = None
                         ) -> CanaryDeployer:
        """A deployer that carries on where the checkpointed one stood."""
        state = msgspec.msgpack.decode(data, type=_Checkpoint)
        deployer = cls(configs, rollouts, emit, state.settings)
        for rollout in state.rollouts:
            if rollout.baseline is None or rollout.canary is None:
                raise ValueError(f"checkpoint of {rollout.doc_id} has no samples")
            deployer._samples[rollout.service] = (Samples.from_state(rollout.baseline),
                                                  Samples.from_state(rollout.canary))
            deployer.active[rollout.service] = msgspec.structs.replace(
                rollout, baseline=None, canary=None)
        return deployer


def _removed(config: LLMConfig) -> str:
    return (f"the {CANARY!r} variant was removed from the config (version {config.version}) "
            "outside the rollout")
