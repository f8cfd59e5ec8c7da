"""Analyzers on known series: a clear regression is found, a healthy series with noise gives
nothing, too little data gives nothing. Series are drawn with fixed seeds."""
from __future__ import annotations

import math

import numpy as np
import pytest

from workers.processor.analyzers import (
    Finding,
    InvalidSeries,
    SeriesKey,
    anomaly,
    cost,
    pattern,
    performance,
    quality,
)
from workers.processor.analyzers.robust import robust_z
from workers.processor.analyzers.welch import pool

KEY = SeriesKey("chat", "gpt-4o", "completion")
WINDOW_NS = 60 * 10**9
ANALYZERS = (performance, cost, quality, pattern, anomaly)


def healthy(n: int, seed: int = 0, calls: float = 500.0) -> list[dict]:
    """n one-minute windows of a steady service: Poisson calls, 2% errors, p95 ~ 800 ms with 5%
    window-to-window noise, ~$0.002 a call, quality ~ 0.8 from 50 scores a window."""
    rng = np.random.default_rng(seed)
    windows = []
    for i in range(n):
        count = int(rng.poisson(calls))
        p95 = 800 * math.exp(rng.normal(0, 0.05))
        cpc = 0.002 * math.exp(rng.normal(0, 0.03))
        scores = np.clip(rng.beta(8, 2, 50), 0, 1)
        windows.append({
            "window_start_ns": i * WINDOW_NS, "window_end_ns": (i + 1) * WINDOW_NS,
            "count": count, "error_rate": rng.binomial(count, 0.02) / count,
            "p50_ms": p95 / 2, "p95_ms": p95, "p99_ms": p95 * 1.4,
            "tokens_in": count * 300, "tokens_out": count * 120,
            "cost_usd": count * cpc, "cost_per_call": cpc,
            "quality_mean": float(scores.mean()), "quality_n": 50,
            "quality_var": float(scores.var(ddof=1)),
            "cache_hit_rate": 0.1, "repeat_share": 0.05, "calls_per_window": count,
        })
    return windows


def scale(windows: list[dict], field: str, factor: float, last: int) -> list[dict]:
    return windows[:-last] + [{**w, field: w[field] * factor} for w in windows[-last:]]


def kinds(findings: list[Finding]) -> list[str]:
    return [f.kind for f in findings]


# -- all analyzers -------------------------------------------------------------------------

def test_healthy_series_gives_no_finding() -> None:
    for seed in range(100):
        series = healthy(60, seed)
        assert [f for a in ANALYZERS[:-1] for f in a.analyze(series, KEY)] == [], seed


def test_anomaly_false_alarms_on_healthy_series_are_rare() -> None:
    """Four metrics, two detectors, the latest window of 500 healthy series: ~1.4% alarm."""
    alarms = sum(bool(anomaly.analyze(healthy(60, seed), KEY)) for seed in range(500))
    assert alarms / 500 <= 0.025


@pytest.mark.parametrize("analyzer, field, factor, kind", [
    (performance, "p95_ms", 1.3, "latency_regression"),
    (cost, "cost_per_call", 1.2, "cost_per_call_drift"),
    (quality, "quality_mean", 0.94, "quality_drop"),  # a 0.048 drop
])
def test_regressions_are_found_in_nearly_every_series(analyzer, field, factor, kind) -> None:
    found = sum(kinds(analyzer.analyze(scale(healthy(40, seed), field, factor, 6), KEY)) == [kind]
                for seed in range(100))
    assert found >= 95


@pytest.mark.parametrize("analyzer", ANALYZERS)
def test_too_little_data_gives_no_finding(analyzer) -> None:
    series = healthy(5)
    for field in ("p95_ms", "cost_usd", "calls_per_window", "error_rate"):
        series = scale(series, field, 5.0, 2)
    series = [{**w, "quality_mean": 0.2, "repeat_share": 0.9, "count": 10} for w in series]
    assert analyzer.analyze(series, KEY) == []


def test_missing_field_names_it() -> None:
    series = healthy(40)
    del series[30]["p95_ms"]
    with pytest.raises(InvalidSeries, match="p95_ms") as info:
        performance.analyze(series, KEY)
    assert info.value.field == "p95_ms"
    series = healthy(40)
    series[-1]["cost_usd"] = "lots"
    with pytest.raises(InvalidSeries, match="not a number"):
        cost.analyze(series, KEY)


def test_out_of_order_windows_are_sorted() -> None:
    series = scale(healthy(40, 1), "p95_ms", 1.5, 6)
    assert kinds(performance.analyze(series[::-1], KEY)) == ["latency_regression"]


# -- performance ---------------------------------------------------------------------------

