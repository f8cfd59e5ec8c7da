"""What the decision engine may propose and the thresholds it must respect. One policy for all
strategies, with a nested section of tuning knobs per strategy; every default is conservative
(nothing is deployed automatically, quality may drop by at most 0.02)."""
from __future__ import annotations

from typing import Literal

from msgspec import Struct, field

from workers.processor.strategies.proposal import Constraints

STRATEGIES: tuple[str, ...] = ("model_selection", "caching", "rate_limiting", "batching",
                               "prompt_optimization")
# Strategies whose benefit is money, so that the minimum-savings rule applies to them; the
# others are gated by their own thresholds (error share, call rate).
COST_STRATEGIES = frozenset({"model_selection", "caching", "prompt_optimization"})


class PolicyError(ValueError):
    """A policy value out of its range, or an unknown strategy name."""


class ModelSelectionConfig(Struct, frozen=True, kw_only=True):
    alpha: float = 0.05  # level of the one-sided non-inferiority test
    error_tolerance: float = 0.01  # absolute error-rate increase a cheaper model may have
    # Untested cheaper models from the price table: "family" only takes names extending the
    # current one (gpt-4o -> gpt-4o-mini), "provider" any model of the same provider.
    price_candidates: Literal["family", "provider", "off"] = "family"
    min_price_saving: float = 0.2  # relative per-call saving an untested model must bring
    peer_confidence: float = 0.5  # factor on the test's confidence when evidence is elsewhere
    price_confidence: float = 0.2  # confidence of a price-table-only candidate


class CachingConfig(Struct, frozen=True, kw_only=True):
    min_repeat_share: float = 0.15
    max_hit_rate: float = 0.5  # a cache already serving this share is in place: leave it
    hit_fraction: float = 1.0  # share of in-window repeats a cache would serve
    ttl_s: int = 600


class RateLimitConfig(Struct, frozen=True, kw_only=True):
    min_rate_limited_share: float = 0.01
    burst_k: float = 5.0  # a burst window: calls above median + k sigma (sigma from the MAD)
    burst_min_ratio: float = 1.5  # ... and at least this times the median
    min_windows: int = 10
    rate_quantile: float = 0.9  # the sustainable rate: this quantile of accepted calls/s


class BatchingConfig(Struct, frozen=True, kw_only=True):
    operations: tuple[str, ...] = ("embedding", "embeddings", "embed", "rerank", "moderation",
                                   "classification")
    min_calls_per_s: float = 5.0
    max_tokens_in_per_call: float = 1024.0
    max_batch: int = 64
    max_wait_ms: float = 50.0


class PromptConfig(Struct, frozen=True, kw_only=True):
    ratio: float = 2.0  # input tokens per call above this times the peer median
    min_peers: int = 2
    headroom: float = 1.25  # the cap: peer median times this
    confidence: float = 0.5


class DecisionPolicy(Struct, frozen=True, kw_only=True):
    strategies: list[str] = field(default_factory=lambda: list(STRATEGIES))
    quality_tolerance: float = 0.02  # absolute drop in mean quality (0..1) allowed
    latency_budget_ms: float | None = None  # absolute p95 budget; None: none
    latency_tolerance: float = 0.20  # relative p95 increase allowed
    min_samples: int = 200  # calls (and quality scores) per model and key
    auto_deploy: bool = False
    lookback_windows: int = 60
    # A cost proposal must meet both (set one to 0 to rely on the other alone).
    min_cost_pct: float = 1.0
    min_savings_usd_per_day: float = 0.10
    model_selection: ModelSelectionConfig = field(default_factory=ModelSelectionConfig)
    caching: CachingConfig = field(default_factory=CachingConfig)
    rate_limiting: RateLimitConfig = field(default_factory=RateLimitConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.strategies) - set(STRATEGIES))
        if unknown:
            raise PolicyError(f"unknown strategies {unknown}; known: {list(STRATEGIES)}")
        if not 0 <= self.quality_tolerance <= 1:
            raise PolicyError(f"quality_tolerance must be in 0..1, got {self.quality_tolerance}")
        if self.latency_tolerance < 0:
            raise PolicyError(f"latency_tolerance must be >= 0, got {self.latency_tolerance}")
        if self.latency_budget_ms is not None and self.latency_budget_ms <= 0:
            raise PolicyError(f"latency_budget_ms must be > 0, got {self.latency_budget_ms}")
        if self.min_samples < 2 or self.lookback_windows < 1:
            raise PolicyError("min_samples must be >= 2 and lookback_windows >= 1")
        if self.min_cost_pct < 0 or self.min_savings_usd_per_day < 0:
            raise PolicyError("minimum savings must not be negative")

    def constraints(self) -> Constraints:
        return Constraints(quality_tolerance=self.quality_tolerance,
                           latency_budget_ms=self.latency_budget_ms,
                           min_samples=self.min_samples)
