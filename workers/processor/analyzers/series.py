"""Reading a key's series of per-window summaries: ordered by time, one column at a time, with
an error that names the window and field at fault instead of a KeyError deep in numpy."""
from __future__ import annotations

import math
from collections.abc import Sequence
from operator import itemgetter

import numpy as np


class InvalidSeries(ValueError):
    """A window summary lacks a field or holds a non-number there."""

    def __init__(self, field: str, index: int, problem: str) -> None:
        super().__init__(f"window {index}, field {field!r}: {problem}")
        self.field = field
        self.index = index


_PLAIN_NUMBERS = frozenset({int, float, type(None)})
_MISSING = object()


_START, _END = itemgetter("window_start_ns"), itemgetter("window_end_ns")


def ordered(series: Sequence[dict]) -> list[dict]:
    """The windows sorted by start time (producers may emit late windows out of order).
    Every analyzer orders every key's series at every analysis, so the common case (dicts
    with int bounds) is checked by type sets; anything else goes through the check that names
    the window at fault."""
    try:
        plain = set(map(type, series)) <= {dict} and \
            set(map(type, map(_START, series))) | set(map(type, map(_END, series))) <= {int}
    except (KeyError, TypeError):  # a bound missing, or not a dict: _check_windows names it
        plain = False
    if not plain:
        _check_windows(series)
    return sorted(series, key=_START)


def _check_windows(series: Sequence[dict]) -> None:
    for i, window in enumerate(series):
        if not isinstance(window, dict):
            raise InvalidSeries("window_start_ns", i, f"expected a dict, got {type(window)}")
        for field in ("window_start_ns", "window_end_ns"):
            if not isinstance(window.get(field), int):
                raise InvalidSeries(field, i, "missing or not an integer")


def column(windows: Sequence[dict], field: str) -> np.ndarray:
    """The field of every window as floats; None (no data in that window) becomes NaN. The
    common case (ints, floats and None) is converted by numpy in one call; anything else goes
    through the check that names the window at fault."""
    try:
        values = [w.get(field, _MISSING) for w in windows]
    except AttributeError:  # not a dict: the check below says what is wrong
        return _checked_column(windows, field)
    kinds = set(map(type, values))
    if not kinds <= _PLAIN_NUMBERS:
        return _checked_column(windows, field)
    if type(None) in kinds:
        values = [math.nan if value is None else value for value in values]
    return np.array(values, dtype=float)


def _checked_column(windows: Sequence[dict], field: str) -> np.ndarray:
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