def test_latency_regression_is_found_with_its_evidence() -> None:
    series = scale(healthy(40, 2), "p95_ms", 1.3, 6)
    [finding] = performance.analyze(series, KEY)
    assert finding.kind == "latency_regression" and finding.severity == "warning"
    assert finding.evidence["ratio"] == pytest.approx(0.3, abs=0.05)
    assert finding.evidence["p_value"] < 0.01
    assert finding.window_start_ns == series[-6]["window_start_ns"]
    assert finding.window_end_ns == series[-1]["window_end_ns"]
    assert finding.to_dict()["service"] == "chat"
    assert performance.analyze(scale(healthy(40, 2), "p95_ms", 1.8, 6),
                               KEY)[0].severity == "critical"


def test_small_latency_rise_is_not_a_regression() -> None:
    assert performance.analyze(scale(healthy(40, 3), "p95_ms", 1.1, 6), KEY) == []


def test_one_slow_window_is_not_significant() -> None:
    series = healthy(40, 4)
    series[-1] = {**series[-1], "p95_ms": series[-1]["p95_ms"] * 3}
    assert performance.analyze(series, KEY) == []


def test_quiet_windows_do_not_count() -> None:
    series = scale(healthy(40, 5), "p95_ms", 2.0, 6)
    series = series[:-6] + [{**w, "count": 5} for w in series[-6:]]
    assert performance.analyze(series, KEY) == []


# -- cost ----------------------------------------------------------------------------------

def test_spend_spike_in_latest_window() -> None:
    series = scale(healthy(30, 6), "cost_usd", 4.0, 1)
    [finding] = cost.analyze(series, KEY)
    assert finding.kind == "spend_spike" and finding.severity == "critical"
    assert finding.evidence["ratio"] == pytest.approx(4.0, rel=0.15)
    assert finding.window_start_ns == series[-1]["window_start_ns"]


def test_spend_spike_needs_a_real_rise_over_a_flat_history() -> None:
    series = [{**w, "cost_usd": 10.0} for w in healthy(30, 7)]
    series[-1]["cost_usd"] = 10.5  # MAD 0: k sigma alone would flag this
    assert cost.analyze(series, KEY) == []
    series[-1]["cost_usd"] = 16.0
    assert kinds(cost.analyze(series, KEY)) == ["spend_spike"]


def test_cost_per_call_drift() -> None:
    series = scale(healthy(40, 8), "cost_per_call", 1.3, 6)
    [finding] = cost.analyze(series, KEY)
    assert finding.kind == "cost_per_call_drift" and finding.severity == "warning"
    assert finding.evidence["drift"] == pytest.approx(0.3, abs=0.05)


def test_cheaper_calls_are_no_finding() -> None:
    assert cost.analyze(scale(healthy(40, 9), "cost_per_call", 0.6, 6), KEY) == []


# -- quality -------------------------------------------------------------------------------

def test_pool_matches_the_raw_samples() -> None:
    rng = np.random.default_rng(10)
    groups = [rng.normal(0.8, 0.1, n) for n in (5, 17, 1, 40)]
    mean, var, n = pool(np.array([g.mean() for g in groups]),
                        np.array([g.var(ddof=1) if len(g) > 1 else 0.0 for g in groups]),
                        np.array([len(g) for g in groups]))
    everything = np.concatenate(groups)
    assert (mean, var, n) == pytest.approx((everything.mean(), everything.var(ddof=1), 63))


def test_quality_drop_is_found() -> None:
    series = healthy(40, 11)
    series = series[:-6] + [{**w, "quality_mean": w["quality_mean"] - 0.05}
                            for w in series[-6:]]
    [finding] = quality.analyze(series, KEY)
    assert finding.kind == "quality_drop" and finding.severity == "warning"
    assert finding.evidence["drop"] == pytest.approx(0.05, abs=0.015)
    assert finding.evidence["recent_n"] == 300


def test_quality_drop_below_tolerance_or_with_few_scores_is_no_finding() -> None:
    series = healthy(40, 12)
    small = series[:-6] + [{**w, "quality_mean": w["quality_mean"] - 0.01} for w in series[-6:]]
    assert quality.analyze(small, KEY) == []
    sparse = [{**w, "quality_n": 2} for w in series[:-6]] + [
        {**w, "quality_n": 2, "quality_mean": 0.5} for w in series[-6:]]
    assert quality.analyze(sparse, KEY) == []


def test_windows_without_scores_are_skipped() -> None:
    series = healthy(40, 13)
    series = [{**w, "quality_n": 0, "quality_mean": None, "quality_var": None}
              if i % 2 == 0 else w for i, w in enumerate(series)]
    series[-1] = {**series[-1], "quality_mean": 0.6}
    series[-3] = {**series[-3], "quality_mean": 0.6}
    series[-5] = {**series[-5], "quality_mean": 0.6}
    assert kinds(quality.analyze(series, KEY)) == ["quality_drop"]


# -- pattern -------------------------------------------------------------------------------

