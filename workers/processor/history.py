"""The recent tumbling windows of every key: what analyzers and decisions look back on.

Each key keeps its last ``lookback`` window summaries (the dicts of ``Aggregate.summary()``
with ``window_start_ns``, ``window_end_ns`` and ``calls_per_window`` added), in time order. A
key whose newest window is more than ``lookback`` windows behind the newest window of all is
dropped, so memory follows the keys that are active, not every key ever seen.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import msgspec

from ipc.window_series import KeyT


class _State(msgspec.Struct, array_like=True):
    lookback: int
    window_ns: int
    series: list[tuple[tuple[str, str, str, str], list[dict]]]


class WindowHistory:
    def __init__(self, lookback: int, window_ns: int):
        self.lookback, self.window_ns = lookback, window_ns
        self._series: dict[KeyT, deque[dict]] = {}
        self.newest_end_ns = 0

    def __len__(self) -> int:
        return len(self._series)

    def add(self, key: KeyT, start_ns: int, end_ns: int, summary: dict) -> dict:
        """Record one closed window; returns the row kept (summary plus window fields)."""
        row = {**summary, "window_start_ns": start_ns, "window_end_ns": end_ns,
               "calls_per_window": summary["count"]}
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = deque(maxlen=self.lookback)
        series.append(row)
        if end_ns > self.newest_end_ns:
            self.newest_end_ns = end_ns
            self._forget_idle()
        return row

    def _forget_idle(self) -> None:
        horizon = self.newest_end_ns - self.lookback * self.window_ns
        for key in [k for k, s in self._series.items() if s[-1]["window_end_ns"] <= horizon]:
            del self._series[key]

    def items(self) -> Iterator[tuple[KeyT, list[dict]]]:
        for key, series in self._series.items():
            yield key, list(series)

    def get(self, key: KeyT) -> list[dict]:
        return list(self._series.get(key, ()))

    def to_bytes(self) -> bytes:
        return msgspec.msgpack.encode(_State(self.lookback, self.window_ns,
                                             [(k, list(s)) for k, s in self._series.items()]))

    @classmethod
    def from_bytes(cls, data: bytes) -> WindowHistory:
        state = msgspec.msgpack.decode(data, type=_State)
        history = cls(state.lookback, state.window_ns)
        for key, rows in state.series:
            history._series[tuple(key)] = deque(rows, maxlen=state.lookback)
            history.newest_end_ns = max(history.newest_end_ns,
                                        max((r["window_end_ns"] for r in rows), default=0))
        return history
