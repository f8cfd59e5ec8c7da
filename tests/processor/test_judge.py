"""The canary judge: known answers against scipy and brute force, the verdict rule, and its
error rates by simulation (fixed seeds, so every run sees the same draws)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from workers.processor.judge import (
    InvalidMetric,
    JudgeConfig,
    MetricSpec,
    hodges_lehmann,
    judge,
    two_proportion_test,
)

LATENCY = MetricSpec("latency_ms", "increase_is_bad", tolerance=0.10)
ERRORS = MetricSpec("errors", "increase_is_bad", tolerance=0.01, critical=True,
                    kind="proportion")
QUALITY = MetricSpec("quality", "decrease_is_bad", tolerance=0.01)
SPECS = [LATENCY, ERRORS, QUALITY]


def draw(rng: np.random.Generator, n: int, latency_scale: float = 1.0, error_rate: float = 0.02,
         quality_scale: float = 1.0) -> dict[str, np.ndarray]:
    """One side of a comparison: lognormal latency (median 800 ms, sigma 0.5), Bernoulli errors,
    Beta(8, 2) quality. Scaling a lognormal scales every quantile, p95 included."""
    return {"latency_ms": rng.lognormal(math.log(800), 0.5, n) * latency_scale,
            "errors": (rng.random(n) < error_rate).astype(float),
            "quality": rng.beta(8, 2, n) * quality_scale}


def fail_rate(seed: int, trials: int, n: int, specs=SPECS, **canary) -> float:
    rng = np.random.default_rng(seed)
    names = {s.name for s in specs}
    fails = 0
    for _ in range(trials):
        base, can = draw(rng, n), draw(rng, n, **canary)
        result = judge(specs, {k: (base[k], can[k]) for k in names})
        fails += result.verdict == "fail"
    return fails / trials


# -- known answers -------------------------------------------------------------------------

def test_p_value_is_scipys_mann_whitney() -> None:
    rng = np.random.default_rng(7)
    base, can = rng.normal(10, 2, 60), rng.normal(11, 2, 50)
    result = judge([MetricSpec("m")], {"m": (base, can)})
    expected = stats.mannwhitneyu(can, base, alternative="two-sided").pvalue
    assert result.metrics[0].p_value == pytest.approx(expected, rel=1e-12)


def test_hodges_lehmann_is_the_median_of_pairwise_differences() -> None:
    rng = np.random.default_rng(11)
    base, can = rng.normal(0, 1, 23), rng.normal(0.5, 1, 17)
    diffs = np.sort([c - b for c in can for b in base])
    shift, lo, hi = hodges_lehmann(can, base, 0.95)
    assert shift == pytest.approx(np.median(diffs))
    nm = len(diffs)  # the CI bounds are order statistics k and nm-k+1 (1-based)
    k = math.floor(nm / 2 - stats.norm.ppf(0.975) * math.sqrt(nm * (23 + 17 + 1) / 12))
    assert (lo, hi) == (diffs[k - 1], diffs[nm - k])
    assert lo < shift < hi


def test_hodges_lehmann_interval_covers_the_true_shift() -> None:
    """A 90% interval covers the true shift about 90% of the time."""
    rng = np.random.default_rng(5)
    covered = sum(lo <= 2.0 <= hi for lo, hi in
                  (hodges_lehmann(rng.exponential(5, 40) + 2.0, rng.exponential(5, 40), 0.90)[1:]
                   for _ in range(400)))
    assert 0.86 <= covered / 400 <= 0.94


def test_subsampled_differences_are_deterministic_and_close() -> None:
    rng = np.random.default_rng(3)
    base, can = rng.lognormal(0, 0.5, 700), rng.lognormal(0.1, 0.5, 600)  # 420k pairs
    exact = hodges_lehmann(can, base, 0.98, max_pairs=10**6)
    sampled = hodges_lehmann(can, base, 0.98)
    assert sampled == hodges_lehmann(can, base, 0.98)
    assert sampled == pytest.approx(exact, abs=0.01)


def test_two_proportion_test_known_answer() -> None:
    # 20/400 vs 40/400: pooled p = 0.075, z = 0.05 / sqrt(0.075 * 0.925 * 2 / 400) = 2.6846
    p_value, diff, lo, hi = two_proportion_test(20, 400, 40, 400, 0.95)
    assert diff == pytest.approx(0.05)
    assert p_value == pytest.approx(0.007262, rel=1e-3)
    half = 1.959964 * math.sqrt(0.05 * 0.95 / 400 + 0.1 * 0.9 / 400)
    assert (lo, hi) == pytest.approx((0.05 - half, 0.05 + half))


# -- classification and verdict ------------------------------------------------------------

def test_error_free_sides_pass() -> None:
    result = judge([ERRORS], {"errors": (np.zeros(500), np.zeros(500))})
    assert result.metrics[0].classification == "pass" and result.metrics[0].p_value == 1.0


def test_significant_but_small_shift_passes() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(1000, 10, 2000)
    result = judge([LATENCY], {"latency_ms": (base, base + 20)})  # 2% shift, 10% tolerated
    metric = result.metrics[0]
    assert metric.p_value < 1e-6 and metric.ci_low > 0
    assert metric.classification == "pass" and result.verdict == "pass"


def test_harmless_direction_passes_and_either_catches_both() -> None:
    rng = np.random.default_rng(2)
    base = rng.normal(1000, 50, 300)
    faster = {"latency_ms": (base, base * 0.7)}
    assert judge([LATENCY], faster).metrics[0].classification == "pass"
    either = MetricSpec("latency_ms", "either")
    assert judge([either], faster).metrics[0].classification == "low"
    assert judge([either], {"latency_ms": (base, base * 1.3)}).metrics[0].classification == "high"


def test_too_few_samples_is_inconclusive() -> None:
    rng = np.random.default_rng(4)
    sides = draw(rng, 400)
    samples = {k: (v, v) for k, v in sides.items()}
    samples["quality"] = (sides["quality"][:10], sides["quality"][:10])
    result = judge(SPECS, samples)
    assert result.verdict == "inconclusive"
    assert [m.classification for m in result.metrics] == ["pass", "pass", "nodata"]
    assert result.score == 100.0


def test_critical_failure_fails_even_among_many_passing_metrics() -> None:
    rng = np.random.default_rng(6)
    many = [MetricSpec(f"m{i}") for i in range(40)]
    samples = {s.name: (rng.normal(5, 1, 100), rng.normal(5, 1, 100)) for s in many}
    samples["errors"] = (np.zeros(1000), (rng.random(1000) < 0.2).astype(float))
    result = judge([*many, ERRORS], samples)
    assert result.verdict == "fail" and "errors" in result.reason
    assert result.score == pytest.approx(100 * 40 / 41, abs=0.01)


def test_one_noncritical_failure_fails_few_metrics_but_not_many() -> None:
    rng = np.random.default_rng(8)

    def run(n_metrics: int) -> str:
        specs = [MetricSpec(f"m{i}", tolerance=0.05) for i in range(n_metrics)]
        samples = {s.name: (rng.normal(5, 0.1, 100),) * 2 for s in specs}
        samples["m0"] = (rng.normal(5, 0.1, 100), rng.normal(8, 0.1, 100))
        return judge(specs, samples).verdict

    assert run(3) == "fail"
    assert run(25) == "pass"  # 96 >= 95


def test_to_dict_is_plain_builtins() -> None:
    rng = np.random.default_rng(9)
    sides = draw(rng, 100)
    evidence = judge(SPECS, {k: (v, v) for k, v in sides.items()}).to_dict()
    assert evidence["verdict"] == "pass"
    assert evidence["metrics"][1]["name"] == "errors"
    assert isinstance(evidence["metrics"][0]["p_value"], float)


@pytest.mark.parametrize("spec, samples, match", [
    (LATENCY, {}, "no samples"),
    (LATENCY, {"latency_ms": ([1.0] * 40, [float("nan")] * 40)}, "NaN"),
    (ERRORS, {"errors": ([0.5] * 40, [0.0] * 40)}, "0 or 1"),
    (MetricSpec("x", tolerance=-1), {"x": ([1.0] * 40, [1.0] * 40)}, "tolerance"),
])
def test_bad_input_names_the_metric(spec: MetricSpec, samples: dict, match: str) -> None:
    with pytest.raises(InvalidMetric, match=match) as info:
        judge([spec], samples)
    assert info.value.metric == spec.name


# -- error rates by simulation -------------------------------------------------------------

def test_aa_comparisons_rarely_fail() -> None:
    assert fail_rate(seed=100, trials=200, n=400) <= 0.01


def test_latency_regression_of_30_percent_at_p95_is_caught() -> None:
    assert fail_rate(seed=101, trials=100, n=400, latency_scale=1.3) >= 0.95


def test_quality_drop_of_5_percent_is_caught() -> None:
    assert fail_rate(seed=102, trials=100, n=400, quality_scale=0.95) >= 0.95


def test_error_rate_doubling_is_caught_with_enough_calls() -> None:
    """2% -> 4% errors with 1 point tolerated at 98% confidence: the interval's lower bound must
    pass 0.01, which at 400 calls a side it does in ~8% of trials (a z-test alone ~25%), at
    10,000 calls a side in ~95%, at 15,000 in ~99%. Proportions need calls, not windows."""
    assert fail_rate(seed=103, trials=100, n=15_000, specs=[ERRORS], error_rate=0.04) >= 0.95
    assert fail_rate(seed=104, trials=100, n=400, specs=[ERRORS], error_rate=0.04) <= 0.3


def test_config_confidence_must_be_a_probability() -> None:
    with pytest.raises(ValueError, match="confidence"):
        judge([LATENCY], {"latency_ms": ([1.0] * 40,) * 2}, JudgeConfig(confidence=1.0))
