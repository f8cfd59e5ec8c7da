"""Batch many small concurrent calls (embeddings and the like) into fewer requests.

Conservative by design: providers bill batched inputs per token as they bill single ones, so
no cost saving is claimed; the gain is fewer requests (less overhead and rate-limit pressure),
and the price is up to ``max_wait_ms`` of extra latency while a batch fills. The expected batch
size is what arrives at the median rate within the wait, capped at ``max_batch``."""
from __future__ import annotations

import statistics

from ipc.prices import PriceTable
from workers.processor.strategies.policy import DecisionPolicy
from workers.processor.strategies.proposal import ExpectedImpact, Proposal, proposal_id
from workers.processor.strategies.view import ServiceView

STRATEGY = "batching"


def propose(view: ServiceView, policy: DecisionPolicy, prices: PriceTable,
            now_ns: int) -> list[Proposal]:
    del prices  # no price change is claimed
    cfg, total = policy.batching, view.total
    if view.operation.lower() not in cfg.operations or total.count < policy.min_samples:
        return []
    rate = statistics.median(view.window_calls) / view.window_s
    tokens = total.tokens_in_per_call
    if rate < cfg.min_calls_per_s or tokens > cfg.max_tokens_in_per_call:
        return []
    batch = min(cfg.max_batch, 1 + rate * cfg.max_wait_ms / 1000)
    if batch < 2:
        return []
    fewer = 1 - 1 / batch
    return [Proposal(
        id=proposal_id(STRATEGY, view.service, view.operation, "client-batch"),
        strategy=STRATEGY, service=view.service, operation=view.operation,
        model=view.models[0].model,
        title=f"Batch {view.service}/{view.operation} calls (about {batch:.0f} per request)",
        rationale=(f"{rate:.1f} calls/s of {tokens:.0f} input tokens each; waiting up to "
                   f"{cfg.max_wait_ms:.0f} ms groups about {batch:.1f} calls per request, "
                   f"{fewer:.0%} fewer requests. Assumes per-token billing is unchanged by "
                   "batching, so no cost saving is counted; latency rises by up to the wait."),
        expected_impact=ExpectedImpact(
            cost_pct=0.0, savings_usd_per_day=0.0, quality_delta=0.0,
            latency_delta_ms=cfg.max_wait_ms, confidence=0.5),
        constraints=policy.constraints(),
        change={"batching": {"max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms}},
        needs_experiment=True,
        evidence={"calls_per_s": rate, "tokens_in_per_call": tokens,
                  "expected_batch": batch, "request_reduction": fewer},
        created_ns=now_ns)]
