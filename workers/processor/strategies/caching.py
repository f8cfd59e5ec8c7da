"""A response cache for a service/operation whose prompts repeat.

``repeat_share`` counts only calls whose prompt was already seen in the same window (the first
occurrence is the miss), so a cache keyed by the prompt fingerprint would serve that share of
calls at no model cost: savings = uncaptured repeat share x cost per uncached call x calls per
day x the fraction of repeats a cache serves. Repeats across windows are not counted: the
estimate is a floor, which a TTL longer than a window can only beat."""
from __future__ import annotations

import math

from scipy.stats import norm

from ipc.prices import PriceTable
from workers.processor.strategies.policy import DecisionPolicy
from workers.processor.strategies.proposal import ExpectedImpact, Proposal, proposal_id
from workers.processor.strategies.view import ServiceView

STRATEGY = "caching"


def propose(view: ServiceView, policy: DecisionPolicy, prices: PriceTable,
            now_ns: int) -> list[Proposal]:
    del prices  # savings come from observed cost, not list prices
    cfg, total = policy.caching, view.total
    repeat, hit_rate = total.repeat_share, total.cache_hit_rate or 0.0
    cost_per_day = total.cost_per_day
    if repeat is None or not cost_per_day or total.count < policy.min_samples \
            or hit_rate >= cfg.max_hit_rate:
        return []
    uncaptured = repeat - hit_rate
    if uncaptured < cfg.min_repeat_share:
        return []
    # Calls a cache already serves cost (about) nothing: the rest carry the spend.
    savings = uncaptured * cfg.hit_fraction * cost_per_day / (1 - hit_rate)
    # How sure we are that the true repeat share clears the threshold (binomial error).
    se = math.sqrt(max(uncaptured * (1 - uncaptured), 1e-12) / total.count)
    confidence = float(norm.cdf((uncaptured - cfg.min_repeat_share) / se))
    latency = None if total.p50_ms is None else -uncaptured * cfg.hit_fraction * total.p50_ms
    return [Proposal(
        id=proposal_id(STRATEGY, view.service, view.operation, "response-cache"),
        strategy=STRATEGY, service=view.service, operation=view.operation,
        model=view.models[0].model,
        title=f"Cache responses of {view.service}/{view.operation} by prompt fingerprint",
        rationale=(f"{uncaptured:.0%} of {total.count} calls repeated a prompt seen in the same "
                   f"{view.window_s:.0f} s window (cache hit rate now {hit_rate:.0%}); serving "
                   f"{cfg.hit_fraction:.0%} of those from a cache saves about ${savings:.2f} of "
                   f"${cost_per_day:.2f}/day. Repeats across windows are not counted."),
        expected_impact=ExpectedImpact(
            cost_pct=-100 * savings / cost_per_day, savings_usd_per_day=savings,
            quality_delta=0.0, latency_delta_ms=latency, confidence=confidence),
        constraints=policy.constraints(),
        change={"cache": {"enabled": True, "ttl_s": cfg.ttl_s}},
        needs_experiment=False,
        evidence={"repeat_share": repeat, "cache_hit_rate": hit_rate,
                  "cost_per_day": cost_per_day, "calls": total.count},
        created_ns=now_ns)]
