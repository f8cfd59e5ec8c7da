"""Quality drop: pooled feedback scores of the recent windows against the baseline windows.

Windows carry (quality_mean, quality_var, quality_n) of their scores (quality_var the sample
variance, ddof=1), so each side is pooled with the mergeable moment formulas and the sides are
compared by a one-sided Welch t-test. Scores are sparse (few calls get feedback), so a side
needs ``min_scores`` scores, not a number of windows. A finding needs significance and a drop
of at least ``tolerance`` (absolute, on the score's scale)."""
from __future__ import annotations

from collections.abc import Sequence

import msgspec
import numpy as np

from workers.processor.analyzers.finding import Finding, SeriesKey, make_finding
from workers.processor.analyzers.series import column, ordered, split
from workers.processor.analyzers.welch import pool, welch_p


class QualityConfig(msgspec.Struct, frozen=True):
    recent_windows: int = 6
    baseline_windows: int = 24
    min_scores: int = 30  # per side
    tolerance: float = 0.03
    critical_drop: float = 0.10
    alpha: float = 0.01


def pooled(windows: list[dict]) -> tuple[float, float, int]:
    """(mean, variance, n) of all scores in the windows that have any."""
    n = column(windows, "quality_n")
    scored = np.isfinite(n) & (n > 0)
    if not scored.any():
        return 0.0, 0.0, 0
    means, variances = column(windows, "quality_mean"), column(windows, "quality_var")
    variances = np.where(np.isfinite(variances), variances, 0.0)  # a window of one score
    return pool(means[scored], variances[scored], n[scored])


def analyze(series: Sequence[dict], key: SeriesKey,
            config: QualityConfig | None = None) -> list[Finding]:
    config = config or QualityConfig()
    base, recent = split(ordered(series), config.recent_windows, config.baseline_windows)
    base_mean, base_var, base_n = pooled(base)
    recent_mean, recent_var, recent_n = pooled(recent)
    if min(base_n, recent_n) < config.min_scores:
        return []
    drop = base_mean - recent_mean
    if drop < config.tolerance:
        return []
    p_value = welch_p(recent_mean, recent_var, recent_n, base_mean, base_var, base_n, "less")
    if p_value >= config.alpha:
        return []
    severity = "critical" if drop >= config.critical_drop else "warning"
    return [make_finding(
        key, "quality_drop", severity, f"quality down {drop:.3f} on {key.model}",
        f"mean score {recent_mean:.3f} (n={recent_n}) over the last {len(recent)} windows "
        f"against {base_mean:.3f} (n={base_n}) before (Welch, p = {p_value:.2g})",
        {"drop": drop, "p_value": p_value, "recent_mean": recent_mean, "baseline_mean": base_mean,
         "recent_n": recent_n, "baseline_n": base_n},
        recent)]
