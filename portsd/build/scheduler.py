"""Runs builds: up to ``jobs`` at once, dependencies first, critical path first.

The scheduler knows builds by build key. ``submit`` replaces the wanted work at any time:
running builds whose keys are still wanted keep running, running builds no longer
wanted are cancelled, and queued ones simply vanish. That is what lets the daemon take a
new commit in the middle of a long rebuild without losing finished or still-useful work.

A build that fails is reported, and every wanted build that needs it (directly or not)
is skipped with the name of the failed dependency (the planner's rule, ``plan.skips``);
everything unrelated carries on.
``run`` is called on a worker thread (builds are subprocesses, so threads suffice) and
must stop soon after its cancel event is set.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import Protocol

from portsd.core.plan import BuildPlan, PlannedBuild, skips
from portsd.errors import PortsdError


class Outcome(StrEnum):
    BUILT = "built"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"


@dataclass(frozen=True, slots=True)
class Result:
    """How one build ended; ``reason`` explains anything but success."""

    build: PlannedBuild
    outcome: Outcome
    reason: str | None = None
    duration: float = 0.0

    @property
    def name(self) -> str:
        return self.build.name


class Reporter(Protocol):
    """Hears about progress, outside the scheduler's lock, from any thread."""

    def started(self, build: PlannedBuild) -> None: ...

    def finished(self, result: Result) -> None: ...


Runner = Callable[[PlannedBuild, threading.Event], None]
"""Builds one port; raises on failure; should stop soon after the event is set."""


@dataclass(slots=True)
class _Running:
    build: PlannedBuild
    cancel: threading.Event
    started: float
    future: Future[None] | None = None


