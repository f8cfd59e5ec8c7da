"""Decision strategies on known data: each proposes when the evidence is there and stays silent
when it is not (too few samples, quality beyond tolerance, a dearer model, a healthy service);
two simulations build real Aggregates from seeded synthetic events: a cache on a trace where
40% of calls repeat a prompt, and a switch to a cheaper model of near-equal quality."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from ipc.events import LLMEvent
from ipc.prices import shipped_prices
from workers.processor.aggregates import Aggregate, event_key
from workers.processor.strategies import (
    DecisionEngine,
    DecisionPolicy,
    InvalidHistory,
    PolicyError,
    build_views,
)
from workers.processor.strategies import (
    batching,
    caching,
    model_selection,
    prompt_optimization,
    rate_limiting,
)
from workers.processor.strategies.policy import ModelSelectionConfig
from workers.processor.strategies.view import NS_PER_DAY

WINDOW_NS = 60 * 10**9
PRICES = shipped_prices()
POLICY = DecisionPolicy()


def window(i: int, count: int = 100, *, cost_per_call: float | None = 0.001,
           tokens_in: int = 500, tokens_out: int = 100, quality: tuple | None = None,
           p95: float = 800.0, errors_by_type: dict | None = None, repeat: float = 0.0,
           cache_hit_rate: float | None = None) -> dict:
    """A synthetic window summary; quality is (mean, variance, n)."""
    errors_by_type = errors_by_type or {}
    mean, var, n = quality or (None, None, 0)
    return {"window_start_ns": i * WINDOW_NS, "window_end_ns": (i + 1) * WINDOW_NS,
            "count": count, "errors": sum(errors_by_type.values()),
            "errors_by_type": errors_by_type, "p50_ms": p95 / 2, "p95_ms": p95,
            "tokens_in": tokens_in * count, "tokens_out": tokens_out * count,
            "cost_usd": 0.0 if cost_per_call is None else cost_per_call * count,
            "uncosted": count if cost_per_call is None else 0,
            "quality_mean": mean, "quality_var": var, "quality_n": n,
            "cache_hit_rate": cache_hit_rate, "repeat_share": repeat}


def series(n: int = 60, **kw) -> list[dict]:
    return [window(i, **kw) for i in range(n)]


def views(history: dict) -> list:
    return build_views(history, POLICY.lookback_windows)


def one_view(history: dict, service: str = "svc"):
    return next(v for v in views(history) if v.service == service)


NOW = 60 * WINDOW_NS


def summaries(events: list[LLMEvent]) -> dict:
    """Real per-window summaries of the events, as the processor's windows emit them."""
    aggs: dict = defaultdict(dict)
    for event in events:
        start = event.time_ns // WINDOW_NS * WINDOW_NS
        aggs[event_key(event)].setdefault(start, Aggregate()).add(event)
    return {key: [{**agg.summary(), "window_start_ns": start, "window_end_ns": start + WINDOW_NS}
                  for start, agg in sorted(by_start.items())]
            for key, by_start in aggs.items()}


def event(i: int, t: int, service: str, model: str, rng, *, tokens_in: int | None = None,
          quality: float | None = None, fingerprint: str | None = None,
          latency: float = 800.0) -> LLMEvent:
    e = LLMEvent(event_id=f"{service}-{i}", time_ns=t, service=service, model=model,
                 provider="openai", input_tokens=tokens_in or int(rng.poisson(500)),
                 output_tokens=int(rng.poisson(200)),
                 latency_ms=float(latency * math.exp(rng.normal(0, 0.2))), quality=quality,
                 prompt_fingerprint=fingerprint or f"{service}-p{i}")
    return PRICES.with_cost(e)


# --- view and policy ---------------------------------------------------------------------------

