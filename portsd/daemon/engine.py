"""The build engine as its presenters see it: the ``Engine`` protocol and the records it
reports (status, running builds, the plan as a graph).

The daemon (``portsd.daemon.service.Daemon``) implements it; the HTTP server
(``portsd.daemon.server``) and the status page consume it. It lives beside the daemon,
not in the server, so the engine never depends on its presentation layer, and the server
can be tested against a real database and repository without a build engine running."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from portsd.config import Config
from portsd.daemon.events import EventBus
from portsd.daemon.problems import Problems
from portsd.daemon.state import BuildRow, BuildState, State
from portsd.pkg.repo import Repository

if TYPE_CHECKING:
    from portsd.cluster.dispatch import Dashboard, WorkerView


@dataclass(frozen=True, slots=True)
class Running:
    """A build in progress and the step it is in."""

    build: BuildRow
    step: str


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    """Builders on a Dask cluster: its scheduler, dashboard, workers, and the keys whose
    builds disagreed (message, the two workers, the differing files)."""

    scheduler: str
    dashboard: Dashboard
    workers: tuple[WorkerView, ...]
    disagreements: tuple[tuple[str, tuple[str, str], tuple[str, ...]], ...] = ()


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """The daemon at a glance."""

    branch: str
    head: str | None  # the branch's current commit
    evaluated: str | None  # the commit of the latest finished evaluation
    evaluation: int | None  # its id
    evaluating: bool  # an evaluation is in progress
    queued: int
    running: tuple[Running, ...]
    eta: float | None  # seconds until the queue is empty, from past build times
    blocked: int = 0  # ports of the evaluated commit that cannot be built
    seed: str = ""  # content id of the bootstrap seed every build stands on
    cluster: ClusterStatus | None = None  # None: builds run on the daemon's machine
    pending: int = 0  # ports whose key waits for a planned build's package
    cut_off: tuple[str, ...] = ()  # ports of this head once pending, found up to date
    toolchain: str = ""  # what the current keys build on: the seed, or a stage of the tree's


@dataclass(frozen=True, slots=True)
class PlanNode:
    port: str
    key: str | None
    state: BuildState | None  # None: up to date (nothing to do)
    reason: str = ""  # why it is planned, or why it cannot be built
    pending: str | None = None  # the planned build whose package its key waits for
    cut_off: bool = False  # was pending, and its dependency's rebuild came out identical


@dataclass(frozen=True, slots=True)
class PlanGraph:
    """The latest evaluation's plan and the ports around it, for drawing."""

    revision: str | None
    nodes: tuple[PlanNode, ...] = ()
    edges: tuple[tuple[str, str, str], ...] = field(default=())  # (port, dependency, kind)


class Engine(Protocol):
    """The build engine as the server sees it; portsd.daemon.service.Daemon is the real one."""

    config: Config
    state: State
    repo: Repository
    events: EventBus

    def trigger(self, source: str) -> None:
        """Look at the tracked branch again soon (``source``: hook, watch, api...)."""

    def rebuild(self, names: Sequence[str]) -> list[str]:
        """Forget remembered failures of ``names`` and re-evaluate; the names accepted."""
        ...

    def status(self) -> EngineStatus: ...

    def plan_graph(self) -> PlanGraph: ...

    def problems(self) -> Problems:
        """The evaluated tree's failing, skipped and blocked ports, and recent fixes."""
        ...
