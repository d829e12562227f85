"""What to build, in what order: the ports whose build keys the repository lacks.

A plan covers the wanted ports and, transitively, whatever they need to build. A port is
planned exactly when it has a key and that key is not yet in the repository; a port
waiting for a dependency's package to know its key is **pending** (it is built after
that dependency only if the dependency's content changed: a plan is "at most these"); a
port that cannot be built is reported as blocked with the reason.

A failed build skips the planned builds that need it, directly or not, and nothing else
(``skips``): the one rule for a failure seen during a run and for one remembered from an
earlier run. ``triage`` sorts a whole evaluation for the build host: what to build now,
what a remembered failure dooms, what cannot be built and why.
"""

from __future__ import annotations

import heapq
from collections.abc import Collection, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

from portsd.core.evaluate import Evaluation
from portsd.core.graph import Graph, PortProblem
from portsd.core.keys import KeySet
from portsd.errors import BrokenDependency


@dataclass(frozen=True, slots=True)
class PlannedBuild:
    """One build: the port, its key and the planned builds that must finish first."""

    name: str
    key: str
    needs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BuildPlan:
    """Builds in dependency order, the ports that may need a build once those are done
    (``pending``: port -> the planned build it waits for), and those that cannot be built."""

    builds: tuple[PlannedBuild, ...]
    blocked: Mapping[str, PortProblem] = field(default_factory=dict)
    up_to_date: frozenset[str] = frozenset()
    pending: Mapping[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.builds)

    def names(self) -> list[str]:
        return [build.name for build in self.builds]


@dataclass(frozen=True, slots=True)
class Skip:
    """A planned build that cannot run: a build it needs, directly or not, failed."""

    build: PlannedBuild
    failed: str  # the failed port it waits for (the first by name when there are several)

    @property
    def reason(self) -> str:
        return f"dependency {self.failed} failed"


def skips(plan: BuildPlan, failed: Collection[str]) -> tuple[Skip, ...]:
    """The builds of ``plan`` that need a ``failed`` build (port names), directly or
    through other skipped builds, in plan order; the failed builds themselves are not."""
    culprit: dict[str, str] = {}  # skipped build -> the failed port it waits for
    found = []
    for build in plan.builds:  # dependencies come first in a plan
        if build.name in failed:
            continue
        causes = [
            culprit.get(need, need) for need in build.needs if need in failed or need in culprit
        ]
        if causes:
            culprit[build.name] = min(causes)
            found.append(Skip(build, culprit[build.name]))
    return tuple(found)


def make_plan(
    graph: Graph, keys: KeySet, present: Container[str], wanted: Iterable[str] | None = None
) -> BuildPlan:
    """BuildPlan the builds ``wanted`` (default: every port for this architecture) needs.

    ``present`` holds the keys the repository already has.
    """
    missing: set[str]
    blocked: dict[str, PortProblem]
    up_to_date: set[str]
    pending: Mapping[str, str]
    if wanted is None:
        # The whole tree: ``keys`` already covers it (edges only lead to supported ports),
        # and set operations beat walking 30,000 names on every push.
        missing = {name for name, key in keys.keys.items() if key not in present}
        up_to_date = keys.keys.keys() - missing
        blocked = dict(keys.blocked)
        pending = keys.pending  # a KeySet does not change: no copy, and nothing worked out
    else:
        missing, blocked, up_to_date, waiting = set(), {}, set(), []
        closure = graph.dependency_closure((n for n in wanted if graph.supported(n)), keys.on_seed)
        for name in closure:
            key = keys.keys.get(name)
            if key is None:
                problem = keys.blocked.get(name)
                if problem is not None:
                    blocked[name] = problem
                elif name in keys.pending:
                    waiting.append(name)
            elif key in present:
                up_to_date.add(name)
            else:
                missing.add(name)
        pending = {name: keys.pending[name] for name in waiting}
    needs = {
        name: [dep for dep in keys.build_root(graph, name) if dep in missing and dep != name]
        for name in missing
    }
    builds = tuple(
        PlannedBuild(name=name, key=keys.keys[name], needs=tuple(needs[name]))
        for name in _order(needs)
    )
    return BuildPlan(
        builds=builds, blocked=blocked, up_to_date=frozenset(up_to_date), pending=pending
    )


