"""Welch's t-test from summaries. Analyzers see per-window (mean, variance, n), never the raw
samples, so groups of windows are pooled with the mergeable moment formulas first."""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
from scipy import stats

Alternative = Literal["greater", "less", "two-sided"]


def pool(means: np.ndarray, variances: np.ndarray, counts: np.ndarray) -> tuple[float, float, int]:
    """(mean, sample variance, n) of the union of groups given each group's mean, sample
    variance (ddof=1) and size: M2 = sum((n_i - 1) var_i + n_i (mean_i - mean)^2)."""
    n = int(counts.sum())
    mean = float((counts * means).sum() / n)
    m2 = float(((counts - 1) * np.where(counts > 1, variances, 0.0)
                + counts * (means - mean) ** 2).sum())
    return mean, (m2 / (n - 1) if n > 1 else 0.0), n


def welch_p(mean1: float, var1: float, n1: int, mean2: float, var2: float, n2: int,
            alternative: Alternative) -> float:
    """p-value of Welch's test of group 1 against group 2 (``greater``: mean1 > mean2). With no
    spread on either side the test is degenerate: any difference in the direction asked is
    certain (p = 0), none is p = 1."""
    if var1 == 0 and var2 == 0:
        diff = mean1 - mean2
        hit = {"greater": diff > 0, "less": diff < 0, "two-sided": diff != 0}[alternative]
        return 0.0 if hit else 1.0
    result = stats.ttest_ind_from_stats(mean1, math.sqrt(var1), n1, mean2, math.sqrt(var2), n2,
                                        equal_var=False, alternative=alternative)
    return float(result.pvalue)


def welch_values(a: np.ndarray, b: np.ndarray, alternative: Alternative) -> float:
    """Welch's test of the values a against b (e.g. one value per window)."""
    return welch_p(float(a.mean()), float(a.var(ddof=1)), len(a),
                   float(b.mean()), float(b.var(ddof=1)), len(b), alternative)
