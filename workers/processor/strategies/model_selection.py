"""Switch a service/operation to a cheaper model that is not worse where it matters.

Evidence, strongest first: the cheaper model served the same service and operation and its
quality is non-inferior (one-sided Welch test on pooled moments at margin
``quality_tolerance``), with p95 and error rate within bounds: a switch (rolled out through a
canary all the same). Otherwise it passed the same test in another service for the same
operation, or it is a known cheaper model of the same provider: an experiment, with lower
confidence. A model that is not cheaper is never proposed."""
from __future__ import annotations

import re

from ipc.prices import PriceTable
from workers.processor.analyzers.welch import welch_p
from workers.processor.strategies.policy import DecisionPolicy
from workers.processor.strategies.proposal import ExpectedImpact, Proposal, proposal_id
from workers.processor.strategies.view import ModelStats, ServiceView

STRATEGY = "model_selection"
_VERSION_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8}|\d{4}|\d{3}|latest)$")


def cost_at_mix(prices: PriceTable, model: str, tokens_in: float, tokens_out: float
                ) -> float | None:
    """Per-call list price of ``model`` for a call of this many tokens; None if unpriced."""
    price = prices.lookup(model)
    return None if price is None else price.input * tokens_in + price.output * tokens_out


def noninferiority_p(current: ModelStats, candidate: ModelStats, margin: float) -> float:
    """p of H0 "candidate's mean quality is below current's by margin or more"."""
    return welch_p(candidate.quality_mean + margin, candidate.quality_var or 0.0,
                   candidate.quality_n, current.quality_mean, current.quality_var or 0.0,
                   current.quality_n, "greater")


def _scored(stats: ModelStats, min_samples: int) -> bool:
    return stats.quality_n >= min_samples and stats.quality_mean is not None


def _latency_ok(current: ModelStats, candidate: ModelStats, policy: DecisionPolicy) -> bool:
    if candidate.p95_ms is None or current.p95_ms is None:
        return False
    if policy.latency_budget_ms is not None and candidate.p95_ms > policy.latency_budget_ms:
        return False
    return candidate.p95_ms <= current.p95_ms * (1 + policy.latency_tolerance)


def _proposal(view: ServiceView, current: ModelStats, target: str, cost_now: float,
              cost_new: float, policy: DecisionPolicy, now_ns: int, *, confidence: float,
              needs_experiment: bool, why: str, quality_delta: float | None,
              latency_delta_ms: float | None, evidence: dict[str, float]) -> Proposal:
    savings = current.calls_per_day * (cost_now - cost_new)
    service_cost = view.total.cost_per_day or current.calls_per_day * cost_now
    cut = 100 * (1 - cost_new / cost_now)
    return Proposal(
        id=proposal_id(STRATEGY, view.service, view.operation, f"{current.model}->{target}"),
        strategy=STRATEGY, service=view.service, operation=view.operation,
        model=current.model,
        title=f"Switch {view.service}/{view.operation} from {current.model} to {target}",
        rationale=(f"{target} costs ${cost_new:.6f} a call against ${cost_now:.6f} for "
                   f"{current.model} ({cut:.0f}% less, ${savings:.2f}/day); {why}"),
        expected_impact=ExpectedImpact(
            cost_pct=-100 * savings / service_cost if service_cost else -cut,
            savings_usd_per_day=savings, quality_delta=quality_delta,
            latency_delta_ms=latency_delta_ms, confidence=confidence),
        constraints=policy.constraints(), change={"model": target},
        needs_experiment=needs_experiment,
        evidence={"cost_per_call": cost_now, "candidate_cost_per_call": cost_new,
                  "calls_per_day": current.calls_per_day, **evidence},
        created_ns=now_ns)


def _observed(view: ServiceView, current: ModelStats, cost_now: float, policy: DecisionPolicy,
              prices: PriceTable, now_ns: int) -> Proposal | None:
    """The cheapest-to-run candidate that passed every test in this very service."""
    best: Proposal | None = None
    for cand in view.models:
        if cand.model == current.model or not _scored(cand, policy.min_samples):
            continue
        cost_new = cand.cost_per_call or cost_at_mix(prices, cand.model,
                                                     current.tokens_in_per_call,
                                                     current.tokens_out_per_call)
        if cost_new is None or cost_new >= cost_now or not _latency_ok(current, cand, policy):
            continue
        if cand.error_rate > current.error_rate + policy.model_selection.error_tolerance:
            continue
        p = noninferiority_p(current, cand, policy.quality_tolerance)
        if p > policy.model_selection.alpha:
            continue
        delta = cand.quality_mean - current.quality_mean
        proposal = _proposal(
            view, current, cand.model, cost_now, cost_new, policy, now_ns,
            confidence=1 - p, needs_experiment=False, quality_delta=delta,
            latency_delta_ms=cand.p95_ms - current.p95_ms,
            why=(f"mean quality {cand.quality_mean:.3f} vs {current.quality_mean:.3f} over "
                 f"{cand.quality_n}/{current.quality_n} scores, non-inferior at margin "
                 f"{policy.quality_tolerance} (p={p:.2g}); p95 {cand.p95_ms:.0f} vs "
                 f"{current.p95_ms:.0f} ms."),
            evidence={"quality_mean": current.quality_mean,
                      "candidate_quality_mean": cand.quality_mean, "p_value": p,
                      "quality_n": current.quality_n, "candidate_quality_n": cand.quality_n})
        if best is None or proposal.expected_impact.savings_usd_per_day > \
                best.expected_impact.savings_usd_per_day:
            best = proposal
    return best