def staged_plan(
    evaluation: Evaluation, present: Container[str], wanted: Iterable[str] | None
) -> BuildPlan:
    """``make_plan`` of the evaluation's current stage: until the tree's toolchain reaches
    its fixed point, only the toolchain is planned, and every other port (of ``wanted``)
    waits for it, pending on one of its unbuilt ports. On the fixed point, the whole tree
    (``wanted`` None) leaves out what only stage 1 needed (``Graph.bootstrap_only``)."""
    stages = evaluation.stages
    graph = evaluation.graph
    plan = make_plan(graph, evaluation.keys, present, stages.scope(wanted))
    if stages.converged:
        unused = stage_one_only(evaluation) if wanted is None else ()
        return _without(plan, unused) if unused else plan
    building = [b.name for b in plan.builds] or sorted(plan.pending.values())
    on_seed = evaluation.keys.on_seed
    names = graph.dependency_closure(wanted, on_seed) if wanted is not None else graph.names()
    # what the toolchain's own builds need (gcc's gmp, stage 1's cross compiler) is planned
    # with it, not waiting for it
    needed = graph.dependency_closure(stages.members, on_seed)
    others = [
        name
        for name in names
        if name not in needed and graph.supported(name) and graph.problem(name) is None
    ]
    if not building:  # the toolchain is stuck: a port of it cannot be built
        stuck = min(plan.blocked, default="")
        blocked = {
            name: evaluation.keys.blocked.get(name)
            or BrokenDependency(name, stuck, "the tree's toolchain cannot be built")
            for name in others
        }
        return replace(plan, blocked={**blocked, **plan.blocked})
    waiting = dict.fromkeys(others, building[0])
    return BuildPlan(plan.builds, plan.blocked, plan.up_to_date, {**waiting, **plan.pending})


def stage_one_only(evaluation: Evaluation) -> frozenset[str]:
    """The ports the whole tree's plan leaves out on the toolchain's fixed point: only
    stage 1's builds needed them (``Graph.bootstrap_only``), and no later build can."""
    stages = evaluation.stages
    if not (stages.converged and stages.members):
        return frozenset()
    return evaluation.graph.bootstrap_only(stages.members)


def _without(plan: BuildPlan, names: Collection[str]) -> BuildPlan:
    """``plan`` less the ports ``names``, which none of its other builds needs."""
    waiting = [name for name in names if name in plan.pending]
    return BuildPlan(
        builds=tuple(b for b in plan.builds if b.name not in names),
        blocked={n: p for n, p in plan.blocked.items() if n not in names},
        up_to_date=plan.up_to_date - frozenset(names),
        # a view, not a copy: a KeySet works out what a pending port waits for when asked
        pending=_Without(plan.pending, waiting) if waiting else plan.pending,
    )


@dataclass(frozen=True, slots=True)
class Triage:
    """An evaluation sorted for the build host."""

    plan: BuildPlan  # every build the repository lacks, in dependency order
    wanted: BuildPlan  # what to build now: ``plan`` less remembered failures and their dependents
    doomed: tuple[Skip, ...]  # the builds that need a remembered failure
    blocked: Mapping[str, str]  # port -> why it is not built now, in one line
    stranded: Mapping[str, str] = field(default_factory=dict)
    """pending port -> the build it waits for, a remembered failure or doomed by one"""


def triage(evaluation: Evaluation, present: Container[str], failed: Mapping[str, str]) -> Triage:
    """Sort the ports of ``evaluation``: ``present`` holds the keys the repository has,
    ``failed`` the remembered failures (build key -> what went wrong). A failed key is not
    built again (it is blocked, its dependents doomed) until it changes or is forgotten."""
    plan = staged_plan(evaluation, present, None)
    failures = {b.name: failed[b.key] for b in plan.builds if b.key in failed}
    doomed = skips(plan, failures)
    dropped = failures.keys() | {skip.build.name for skip in doomed}
    stranded = _waiting_for(evaluation, plan.pending, dropped)
    wanted = BuildPlan(
        builds=tuple(b for b in plan.builds if b.name not in dropped),
        blocked=plan.blocked,
        up_to_date=plan.up_to_date,
        pending=_Without(plan.pending, stranded.keys()) if stranded else plan.pending,
    )
    blocked = {name: _first_line(str(problem)) for name, problem in plan.blocked.items()}
    for name, dep in stranded.items():
        blocked[name] = f"waits for the package of {dep}, which cannot be built now"
    for name, detail in failures.items():
        blocked[name] = (
            "failed before, not retried until it changes or `portsd rebuild` asks: "
            + _first_line(detail)
        )
    return Triage(plan=plan, wanted=wanted, doomed=doomed, blocked=blocked, stranded=stranded)


def _waiting_for(
    evaluation: Evaluation, pending: Mapping[str, str], builds: Collection[str]
) -> dict[str, str]:
    """The ``pending`` ports that wait for one of ``builds``, and which. Only the ports
    above those builds can, so only theirs are worked out (see ``keys.Pending``); while
    the toolchain builds, every port waits for it, whatever its dependencies."""
    if not builds:
        return {}
    if not evaluation.stages.converged:
        return {name: dep for name, dep in pending.items() if dep in builds}
    above = evaluation.graph.reverse_closure(builds)
    return {name: pending[name] for name in above if name in pending and pending[name] in builds}


class _Without(Mapping[str, str]):
    """A mapping less some of its keys, without copying the rest."""

    __slots__ = ("_mapping", "_without")

    def __init__(self, mapping: Mapping[str, str], without: Collection[str]) -> None:
        self._mapping = mapping
        self._without = without

    def __getitem__(self, name: str) -> str:
        if name in self._without:
            raise KeyError(name)
        return self._mapping[name]

    def __iter__(self) -> Iterator[str]:
        return (name for name in self._mapping if name not in self._without)

    def __len__(self) -> int:
        return len(self._mapping) - len(self._without)  # ``without`` is among its keys


def _first_line(text: str) -> str:
    return text.split("\n", 1)[0]


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