def test_repeated_prompts_with_their_cost() -> None:
    series = [{**w, "repeat_share": 0.3} for w in healthy(10, 14)]
    [finding] = pattern.analyze(series, KEY)
    recent = series[-6:]
    assert finding.kind == "repeated_prompts" and finding.severity == "info"
    assert finding.evidence["repeat_share"] == pytest.approx(0.3)
    assert finding.evidence["repeated_calls"] == pytest.approx(
        0.3 * sum(w["count"] for w in recent))
    assert finding.evidence["repeated_cost_usd"] == pytest.approx(
        0.3 * sum(w["cost_usd"] for w in recent))


def test_burst_in_latest_window() -> None:
    series = scale(healthy(30, 15), "calls_per_window", 3.0, 1)
    [finding] = pattern.analyze(series, KEY)
    assert finding.kind == "burst"
    assert finding.evidence["ratio"] == pytest.approx(3.0, rel=0.1)


# -- anomaly -------------------------------------------------------------------------------

def test_error_spike_is_flagged_by_both_detectors() -> None:
    series = healthy(60, 16)
    series[-1] = {**series[-1], "error_rate": 0.2}
    [finding] = anomaly.analyze(series, KEY)
    assert finding.kind == "anomaly" and finding.severity == "critical"
    assert "error_rate" in finding.title and finding.evidence["robust_z"] > 3.5


def test_small_sustained_shift_is_caught_by_ewma_alone() -> None:
    series = scale(healthy(60, 17), "p95_ms", 1.12, 10)  # +2.4 sigma, no window stands out
    [finding] = anomaly.analyze(series, KEY)
    assert "p95_ms" in finding.title and finding.severity == "warning"
    assert finding.evidence["by_ewma"] == 1.0 and finding.evidence["by_robust_z"] == 0.0


def test_anomaly_respects_direction() -> None:
    series = healthy(60, 18)
    series[-1] = {**series[-1], "error_rate": 0.0, "p95_ms": 200.0}
    assert anomaly.analyze(series, KEY) == []
    series[-1] = {**series[-1], "count": 5}
    assert kinds(anomaly.analyze(series, KEY)) == ["anomaly"]


def test_robust_z_on_a_mostly_constant_history() -> None:
    history = np.array([0.0] * 30 + [0.01, 0.02])
    assert robust_z(0.0, history) == 0.0
    assert robust_z(0.1, history) > 3.5
    assert robust_z(1.0, np.zeros(10)) == math.inf


def test_windows_with_missing_figures_are_skipped_not_fatal() -> None:
    """aggregates.summary() gives None for a rate or mean with nothing to divide by."""
    series = scale(scale(healthy(40, 19), "p95_ms", 1.5, 6), "cost_per_call", 1.5, 6)
    series = [{**w, "repeat_share": 0.4} for w in series]
    for i in (-2, -9, -20):
        series[i] = {**series[i], "p95_ms": None, "cost_per_call": None, "error_rate": None,
                     "repeat_share": None, "cache_hit_rate": None}
    found = {f.kind: f for a in ANALYZERS for f in a.analyze(series, KEY)}
    assert {"latency_regression", "cost_per_call_drift", "repeated_prompts"} <= found.keys()
    assert found["latency_regression"].evidence["recent_windows"] == 5
    assert found["repeated_prompts"].evidence["calls"] == sum(w["count"] for w in series[-6:]
                                                              if w["repeat_share"] is not None)


def test_series_columns_and_order_check_every_window() -> None:
    from workers.processor.analyzers.series import column, ordered
    windows = [{"window_start_ns": 2, "window_end_ns": 3, "n": 1, "q": None, "x": 1.5},
               {"window_start_ns": 1, "window_end_ns": 2, "n": 2.5, "q": 3, "x": np.float64(2)}]
    assert [w["window_start_ns"] for w in ordered(windows)] == [1, 2]
    assert column(windows, "n").tolist() == [1.0, 2.5]
    assert np.isnan(column(windows, "q")[0]) and column(windows, "q")[1] == 3.0
    assert column(windows, "x").tolist() == [1.5, 2.0]  # a numpy float is a number too
    for value, problem in ((True, "not a number"), ("7", "not a number")):
        bad = [dict(w) for w in windows]
        bad[1]["n"] = value
        with pytest.raises(InvalidSeries, match=problem) as info:
            column(bad, "n")
        assert info.value.index == 1
    with pytest.raises(InvalidSeries, match="missing") as info:
        column(windows, "absent")
    assert info.value.index == 0
    for bad, field in (([windows[0], {"window_start_ns": 5}], "window_end_ns"),
                       ([windows[0], {"window_start_ns": 1.5, "window_end_ns": 2}],
                        "window_start_ns"),
                       ([windows[0], [1, 2]], "window_start_ns")):
        with pytest.raises(InvalidSeries) as info:
            ordered(bad)
        assert (info.value.index, info.value.field) == (1, field)
