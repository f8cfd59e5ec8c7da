"""One window's statistics for one key (service, model, variant, operation), in bounded memory.

Why this shape: the processor keeps one ``Aggregate`` per pane and key and builds every window
by merging panes, so each statistic is one that merges exactly or within a known error:
counts and sums, DDSketch quantiles (1% relative accuracy, mergeable bin by bin), Welford's
quality mean and variance (Chan et al.'s parallel formula), a Space-Saving summary of the top
prompt fingerprints and a HyperLogLog count of the distinct ones (for the repeat share).
Memory is bounded whatever the event count: the sketches are capped at
``BIN_LIMIT`` bins (the lowest collapse first, which never touches p50..p99 in practice),
``errors_by_type`` at ``MAX_ERROR_TYPES`` names and the fingerprints at their capacity.

Latencies are buffered (``PENDING_VALUES`` per aggregate) and binned by numpy in bulk, when
the buffer is full or a sketch is read: a per-value ``DDSketch.add`` is about 1 us of Python.

``to_bytes`` is msgpack; a sketch is written by its bins (offset, length and the non-zero
range) and the buffer as it is, so a restored aggregate answers every quantile exactly as the
original and continues to evolve identically (which checkpoint/restore relies on).
"""
from __future__ import annotations

import math

import msgspec
import numpy as np
from ddsketch import LogCollapsingLowestDenseDDSketch
from ddsketch.ddsketch import BaseDDSketch
from ddsketch.mapping import LogarithmicMapping
from ddsketch.store import CollapsingLowestDenseStore
from msgspec import Struct

from ipc.events import LLMEvent
from workers.processor.distinct import DistinctCounter, DistinctDecodeError
from workers.processor.heavy_hitters import HeavyHittersDecodeError, SpaceSaving

KeyT = tuple[str, str, str, str]  # (service, model, variant or "", operation)

RELATIVE_ACCURACY = 0.01
BIN_LIMIT = 2048  # at 1% accuracy 2048 bins span a ratio of ~1e17: collapse is for garbage
MAX_ERROR_TYPES = 32
OTHER_ERROR = "(other)"
UNKNOWN_ERROR = "(unknown)"
FINGERPRINT_CAPACITY = 64
TOP_FINGERPRINTS = 10
PENDING_VALUES = 128  # latencies buffered per aggregate before numpy bins them
FORMAT_VERSION = 1


class AggregateDecodeError(ValueError):
    """Bytes that are not a serialized Aggregate of a known version."""


def event_key(event: LLMEvent) -> KeyT:
    return (event.service, event.model, event.variant or "", event.operation)


_MAPPING = LogarithmicMapping(RELATIVE_ACCURACY)  # immutable: shared, as building one is slow
_MULTIPLIER, _MIN_POSSIBLE = _MAPPING._multiplier, _MAPPING.min_possible
_ceil, _log2 = math.ceil, math.log2


def _template_sketch() -> BaseDDSketch:
    sketch = LogCollapsingLowestDenseDDSketch.__new__(LogCollapsingLowestDenseDDSketch)
    BaseDDSketch.__init__(sketch, mapping=_MAPPING,
                          store=CollapsingLowestDenseStore(BIN_LIMIT),
                          negative_store=CollapsingLowestDenseStore(BIN_LIMIT), zero_count=0.0)
    return sketch


_SKETCH_FIELDS = {name: value for name, value in vars(_template_sketch()).items()
                  if name not in ("_store", "_negative_store")}
_STORE_FIELDS = {name: value for name, value in vars(_template_sketch()._store).items()
                 if name != "bins"}


def _new_store() -> CollapsingLowestDenseStore:
    """A CollapsingLowestDenseStore(BIN_LIMIT): the fields of a fresh one, copied (its
    ``__init__`` chain costs several times more, once per window and sketch)."""
    store = object.__new__(CollapsingLowestDenseStore)
    fields = store.__dict__
    fields.update(_STORE_FIELDS)
    fields["bins"] = []
    return store


