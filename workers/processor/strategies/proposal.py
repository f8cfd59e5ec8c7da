"""What every strategy returns: a ``Proposal`` for one (service, operation), with the config
change to apply, its expected impact and the numbers behind it, so that a deployment can be
audited and the same opportunity found twice is recognised by its id."""
from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import Struct

Strategy = Literal["model_selection", "caching", "rate_limiting", "batching",
                   "prompt_optimization"]


class ExpectedImpact(Struct, frozen=True, kw_only=True):
    """Changes relative to the current state of the service/operation; None when unknown."""

    cost_pct: float  # percent of the service/operation's daily cost; negative = savings
    savings_usd_per_day: float
    quality_delta: float | None = None  # absolute change in mean quality (0..1 scale)
    latency_delta_ms: float | None = None  # change in p95 latency
    error_rate_delta: float = 0.0  # absolute change in the share of failed calls
    confidence: float  # 0..1: how sure the evidence makes us


class Constraints(Struct, frozen=True, kw_only=True):
    """The guard rails a rollout of the proposal must keep (checked again by the canary)."""

    quality_tolerance: float
    latency_budget_ms: float | None
    min_samples: int


class Proposal(Struct, frozen=True, kw_only=True):
    id: str
    strategy: Strategy
    service: str
    operation: str
    model: str  # the model in use now
    title: str
    rationale: str
    expected_impact: ExpectedImpact
    constraints: Constraints
    change: dict[str, Any]
    needs_experiment: bool  # true: evidence is indirect, a canary must gather it first
    evidence: dict[str, float]
    created_ns: int  # event time of the data the proposal was made from

    def to_dict(self) -> dict:
        return msgspec.to_builtins(self)


def proposal_id(strategy: Strategy, service: str, operation: str, target: str) -> str:
    """Deterministic, so that re-finding an opportunity replaces rather than duplicates it."""
    return f"{strategy}:{service}:{operation}:{target}"