class Scheduler:
    """Builds what was last submitted, with ``jobs`` worker threads."""

    def __init__(self, run: Runner, *, jobs: int, reporter: Reporter) -> None:
        self._run = run
        self._jobs = jobs  # builds at once: at most the pool's threads
        self._threads = jobs
        self._reporter = reporter
        self._pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="build")
        self._lock = threading.Condition()
        self._plan = BuildPlan(builds=())  # the wanted work
        self._queued: dict[str, PlannedBuild] = {}  # by key
        self._needs: dict[str, set[str]] = {}  # key -> keys it waits for
        self._priority: dict[str, float] = {}
        self._running: dict[str, _Running] = {}
        self._built: set[str] = set()
        self._failed: set[str] = set()  # keys of the wanted work that failed
        self._closed = False

    # -- what callers use ----------------------------------------------------------------

    def submit(
        self,
        plan: BuildPlan,
        priority: Mapping[str, float] | None = None,
        *,
        again: Collection[str] = (),
    ) -> None:
        """Make ``plan`` the wanted work (priorities by port name; higher runs first).

        A key built before is not run again (the plan may predate its publish) unless it is
        in ``again``: built, but its package has been lost since.
        """
        keys = {build.name: build.key for build in plan.builds}
        events: list[Callable[[], None]] = []
        with self._lock:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            self._built.difference_update(again)
            self._plan = plan
            wanted = {build.key: build for build in plan.builds}
            for key, running in self._running.items():
                if key not in wanted:
                    running.cancel.set()
            self._queued = {
                key: build
                for key, build in wanted.items()
                if key not in self._running and key not in self._built
            }
            self._needs = {build.key: {keys[name] for name in build.needs} for build in plan.builds}
            self._priority = {
                keys[name]: value for name, value in (priority or {}).items() if name in keys
            }
            self._failed.clear()  # a wanted key that failed is asked for again
            events += self._dispatch()
            self._lock.notify_all()
        for event in events:
            event()

    def limit(self, jobs: int) -> None:
        """Run at most ``jobs`` builds at once from now on (no more than the pool's
        threads): a cluster's build slots, as workers come and go. Running builds beyond
        a lowered limit finish."""
        with self._lock:
            self._jobs = min(max(jobs, 0), self._threads)
            events = [] if self._closed else self._dispatch()
            self._lock.notify_all()
        for event in events:
            event()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queued or self._running:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._lock.wait(remaining)
        return True

    def cancel(self) -> None:
        """Drop everything queued and stop everything running."""
        with self._lock:
            dropped = list(self._queued.values())
            self._queued.clear()
            for running in self._running.values():
                running.cancel.set()
            self._lock.notify_all()
        for build in dropped:
            self._reporter.finished(Result(build, Outcome.CANCELLED, "cancelled"))

    def close(self) -> None:
        """Cancel everything and wait for the workers to stop."""
        self.cancel()
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True)

    def snapshot(self) -> tuple[list[PlannedBuild], list[tuple[PlannedBuild, float]]]:
        """(queued builds, running builds with their start times)."""
        with self._lock:
            return list(self._queued.values()), [
                (r.build, r.started) for r in self._running.values()
            ]

    # -- inside ------------------------------------------------------------------------

    def _skip_dependents(self) -> list[Callable[[], None]]:
        """Drop the queued builds a failure dooms; returns the reports to send unlocked."""
        failed = {build.name for build in self._plan.builds if build.key in self._failed}
        events: list[Callable[[], None]] = []
        for skip in skips(self._plan, failed):
            if self._queued.pop(skip.build.key, None) is not None:
                result = Result(skip.build, Outcome.SKIPPED, skip.reason)
                events.append(partial(self._reporter.finished, result))
        return events

    def _dispatch(self) -> list[Callable[[], None]]:
        """Start ready builds; returns the reports to send unlocked."""
        events: list[Callable[[], None]] = []
        ready = [key for key in self._queued if self._ready(key)]
        ready.sort(key=lambda k: (-self._priority.get(k, 0.0), self._queued[k].name))
        for key in ready[: max(self._jobs - len(self._running), 0)]:
            build = self._queued.pop(key)
            running = _Running(build, threading.Event(), time.monotonic())
            self._running[key] = running
            events.append(partial(self._reporter.started, build))
            running.future = self._pool.submit(self._work, running)
        return events

    def _ready(self, key: str) -> bool:
        return all(
            need in self._built or (need not in self._queued and need not in self._running)
            for need in self._needs.get(key, ())
        )

    def _work(self, running: _Running) -> None:
        build = running.build
        try:
            self._run(build, running.cancel)
        except BaseException as error:  # noqa: BLE001 - a failed build, reported, never raised
            cancelled = running.cancel.is_set()
            outcome = Outcome.CANCELLED if cancelled else Outcome.FAILED
            result = Result(
                build, outcome, "cancelled" if cancelled else describe_error(error), _since(running)
            )
        else:
            result = Result(build, Outcome.BUILT, None, _since(running))
        with self._lock:
            self._running.pop(build.key, None)
            if result.outcome is Outcome.BUILT:
                self._built.add(build.key)
            events = []
            if result.outcome is Outcome.FAILED:
                self._failed.add(build.key)
                events += self._skip_dependents()
            if not self._closed:
                events += self._dispatch()
            self._lock.notify_all()
        self._reporter.finished(result)
        for event in events:
            event()


def _since(running: _Running) -> float:
    return time.monotonic() - running.started


def describe_error(error: BaseException) -> str:
    """One readable line (plus detail lines) for a failed build."""
    if isinstance(error, PortsdError):
        return str(error)
    return f"internal error: {type(error).__name__}: {error}"


class Collector:
    """A reporter that keeps every result, and passes events on to another reporter."""

    def __init__(self, then: Reporter | None = None) -> None:
        self.results: list[Result] = []
        self._then = then
        self._lock = threading.Lock()

    def started(self, build: PlannedBuild) -> None:
        if self._then is not None:
            self._then.started(build)

    def finished(self, result: Result) -> None:
        with self._lock:
            self.results.append(result)
        if self._then is not None:
            self._then.finished(result)


def run_plan(
    plan: BuildPlan,
    run: Runner,
    *,
    jobs: int,
    priority: Mapping[str, float] | None = None,
    reporter: Reporter | None = None,
) -> list[Result]:
    """Run one plan to the end (what ``ports build`` does); Ctrl-C cancels the builds."""
    collector = Collector(reporter)
    scheduler = Scheduler(run, jobs=jobs, reporter=collector)
    try:
        scheduler.submit(plan, priority)
        while not scheduler.wait(timeout=0.5):
            pass  # wake up regularly so a KeyboardInterrupt is seen promptly
    finally:
        scheduler.close()
    return collector.results