def _new_sketch() -> BaseDDSketch:
    """A LogCollapsingLowestDenseDDSketch(RELATIVE_ACCURACY, BIN_LIMIT) on the shared
    mapping, with the fields of a fresh one."""
    sketch = object.__new__(LogCollapsingLowestDenseDDSketch)
    fields = sketch.__dict__
    fields.update(_SKETCH_FIELDS)
    fields["_store"] = _new_store()
    fields["_negative_store"] = _new_store()
    return sketch


def _add_values(sketch: BaseDDSketch, values: list[float]) -> None:
    """Add many values to ``sketch`` at once: each value's bin key (the mapping's
    ceil(log2(v) * multiplier)) is counted in a dict, then each distinct key is added to the
    store once. About 0.12 us a value; numpy's fixed cost (~17 us a call) only pays off past
    a few hundred values, and a pane rarely buffers more than ``PENDING_VALUES``."""
    counts: dict[int, int] = {}
    get = counts.get
    small = []
    total = 0.0
    for value in values:
        if value > _MIN_POSSIBLE:
            key = _ceil(_log2(value) * _MULTIPLIER)
            counts[key] = get(key, 0) + 1
            total += value
        else:  # zeros (and garbage) go one by one
            small.append(value)
    for value in small:
        sketch.add(value)
    if not counts:
        return
    n = len(values) - len(small)
    low, high = min(counts), max(counts)
    store = sketch._store
    if not store.count or low < store.min_key or high > store.max_key:
        store._extend_range(low, high)  # grows, or collapses the lowest bins, as add() would
    if store.is_collapsed:  # keys below min_key now fold into the lowest bin: add() knows how
        for key in sorted(counts):
            store.add(key, float(counts[key]))
    else:
        bins, offset = store.bins, store.offset
        for key, count in counts.items():
            bins[key - offset] += count
        store.count += float(n)
    sketch._count += float(n)
    sketch._sum += total
    positive = values if not small else [value for value in values if value > _MIN_POSSIBLE]
    sketch._min = min(sketch._min, min(positive))
    sketch._max = max(sketch._max, max(positive))


class _StoreState(Struct, array_like=True):
    offset: int
    length: int
    min_key: int
    max_key: int
    count: float
    collapsed: bool
    bins: list[float]  # bins for keys min_key..max_key; every other bin is zero


class _SketchState(Struct, array_like=True):
    zero_count: float
    count: float
    sum: float
    min: float
    max: float
    positive: _StoreState | None
    negative: _StoreState | None


class _State(Struct, array_like=True):
    version: int
    count: int
    errors: int
    errors_by_type: dict[str, int]
    latency: _SketchState
    ttft: _SketchState | None
    tokens_in: int
    tokens_out: int
    cost_usd: float
    uncosted: int
    quality_n: int
    quality_mean: float
    quality_m2: float
    cache_hits: int
    cache_known: int
    fingerprint_calls: int
    fingerprint_capacity: int
    fingerprints: list[tuple[str, int, int]]
    distinct: bytes
    first_ns: int | None
    last_ns: int | None
    pending_latency: list[float]
    pending_ttft: list[float]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_State)


def _store_state(store: CollapsingLowestDenseStore) -> _StoreState | None:
    if not store.bins:
        return None
    low, high = store.min_key - store.offset, store.max_key - store.offset
    return _StoreState(store.offset, len(store.bins), int(store.min_key), int(store.max_key),
                       store.count, store.is_collapsed,
                       store.bins[low:high + 1])


def _load_store(store: CollapsingLowestDenseStore, state: _StoreState | None) -> None:
    if state is None:
        return
    low = state.min_key - state.offset
    if low < 0 or low + len(state.bins) > state.length or \
            state.max_key - state.min_key + 1 != len(state.bins):
        raise AggregateDecodeError("sketch bins do not fit their offset and length")
    bins = [0.0] * state.length
    bins[low:low + len(state.bins)] = state.bins
    store.bins, store.offset, store.count = bins, state.offset, state.count
    store.min_key, store.max_key = state.min_key, state.max_key
    store.is_collapsed = state.collapsed


