"""Reading a key's series of per-window summaries: ordered by time, one column at a time, with
an error that names the window and field at fault instead of a KeyError deep in numpy."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class InvalidSeries(ValueError):
    """A window summary lacks a field or holds a non-number there."""

    def __init__(self, field: str, index: int, problem: str) -> None:
        super().__init__(f"window {index}, field {field!r}: {problem}")
        self.field = field
        self.index = index


def ordered(series: Sequence[dict]) -> list[dict]:
    """The windows sorted by start time (producers may emit late windows out of order)."""
    for i, window in enumerate(series):
        if not isinstance(window, dict):
            raise InvalidSeries("window_start_ns", i, f"expected a dict, got {type(window)}")
        for field in ("window_start_ns", "window_end_ns"):
            if not isinstance(window.get(field), int):
                raise InvalidSeries(field, i, "missing or not an integer")
    return sorted(series, key=lambda w: w["window_start_ns"])


def column(windows: Sequence[dict], field: str) -> np.ndarray:
    """The field of every window as floats; None (no data in that window) becomes NaN."""
    values = np.empty(len(windows))
    for i, window in enumerate(windows):
        if field not in window:
            raise InvalidSeries(field, i, "missing")
        value = window[field]
        if value is None:
            values[i] = math.nan
        elif isinstance(value, int | float) and not isinstance(value, bool):
            values[i] = value
        else:
            raise InvalidSeries(field, i, f"not a number: {value!r}")
    return values


def split(windows: list[dict], recent: int, baseline: int) -> tuple[list[dict], list[dict]]:
    """(baseline, recent): the last ``recent`` windows and the ``baseline`` windows before them."""
    cut = max(0, len(windows) - recent)
    return windows[max(0, cut - baseline):cut], windows[cut:]


def busy(windows: list[dict], min_calls: int) -> list[dict]:
    """The windows with at least min_calls calls: a p95 or a mean of a handful of calls is
    noise, and counting such windows would let a quiet night look like a regression."""
    return [w for w, n in zip(windows, column(windows, "count"), strict=True) if n >= min_calls]
