"""Runs a plan: up to ``jobs`` builds at once, dependencies first, critical path first.

The executor knows nothing about how a port is built: it calls ``run`` for each planned
build on a worker thread (builds are subprocesses, so threads suffice). A build that
raises fails; every build that needs it, directly or not, is skipped with the name of
the failed dependency, and everything unrelated carries on.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from portsd.errors import PortsdError
from portsd.plan import Plan, PlannedBuild


class Outcome(StrEnum):
    BUILT = "built"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Result:
    """How one planned build ended; ``reason`` explains anything but success."""

    name: str
    key: str
    outcome: Outcome
    reason: str | None = None
    duration: float = 0.0


class Reporter(Protocol):
    """Hears about progress; the CLI draws bars from it, the daemon records it."""

    def started(self, build: PlannedBuild) -> None: ...

    def finished(self, result: Result) -> None: ...


class SilentReporter:
    def started(self, build: PlannedBuild) -> None:
        pass

    def finished(self, result: Result) -> None:
        pass


Runner = Callable[[PlannedBuild, threading.Event], None]
"""Builds one port; raises on failure; should stop soon after the event is set."""


def execute(
    plan: Plan,
    run: Runner,
    *,
    jobs: int,
    priority: Mapping[str, float] | None = None,
    reporter: Reporter | None = None,
    cancel: threading.Event | None = None,
) -> list[Result]:
    """Run every build of ``plan``; returns one result per planned build, in finishing order.

    Setting ``cancel`` (from any thread) stops starting new builds, asks running ones to
    stop, and reports everything not finished as cancelled.
    """
    reporter = reporter or SilentReporter()
    cancel = cancel or threading.Event()
    priority = priority or {}
    builds = {build.name: build for build in plan.builds}
    waiting_on = {build.name: set(build.needs) for build in plan.builds}
    dependents: dict[str, list[str]] = {name: [] for name in builds}
    for build in plan.builds:
        for need in build.needs:
            dependents[need].append(build.name)
    results: list[Result] = []
    done: set[str] = set()

    def finish(result: Result) -> None:
        results.append(result)
        done.add(result.name)
        reporter.finished(result)

    def skip_dependents(name: str, reason: str) -> None:
        stack = list(dependents[name])
        while stack:
            dependent = stack.pop()
            if dependent not in done:
                finish(Result(dependent, builds[dependent].key, Outcome.SKIPPED, reason))
                stack.extend(dependents[dependent])

    running: dict[Future[None], tuple[PlannedBuild, float]] = {}
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="build") as pool:
        try:
            while len(done) < len(builds):
                if not cancel.is_set():
                    ready = [
                        name
                        for name, needs in waiting_on.items()
                        if not needs
                        and name not in done
                        and all(b.name != name for b, _ in running.values())
                    ]
                    ready.sort(key=lambda n: (-priority.get(n, 0.0), n))
                    for name in ready[: jobs - len(running)]:
                        reporter.started(builds[name])
                        running[pool.submit(run, builds[name], cancel)] = (
                            builds[name],
                            time.monotonic(),
                        )
                if not running:
                    break
                finished, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                for future in finished:
                    build, started = running.pop(future)
                    duration = time.monotonic() - started
                    error = future.exception()
                    if error is None:
                        finish(Result(build.name, build.key, Outcome.BUILT, None, duration))
                        for dependent in dependents[build.name]:
                            waiting_on[dependent].discard(build.name)
                    elif cancel.is_set():
                        finish(
                            Result(build.name, build.key, Outcome.CANCELLED, "cancelled", duration)
                        )
                    else:
                        finish(
                            Result(build.name, build.key, Outcome.FAILED, describe(error), duration)
                        )
                        skip_dependents(build.name, f"dependency {build.name} failed")
        except BaseException:
            cancel.set()  # Ctrl-C or a bug: stop the builds still running, then re-raise
            raise
        finally:
            for future, (build, started) in running.items():
                future.exception()  # wait for the worker to notice the cancel
                finish(
                    Result(
                        build.name,
                        build.key,
                        Outcome.CANCELLED,
                        "cancelled",
                        time.monotonic() - started,
                    )
                )
    for name in _unfinished(builds, done):
        finish(Result(name, builds[name].key, Outcome.CANCELLED, "cancelled"))
    return results


def _unfinished(builds: Mapping[str, PlannedBuild], done: Iterable[str]) -> list[str]:
    finished = set(done)
    return [name for name in builds if name not in finished]


def describe(error: BaseException) -> str:
    """One readable line (plus detail lines) for a failed build."""
    if isinstance(error, PortsdError):
        return str(error)
    return f"internal error: {type(error).__name__}: {error}"
