"""Canary judge: does a canary's telemetry differ from its baseline's by more than we tolerate?

Modelled on Kayenta's NetflixACAJudge with its Mann-Whitney classifier. Each metric is
classified on its own, then the verdict weighs them:

* continuous metrics (latency, quality, cost per call): a two-sided Mann-Whitney U test, and the
  Hodges-Lehmann estimate of the location shift (median of the pairwise differences
  canary - baseline) with a confidence interval read off the sorted pairwise differences at the
  order statistics the normal approximation of U gives (as R's ``wilcox.test`` and Kayenta do).
* proportions (errors): a two-proportion z-test (pooled) and a Wald interval of the difference.

A metric is "high" or "low" only when its interval excludes zero *and* the interval's bound
nearest zero lies outside the tolerance band (relative to the baseline median for continuous
metrics, absolute points for proportions): significant but small shifts pass, so that a large
sample does not fail a canary over a shift nobody cares about. A shift in the harmless
direction (``direction``) is reported in the reason but classified "pass", as in Kayenta.

Verdict rule: score = weighted share of passing metrics among those with data (0..100).
A critical metric classified high/low fails outright. Otherwise the canary fails when even
counting every no-data metric as passing the score stays below ``pass_threshold``; it is
inconclusive when some metric has too few samples; else it fails when score < pass_threshold.
With the default threshold of 95 and equal weights, any single failing metric fails a canary of
up to 20 metrics (one failure costs 100/n points); only larger metric sets tolerate a failure.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec
import numpy as np
from scipy import stats

Direction = Literal["increase_is_bad", "decrease_is_bad", "either"]
Kind = Literal["continuous", "proportion"]
Classification = Literal["pass", "high", "low", "nodata"]
Verdict = Literal["pass", "fail", "inconclusive"]

MAX_PAIRS = 250_000  # pairwise differences beyond this are subsampled (deterministically)


class InvalidMetric(ValueError):
    """A metric's spec or samples cannot be judged; names the metric."""

    def __init__(self, metric: str, problem: str) -> None:
        super().__init__(f"metric {metric!r}: {problem}")
        self.metric = metric


class MetricSpec(msgspec.Struct, frozen=True):
    name: str
    direction: Direction = "either"
    tolerance: float = 0.10  # relative to the baseline median; absolute points for proportions
    critical: bool = False
    kind: Kind = "continuous"
    weight: float = 1.0


class JudgeConfig(msgspec.Struct, frozen=True):
    confidence: float = 0.98
    min_samples: int = 30  # per side and metric; fewer makes the metric "nodata"
    pass_threshold: float = 95.0
    max_pairs: int = MAX_PAIRS


class MetricResult(msgspec.Struct, frozen=True):
    name: str
    classification: Classification
    p_value: float | None
    shift: float | None  # canary - baseline: HL estimate, or difference of proportions
    ci_low: float | None
    ci_high: float | None
    baseline_median: float | None  # the proportion itself for proportions
    canary_median: float | None
    reason: str
    critical: bool = False


class JudgeResult(msgspec.Struct, frozen=True):
    score: float
    verdict: Verdict
    metrics: list[MetricResult]
    reason: str

    def to_dict(self) -> dict:
        """Plain builtins, for the evidence store."""
        return msgspec.to_builtins(self)


def _as_array(spec: MetricSpec, samples: Sequence[float], side: str) -> np.ndarray:
    values = np.asarray(samples, dtype=float)
    if values.ndim != 1:
        raise InvalidMetric(spec.name, f"{side} samples must be one-dimensional")
    if not np.all(np.isfinite(values)):
        raise InvalidMetric(spec.name, f"{side} samples contain NaN or infinity")
    if spec.kind == "proportion" and not np.all((values == 0) | (values == 1)):
        raise InvalidMetric(spec.name, f"{side} samples of a proportion must be 0 or 1")
    return values


