"""Start order of services from their depends_on lists, with a cycle error naming the cycle."""
from __future__ import annotations

import graphlib
from collections.abc import Mapping, Sequence


class DependencyCycleError(ValueError):
    """depends_on forms a cycle; ``cycle`` lists it with the first name repeated at the end."""

    def __init__(self, cycle: Sequence[str]):
        self.cycle = list(cycle)
        super().__init__("dependency cycle: " + " -> ".join(self.cycle))


def start_tiers(depends_on: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Services grouped by tier: every service's dependencies are in earlier tiers.

    Dependencies that are not keys of ``depends_on`` (disabled or unknown services) are ignored
    here; config validation reports unknown names before this is called.
    """
    sorter = graphlib.TopologicalSorter(
        {name: [d for d in deps if d in depends_on] for name, deps in depends_on.items()})
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        # graphlib gives the cycle in reverse dependency order (a <- b <- a); name it as
        # "a depends on b depends on a".
        raise DependencyCycleError(list(reversed(exc.args[1]))) from None
    tiers = []
    while sorter.is_active():
        ready = sorted(sorter.get_ready())
        tiers.append(ready)
        sorter.done(*ready)
    return tiers


def start_order(depends_on: Mapping[str, Sequence[str]]) -> list[str]:
    return [name for tier in start_tiers(depends_on) for name in tier]
