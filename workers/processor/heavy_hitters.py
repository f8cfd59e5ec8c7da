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
        self._buckets: dict[int, dict[str, None]] = {}  # count -> items, in arrival order
        self._min = 0  # the smallest count of a monitored item (0 when empty)

    def __len__(self) -> int:
        return len(self._counts)

    @property
    def min_count(self) -> int:
        """What an unmonitored item may have had: the minimum count once full, else 0."""
        return self._min if len(self._counts) >= self.capacity else 0

    def add(self, item: str) -> None:
        counts = self._counts
        count = counts.get(item)
        if count is not None:
            buckets = self._buckets
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
            self._buckets.setdefault(1, {})[item] = None
            self._min = 1
            return
        self._replace_min(item)

    def _replace_min(self, item: str) -> None:
        """The paper's eviction: the new item inherits the minimum count as its error."""
        low_count = self._min
        low = self._buckets[low_count]
        victim = next(iter(low))
        del low[victim], self._counts[victim], self._errors[victim]
        if not low:
            del self._buckets[low_count]
            self._min = low_count + 1
        self._counts[item] = low_count + 1
        self._errors[item] = low_count
        self._buckets.setdefault(low_count + 1, {})[item] = None

    def top(self, n: int | None = None) -> list[Row]:
        """The ``n`` largest items as (item, count, error), largest first; ties by smaller
        error, then by item, so that the order never depends on arrival."""
        errors = self._errors
        rows = sorted(((item, count, errors[item]) for item, count in self._counts.items()),
                      key=lambda row: (-row[1], row[2], row[0]))
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
        pad_self, pad_other = self.min_count, other.min_count
        merged: dict[str, tuple[int, int]] = {}
        for item in list(self._counts) + [i for i in other._counts if i not in self._counts]:
            merged[item] = (
                self._counts.get(item, pad_self) + other._counts.get(item, pad_other),
                self._errors.get(item, pad_self) + other._errors.get(item, pad_other))
        rows = sorted(((item, c, e) for item, (c, e) in merged.items()),
                      key=lambda row: (-row[1], row[2], row[0]))[:self.capacity]
        self._load(reversed(rows))

    def _load(self, rows) -> None:
        """Rebuild from rows given in bucket order (ascending count, arrival order within)."""
        self._counts, self._errors, self._buckets = {}, {}, {}
        for item, count, error in rows:
            self._counts[item] = count
            self._errors[item] = error
            self._buckets.setdefault(count, {})[item] = None
        self._min = min(self._buckets) if self._buckets else 0

    def to_list(self) -> list[Row]:
        """Rows in bucket order, so that ``from_list`` restores the exact eviction order."""
        errors = self._errors
        return [(item, count, errors[item])
                for count in sorted(self._buckets) for item in self._buckets[count]]

    @classmethod
    def from_list(cls, rows: list, capacity: int = DEFAULT_CAPACITY) -> SpaceSaving:
        summary = cls(capacity)
        checked = []
        for row in rows:
            try:
                item, count, error = row
            except (TypeError, ValueError):
                raise HeavyHittersDecodeError(f"expected (item, count, error), got {row!r}") \
                    from None
            if not isinstance(item, str) or not isinstance(count, int) \
                    or not isinstance(error, int) or not 0 <= error < count:
                raise HeavyHittersDecodeError(f"invalid row {row!r}")
            checked.append((item, count, error))
        if len(checked) > capacity or len({row[0] for row in checked}) != len(checked):
            raise HeavyHittersDecodeError("more rows than capacity, or an item twice")
        if [row[1] for row in checked] != sorted(row[1] for row in checked):
            raise HeavyHittersDecodeError("rows are not in ascending count order")
        summary._load(checked)
        return summary
