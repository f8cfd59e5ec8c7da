"""Latency regression: the recent windows' p95 against the windows before them.

Only per-window summaries are at hand, so each window's p95 is one observation. A regression
needs both a large ratio of median p95s (recent / baseline) and significance: a one-sided Welch
t-test on log p95 (latency is multiplicative, and logs make the window-to-window spread
comparable across levels). Quiet windows are left out (``min_calls``)."""
from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np

from workers.processor.analyzers.finding import Finding, SeriesKey, make_finding
from workers.processor.analyzers.series import busy, column, ordered, split
from workers.processor.analyzers.welch import welch_values


class PerformanceConfig(msgspec.Struct, frozen=True):
    recent_windows: int = 6
    baseline_windows: int = 24
    min_recent_windows: int = 3
    min_baseline_windows: int = 8
    min_calls: int = 20  # per window, for its p95 to count
    ratio_threshold: float = 0.20  # recent median p95 at least 20% above the baseline's
    critical_ratio: float = 0.50
    alpha: float = 0.01


def positive(values: np.ndarray) -> np.ndarray:
    """The values a log can be taken of (a window without latencies has None, read as NaN)."""
    return values[np.isfinite(values) & (values > 0)]


def analyze(series: Sequence[dict], key: SeriesKey,
            config: PerformanceConfig | None = None) -> list[Finding]:
    config = config or PerformanceConfig()
    base, recent = split(ordered(series), config.recent_windows, config.baseline_windows)
    base, recent = busy(base, config.min_calls), busy(recent, config.min_calls)
    if len(base) < config.min_baseline_windows or len(recent) < config.min_recent_windows:
        return []
    base_p95, recent_p95 = positive(column(base, "p95_ms")), positive(column(recent, "p95_ms"))
    if len(base_p95) < config.min_baseline_windows or len(recent_p95) < config.min_recent_windows:
        return []
    ratio = float(np.median(recent_p95) / np.median(base_p95)) - 1
    if ratio < config.ratio_threshold:
        return []
    p_value = welch_values(np.log(recent_p95), np.log(base_p95), "greater")
    if p_value >= config.alpha:
        return []
    severity = "critical" if ratio >= config.critical_ratio else "warning"
    return [make_finding(
        key, "latency_regression", severity,
        f"p95 latency up {ratio:.0%} on {key.model}",
        f"median p95 {np.median(recent_p95):.0f} ms over the last {len(recent_p95)} windows "
        f"against {np.median(base_p95):.0f} ms over the {len(base_p95)} before (Welch on log p95, "
        f"p = {p_value:.2g})",
        {"ratio": ratio, "p_value": p_value, "recent_p95_ms": np.median(recent_p95),
         "baseline_p95_ms": np.median(base_p95), "recent_windows": len(recent_p95),
         "baseline_windows": len(base_p95)},
        recent)]
