"""Trim prompts that are far longer than other services' prompts for the same operation.

Peers doing the same operation with a fraction of the input tokens suggest padding (history,
examples, retrieved context) that can be cut. The proposal caps input tokens at the peer median
with headroom; savings are the cut tokens at each model's input list price. Whether quality
survives the cut is unknown, hence an experiment."""
from __future__ import annotations

import math
import statistics

from ipc.prices import PriceTable
from workers.processor.strategies.policy import DecisionPolicy
from workers.processor.strategies.proposal import ExpectedImpact, Proposal, proposal_id
from workers.processor.strategies.view import ServiceView

STRATEGY = "prompt_optimization"


def propose(view: ServiceView, policy: DecisionPolicy, prices: PriceTable,
            now_ns: int) -> list[Proposal]:
    cfg, total = policy.prompt, view.total
    peers = [p.tokens_in_per_call for p in view.peer_totals if p.count >= policy.min_samples]
    if total.count < policy.min_samples or len(peers) < cfg.min_peers:
        return []
    peer_median = statistics.median(peers)
    mine = total.tokens_in_per_call
    if peer_median <= 0 or mine <= cfg.ratio * peer_median:
        return []
    cap = math.ceil(peer_median * cfg.headroom)
    savings = 0.0
    for stats in view.models:
        price = prices.lookup(stats.model)
        if price is not None and stats.tokens_in_per_call > cap:
            savings += stats.calls_per_day * (stats.tokens_in_per_call - cap) * price.input
    cost_per_day = total.cost_per_day
    if not savings or not cost_per_day:
        return []
    return [Proposal(
        id=proposal_id(STRATEGY, view.service, view.operation, "max-input-tokens"),
        strategy=STRATEGY, service=view.service, operation=view.operation,
        model=view.models[0].model,
        title=f"Trim {view.service}/{view.operation} prompts to {cap} input tokens",
        rationale=(f"{mine:.0f} input tokens a call against a median of {peer_median:.0f} "
                   f"in {len(peers)} other services doing {view.operation} "
                   f"({mine / peer_median:.1f}x); capping at {cap} saves about "
                   f"${savings:.2f} of ${cost_per_day:.2f}/day at input list prices. "
                   "Quality after trimming is unmeasured: a canary must check it."),
        expected_impact=ExpectedImpact(
            cost_pct=-100 * savings / cost_per_day, savings_usd_per_day=savings,
            confidence=cfg.confidence),
        constraints=policy.constraints(),
        change={"prompt": {"max_input_tokens": cap}},
        needs_experiment=True,
        evidence={"tokens_in_per_call": mine, "peer_median_tokens_in": peer_median,
                  "peers": len(peers), "cost_per_day": cost_per_day},
        created_ns=now_ns)]