def _from_peers(view: ServiceView, current: ModelStats, cost_now: float, tested: set[str],
                policy: DecisionPolicy, prices: PriceTable, now_ns: int) -> Proposal | None:
    """A cheaper model that passed the quality test against us in another service."""
    if not _scored(current, policy.min_samples):
        return None
    best: Proposal | None = None
    for peer in view.peers:
        if peer.model in tested or not _scored(peer, policy.min_samples):
            continue
        cost_new = cost_at_mix(prices, peer.model, current.tokens_in_per_call,
                               current.tokens_out_per_call)
        if cost_new is None or cost_new >= cost_now:
            continue
        p = noninferiority_p(current, peer, policy.quality_tolerance)
        if p > policy.model_selection.alpha:
            continue
        confidence = policy.model_selection.peer_confidence * (1 - p)
        if best is not None and confidence <= best.expected_impact.confidence:
            continue
        best = _proposal(
            view, current, peer.model, cost_now, cost_new, policy, now_ns,
            confidence=confidence, needs_experiment=True, quality_delta=None,
            latency_delta_ms=None,
            why=(f"in {peer.service} it scored {peer.quality_mean:.3f} over {peer.quality_n} "
                 f"calls against {current.quality_mean:.3f} here; another service's traffic "
                 "is only indirect evidence, so a canary must confirm it."),
            evidence={"quality_mean": current.quality_mean,
                      "peer_quality_mean": peer.quality_mean, "p_value": p,
                      "peer_quality_n": peer.quality_n})
    return best


def _base_name(model: str) -> str:
    return _VERSION_SUFFIX.sub("", model.lower().rsplit("/", 1)[-1])


def _from_prices(view: ServiceView, current: ModelStats, cost_now: float, tested: set[str],
                 policy: DecisionPolicy, prices: PriceTable, now_ns: int) -> Proposal | None:
    """The smallest step down in the same family (or provider) by list price."""
    mode = policy.model_selection.price_candidates
    price = prices.lookup(current.model)
    if mode == "off" or price is None:
        return None
    base = _base_name(current.model)
    ranked = []
    for name, cand in prices.models().items():
        family = name.lower().startswith(base + "-") and not name[len(base) + 1:][:1].isdigit()
        if name in tested or cand.provider != price.provider or (mode == "family" and not family):
            continue
        if (cand.output == 0) != (price.output == 0):  # embedding vs generation models
            continue
        cost_new = cost_at_mix(prices, name, current.tokens_in_per_call,
                               current.tokens_out_per_call)
        if cost_new > cost_now * (1 - policy.model_selection.min_price_saving):
            continue
        ranked.append((not family, -cost_new, name, cost_new))
    if not ranked:
        return None
    _, _, target, cost_new = min(ranked)
    return _proposal(
        view, current, target, cost_now, cost_new, policy, now_ns,
        confidence=policy.model_selection.price_confidence, needs_experiment=True,
        quality_delta=None, latency_delta_ms=None,
        why=(f"a cheaper {price.provider or 'same-provider'} model by list price at this "
             "service's token mix, with no quality evidence yet: a canary must measure it."),
        evidence={})


def propose(view: ServiceView, policy: DecisionPolicy, prices: PriceTable,
            now_ns: int) -> list[Proposal]:
    """At most one proposal per model in use with enough calls: the strongest evidence wins."""
    proposals = []
    tested = {m.model for m in view.models if _scored(m, policy.min_samples)}
    for current in view.models:
        if current.count < policy.min_samples:
            continue
        cost_now = current.cost_per_call or cost_at_mix(
            prices, current.model, current.tokens_in_per_call, current.tokens_out_per_call)
        if not cost_now:
            continue
        proposal = (_observed(view, current, cost_now, policy, prices, now_ns)
                    or _from_peers(view, current, cost_now, tested, policy, prices, now_ns)
                    or _from_prices(view, current, cost_now, tested, policy, prices, now_ns))
        if proposal is not None:
            proposals.append(proposal)
    return proposals