def _check_spec(spec: MetricSpec) -> None:
    if spec.direction not in ("increase_is_bad", "decrease_is_bad", "either"):
        raise InvalidMetric(spec.name, f"unknown direction {spec.direction!r}")
    if spec.kind not in ("continuous", "proportion"):
        raise InvalidMetric(spec.name, f"unknown kind {spec.kind!r}")
    if not spec.tolerance >= 0 or not spec.weight > 0:
        raise InvalidMetric(spec.name, "tolerance must be >= 0 and weight > 0")


def pairwise_differences(canary: np.ndarray, baseline: np.ndarray,
                         max_pairs: int = MAX_PAIRS) -> np.ndarray:
    """All differences canary[i] - baseline[j], or a fixed-seed sample of max_pairs of them."""
    n, m = len(canary), len(baseline)
    if n * m <= max_pairs:
        return np.subtract.outer(canary, baseline).ravel()
    rng = np.random.default_rng(0)  # the same inputs always give the same interval
    return canary[rng.integers(0, n, max_pairs)] - baseline[rng.integers(0, m, max_pairs)]


def hodges_lehmann(canary: np.ndarray, baseline: np.ndarray, confidence: float,
                   max_pairs: int = MAX_PAIRS) -> tuple[float, float, float]:
    """(shift, ci_low, ci_high): median of pairwise differences and its distribution-free CI.

    The bounds are the k-th smallest and k-th largest differences, with
    k = floor(nm/2 - z * sqrt(nm(n+m+1)/12)) from the normal approximation of U (no tie
    correction). When the differences are subsampled, the same ranks are read as quantiles."""
    n, m = len(canary), len(baseline)
    diffs = pairwise_differences(canary, baseline, max_pairs)
    nm = n * m
    z = stats.norm.ppf(0.5 + confidence / 2)
    k = max(1, math.floor(nm / 2 - z * math.sqrt(nm * (n + m + 1) / 12)))
    size = len(diffs)
    if size == nm:
        lo_idx, hi_idx = k - 1, nm - k
    else:
        lo_idx = round((k - 1) / (nm - 1) * (size - 1))
        hi_idx = size - 1 - lo_idx
    mid = (size - 1) / 2
    kth = sorted({lo_idx, hi_idx, math.floor(mid), math.ceil(mid)})
    part = np.partition(diffs, kth)
    shift = (part[math.floor(mid)] + part[math.ceil(mid)]) / 2
    return float(shift), float(part[lo_idx]), float(part[hi_idx])


def _classify(spec: MetricSpec, ci_low: float, ci_high: float, band: float) -> tuple[str, str]:
    """(classification, reason) from the interval and the tolerance band."""
    if ci_low <= 0 <= ci_high:
        return "pass", "no significant difference"
    nearest = ci_low if ci_low > 0 else ci_high
    if abs(nearest) <= band:
        return "pass", f"significant but within tolerance (|{nearest:.4g}| <= {band:.4g})"
    side = "high" if nearest > 0 else "low"
    harmless = ((side == "low" and spec.direction == "increase_is_bad")
                or (side == "high" and spec.direction == "decrease_is_bad"))
    if harmless:
        return "pass", f"significantly {side}er, which is not harmful for this metric"
    return side, f"significantly {side}er, beyond tolerance (|{nearest:.4g}| > {band:.4g})"


def judge_continuous(spec: MetricSpec, baseline: np.ndarray, canary: np.ndarray,
                     config: JudgeConfig) -> MetricResult:
    p_value = float(stats.mannwhitneyu(canary, baseline, alternative="two-sided").pvalue)
    shift, ci_low, ci_high = hodges_lehmann(canary, baseline, config.confidence,
                                            config.max_pairs)
    base_median = float(np.median(baseline))
    classification, reason = _classify(spec, ci_low, ci_high, spec.tolerance * abs(base_median))
    return MetricResult(spec.name, classification, p_value, shift, ci_low, ci_high,
                        base_median, float(np.median(canary)), reason, spec.critical)


