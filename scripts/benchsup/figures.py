"""How samples are kept, summarised and printed."""
from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Bench:
    """The run's options and every raw figure, by measurement."""

    quick: bool
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def reps(self) -> int:
        return 2 if self.quick else 5

    def put(self, key: str, value: Any) -> Any:
        self.results[key] = value
        return value


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


def pct(xs: list[float], p: float) -> float:
    """Nearest-rank percentile (p95 of 20 samples is the 19th smallest)."""
    if not xs:
        return math.nan
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def ms(x: float) -> str:
    return "n/a" if _missing(x) else f"{x * 1000:.1f} ms"


def sec(x: float) -> str:
    return "n/a" if _missing(x) else f"{x:.3f} s"


def mib(x: float | None) -> str:
    return "n/a" if x is None else f"{x / (1 << 20):.1f} MiB"


def percent(x: float) -> str:
    return f"{x:.3f}%"


def summary(xs: list[float], unit: Callable[[float], str] = sec) -> str:
    if not xs:
        return "no samples"
    return (f"median {unit(median(xs))}, min {unit(min(xs))}, max {unit(max(xs))}, "
            f"n={len(xs)}")


def columns(samples: list[dict[str, float]]) -> dict[str, list[float]]:
    """A list of per-sample dicts as one list per key."""
    return {k: [s[k] for s in samples] for k in samples[0]}


def log_line(text: str) -> None:
    print(text, flush=True)
