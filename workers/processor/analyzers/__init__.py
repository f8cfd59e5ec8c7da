"""Analyzers: pure functions from one key's series of per-window summaries to Findings.

Each module answers one question with its own config of thresholds and minimum data, as
``analyze(series, key, config=None) -> list[Finding]``: ``performance`` (latency regression),
``cost`` (spend spike, cost-per-call drift), ``quality`` (score drop), ``pattern`` (repeated
prompts, bursts), ``anomaly`` (robust z and EWMA on the latest window). Raw samples are not
available, only summaries, so the tests are the ones summaries allow: per-window values as
observations, or pooled moments. Too little data gives no finding, never a guess."""
from workers.processor.analyzers import anomaly, cost, pattern, performance, quality
from workers.processor.analyzers.finding import Finding, SeriesKey, Severity
from workers.processor.analyzers.series import InvalidSeries

__all__ = ["Finding", "InvalidSeries", "SeriesKey", "Severity", "anomaly", "cost", "pattern",
           "performance", "quality"]
