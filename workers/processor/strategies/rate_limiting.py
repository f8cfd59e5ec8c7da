"""A client-side rate limit when the provider throttles (429s) or traffic comes in bursts.

The limit is the sustainable rate: a high quantile of the calls per second the provider
accepted per window (rate-limited calls excluded), so that steady traffic is never held back
and only the excess of a burst waits instead of failing. Bursts are windows above median +
k sigma of the calls per window, sigma from the MAD so that past bursts do not hide new ones."""
from __future__ import annotations

import numpy as np

from ipc.prices import PriceTable
from workers.processor.analyzers.robust import spike_threshold
from workers.processor.strategies.policy import DecisionPolicy
from workers.processor.strategies.proposal import ExpectedImpact, Proposal, proposal_id
from workers.processor.strategies.view import ServiceView

STRATEGY = "rate_limiting"


def propose(view: ServiceView, policy: DecisionPolicy, prices: PriceTable,
            now_ns: int) -> list[Proposal]:
    del prices  # a rate limit changes no price
    cfg, total = policy.rate_limiting, view.total
    calls = np.asarray(view.window_calls, dtype=float)
    if total.count < policy.min_samples or len(calls) < cfg.min_windows:
        return []
    limited_share = total.rate_limited / total.count
    threshold, median = spike_threshold(calls, cfg.burst_k, cfg.burst_min_ratio)
    bursts = int((calls > threshold).sum())
    if limited_share < cfg.min_rate_limited_share and not bursts:
        return []
    accepted = calls - np.asarray(view.window_rate_limited, dtype=float)
    rate = float(np.quantile(accepted, cfg.rate_quantile)) / view.window_s
    quantile = round(cfg.rate_quantile * 100)
    why = (f"{limited_share:.1%} of {total.count} calls were rate-limited by the provider"
           if limited_share >= cfg.min_rate_limited_share else
           f"{bursts} of {len(calls)} windows had bursts above {threshold:.0f} calls "
           f"(median {median:.0f})")
    return [Proposal(
        id=proposal_id(STRATEGY, view.service, view.operation, "client-limit"),
        strategy=STRATEGY, service=view.service, operation=view.operation,
        model=view.models[0].model,
        title=f"Rate-limit {view.service}/{view.operation} at {rate:.1f} requests/s",
        rationale=(f"{why}. A client-side limit at {rate:.1f}/s (the p{quantile} "
                   "of accepted calls per second) queues the excess instead of failing it; "
                   "calls over the limit wait, so their latency rises during bursts."),
        expected_impact=ExpectedImpact(
            cost_pct=0.0, savings_usd_per_day=0.0, quality_delta=0.0,
            error_rate_delta=-limited_share,
            confidence=min(0.9, total.rate_limited / (total.rate_limited + 30.0))
            if limited_share >= cfg.min_rate_limited_share else 0.5),
        constraints=policy.constraints(),
        change={"rate_limit": {"requests_per_s": round(rate, 3)}},
        needs_experiment=False,
        evidence={"rate_limited_share": limited_share, "burst_windows": bursts,
                  "median_calls_per_window": median, "burst_threshold": threshold,
                  "requests_per_s": rate},
        created_ns=now_ns)]