def test_view_pools_quality_like_numpy_and_counts_rate_limits():
    rng = np.random.default_rng(1)
    scores = rng.beta(8, 2, 500)
    events = [event(i, (i // 100) * WINDOW_NS + i, "svc", "gpt-4o", rng, quality=float(q))
              for i, q in enumerate(scores)]
    history = summaries(events)
    history[("svc", "gpt-4o", "", "chat")][0]["errors_by_type"] = {"RateLimitError": 3,
                                                                   "HTTP 429": 2, "timeout": 1}
    stats = one_view(history).model("gpt-4o")
    assert stats.quality_n == 500 and stats.windows == 5
    assert stats.quality_mean == pytest.approx(scores.mean(), rel=1e-9)
    assert stats.quality_var == pytest.approx(scores.var(ddof=1), rel=1e-9)
    assert stats.rate_limited == 5
    assert stats.calls_per_day == pytest.approx(500 * NS_PER_DAY / (5 * WINDOW_NS))


def test_bad_history_and_policy_are_typed_errors():
    with pytest.raises(InvalidHistory, match="count"):
        build_views({("svc", "m", "", "chat"): [{**window(0), "count": "x"}]})
    with pytest.raises(InvalidHistory, match="service, model"):
        build_views({("svc", "m"): [window(0)]})
    with pytest.raises(PolicyError, match="unknown strategies"):
        DecisionPolicy(strategies=["magic"])
    with pytest.raises(PolicyError):
        DecisionPolicy(quality_tolerance=2.0)


def test_lookback_drops_old_windows():
    history = {("svc", "m", "", "chat"): series(120)}
    assert one_view(history).total.windows == 60


# --- model selection ---------------------------------------------------------------------------

GOOD = (0.80, 0.0145, 100)  # per window: mean, variance, scores


def two_models(b_quality=GOOD, b_cost=0.0002, b_p95=700.0, n=60, b_errors=None) -> dict:
    return {("svc", "model-a", "", "chat"): series(n, cost_per_call=0.002, quality=GOOD),
            ("svc", "model-b", "", "chat"): series(n, cost_per_call=b_cost, quality=b_quality,
                                                   p95=b_p95, errors_by_type=b_errors)}


def test_cheaper_model_with_equal_quality_is_proposed():
    [p] = model_selection.propose(one_view(two_models()), POLICY, PRICES, NOW)
    assert p.change == {"model": "model-b"} and p.model == "model-a"
    assert not p.needs_experiment and p.expected_impact.confidence > 0.99
    calls_per_day = 100 * NS_PER_DAY / WINDOW_NS
    assert p.expected_impact.savings_usd_per_day == pytest.approx(calls_per_day * 0.0018)
    # equal traffic: the service spends 0.0022 per pair of calls, switching A saves 0.0018
    assert p.expected_impact.cost_pct == pytest.approx(-100 * 0.0018 / 0.0022)
    assert p.id == "model_selection:svc:chat:model-a->model-b"
    assert p.to_dict()["expected_impact"]["quality_delta"] == pytest.approx(0.0)


@pytest.mark.parametrize("case", ["few samples", "quality drop", "dearer", "slower", "errors"])
def test_no_switch_without_evidence(case):
    """Only the reverse switch (to the cheaper model-a) survives when model-b is dearer."""
    history = {
        "few samples": lambda: two_models(b_quality=(0.80, 0.0145, 2), n=60),
        "quality drop": lambda: two_models(b_quality=(0.75, 0.0145, 100)),
        "dearer": lambda: two_models(b_cost=0.003),
        "slower": lambda: two_models(b_p95=1200.0),
        "errors": lambda: two_models(b_errors={"timeout": 5}),
    }[case]()
    proposals = model_selection.propose(one_view(history), POLICY, PRICES, NOW)
    assert [p.change for p in proposals] == ([{"model": "model-a"}] if case == "dearer" else [])


def test_quality_drop_within_tolerance_but_uncertain_is_not_proposed():
    # a drop of 0.015 at margin 0.02 with only 300 scores per model: not shown non-inferior
    history = {("svc", "model-a", "", "chat"): series(3, cost_per_call=0.002, quality=GOOD),
               ("svc", "model-b", "", "chat"): series(3, cost_per_call=0.0002,
                                                      quality=(0.785, 0.0145, 100))}
    policy = DecisionPolicy(min_samples=200)
    assert model_selection.propose(one_view(history), policy, PRICES, NOW) == []


def test_model_good_in_another_service_is_an_experiment():
    history = {("svc", "model-a", "", "chat"): series(cost_per_call=0.002, quality=GOOD),
               ("other", "gpt-4o-mini", "", "chat"): series(cost_per_call=0.0002,
                                                            quality=GOOD)}
    [p] = model_selection.propose(one_view(history), POLICY, PRICES, NOW)
    assert p.change == {"model": "gpt-4o-mini"} and p.needs_experiment
    assert 0 < p.expected_impact.confidence <= 0.5
    price = PRICES.lookup("gpt-4o-mini")
    assert p.evidence["candidate_cost_per_call"] == pytest.approx(500 * price.input
                                                                  + 100 * price.output)
    # the same candidate is not proposed to the service that runs it (it is not cheaper there)
    assert model_selection.propose(one_view(history, "other"), POLICY, PRICES, NOW) == []


def test_price_table_proposes_only_a_cheaper_sibling():
    history = {("svc", "gpt-4o", "", "chat"): series(cost_per_call=None),
               ("cheap", "gpt-4o-mini", "", "chat"): series(cost_per_call=None)}
    [p] = model_selection.propose(one_view(history), POLICY, PRICES, NOW)
    assert p.change == {"model": "gpt-4o-mini"} and p.needs_experiment
    assert p.expected_impact.confidence == pytest.approx(0.2)
    assert p.expected_impact.savings_usd_per_day > 0
    assert model_selection.propose(one_view(history, "cheap"), POLICY, PRICES, NOW) == []
    off = DecisionPolicy(model_selection=ModelSelectionConfig(price_candidates="off"))
    assert model_selection.propose(one_view(history), off, PRICES, NOW) == []


# --- caching -----------------------------------------------------------------------------------

def repeat_trace(share: float, windows: int = 60, calls: int = 100, seed: int = 7):
    """Events where each call repeats a prompt already seen in its window with probability
    ``share``; returns (events, true cost of the repeated calls)."""
    rng = np.random.default_rng(seed)
    events, repeated_cost, i = [], 0.0, 0
    for w in range(windows):
        seen: list[tuple[str, int]] = []
        for j in range(calls):
            if seen and rng.random() < share:
                fingerprint, tokens = seen[rng.integers(len(seen))]
            else:
                fingerprint, tokens = f"p{w}-{j}", int(rng.integers(200, 2000))
            e = event(i, w * WINDOW_NS + j * 10**8, "svc", "gpt-4o", rng, tokens_in=tokens,
                      fingerprint=fingerprint)
            if (fingerprint, tokens) in seen:
                repeated_cost += e.cost_usd
            else:
                seen.append((fingerprint, tokens))
            events.append(e)
            i += 1
    return events, repeated_cost


def test_cache_savings_within_20_percent_of_the_repeated_calls_cost():
    events, repeated_cost = repeat_trace(0.4)
    [p] = caching.propose(one_view(summaries(events)), POLICY, PRICES, NOW)
    truth = repeated_cost * NS_PER_DAY / (60 * WINDOW_NS)
    assert p.expected_impact.savings_usd_per_day == pytest.approx(truth, rel=0.20)
    assert p.change["cache"]["enabled"] is True and p.expected_impact.cost_pct < -30
    assert p.expected_impact.confidence > 0.99


@pytest.mark.parametrize("kw", [{"repeat": 0.05}, {"repeat": 0.4, "count": 2},
                                {"repeat": 0.4, "cache_hit_rate": 0.6}])
def test_no_cache_without_repeats_samples_or_when_cached(kw):
    history = {("svc", "m", "", "chat"): series(**kw)}
    assert caching.propose(one_view(history), POLICY, PRICES, NOW) == []


# --- rate limiting -----------------------------------------------------------------------------

def test_rate_limit_on_429s_at_the_accepted_rate():
    history = {("svc", "m", "", "chat"): [
        window(i, 600, errors_by_type={"RateLimitError": 100 if i % 2 else 0, "HTTP 429": 0})
        for i in range(60)]}
    [p] = rate_limiting.propose(one_view(history), POLICY, PRICES, NOW)
    assert p.change["rate_limit"]["requests_per_s"] == pytest.approx(600 / 60)
    assert p.expected_impact.error_rate_delta == pytest.approx(-50 / 600)


def test_rate_limit_on_bursts_but_not_on_steady_traffic():
    rng = np.random.default_rng(3)
    counts = rng.poisson(300, 60)
    steady = {("svc", "m", "", "chat"): [window(i, int(c)) for i, c in enumerate(counts)]}
    assert rate_limiting.propose(one_view(steady), POLICY, PRICES, NOW) == []
    counts[[10, 30, 50]] = 2000
    bursty = {("svc", "m", "", "chat"): [window(i, int(c)) for i, c in enumerate(counts)]}
    [p] = rate_limiting.propose(one_view(bursty), POLICY, PRICES, NOW)
    assert p.evidence["burst_windows"] == 3
    assert 300 / 60 < p.change["rate_limit"]["requests_per_s"] < 400 / 60


# --- batching ----------------------------------------------------------------------------------

def test_batching_many_small_embedding_calls_only():
    def history(op: str, count: int, tokens: int) -> dict:
        return {("svc", "text-embedding-3-small", "", op): series(count=count,
                                                                   tokens_in=tokens)}
    [p] = batching.propose(one_view(history("embeddings", 1200, 50)), POLICY, PRICES, NOW)
    assert p.change["batching"] == {"max_batch": 64, "max_wait_ms": 50.0}
    assert p.evidence["expected_batch"] == pytest.approx(2.0)
    assert p.expected_impact.savings_usd_per_day == 0 and p.needs_experiment
    for args in (("chat", 1200, 50), ("embeddings", 60, 50), ("embeddings", 1200, 5000)):
        assert batching.propose(one_view(history(*args)), POLICY, PRICES, NOW) == []


# --- prompt optimization -----------------------------------------------------------------------

def prompt_history(mine: int) -> dict:
    history = {("svc", "gpt-4o", "", "summarize"): series(tokens_in=mine)}
    for service, tokens in (("a", 800), ("b", 900), ("c", 1000)):
        history[(service, "gpt-4o", "", "summarize")] = series(tokens_in=tokens)
    return history


def test_prompt_trim_when_far_above_peers():
    [p] = prompt_optimization.propose(one_view(prompt_history(3000)), POLICY, PRICES, NOW)
    cap = math.ceil(900 * 1.25)
    assert p.change == {"prompt": {"max_input_tokens": cap}} and p.needs_experiment
    calls_per_day = 100 * NS_PER_DAY / WINDOW_NS
    expected = calls_per_day * (3000 - cap) * PRICES.lookup("gpt-4o").input
    assert p.expected_impact.savings_usd_per_day == pytest.approx(expected)
    assert prompt_optimization.propose(one_view(prompt_history(1500)), POLICY, PRICES, NOW) \
        == []


# --- engine ------------------------------------------------------------------------------------

def steady_trace(service: str, model: str, seed: int = 11, windows: int = 60) -> list[LLMEvent]:
    rng = np.random.default_rng(seed)
    events, i = [], 0
    for w in range(windows):
        for j in range(int(rng.poisson(100))):
            events.append(event(i, w * WINDOW_NS + j * 10**8, service, model, rng,
                                quality=float(rng.beta(8, 2))))
            i += 1
    return events


def test_engine_proposes_nothing_for_a_healthy_service():
    engine = DecisionEngine(POLICY, PRICES)
    assert engine.propose(engine.views(summaries(steady_trace("control", "gpt-4o-mini"))),
                          NOW) == []


def test_engine_filters_deduplicates_and_sorts():
    engine = DecisionEngine(POLICY, PRICES)
    history = {**two_models(),
               ("cache", "m", "", "chat"): series(repeat=0.4, cost_per_call=0.01),
               ("tiny", "m", "", "chat"): series(count=1, repeat=0.5)}
    found = engine.views(history)
    proposals = engine.propose(found + found, NOW)
    assert [p.id for p in proposals] == ["caching:cache:chat:response-cache",
                                         "model_selection:svc:chat:model-a->model-b"]
    only = DecisionEngine(DecisionPolicy(strategies=["caching"]), PRICES)
    assert [p.strategy for p in only.propose(found, NOW)] == ["caching"]
    # a strategy paused by its feature flag proposes nothing, the others go on
    assert [p.strategy for p in engine.propose(found, NOW, skip=frozenset({"caching"}))] \
        == ["model_selection"]


# --- simulation: a cheaper model of near-equal quality -----------------------------------------

def test_simulated_switch_to_cheaper_model_halves_cost_and_keeps_quality():
    rng = np.random.default_rng(2024)
    events = []
    for i in range(60 * 160):
        t = (i // 160) * WINDOW_NS + (i % 160) * 10**8
        base = float(rng.beta(8, 2))
        if i % 2:
            q = base * 0.85 if rng.random() < 0.10 else base
            events.append(event(i, t, "svc", "gpt-4o-mini", rng, quality=q, latency=600))
        else:
            events.append(event(i, t, "svc", "gpt-4o", rng, quality=base))
    by_model = defaultdict(list)
    for e in events:
        by_model[e.model].append(e)
    cost = {m: np.mean([e.cost_usd for e in es]) for m, es in by_model.items()}
    quality = {m: np.mean([e.quality for e in es]) for m, es in by_model.items()}
    assert quality["gpt-4o"] - quality["gpt-4o-mini"] < POLICY.quality_tolerance

    engine = DecisionEngine(POLICY, PRICES)
    proposals = engine.propose(engine.views(summaries(events)), NOW)
    [switch] = [p for p in proposals if p.strategy == "model_selection"]
    assert switch.model == "gpt-4o" and switch.change == {"model": "gpt-4o-mini"}
    assert not switch.needs_experiment and switch.expected_impact.confidence > 0.95
    # on the trace's own numbers: at least half the cost saved, 95% of the quality kept
    assert cost["gpt-4o-mini"] <= 0.5 * cost["gpt-4o"]
    assert quality["gpt-4o-mini"] >= 0.95 * quality["gpt-4o"]
    calls_per_day = len(by_model["gpt-4o"]) * NS_PER_DAY / (60 * WINDOW_NS)
    assert switch.expected_impact.savings_usd_per_day == pytest.approx(
        calls_per_day * (cost["gpt-4o"] - cost["gpt-4o-mini"]), rel=1e-6)
    assert switch.expected_impact.quality_delta == pytest.approx(
        quality["gpt-4o-mini"] - quality["gpt-4o"], abs=1e-9)
