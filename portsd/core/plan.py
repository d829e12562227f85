"""What to build, in what order: the ports whose build keys the repository lacks.

A plan covers the wanted ports and, transitively, whatever they need to build. A port is
planned exactly when it has a key and that key is not yet in the repository; a port
without a key is reported as blocked with the reason, and everything else goes ahead.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field

from portsd.core.graph import Graph, PortProblem
from portsd.core.keys import KeySet


@dataclass(frozen=True, slots=True)
class PlannedBuild:
    """One build: the port, its key and the planned builds that must finish first."""

    name: str
    key: str
    needs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BuildPlan:
    """Builds in dependency order, plus the ports that cannot be built and why."""

    builds: tuple[PlannedBuild, ...]
    blocked: Mapping[str, PortProblem] = field(default_factory=dict)
    up_to_date: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.builds)

    def names(self) -> list[str]:
        return [build.name for build in self.builds]


def make_plan(
    graph: Graph, keys: KeySet, present: Container[str], wanted: Iterable[str] | None = None
) -> BuildPlan:
    """Plan the builds ``wanted`` (default: every port for this architecture) needs.

    ``present`` holds the keys the repository already has.
    """
    missing: set[str]
    blocked: dict[str, PortProblem]
    up_to_date: set[str]
    if wanted is None:
        # The whole tree: ``keys`` already covers it (edges only lead to supported ports),
        # and set operations beat walking 30,000 names on every push.
        missing = {name for name, key in keys.keys.items() if key not in present}
        up_to_date = keys.keys.keys() - missing
        blocked = dict(keys.blocked)
    else:
        missing, blocked, up_to_date = set(), {}, set()
        for name in graph.dependency_closure(n for n in wanted if graph.supported(n)):
            key = keys.keys.get(name)
            if key is None:
                problem = keys.blocked.get(name)
                if problem is not None:
                    blocked[name] = problem
            elif key in present:
                up_to_date.add(name)
            else:
                missing.add(name)
    needs = {
        name: [dep for dep in keys.build_root(graph, name) if dep in missing and dep != name]
        for name in missing
    }
    builds = tuple(
        PlannedBuild(name=name, key=keys.keys[name], needs=tuple(needs[name]))
        for name in _order(needs)
    )
    return BuildPlan(builds=builds, blocked=blocked, up_to_date=frozenset(up_to_date))


def _order(needs: Mapping[str, list[str]]) -> list[str]:
    """Kahn's algorithm over ``needs``; ties broken by name so every run agrees."""
    waiting = {name: len(required) for name, required in needs.items()}
    unlocks: dict[str, list[str]] = {}
    for name, required in needs.items():
        for dep in required:
            unlocks.setdefault(dep, []).append(name)
    ready = [name for name, count in waiting.items() if count == 0]
    heapq.heapify(ready)
    ordered: list[str] = []
    while ready:
        name = heapq.heappop(ready)
        ordered.append(name)
        for dependent in unlocks.get(name, ()):
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                heapq.heappush(ready, dependent)
    return ordered


def critical_path(
    plan: BuildPlan, durations: Mapping[str, float], default: float = 60.0
) -> dict[str, float]:
    """Each planned build's priority: its own expected duration plus the longest chain of
    expected durations of the planned builds waiting on it. Running the highest first
    shortens the whole run (the critical path starts early); ``default`` stands in for a
    port never built before.
    """
    waiting_on: dict[str, list[str]] = {build.name: [] for build in plan.builds}
    for build in plan.builds:
        for need in build.needs:
            waiting_on[need].append(build.name)
    priority: dict[str, float] = {}
    for build in reversed(plan.builds):  # dependents come later in a plan, so are done first
        tail = max((priority[d] for d in waiting_on[build.name]), default=0.0)
        priority[build.name] = durations.get(build.name, default) + tail
    return priority
