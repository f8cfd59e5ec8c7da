"""Cost: a spend spike in the latest window, and a drift of cost per call.

A spike is the latest window's spend above a robust baseline (median + k sigma from the MAD of
the windows before it, and at least ``spike_min_ratio`` times the median): a mean and standard
deviation would be inflated by the very spikes we look for. A drift is the recent windows' mean
cost per call above the baseline's by ``drift_threshold`` with a one-sided Welch test on the
per-window values; a drop is a saving, not a finding."""
from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np

from workers.processor.analyzers.finding import Finding, SeriesKey, make_finding
from workers.processor.analyzers.robust import spike_threshold
from workers.processor.analyzers.series import busy, column, ordered, split
from workers.processor.analyzers.welch import welch_values


class CostConfig(msgspec.Struct, frozen=True):
    history_windows: int = 24  # baseline of the spike test
    min_history_windows: int = 8
    spike_k: float = 5.0
    spike_min_ratio: float = 1.5
    min_spike_usd: float = 1.0  # a spike of cents is not worth a finding
    critical_spike_ratio: float = 3.0
    recent_windows: int = 6
    baseline_windows: int = 24
    min_recent_windows: int = 3
    min_baseline_windows: int = 8
    min_calls: int = 20  # per window, for its cost per call to count
    drift_threshold: float = 0.15
    critical_drift: float = 0.50
    alpha: float = 0.01


def analyze(series: Sequence[dict], key: SeriesKey,
            config: CostConfig | None = None) -> list[Finding]:
    config = config or CostConfig()
    windows = ordered(series)
    return spend_spike(windows, key, config) + cost_per_call_drift(windows, key, config)


def spend_spike(windows: list[dict], key: SeriesKey, config: CostConfig) -> list[Finding]:
    history, latest = split(windows, 1, config.history_windows)
    if len(history) < config.min_history_windows or not latest:
        return []
    spend = float(column(latest, "cost_usd")[0])
    threshold, median = spike_threshold(column(history, "cost_usd"), config.spike_k,
                                        config.spike_min_ratio)
    if spend <= threshold or spend < config.min_spike_usd:
        return []
    ratio = spend / median if median > 0 else float("inf")
    severity = "critical" if ratio >= config.critical_spike_ratio else "warning"
    return [make_finding(
        key, "spend_spike", severity, f"spend spike on {key.model}: ${spend:.2f} in one window",
        f"${spend:.2f} against a median of ${median:.2f} over the previous {len(history)} "
        f"windows (threshold ${threshold:.2f})",
        {"cost_usd": spend, "baseline_median_usd": median, "threshold_usd": threshold,
         "ratio": ratio, "history_windows": len(history)},
        latest)]


def cost_per_call_drift(windows: list[dict], key: SeriesKey,
                        config: CostConfig) -> list[Finding]:
    base, recent = split(windows, config.recent_windows, config.baseline_windows)
    base, recent = busy(base, config.min_calls), busy(recent, config.min_calls)
    if len(base) < config.min_baseline_windows or len(recent) < config.min_recent_windows:
        return []
    base_cpc, recent_cpc = column(base, "cost_per_call"), column(recent, "cost_per_call")
    base_cpc, recent_cpc = base_cpc[np.isfinite(base_cpc)], recent_cpc[np.isfinite(recent_cpc)]
    if len(base_cpc) < config.min_baseline_windows or len(recent_cpc) < config.min_recent_windows:
        return []  # windows of calls without a price have no cost per call
    base_mean, recent_mean = float(base_cpc.mean()), float(recent_cpc.mean())
    if base_mean <= 0:
        return []
    drift = recent_mean / base_mean - 1
    if drift < config.drift_threshold:
        return []
    p_value = welch_values(recent_cpc, base_cpc, "greater")
    if p_value >= config.alpha:
        return []
    severity = "critical" if drift >= config.critical_drift else "warning"
    return [make_finding(
        key, "cost_per_call_drift", severity, f"cost per call up {drift:.0%} on {key.model}",
        f"${recent_mean:.5f} per call over the last {len(recent_cpc)} windows against "
        f"${base_mean:.5f} over the {len(base_cpc)} before (Welch, p = {p_value:.2g})",
        {"drift": drift, "p_value": p_value, "recent_cost_per_call": recent_mean,
         "baseline_cost_per_call": base_mean, "recent_windows": len(recent_cpc),
         "baseline_windows": len(base_cpc)},
        recent)]