def _sketch_state(sketch: BaseDDSketch) -> _SketchState:
    return _SketchState(sketch._zero_count, sketch._count, sketch._sum, sketch._min,
                        sketch._max, _store_state(sketch._store),
                        _store_state(sketch._negative_store))


def _load_sketch(state: _SketchState) -> BaseDDSketch:
    sketch = _new_sketch()
    _load_store(sketch._store, state.positive)
    _load_store(sketch._negative_store, state.negative)
    sketch._zero_count, sketch._count, sketch._sum = state.zero_count, state.count, state.sum
    sketch._min, sketch._max = state.min, state.max
    return sketch


def _store_array(store: CollapsingLowestDenseStore) -> np.ndarray:
    """The bins of keys min_key..max_key of ``store`` as a numpy array, kept on the store
    until it changes: a pane's bins are summed into its tumbling window and into every
    sliding one, and converting the list is most of a sum. Every change of the bins changes
    the count or the key range (weights are positive), which is what the cache checks."""
    version = (store.count, store.min_key, store.max_key, store.offset)
    cached = store.__dict__.get("_window_array")
    if cached is not None and cached[0] == version:
        return cached[1]
    start, length = store.min_key - store.offset, store.max_key - store.min_key + 1
    array = np.fromiter(store.bins[start:start + length], float, length)
    store._window_array = (version, array)
    return array


def _quantiles(sketch: BaseDDSketch | None, quantiles: tuple[float, ...]) -> list[float | None]:
    """``sketch.get_quantile_value(q)`` for each of ``quantiles``, from one cumulative sum
    of the bins (numpy accumulates in order, as the library's loop does, so the keys are the
    same) instead of one Python walk over the bins per quantile."""
    if sketch is None or not sketch._count:
        return [None] * len(quantiles)
    store = sketch._store
    if sketch._negative_store.count or sketch._zero_count or not store.count:
        return [sketch.get_quantile_value(q) for q in quantiles]
    cumulative = np.cumsum(store.bins)
    ranks = [q * (sketch._count - 1) for q in quantiles]
    indices = np.searchsorted(cumulative, ranks, side="right").tolist()
    length, offset, max_key, value = len(cumulative), store.offset, store.max_key, \
        _MAPPING.value
    return [None if not 0 <= q <= 1 else value(i + offset if i < length else max_key)
            for q, i in zip(quantiles, indices, strict=True)]


def _sum_stores(out: CollapsingLowestDenseStore,
                stores: list[CollapsingLowestDenseStore]) -> None:
    """Fill the empty ``out`` with the sum of ``stores``, in one pass over one new bin list
    (the library merges pairwise, growing and re-centering as it goes)."""
    stores = [store for store in stores if store.count]
    if not stores:
        return
    low, high = min(s.min_key for s in stores), max(s.max_key for s in stores)
    if high - low + 1 > out.bin_limit or any(s.is_collapsed for s in stores):
        for store in stores:  # the lowest bins must collapse: the library knows how
            out.merge(store)
        return
    bins = np.zeros(high - low + 1)  # numpy adds the same float64s, twice as fast here
    count = 0.0
    for store in stores:
        bins[store.min_key - low:store.max_key - low + 1] += _store_array(store)
        count += store.count
    out.bins, out.offset, out.min_key, out.max_key = bins.tolist(), low, low, high
    out.count = count


def _merged_sketch(sketches: list[BaseDDSketch]) -> BaseDDSketch:
    """A new sketch of all ``sketches``: the same bins as merging them in turn."""
    out = _new_sketch()
    sketches = [sketch for sketch in sketches if sketch._count]
    if len(sketches) == 1:  # a tumbling window of one pane: a copy
        out._copy(sketches[0])
        return out
    for sketch in sketches:
        out._zero_count += sketch._zero_count
        out._count += sketch._count
        out._sum += sketch._sum
        out._min = min(out._min, sketch._min)
        out._max = max(out._max, sketch._max)
    _sum_stores(out._store, [sketch._store for sketch in sketches])
    _sum_stores(out._negative_store, [sketch._negative_store for sketch in sketches])
    return out