def two_proportion_test(x1: float, n1: int, x2: float, n2: int,
                        confidence: float) -> tuple[float, float, float, float]:
    """(p_value, diff, ci_low, ci_high) for p2 - p1: pooled two-sided z-test, Wald interval."""
    p1, p2 = x1 / n1, x2 / n2
    diff = p2 - p1
    pooled = (x1 + x2) / (n1 + n2)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    p_value = 1.0 if se_pooled == 0 else float(2 * stats.norm.sf(abs(diff) / se_pooled))
    se = math.sqrt(p1 * (1 - p1) / n1 + p2 * (1 - p2) / n2)
    half = float(stats.norm.ppf(0.5 + confidence / 2)) * se
    return p_value, diff, diff - half, diff + half


def judge_proportion(spec: MetricSpec, baseline: np.ndarray, canary: np.ndarray,
                     config: JudgeConfig) -> MetricResult:
    p_value, diff, ci_low, ci_high = two_proportion_test(
        float(baseline.sum()), len(baseline), float(canary.sum()), len(canary),
        config.confidence)
    classification, reason = _classify(spec, ci_low, ci_high, spec.tolerance)
    return MetricResult(spec.name, classification, p_value, diff, ci_low, ci_high,
                        float(baseline.mean()), float(canary.mean()), reason, spec.critical)


def judge_metric(spec: MetricSpec, baseline: Sequence[float], canary: Sequence[float],
                 config: JudgeConfig) -> MetricResult:
    _check_spec(spec)
    base = _as_array(spec, baseline, "baseline")
    can = _as_array(spec, canary, "canary")
    if min(len(base), len(can)) < config.min_samples:
        return MetricResult(spec.name, "nodata", None, None, None, None, None, None,
                            f"{len(base)} baseline and {len(can)} canary samples, "
                            f"need {config.min_samples} each", spec.critical)
    if spec.kind == "proportion":
        return judge_proportion(spec, base, can, config)
    return judge_continuous(spec, base, can, config)


def judge(specs: Sequence[MetricSpec],
          samples: Mapping[str, tuple[Sequence[float], Sequence[float]]],
          config: JudgeConfig | None = None) -> JudgeResult:
    """Judge every spec against ``samples[name] = (baseline, canary)``; see the module doc."""
    config = config or JudgeConfig()
    if not 0 < config.confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {config.confidence}")
    if not specs:
        raise ValueError("no metrics to judge")
    results = []
    for spec in specs:
        if spec.name not in samples:
            raise InvalidMetric(spec.name, "no samples given")
        baseline, canary = samples[spec.name]
        results.append(judge_metric(spec, baseline, canary, config))
    return _verdict(specs, results, config)


def _verdict(specs: Sequence[MetricSpec], results: list[MetricResult],
             config: JudgeConfig) -> JudgeResult:
    weights = {s.name: s.weight for s in specs}
    total = sum(weights.values())
    with_data = sum(weights[r.name] for r in results if r.classification != "nodata")
    passing = sum(weights[r.name] for r in results if r.classification == "pass")
    nodata = total - with_data
    score = 100.0 * passing / with_data if with_data else 0.0
    critical = [r.name for r in results if r.critical and r.classification in ("high", "low")]
    failing = [r.name for r in results if r.classification in ("high", "low")]
    missing = [r.name for r in results if r.classification == "nodata"]
    if critical:
        verdict, reason = "fail", f"critical metric(s) failed: {', '.join(critical)}"
    elif 100.0 * (passing + nodata) / total < config.pass_threshold:
        verdict, reason = "fail", (f"failing metric(s) {', '.join(failing)}: score {score:.1f} "
                                   f"< {config.pass_threshold:g}")
    elif missing:
        verdict, reason = "inconclusive", f"too few samples for {', '.join(missing)}"
    else:
        verdict, reason = "pass", f"score {score:.1f} >= {config.pass_threshold:g}"
    return JudgeResult(round(score, 2), verdict, results, reason)
