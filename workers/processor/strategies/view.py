"""A strategy's view of one (service, operation): per model (and variant) statistics merged
over the lookback, the calls per window (for bursts) and the other services' figures for the
same operation (peers). Summaries are merged here once, with the mergeable formulas: sums,
count-weighted means and pooled quality variance. Latency quantiles cannot be merged from
summaries; the count-weighted mean of the windows' quantiles stands in for them."""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
from msgspec import Struct

KeyT = tuple[str, str, str, str]  # (service, model, variant or "", operation)
NS_PER_DAY = 86_400 * 10**9
_NUMBERS = ("count", "errors", "tokens_in", "tokens_out", "cost_usd", "uncosted",
            "window_start_ns", "window_end_ns")
ALL_MODELS = "*"


class InvalidHistory(ValueError):
    """A history key or window summary the views cannot be built from."""


def is_rate_limit(error_type: str) -> bool:
    """Provider throttling however it is spelt: rate_limit, RateLimitError, 429, ..."""
    name = error_type.lower()
    return "rate" in name or "429" in name or "too_many_requests" in name


class ModelStats(Struct, frozen=True, kw_only=True):
    """One model's (or a whole service's, model "*") figures over the lookback."""

    service: str
    model: str
    variant: str
    windows: int
    count: int
    errors: int
    rate_limited: int
    tokens_in: int
    tokens_out: int
    cost_usd: float
    costed: int  # calls with a cost
    quality_n: int
    quality_mean: float | None
    quality_var: float | None
    p50_ms: float | None
    p95_ms: float | None
    cache_hit_rate: float | None
    repeat_share: float | None
    span_ns: int  # first window start to last window end

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0

    @property
    def cost_per_call(self) -> float | None:
        return self.cost_usd / self.costed if self.costed else None

    @property
    def tokens_in_per_call(self) -> float:
        return self.tokens_in / self.count if self.count else 0.0

    @property
    def tokens_out_per_call(self) -> float:
        return self.tokens_out / self.count if self.count else 0.0

    @property
    def calls_per_day(self) -> float:
        return self.count * NS_PER_DAY / self.span_ns if self.span_ns > 0 else 0.0

    @property
    def cost_per_day(self) -> float | None:
        """Uncosted calls are counted at the mean cost of the costed ones."""
        cpc = self.cost_per_call
        return None if cpc is None else cpc * self.calls_per_day


class ServiceView(Struct, frozen=True, kw_only=True):
    service: str
    operation: str
    total: ModelStats  # every model and variant of the service/operation
    models: list[ModelStats]  # per model (variants merged), most calls first
    arms: list[ModelStats]  # per (model, variant)
    window_s: float  # window length
    window_calls: list[int]  # calls per window, time order (windows without calls absent)
    window_rate_limited: list[int]  # rate-limited calls per window, same order
    peers: list[ModelStats]  # other services, same operation, per model
    peer_totals: list[ModelStats]  # other services, same operation, all models

    def model(self, name: str) -> ModelStats | None:
        return next((m for m in self.models if m.model == name), None)


def _weighted(windows: Sequence[dict], field: str) -> float | None:
    """Count-weighted mean of a per-window figure over the windows that have it."""
    pairs = [(w["count"], w[field]) for w in windows if w.get(field) is not None]
    total = sum(n for n, _ in pairs)
    return sum(n * v for n, v in pairs) / total if total else None


def _pooled_quality(windows: Sequence[dict]) -> tuple[int, float | None, float | None]:
    """(n, mean, sample variance) of the union of the windows' quality scores."""
    groups = [(w["quality_n"], w["quality_mean"], w.get("quality_var") or 0.0)
              for w in windows if w.get("quality_n") and w.get("quality_mean") is not None]
    n = sum(g[0] for g in groups)
    if not n:
        return 0, None, None
    mean = sum(k * m for k, m, _ in groups) / n
    m2 = sum((k - 1) * v + k * (m - mean) ** 2 for k, m, v in groups)
    return n, mean, (m2 / (n - 1) if n > 1 else None)


