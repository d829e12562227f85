"""What to build, in what order: the ports whose build keys the repository lacks.

A plan covers the wanted ports and, transitively, whatever they need to build. A port is
planned exactly when it has a key and that key is not yet in the repository; a port
without a key is reported as blocked with the reason, and everything else goes ahead.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field

from portsd.graph import Graph, Problem
from portsd.keys import KeySet


@dataclass(frozen=True, slots=True)
class PlannedBuild:
    """One build: the port, its key and the planned builds that must finish first."""

    name: str
    key: str
    needs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """Builds in dependency order, plus the ports that cannot be built and why."""

    builds: tuple[PlannedBuild, ...]
    blocked: Mapping[str, Problem] = field(default_factory=dict)
    up_to_date: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.builds)

    def names(self) -> list[str]:
        return [build.name for build in self.builds]


def make_plan(
    graph: Graph, keys: KeySet, present: Container[str], wanted: Iterable[str] | None = None
) -> Plan:
    """Plan the builds ``wanted`` (default: every port for this architecture) needs.

    ``present`` holds the keys the repository already has.
    """
    roots = [
        name for name in (graph.names() if wanted is None else wanted) if graph.supported(name)
    ]
    scope = graph.dependency_closure(roots)
    missing: set[str] = set()
    blocked: dict[str, Problem] = {}
    up_to_date: set[str] = set()
    for name in scope:
        key = keys.key(name)
        if key is None:
            problem = keys.blocked.get(name)
            if problem is not None:
                blocked[name] = problem
        elif key in present:
            up_to_date.add(name)
        else:
            missing.add(name)
    builds = tuple(
        PlannedBuild(
            name=name,
            key=keys.keys[name],
            needs=tuple(sorted({edge.target for edge in graph.edges(name)} & missing - {name})),
        )
        for name in graph.order(missing)
    )
    return Plan(builds=builds, blocked=blocked, up_to_date=frozenset(up_to_date))
