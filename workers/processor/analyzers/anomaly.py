"""Anomalies in the latest window, per metric, by two detectors that see different things:

* a robust z-score (0.6745 (x - median) / MAD of the history) catches a single-window spike;
* an EWMA control chart (lambda, L sigma limits) over the last ``ewma_windows`` windows catches
  a small sustained shift that no single window shows.

Both measure against a reference period before the monitored windows (its median, and sigma
from its MAD): were the shifted windows part of the reference, they would move its centre and
widen its sigma, and hide themselves.

Each metric has the direction that matters (a drop in errors is no anomaly). One finding per
metric, "warning" when one detector fires and "critical" when both do."""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import msgspec
import numpy as np

from workers.processor.analyzers.finding import Finding, SeriesKey, make_finding
from workers.processor.analyzers.robust import MAD_TO_SIGMA, median_mad, robust_z
from workers.processor.analyzers.series import column, ordered, split

Side = Literal["up", "down", "both"]


class AnomalyConfig(msgspec.Struct, frozen=True):
    metrics: tuple[tuple[str, Side], ...] = (
        ("count", "both"), ("error_rate", "up"), ("p95_ms", "up"), ("cost_per_call", "up"))
    history_windows: int = 48  # the reference period
    min_history_windows: int = 12
    ewma_windows: int = 12  # monitored by the chart, the latest one included
    z_threshold: float = 3.5  # Iglewicz and Hoaglin's cut-off for the modified z-score
    ewma_lambda: float = 0.2
    ewma_l: float = 3.5  # 3.0 alarms in ~3% of healthy windows (sigma is estimated)


def ewma_chart(values: np.ndarray, centre: float, sigma: float, n_reference: int, lam: float,
               width: float) -> tuple[float, float]:
    """(EWMA, control-limit half-width) at the last value; the chart starts at ``centre``.

    The limits widen by the uncertainty of the centre itself, a median of n_reference values
    (variance pi/2 sigma^2 / n): without it a short reference period alarms several times
    as often as L sigma promises."""
    ewma = centre
    for x in values:
        ewma = lam * x + (1 - lam) * ewma
    t = len(values)
    variance = lam / (2 - lam) * (1 - (1 - lam) ** (2 * t)) + math.pi / 2 / n_reference
    return ewma, width * sigma * math.sqrt(variance)


def _fires(deviation: float, side: Side) -> bool:
    return {"up": deviation > 0, "down": deviation < 0, "both": deviation != 0}[side]


def analyze(series: Sequence[dict], key: SeriesKey,
            config: AnomalyConfig | None = None) -> list[Finding]:
    config = config or AnomalyConfig()
    history, monitored = split(ordered(series), config.ewma_windows, config.history_windows)
    if len(history) < config.min_history_windows or not monitored:
        return []
    latest = monitored[-1:]
    findings = []
    for metric, side in config.metrics:
        past, recent = column(history, metric), column(monitored, metric)
        past, x = past[np.isfinite(past)], float(recent[-1])
        if len(past) < config.min_history_windows or not math.isfinite(x):
            continue
        z = robust_z(x, past)
        by_z = abs(z) > config.z_threshold and _fires(z, side)
        centre, mad = median_mad(past)
        sigma = mad * MAD_TO_SIGMA or float(np.std(past, ddof=1))
        ewma, limit = ewma_chart(recent[np.isfinite(recent)], centre, sigma, len(past),
                                 config.ewma_lambda, config.ewma_l)
        by_ewma = sigma > 0 and abs(ewma - centre) > limit and _fires(ewma - centre, side)
        if not (by_z or by_ewma):
            continue
        detectors = " and ".join(d for d, hit in (("robust z", by_z), ("EWMA", by_ewma)) if hit)
        findings.append(make_finding(
            key, "anomaly", "critical" if by_z and by_ewma else "warning",
            f"{metric} anomalous on {key.model}: {x:.4g}",
            f"{metric} = {x:.4g} against a median of {centre:.4g} over {len(past)} windows "
            f"(robust z {z:.1f}, EWMA {ewma:.4g} vs limits {centre:.4g} +- {limit:.4g}); "
            f"flagged by {detectors}",
            {"value": x, "median": centre, "robust_z": z, "ewma": ewma,
             "ewma_limit": limit, "by_robust_z": by_z, "by_ewma": by_ewma},
            latest))
    return findings
