"""Space-Saving top-k counter (Metwally, Agrawal, El Abbadi 2005) for prompt fingerprints.

Why: a window may see millions of distinct fingerprints, but only the frequent ones matter
(repeated prompts are what a response cache would save), so memory is a fixed ``capacity``.
Each monitored item has a ``count`` (never an underestimate) and an ``error`` (how much of that
count may belong to items it replaced), so ``count - error`` is a guaranteed lower bound.

Counts are kept in buckets by count (the paper's Stream-Summary), so that an update and an
eviction are O(1). Buckets are dicts, not sets, so that on a tie the evicted item is the one
that reached the minimum first: the same on every run and after a checkpoint restore.
"""
from __future__ import annotations

DEFAULT_CAPACITY = 64

Row = tuple[str, int, int]  # (item, count, error)


class HeavyHittersDecodeError(ValueError):
    """A serialized summary that cannot be restored."""


class SpaceSaving:
    """Fixed-capacity frequent-item counter; mergeable, serializable to plain lists."""

    __slots__ = ("capacity", "_counts", "_errors", "_buckets", "_min")

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._counts: dict[str, int] = {}
        self._errors: dict[str, int] = {}
        # count -> items in eviction order; None until the next add needs it, because a merged
        # summary (a closed window) is usually never added to
        self._buckets: dict[int, dict[str, None]] | None = {}
        self._min = 0  # the smallest count of a monitored item (0 when empty); with buckets

    def __len__(self) -> int:
        return len(self._counts)

    @property
    def min_count(self) -> int:
        """What an unmonitored item may have had: the minimum count once full, else 0."""
        if len(self._counts) < self.capacity:
            return 0
        return min(self._counts.values()) if self._buckets is None else self._min

    def _build_buckets(self) -> dict[int, dict[str, None]]:
        """Buckets from the counts, items of one count in the counts' order."""
        buckets: dict[int, dict[str, None]] = {}
        for item, count in self._counts.items():
            bucket = buckets.get(count)
            if bucket is None:
                buckets[count] = {item: None}
            else:
                bucket[item] = None
        self._buckets = buckets
        self._min = min(buckets) if buckets else 0
        return buckets

    def add(self, item: str) -> None:
        counts = self._counts
        buckets = self._buckets
        if buckets is None:
            buckets = self._build_buckets()
        count = counts.get(item)
        if count is not None:
            low = buckets[count]
            del low[item]
            if not low:
                del buckets[count]
                if count == self._min:
                    self._min = count + 1
            counts[item] = count + 1
            up = buckets.get(count + 1)
            if up is None:
                buckets[count + 1] = {item: None}
            else:
                up[item] = None
            return
        if len(counts) < self.capacity:
            counts[item] = 1
            self._errors[item] = 0
            buckets.setdefault(1, {})[item] = None
            self._min = 1
            return
        # The paper's eviction: the new item inherits the minimum count as its error.
        low_count = self._min
        low = buckets[low_count]
        victim = next(iter(low))
        del low[victim], counts[victim], self._errors[victim]
        if not low:
            del buckets[low_count]
            self._min = low_count + 1
        counts[item] = low_count + 1
        self._errors[item] = low_count
        buckets.setdefault(low_count + 1, {})[item] = None

    def top(self, n: int | None = None) -> list[Row]:
        """The ``n`` largest items as (item, count, error), largest first; ties by smaller
        error, then by item, so that the order never depends on arrival."""
        errors = self._errors
        rows = sorted(((item, count, errors[item]) for item, count in self._counts.items()),
                      key=_rank)
        return rows if n is None else rows[:n]

    def repeats(self) -> int:
        """A lower bound on the calls whose item had been seen before: the sum of
        max(count - error - 1, 0). Counts alone would report every replaced item as a repeat."""
        errors = self._errors
        return sum(max(count - errors[item] - 1, 0) for item, count in self._counts.items())

    def merge(self, other: SpaceSaving) -> None:
        """Merge ``other`` into this summary (Cafaro et al.'s rule): an item missing from a
        full side may have had up to that side's minimum, which goes into both count and
        error; the ``capacity`` largest are kept."""
        if not other._counts:
            return
        counts, errors = self._counts, self._errors
        other_counts, other_errors = other._counts, other._errors
        pad_self, pad_other = self.min_count, other.min_count
        if pad_other:
            for item in counts:
                if item not in other_counts:
                    counts[item] += pad_other
                    errors[item] += pad_other
        for item, count in other_counts.items():
            if item in counts:
                counts[item] += count
                errors[item] += other_errors[item]
            else:
                counts[item] = count + pad_self
                errors[item] = other_errors[item] + pad_self
        self._counts, self._errors = _truncate(counts, errors, self.capacity)
        self._buckets = None

    @classmethod
    def merged(cls, parts: list[SpaceSaving], capacity: int = DEFAULT_CAPACITY) -> SpaceSaving:
        """The merge of many summaries, truncated once at the end: what pairwise ``merge``
        would give, but one sort instead of one per step (and never less accurate)."""
        if len(parts) == 1 and parts[0].capacity <= capacity:
            summary = cls(capacity)
            summary._counts, summary._errors = dict(parts[0]._counts), dict(parts[0]._errors)
            summary._buckets = None
            return summary
        pads = [part.min_count for part in parts]
        total_pad = sum(pads)
        # every item starts as missing from every part (total_pad); where present, the part's
        # own count and error replace its pad. The first part is copied whole when it adds no
        # pad to anyone: the usual case, as a pane is rarely full.
        if pads[0] == total_pad:
            counts, errors = dict(parts[0]._counts), dict(parts[0]._errors)
            rest = zip(parts[1:], pads[1:], strict=True)
        else:
            counts, errors = {}, {}
            rest = zip(parts, pads, strict=True)
        get = counts.get
        for part, pad in rest:
            part_errors = part._errors
            fresh = total_pad - pad  # what an item new here had in the parts before
            for item, count in part._counts.items():
                have = get(item)
                if have is None:
                    counts[item] = count + fresh
                    errors[item] = part_errors[item] + fresh
                else:
                    counts[item] = have + count - pad
                    errors[item] += part_errors[item] - pad
        summary = cls(capacity)
        summary._counts, summary._errors = _truncate(counts, errors, capacity)
        summary._buckets = None
        return summary

    def to_list(self) -> list[Row]:
        """Rows in eviction order (ascending count; within a count, first evicted first), so
        that ``from_list`` restores a summary that evolves identically."""
        buckets = self._build_buckets() if self._buckets is None else self._buckets
        errors = self._errors
        return [(item, count, errors[item])
                for count in sorted(buckets) for item in buckets[count]]

    @classmethod
    def from_list(cls, rows: list, capacity: int = DEFAULT_CAPACITY) -> SpaceSaving:
        summary = cls(capacity)
        for row in rows:
            try:
                item, count, error = row
            except (TypeError, ValueError):
                raise HeavyHittersDecodeError(f"expected (item, count, error), got {row!r}") \
                    from None
            if not isinstance(item, str) or not isinstance(count, int) \
                    or not isinstance(error, int) or not 0 <= error < count:
                raise HeavyHittersDecodeError(f"invalid row {row!r}")
            if item in summary._counts:
                raise HeavyHittersDecodeError(f"item {item!r} twice")
            summary._counts[item] = count
            summary._errors[item] = error
        if len(summary._counts) > capacity:
            raise HeavyHittersDecodeError(f"{len(rows)} rows for a capacity of {capacity}")
        summary._build_buckets()
        return summary


def _rank(row: Row) -> tuple[int, int, str]:
    return -row[1], row[2], row[0]


def _truncate(counts: dict[str, int], errors: dict[str, int],
              capacity: int) -> tuple[dict[str, int], dict[str, int]]:
    """The ``capacity`` items that rank first (as in ``top``). Only the items tied at the
    cut are sorted: a full sort of every candidate was most of a window's merge time."""
    if len(counts) <= capacity:
        return counts, errors
    cut = sorted(counts.values(), reverse=True)[capacity - 1]
    kept = [item for item, count in counts.items() if count > cut]
    tied = sorted(item for item, count in counts.items() if count == cut)
    tied.sort(key=errors.__getitem__)  # stable: by error, then by item
    kept += tied[:capacity - len(kept)]
    return {item: counts[item] for item in kept}, {item: errors[item] for item in kept}
