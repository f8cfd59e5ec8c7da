"""Bounded samples for the canary judge: a seeded reservoir for continuous metrics and an exact
counter for proportions.

A stage can see millions of calls, but the judge's rank tests need only a few thousand values
per side, so continuous metrics are kept as a uniform sample (Vitter's algorithm R) of bounded
size. The reservoir is seeded, so the same stream always keeps the same sample, and its state
(random generator included) round-trips for checkpoints. Proportions need no sampling: an
error rate is a count of hits out of a total, kept exactly.
"""
from __future__ import annotations

import json

import numpy as np
from msgspec import Struct
from numpy.typing import ArrayLike


class ReservoirState(Struct, array_like=True):
    capacity: int
    seen: int
    values: bytes  # float64, the filled part
    rng: str  # numpy's bit generator state as JSON (its integers exceed 64 bits)


class Reservoir:
    """A uniform sample of at most ``capacity`` of the floats added so far (algorithm R)."""

    def __init__(self, capacity: int, seed: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.seen = 0  # values offered so far
        self._values = np.empty(capacity)
        self._rng = np.random.default_rng(seed)

    def add(self, value: float) -> None:
        """Item t (0-based) enters while there is room, then replaces slot j ~ U{0..t} when
        j < capacity."""
        if self.seen < self.capacity:
            self._values[self.seen] = value
        else:
            slot = int(self._rng.integers(0, self.seen + 1))
            if slot < self.capacity:
                self._values[slot] = value
        self.seen += 1

    def add_many(self, values: ArrayLike) -> None:
        """The same as ``add`` for each value in turn, vectorized (one draw per value)."""
        batch = np.asarray(values, dtype=float).ravel()
        if batch.size == 0:
            return
        room = max(0, min(batch.size, self.capacity - self.seen))
        self._values[self.seen:self.seen + room] = batch[:room]
        rest = batch[room:]
        if rest.size:
            index = self.seen + room + np.arange(rest.size)
            slots = self._rng.integers(0, index + 1)
            taken = slots < self.capacity
            slots, rest = slots[taken][::-1], rest[taken][::-1]
            # sequentially the last value written to a slot wins: keep each slot's last one
            unique, last = np.unique(slots, return_index=True)
            self._values[unique] = rest[last]
        self.seen += batch.size

    def values(self) -> np.ndarray:
        """A copy of the sample (all values while fewer than ``capacity`` were added)."""
        return self._values[:min(self.seen, self.capacity)].copy()

    def to_state(self) -> ReservoirState:
        state = self._rng.bit_generator.state
        return ReservoirState(self.capacity, self.seen, self.values().tobytes(),
                              json.dumps(state))

    @classmethod
    def from_state(cls, state: ReservoirState) -> Reservoir:
        reservoir = cls(state.capacity, 0)
        kept = np.frombuffer(state.values, dtype=float)
        reservoir._values[:kept.size] = kept
        reservoir.seen = state.seen
        reservoir._rng.bit_generator.state = json.loads(state.rng)
        return reservoir


class ProportionCounter(Struct, array_like=True):
    """Hits out of a total, exactly (errors out of calls)."""

    hits: int = 0
    total: int = 0

    def add(self, hit: bool) -> None:
        self.hits += bool(hit)
        self.total += 1

    def add_many(self, hits: ArrayLike) -> None:
        flags = np.asarray(hits, dtype=bool).ravel()
        self.hits += int(flags.sum())
        self.total += int(flags.size)

    @property
    def proportion(self) -> float | None:
        return self.hits / self.total if self.total else None

    def as_samples(self) -> np.ndarray:
        """0/1 values in the judge's form for proportions (the order does not matter)."""
        samples = np.zeros(self.total)
        samples[:self.hits] = 1.0
        return samples