def merge_windows(service: str, model: str, variant: str,
                  windows: Sequence[dict]) -> ModelStats:
    """Merge window summaries (already validated) into one ModelStats."""
    quality_n, quality_mean, quality_var = _pooled_quality(windows)
    return ModelStats(
        service=service, model=model, variant=variant, windows=len(windows),
        count=sum(w["count"] for w in windows),
        errors=sum(w["errors"] for w in windows),
        rate_limited=sum(_rate_limited(w) for w in windows),
        tokens_in=sum(w["tokens_in"] for w in windows),
        tokens_out=sum(w["tokens_out"] for w in windows),
        cost_usd=float(sum(w["cost_usd"] for w in windows)),
        costed=sum(w["count"] - w["uncosted"] for w in windows),
        quality_n=quality_n, quality_mean=quality_mean, quality_var=quality_var,
        p50_ms=_weighted(windows, "p50_ms"), p95_ms=_weighted(windows, "p95_ms"),
        cache_hit_rate=_weighted(windows, "cache_hit_rate"),
        repeat_share=_weighted(windows, "repeat_share"),
        span_ns=(max(w["window_end_ns"] for w in windows)
                 - min(w["window_start_ns"] for w in windows)) if windows else 0)


def _rate_limited(window: dict) -> int:
    return sum(n for name, n in (window.get("errors_by_type") or {}).items()
               if is_rate_limit(name))


def _check(key: object, windows: object) -> None:
    if not (isinstance(key, tuple) and len(key) == 4 and all(isinstance(k, str) for k in key)):
        raise InvalidHistory(f"key {key!r}: expected (service, model, variant, operation)")
    if not isinstance(windows, Sequence):
        raise InvalidHistory(f"key {key!r}: expected a sequence of window summaries")
    for i, window in enumerate(windows):
        if not isinstance(window, dict):
            raise InvalidHistory(f"key {key!r}, window {i}: expected a dict")
        for field in _NUMBERS:
            value = window.get(field)
            if isinstance(value, bool) or not isinstance(value, int | float) \
                    or not math.isfinite(value):
                raise InvalidHistory(f"key {key!r}, window {i}: {field} missing or not a "
                                     f"number: {value!r}")
        if window["window_end_ns"] <= window["window_start_ns"]:
            raise InvalidHistory(f"key {key!r}, window {i}: window ends before it starts")


def build_views(history: Mapping[KeyT, Sequence[dict]],
                lookback_windows: int | None = None) -> list[ServiceView]:
    """One view per (service, operation). ``lookback_windows``: only windows ending within that
    many window lengths of the latest window end are used (None: all)."""
    for key, windows in history.items():
        _check(key, windows)
    every = [w for windows in history.values() for w in windows]
    if not every:
        return []
    window_ns = float(np.median([w["window_end_ns"] - w["window_start_ns"] for w in every]))
    cutoff = -math.inf
    if lookback_windows is not None:
        cutoff = max(w["window_end_ns"] for w in every) - lookback_windows * window_ns
    groups: dict[tuple[str, str], dict[tuple[str, str], list[dict]]] = defaultdict(dict)
    for (service, model, variant, operation), windows in history.items():
        kept = [w for w in windows if w["window_end_ns"] > cutoff and w["count"] > 0]
        if kept:
            groups[service, operation][model, variant] = kept
    per_group = {key: _group_stats(key, arms) for key, arms in groups.items()}
    views = []
    for (service, operation), arms in sorted(groups.items()):
        models, total = per_group[service, operation]
        others = [key for key in per_group if key[1] == operation and key[0] != service]
        by_start: dict[int, list[int]] = defaultdict(lambda: [0, 0])
        for windows in arms.values():
            for w in windows:
                by_start[w["window_start_ns"]][0] += w["count"]
                by_start[w["window_start_ns"]][1] += _rate_limited(w)
        starts = sorted(by_start)
        views.append(ServiceView(
            service=service, operation=operation, total=total, models=models,
            arms=[merge_windows(service, m, v, ws) for (m, v), ws in sorted(arms.items())],
            window_s=window_ns / 1e9,
            window_calls=[by_start[s][0] for s in starts],
            window_rate_limited=[by_start[s][1] for s in starts],
            peers=[m for key in sorted(others) for m in per_group[key][0]],
            peer_totals=[per_group[key][1] for key in sorted(others)]))
    return views


def _group_stats(key: tuple[str, str], arms: Mapping[tuple[str, str], list[dict]]
                 ) -> tuple[list[ModelStats], ModelStats]:
    """(per model, variants merged, most calls first; all models) of one service/operation."""
    service = key[0]
    by_model: dict[str, list[dict]] = defaultdict(list)
    for (model, _variant), windows in arms.items():
        by_model[model].extend(windows)
    models = [merge_windows(service, model, "", ws) for model, ws in by_model.items()]
    models.sort(key=lambda m: (-m.count, m.model))
    total = merge_windows(service, ALL_MODELS, "", [w for ws in arms.values() for w in ws])
    return models, total
