"""How optimizerctl's tables (status, top) write durations and memory: short and aligned."""
from __future__ import annotations


def age(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.0f}m"
    return f"{value / 3600:.1f}h"


def rss(value: int | None) -> str:
    return "-" if value is None else f"{value / (1 << 20):.0f}M"
