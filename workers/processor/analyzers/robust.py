"""Robust location and scale (median and MAD), so that one past spike does not hide the next."""
from __future__ import annotations

import numpy as np

MAD_TO_SIGMA = 1 / 0.6745  # MAD of a normal sample is 0.6745 sigma


def _median_of_sorted(values: np.ndarray) -> float:
    n = len(values)
    if n == 0:
        return float("nan")
    mid = n // 2
    return float(values[mid]) if n % 2 else float(values[mid - 1] + values[mid]) / 2


def median_mad(values: np.ndarray) -> tuple[float, float]:
    """(median, MAD) of the finite values; the MAD unscaled. (Sorting directly: np.median's
    fixed cost dominates on the few dozen values of a window history.)"""
    finite = np.sort(values[np.isfinite(values)])
    median = _median_of_sorted(finite)
    return median, _median_of_sorted(np.sort(np.abs(finite - median)))


def robust_z(x: float, history: np.ndarray) -> float:
    """Iglewicz-Hoaglin modified z-score 0.6745 (x - median) / MAD. A zero MAD (more than half
    the history identical) falls back to the mean absolute deviation (x 1.2533, its normal
    consistency factor); a constant history gives 0 for the same value and +-inf otherwise."""
    median, mad = median_mad(history)
    if mad > 0:
        return 0.6745 * (x - median) / mad
    finite = history[np.isfinite(history)]
    mean_ad = float(np.mean(np.abs(finite - median)))
    if mean_ad > 0:
        return (x - median) / (1.2533 * mean_ad)
    return 0.0 if x == median else float(np.sign(x - median) * np.inf)


def spike_threshold(history: np.ndarray, k: float, min_ratio: float) -> tuple[float, float]:
    """(threshold, median): median + k sigma (sigma from the MAD), and at least min_ratio times
    the median, so that a near-constant history does not flag every small rise."""
    median, mad = median_mad(history)
    return max(median + k * mad * MAD_TO_SIGMA, median * min_ratio), median
