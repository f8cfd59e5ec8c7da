"""Usage patterns worth acting on: repeated prompts (a cache would answer them) and bursts.

Repeats are counted over the recent windows, each window's repeat_share weighted by its calls,
and priced as repeat_share x cost, the spend a perfect cache would save. A burst is the latest
window's calls above the recent history's median + k sigma (sigma from the MAD), and at least
``burst_min_ratio`` times the median."""
from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np

from workers.processor.analyzers.finding import Finding, SeriesKey, make_finding
from workers.processor.analyzers.robust import spike_threshold
from workers.processor.analyzers.series import column, ordered, split


class PatternConfig(msgspec.Struct, frozen=True):
    repeat_windows: int = 6
    repeat_threshold: float = 0.20
    warning_repeat_share: float = 0.50
    min_calls: int = 100  # over the repeat windows
    history_windows: int = 24
    min_history_windows: int = 8
    burst_k: float = 5.0
    burst_min_ratio: float = 2.0


def analyze(series: Sequence[dict], key: SeriesKey,
            config: PatternConfig | None = None) -> list[Finding]:
    config = config or PatternConfig()
    windows = ordered(series)
    return repeated_prompts(windows, key, config) + burst(windows, key, config)


def repeated_prompts(windows: list[dict], key: SeriesKey, config: PatternConfig) -> list[Finding]:
    _, recent = split(windows, config.repeat_windows, 0)
    if not recent:
        return []
    counts, shares = column(recent, "count"), column(recent, "repeat_share")
    known = np.isfinite(shares)  # a window without prompt fingerprints has no repeat_share
    calls = float(counts[known].sum())
    if calls < config.min_calls:
        return []
    repeated = float((shares[known] * counts[known]).sum())
    share = repeated / calls
    if share < config.repeat_threshold:
        return []
    repeated_cost = float((shares[known] * column(recent, "cost_usd")[known]).sum())
    hits = column(recent, "cache_hit_rate")
    cached = np.isfinite(hits) & (counts > 0)
    cache_hit_rate = (float((hits[cached] * counts[cached]).sum() / counts[cached].sum())
                      if cached.any() else float("nan"))
    severity = "warning" if share >= config.warning_repeat_share else "info"
    return [make_finding(
        key, "repeated_prompts", severity, f"{share:.0%} of prompts to {key.model} are repeats",
        f"about {repeated:.0f} of {calls:.0f} calls over {len(recent)} windows repeat an earlier "
        f"prompt, ${repeated_cost:.2f} of spend a cache could save",
        {"repeat_share": share, "repeated_calls": repeated, "calls": calls,
         "repeated_cost_usd": repeated_cost, "cache_hit_rate": cache_hit_rate},
        recent)]


def burst(windows: list[dict], key: SeriesKey, config: PatternConfig) -> list[Finding]:
    history, latest = split(windows, 1, config.history_windows)
    if len(history) < config.min_history_windows or not latest:
        return []
    calls = float(column(latest, "calls_per_window")[0])
    threshold, median = spike_threshold(column(history, "calls_per_window"), config.burst_k,
                                        config.burst_min_ratio)
    if calls <= threshold:
        return []
    return [make_finding(
        key, "burst", "warning", f"burst of {calls:.0f} calls to {key.model} in one window",
        f"{calls:.0f} calls against a median of {median:.0f} over the previous {len(history)} "
        f"windows (threshold {threshold:.0f})",
        {"calls": calls, "baseline_median": median, "threshold": threshold,
         "ratio": calls / median if median > 0 else float("inf")},
        latest)]
