"""Runs the enabled strategies over every service view and keeps what is worth doing: cost
proposals must meet the policy's minimum savings; one proposal per id (the newest); most
savings first, then most confident."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ipc.prices import PriceTable
from workers.processor.strategies import (
    batching,
    caching,
    model_selection,
    prompt_optimization,
    rate_limiting,
)
from workers.processor.strategies.policy import COST_STRATEGIES, DecisionPolicy
from workers.processor.strategies.proposal import Proposal
from workers.processor.strategies.view import KeyT, ServiceView, build_views

StrategyFn = Callable[[ServiceView, DecisionPolicy, PriceTable, int], list[Proposal]]
STRATEGY_FUNCTIONS: Mapping[str, StrategyFn] = {
    "model_selection": model_selection.propose, "caching": caching.propose,
    "rate_limiting": rate_limiting.propose, "batching": batching.propose,
    "prompt_optimization": prompt_optimization.propose,
}


class DecisionEngine:
    def __init__(self, policy: DecisionPolicy, prices: PriceTable):
        self.policy, self.prices = policy, prices

    def views(self, history: Mapping[KeyT, Sequence[dict]]) -> list[ServiceView]:
        """The views over the policy's lookback."""
        return build_views(history, self.policy.lookback_windows)

    def worth_it(self, proposal: Proposal) -> bool:
        if proposal.strategy not in COST_STRATEGIES:
            return True
        impact = proposal.expected_impact
        return (impact.savings_usd_per_day >= self.policy.min_savings_usd_per_day
                and -impact.cost_pct >= self.policy.min_cost_pct)

    def propose(self, views: Sequence[ServiceView], now_ns: int,
                skip: frozenset[str] = frozenset()) -> list[Proposal]:
        """What the enabled strategies, but those in ``skip``, find worth doing."""
        found: dict[str, Proposal] = {}
        for name in self.policy.strategies:
            if name in skip:
                continue
            strategy = STRATEGY_FUNCTIONS[name]
            for view in views:
                for proposal in strategy(view, self.policy, self.prices, now_ns):
                    old = found.get(proposal.id)
                    if self.worth_it(proposal) and (old is None
                                                    or proposal.created_ns >= old.created_ns):
                        found[proposal.id] = proposal
        return sorted(found.values(), key=lambda p: (-p.expected_impact.savings_usd_per_day,
                                                     -p.expected_impact.confidence, p.id))