class Aggregate:
    """Statistics of the events of one window (or pane) and key."""

    __slots__ = ("count", "errors", "errors_by_type", "_latency", "_ttft", "_pending_latency",
                 "_pending_ttft", "tokens_in", "tokens_out", "cost_usd", "uncosted",
                 "quality_n", "quality_mean", "quality_m2", "cache_hits", "cache_known",
                 "fingerprint_calls", "fingerprints", "distinct", "first_ns", "last_ns")

    def __init__(self, fingerprint_capacity: int = FINGERPRINT_CAPACITY):
        self.count = 0
        self.errors = 0
        self.errors_by_type: dict[str, int] = {}
        self._latency = _new_sketch()
        self._ttft: BaseDDSketch | None = None  # made for the first event that reports ttft
        # values not yet in the sketches: binned PENDING_VALUES at a time, or when read
        self._pending_latency: list[float] = []
        self._pending_ttft: list[float] = []
        self.tokens_in = 0
        self.tokens_out = 0
        self.cost_usd = 0.0
        self.uncosted = 0  # events without cost_usd: not in cost_usd, not in cost_per_call
        self.quality_n = 0
        self.quality_mean = 0.0
        self.quality_m2 = 0.0  # Welford's sum of squared deviations from the mean
        self.cache_hits = 0
        self.cache_known = 0  # events that said whether they hit the cache
        self.fingerprint_calls = 0
        self.fingerprints = SpaceSaving(fingerprint_capacity)
        self.distinct = DistinctCounter()  # distinct fingerprints, for the repeat share
        self.first_ns: int | None = None
        self.last_ns: int | None = None

    def add(self, event: LLMEvent) -> None:
        self.count += 1
        if event.status == "error":
            self.errors += 1
            self._count_error(event.error_type or UNKNOWN_ERROR, 1)
        pending = self._pending_latency
        pending.append(event.latency_ms)
        if event.ttft_ms is not None:
            self._pending_ttft.append(event.ttft_ms)
        if len(pending) >= PENDING_VALUES:
            self._flush()
        self.tokens_in += event.input_tokens
        self.tokens_out += event.output_tokens
        cost = event.cost_usd
        if cost is None:
            self.uncosted += 1
        else:
            self.cost_usd += cost
        quality = event.quality
        if quality is not None:  # add_quality, inlined: this is every event's path
            n = self.quality_n = self.quality_n + 1
            delta = quality - self.quality_mean
            self.quality_mean += delta / n
            self.quality_m2 += delta * (quality - self.quality_mean)
        cache_hit = event.cache_hit
        if cache_hit is not None:
            self.cache_known += 1
            if cache_hit:
                self.cache_hits += 1
        fingerprint = event.prompt_fingerprint
        if fingerprint is not None:
            self.fingerprint_calls += 1
            self.fingerprints.add(fingerprint)
            self.distinct.add(fingerprint)
        time_ns = event.time_ns
        if self.first_ns is None:
            self.first_ns = self.last_ns = time_ns
        elif time_ns < self.first_ns:
            self.first_ns = time_ns
        elif time_ns > self.last_ns:
            self.last_ns = time_ns

    def add_quality(self, quality: float) -> None:
        """A quality score that arrived after its call (feedback): one more observation."""
        self.quality_n += 1
        delta = quality - self.quality_mean
        self.quality_mean += delta / self.quality_n
        self.quality_m2 += delta * (quality - self.quality_mean)

    def _flush(self) -> None:
        if self._pending_latency:
            _add_values(self._latency, self._pending_latency)
            self._pending_latency = []
        if self._pending_ttft:
            if self._ttft is None:
                self._ttft = _new_sketch()
            _add_values(self._ttft, self._pending_ttft)
            self._pending_ttft = []

    @property
    def latency(self) -> BaseDDSketch:
        """The latency sketch (ms), every value added so far in it."""
        self._flush()
        return self._latency

    @property
    def ttft(self) -> BaseDDSketch | None:
        """The time-to-first-token sketch (ms); None until an event reports ttft."""
        self._flush()
        return self._ttft

    def _count_error(self, error_type: str, n: int) -> None:
        by_type = self.errors_by_type
        if error_type not in by_type and len(by_type) >= MAX_ERROR_TYPES:
            error_type = OTHER_ERROR
        by_type[error_type] = by_type.get(error_type, 0) + n

    def merge(self, other: Aggregate) -> None:
        """Add ``other``'s events to this aggregate (``other`` is not changed)."""
        self._merge_counters(other)
        self._latency = _merged_sketch([self.latency, other.latency])
        if other.ttft is not None:
            self._ttft = _merged_sketch([s for s in (self.ttft, other.ttft) if s is not None])
        self.fingerprints.merge(other.fingerprints)
        self.distinct.merge(other.distinct)

    @classmethod
    def merged(cls, parts: list[Aggregate]) -> Aggregate:
        """A new aggregate of all ``parts`` (a window from its panes); like merging them in
        turn, but each sketch is summed in one pass and the fingerprint summary truncated
        once, not after every part."""
        agg = cls()
        for part in parts:
            agg._merge_counters(part)
        agg._latency = _merged_sketch([part.latency for part in parts])
        ttfts = [part.ttft for part in parts if part.ttft is not None]
        agg._ttft = _merged_sketch(ttfts) if ttfts else None
        agg.fingerprints = SpaceSaving.merged([part.fingerprints for part in parts],
                                              agg.fingerprints.capacity)
        for part in parts:
            agg.distinct.merge(part.distinct)
        return agg

    def _merge_counters(self, other: Aggregate) -> None:
        """Everything of ``merge`` but the sketches and the fingerprints."""
        self.count += other.count
        self.errors += other.errors
        for error_type, n in other.errors_by_type.items():
            self._count_error(error_type, n)
        self.tokens_in += other.tokens_in
        self.tokens_out += other.tokens_out
        self.cost_usd += other.cost_usd
        self.uncosted += other.uncosted
        if other.quality_n:
            n_a, n_b = self.quality_n, other.quality_n
            n = n_a + n_b
            delta = other.quality_mean - self.quality_mean
            self.quality_mean += delta * n_b / n
            self.quality_m2 += other.quality_m2 + delta * delta * n_a * n_b / n
            self.quality_n = n
        self.cache_hits += other.cache_hits
        self.cache_known += other.cache_known
        self.fingerprint_calls += other.fingerprint_calls
        if other.first_ns is not None:
            if self.first_ns is None:
                self.first_ns, self.last_ns = other.first_ns, other.last_ns
            else:
                self.first_ns = min(self.first_ns, other.first_ns)
                self.last_ns = max(self.last_ns, other.last_ns)

    def quantile(self, q: float) -> float | None:
        """Latency (ms) at quantile ``q`` in 0..1, within 1% relative; None when empty."""
        return self.latency.get_quantile_value(q)

    def ttft_quantile(self, q: float) -> float | None:
        ttft = self.ttft
        return None if ttft is None else ttft.get_quantile_value(q)

    @property
    def quality_var(self) -> float | None:
        """Sample variance (ddof=1) of quality; None below two scores."""
        return self.quality_m2 / (self.quality_n - 1) if self.quality_n > 1 else None

    @property
    def repeat_share(self) -> float | None:
        """Share of calls with a fingerprint whose prompt was already seen in this aggregate:
        1 - distinct / calls, with the distinct count from a HyperLogLog sketch (a few
        percent of error, whatever the number of distinct prompts)."""
        if not self.fingerprint_calls:
            return None
        distinct = min(self.distinct.estimate(), self.fingerprint_calls)
        return max(0.0, 1.0 - distinct / self.fingerprint_calls)

    def summary(self) -> dict:
        """JSON-able figures; a rate or mean with nothing to divide by is None."""
        count = self.count
        costed = count - self.uncosted
        p50, p95, p99 = _quantiles(self.latency, (0.50, 0.95, 0.99))
        ttft_p50, ttft_p95 = _quantiles(self.ttft, (0.50, 0.95))
        return {
            "count": count,
            "errors": self.errors,
            "error_rate": self.errors / count if count else None,
            "errors_by_type": dict(sorted(self.errors_by_type.items())),
            "p50_ms": p50,
            "p95_ms": p95,
            "p99_ms": p99,
            "ttft_p50_ms": ttft_p50,
            "ttft_p95_ms": ttft_p95,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "cost_usd": self.cost_usd,
            "uncosted": self.uncosted,
            "cost_per_call": self.cost_usd / costed if costed else None,
            "quality_mean": self.quality_mean if self.quality_n else None,
            "quality_n": self.quality_n,
            "quality_var": self.quality_var,
            "cache_hit_rate": self.cache_hits / self.cache_known if self.cache_known else None,
            "repeat_share": self.repeat_share,
            "top_fingerprints": [list(row) for row in self.fingerprints.top(TOP_FINGERPRINTS)],
            "first_ns": self.first_ns,
            "last_ns": self.last_ns,
        }

    def to_bytes(self) -> bytes:
        # the pending values go as they are: flushing here would make a checkpointed run bin
        # them at other moments than an uninterrupted one
        return _encoder.encode(_State(
            FORMAT_VERSION, self.count, self.errors, self.errors_by_type,
            _sketch_state(self._latency),
            None if self._ttft is None else _sketch_state(self._ttft),
            self.tokens_in, self.tokens_out, self.cost_usd, self.uncosted, self.quality_n,
            self.quality_mean, self.quality_m2, self.cache_hits, self.cache_known,
            self.fingerprint_calls, self.fingerprints.capacity, self.fingerprints.to_list(),
            self.distinct.to_bytes(), self.first_ns, self.last_ns, self._pending_latency,
            self._pending_ttft))

    @classmethod
    def from_bytes(cls, data: bytes) -> Aggregate:
        try:
            state = _decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise AggregateDecodeError(f"not a serialized Aggregate: {exc}") from None
        if state.version != FORMAT_VERSION:
            raise AggregateDecodeError(f"unsupported Aggregate format {state.version}")
        agg = cls(state.fingerprint_capacity)
        try:
            agg.fingerprints = SpaceSaving.from_list(state.fingerprints,
                                                     state.fingerprint_capacity)
        except (HeavyHittersDecodeError, ValueError) as exc:
            raise AggregateDecodeError(f"fingerprints: {exc}") from None
        agg.count, agg.errors, agg.errors_by_type = state.count, state.errors, \
            state.errors_by_type
        agg._latency = _load_sketch(state.latency)
        agg._ttft = None if state.ttft is None else _load_sketch(state.ttft)
        agg.tokens_in, agg.tokens_out = state.tokens_in, state.tokens_out
        agg.cost_usd, agg.uncosted = state.cost_usd, state.uncosted
        agg.quality_n, agg.quality_mean, agg.quality_m2 = \
            state.quality_n, state.quality_mean, state.quality_m2
        agg.cache_hits, agg.cache_known = state.cache_hits, state.cache_known
        agg.fingerprint_calls = state.fingerprint_calls
        try:
            agg.distinct = DistinctCounter.from_bytes(state.distinct)
        except DistinctDecodeError as exc:
            raise AggregateDecodeError(f"distinct fingerprints: {exc}") from None
        agg.first_ns, agg.last_ns = state.first_ns, state.last_ns
        agg._pending_latency, agg._pending_ttft = state.pending_latency, state.pending_ttft
        return agg
