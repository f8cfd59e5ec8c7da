"""Event-time windows per key: tumbling and sliding, closed by a watermark, checkpointable.

Why panes: every event is added once, to the pane (gcd of the tumbling size and the slide)
that holds it; a tumbling or sliding window is the merge of its panes when it closes. Adding
each event to five overlapping sliding windows would cost five sketch updates.

Time is event time only (``LLMEvent.time_ns``), never the clock. The watermark is the largest
event time seen minus the allowed lateness; it never moves back. A window [start, end) closes
when the watermark reaches ``end``. Windows close eagerly, inside ``add``, so what a window
holds never depends on when ``drain_closed`` is called; that, and the checkpoint carrying
every open pane and every undrained closed window, is what makes restore-and-continue give
exactly the windows of an uninterrupted run.

An event whose every window is closed is counted late (``late_count``, ``late_samples``), not
dropped silently. One that misses only some windows (its tumbling window closed, a sliding
one still open) goes into the open ones and is counted in ``partly_late_count``.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Literal

import msgspec
from msgspec import Struct

from ipc.events import LLMEvent
from workers.processor.aggregates import Aggregate, AggregateDecodeError, KeyT

NS = 1_000_000_000
NO_WATERMARK = -(2 ** 63)  # before any event; every window is open
_NO_END = 2 ** 63
_NO_PANE: tuple = (None, None, _NO_END)
LATE_SAMPLES = 100
FORMAT_VERSION = 1

Kind = Literal["tumbling", "sliding"]
_KIND_ORDER = {"tumbling": 0, "sliding": 1}


class WindowConfigError(ValueError):
    """Window sizes that cannot be assigned (not positive, or size not a multiple of slide)."""


class CheckpointDecodeError(ValueError):
    """Bytes that are not a WindowedAggregator checkpoint of a known version."""


class WindowAssigner:
    """Windows of ``size_s`` every ``slide_s`` (tumbling when they are equal), aligned to the
    Unix epoch."""

    def __init__(self, size_s: int = 60, slide_s: int | None = None):
        slide_s = size_s if slide_s is None else slide_s
        if size_s <= 0 or slide_s <= 0 or int(size_s) != size_s or int(slide_s) != slide_s:
            raise WindowConfigError(f"sizes must be whole positive seconds, got size {size_s} "
                                    f"slide {slide_s}")
        if size_s % slide_s:
            raise WindowConfigError(f"size {size_s} s is not a multiple of slide {slide_s} s")
        self.size_ns = int(size_s) * NS
        self.slide_ns = int(slide_s) * NS

    def windows_for(self, time_ns: int) -> list[int]:
        """Start times of the windows [start, start + size) holding ``time_ns``, ascending."""
        last = time_ns - time_ns % self.slide_ns
        return list(range(last - self.size_ns + self.slide_ns, last + 1, self.slide_ns))


@dataclass(frozen=True, slots=True)
class ClosedWindow:
    kind: Kind
    start_ns: int
    end_ns: int
    key: KeyT
    aggregate: Aggregate


class _ClosedState(Struct, array_like=True):
    kind: str
    start_ns: int
    end_ns: int
    key: tuple[str, str, str, str]
    aggregate: bytes


class _State(Struct, array_like=True):
    version: int
    tumbling_s: int
    sliding_s: int
    slide_s: int
    allowed_lateness_s: int
    max_time_ns: int
    watermark_ns: int
    accepted_count: int
    late_count: int
    partly_late_count: int
    late_samples: list[tuple[str, int, int]]
    panes: list[tuple[int, list[tuple[tuple[str, str, str, str], bytes]]]]
    closed: list[_ClosedState]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_State)


class WindowedAggregator:
    """Per-key tumbling and sliding aggregates over event time, closed by a watermark."""

    def __init__(self, tumbling_s: int = 60, sliding_s: int = 300, slide_s: int = 60,
                 allowed_lateness_s: int = 30):
        if allowed_lateness_s < 0 or int(allowed_lateness_s) != allowed_lateness_s:
            raise WindowConfigError(f"allowed lateness must be whole seconds >= 0, "
                                    f"got {allowed_lateness_s}")
        self._config = (tumbling_s, sliding_s, slide_s, allowed_lateness_s)
        self.tumbling = WindowAssigner(tumbling_s)
        self.sliding = WindowAssigner(sliding_s, slide_s)
        self.pane_ns = math.gcd(self.tumbling.size_ns, self.sliding.slide_ns)
        self.lateness_ns = int(allowed_lateness_s) * NS
        self.max_time_ns = NO_WATERMARK
        self.watermark_ns = NO_WATERMARK
        self.accepted_count = 0
        self.late_count = 0
        self.partly_late_count = 0
        self.late_samples: deque[tuple[str, int, int]] = deque(maxlen=LATE_SAMPLES)
        self._panes: dict[int, dict[KeyT, Aggregate]] = {}  # pane start -> key -> aggregate
        self._closed: list[ClosedWindow] = []
        self._next_end_ns = _NO_END  # earliest end of an open window that has a pane
        self._last_pane = _NO_PANE  # (start, keys, first window end) of the last pane used

    # --- which windows a pane belongs to ------------------------------------------------

    def _pane_windows(self, pane: int) -> list[tuple[int, Kind, int]]:
        """(end, kind, start) of every window holding ``pane``."""
        tumbling = self.tumbling.size_ns
        start = pane - pane % tumbling
        windows: list[tuple[int, Kind, int]] = [(start + tumbling, "tumbling", start)]
        size = self.sliding.size_ns
        windows += [(s + size, "sliding", s) for s in self.sliding.windows_for(pane)]
        return windows

    def _first_end(self, pane: int) -> int:
        tumbling, slide = self.tumbling.size_ns, self.sliding.slide_ns
        return min(pane - pane % tumbling + tumbling, pane - pane % slide + slide)

    def _last_end(self, pane: int) -> int:
        tumbling, slide = self.tumbling.size_ns, self.sliding.slide_ns
        return max(pane - pane % tumbling + tumbling, pane - pane % slide + self.sliding.size_ns)

    def _next_end(self, pane: int) -> int:
        """The earliest end of a window of ``pane`` that is still open."""
        return min((end for end, _, _ in self._pane_windows(pane) if end > self.watermark_ns),
                   default=_NO_END)

    # --- ingest -------------------------------------------------------------------------

    def add(self, event: LLMEvent) -> str:
        """Add one event: "accepted", or "late" when every window holding it is closed."""
        time_ns = event.time_ns
        pane = time_ns - time_ns % self.pane_ns
        last_start, keys, first_end = self._last_pane
        if pane != last_start:
            keys = self._panes.get(pane)
            if keys is None:
                watermark = self.watermark_ns
                if watermark >= self._last_end(pane):
                    self.late_count += 1
                    self.late_samples.append((event.event_id, time_ns, watermark))
                    return "late"
                keys = self._panes[pane] = {}
                self._next_end_ns = min(self._next_end_ns, self._next_end(pane))
            first_end = self._first_end(pane)
            self._last_pane = (pane, keys, first_end)
        if self.watermark_ns >= first_end:
            self.partly_late_count += 1
        key = (event.service, event.model, event.variant or "", event.operation)
        agg = keys.get(key)
        if agg is None:
            agg = keys[key] = Aggregate()
        agg.add(event)
        self.accepted_count += 1
        if time_ns > self.max_time_ns:
            self.max_time_ns = time_ns
            watermark = time_ns - self.lateness_ns
            previous = self.watermark_ns
            if watermark > previous:
                self.watermark_ns = watermark
                if watermark >= self._next_end_ns:
                    self._close(previous, watermark)
        return "accepted"

    def add_quality(self, key: KeyT, time_ns: int, quality: float) -> str:
        """A quality score for an earlier event of ``key`` at ``time_ns`` (feedback):
        "accepted" into the windows still open, or "late" when they have all closed."""
        keys = self._panes.get(time_ns - time_ns % self.pane_ns)
        agg = keys.get(key) if keys is not None else None
        if agg is None:
            return "late"
        agg.add_quality(quality)
        return "accepted"

    def _close(self, previous: int, watermark: int) -> None:
        """Materialize the windows ending in (previous, watermark], the watermark's step,
        then forget the panes no open window needs."""
        due: set[tuple[int, Kind, int]] = set()
        for pane in self._panes:
            due.update(w for w in self._pane_windows(pane) if previous < w[0] <= watermark)
        closed = []
        for end, kind, start in due:
            panes = [self._panes[p] for p in range(start, end, self.pane_ns) if p in self._panes]
            keys = sorted({key for keys in panes for key in keys})
            for key in keys:
                parts = [keys_of_pane[key] for keys_of_pane in panes if key in keys_of_pane]
                closed.append(ClosedWindow(kind, start, end, key, Aggregate.merged(parts)))
        closed.sort(key=lambda w: (w.end_ns, w.key, _KIND_ORDER[w.kind]))
        self._closed += closed
        for pane in [p for p in self._panes if self._last_end(p) <= watermark]:
            del self._panes[pane]
        self._last_pane = _NO_PANE
        self._next_end_ns = min(map(self._next_end, self._panes), default=_NO_END)

    def drain_closed(self) -> list[ClosedWindow]:
        """The windows closed since the last drain, by end time then key; forgotten here."""
        closed, self._closed = self._closed, []
        return closed

    @property
    def open_panes(self) -> int:
        """(pane, key) aggregates held: bounded by the open windows times the keys."""
        return sum(len(keys) for keys in self._panes.values())

    # --- checkpoint ---------------------------------------------------------------------

    def state_to_bytes(self) -> bytes:
        """Everything needed to continue exactly: open panes, undrained closed windows,
        the watermark and the late counters."""
        panes = [(pane, [(key, agg.to_bytes()) for key, agg in sorted(keys.items())])
                 for pane, keys in sorted(self._panes.items())]
        closed = [_ClosedState(w.kind, w.start_ns, w.end_ns, w.key, w.aggregate.to_bytes())
                  for w in self._closed]
        tumbling_s, sliding_s, slide_s, lateness_s = self._config
        return _encoder.encode(_State(
            FORMAT_VERSION, tumbling_s, sliding_s, slide_s, lateness_s, self.max_time_ns,
            self.watermark_ns, self.accepted_count, self.late_count, self.partly_late_count,
            list(self.late_samples), panes, closed))

    @classmethod
    def from_state_bytes(cls, data: bytes) -> WindowedAggregator:
        try:
            state = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise CheckpointDecodeError(f"not a WindowedAggregator checkpoint: {exc}") from None
        if state.version != FORMAT_VERSION:
            raise CheckpointDecodeError(f"unsupported checkpoint format {state.version}")
        try:
            self = cls(state.tumbling_s, state.sliding_s, state.slide_s,
                       state.allowed_lateness_s)
            self._panes = {pane: {tuple(key): Aggregate.from_bytes(agg) for key, agg in keys}
                           for pane, keys in state.panes}
            self._closed = [ClosedWindow(w.kind, w.start_ns, w.end_ns, tuple(w.key),
                                         Aggregate.from_bytes(w.aggregate))
                            for w in state.closed]
        except (WindowConfigError, AggregateDecodeError) as exc:
            raise CheckpointDecodeError(str(exc)) from None
        self.max_time_ns, self.watermark_ns = state.max_time_ns, state.watermark_ns
        self.accepted_count, self.late_count = state.accepted_count, state.late_count
        self.partly_late_count = state.partly_late_count
        self.late_samples.extend(state.late_samples)
        self._next_end_ns = min(map(self._next_end, self._panes), default=_NO_END)
        return self
