"""The scheduler: order, parallelism, failure isolation, priorities, superseding, cancel."""

from __future__ import annotations

import threading
import time

import pytest

from portsd.build.scheduler import Collector, Outcome, Result, Scheduler, run_plan
from portsd.core.plan import BuildPlan, PlannedBuild, critical_path
from portsd.errors import BuildError
from tests.test_plan import DIAMOND, plan_of


class Recorder:
    """A runner that records when each build ran, and fails the ones it is told to."""

    def __init__(self, fail: set[str] = frozenset(), delay: float = 0.01) -> None:  # type: ignore[assignment]
        self.fail = fail
        self.delay = delay
        self.lock = threading.Lock()
        self.started: list[str] = []
        self.finished: list[str] = []
        self.running = 0
        self.most_at_once = 0

    def __call__(self, build: PlannedBuild, cancel: threading.Event) -> None:
        with self.lock:
            for need in build.needs:
                assert need in self.finished, f"{build.name} started before {need} finished"
            self.started.append(build.name)
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            deadline = time.monotonic() + self.delay
            while time.monotonic() < deadline and not cancel.is_set():
                time.sleep(0.002)
            if cancel.is_set():
                raise BuildError(build.name, "build", "cancelled")
            if build.name in self.fail:
                raise BuildError(build.name, "build", "exit 2", f"/logs/{build.name}.log")
        finally:
            with self.lock:
                self.running -= 1
                self.finished.append(build.name)


@pytest.mark.parametrize("jobs", [1, 2, 4])
def test_everything_builds_dependencies_first_within_the_job_limit(jobs: int) -> None:
    runner = Recorder()
    results = run_plan(plan_of(DIAMOND), runner, jobs=jobs)
    assert outcomes(results) == {name: Outcome.BUILT for name in DIAMOND}
    assert runner.most_at_once <= jobs
    if jobs > 1:
        assert runner.most_at_once > 1


def test_a_failure_skips_exactly_its_dependents() -> None:
    runner = Recorder(fail={"zlib"})
    results = run_plan(plan_of(DIAMOND), runner, jobs=2)
    assert outcomes(results) == {
        "libc": Outcome.BUILT,
        "zlib": Outcome.FAILED,
        "ssl": Outcome.SKIPPED,
        "png": Outcome.SKIPPED,
        "app": Outcome.SKIPPED,
        "other": Outcome.BUILT,
    }
    by_name = {result.name: result for result in results}
    assert by_name["zlib"].reason == "zlib: build failed (exit 2); log: /logs/zlib.log"
    assert by_name["ssl"].reason == "dependency zlib failed"
    assert by_name["app"].reason == "dependency zlib failed"
    assert "app" not in runner.started


def test_an_unexpected_exception_is_a_failure_not_a_crash() -> None:
    def runner(build: PlannedBuild, cancel: threading.Event) -> None:
        if build.name == "png":
            raise ValueError("boom")

    results = {r.name: r for r in run_plan(plan_of(DIAMOND), runner, jobs=2)}
    assert results["png"].outcome is Outcome.FAILED
    assert results["png"].reason == "internal error: ValueError: boom"
    assert results["app"].outcome is Outcome.SKIPPED and results["ssl"].outcome is Outcome.BUILT


def test_critical_path_first() -> None:
    plan = plan_of({"short": (), "long1": (), "long2": ("long1",), "long3": ("long2",)})
    priority = critical_path(plan, {"short": 5, "long1": 2, "long2": 2, "long3": 2})
    assert priority == {"long3": 2, "long2": 4, "long1": 6, "short": 5}
    runner = Recorder()
    run_plan(plan, runner, jobs=1, priority=priority)
    assert runner.started == ["long1", "short", "long2", "long3"]


def test_cancel_stops_running_builds_and_reports_the_rest() -> None:
    runner = Recorder(delay=30)
    collector = Collector()
    scheduler = Scheduler(runner, jobs=2, reporter=collector)
    scheduler.submit(plan_of(DIAMOND))
    threading.Timer(0.2, scheduler.cancel).start()
    began = time.monotonic()
    assert scheduler.wait(timeout=10)
    scheduler.close()
    assert time.monotonic() - began < 5
    assert set(outcomes(collector.results).values()) == {Outcome.CANCELLED}
    assert set(outcomes(collector.results)) == set(DIAMOND)


def test_a_new_plan_keeps_still_wanted_builds_and_cancels_the_rest() -> None:
    gate = threading.Event()
    started: list[str] = []

    def runner(build: PlannedBuild, cancel: threading.Event) -> None:
        started.append(build.key)
        while not gate.is_set() and not cancel.is_set():
            time.sleep(0.005)
        if cancel.is_set():
            raise BuildError(build.name, "build", "cancelled")

    collector = Collector()
    scheduler = Scheduler(runner, jobs=2, reporter=collector)
    first = BuildPlan(builds=(PlannedBuild("a", "key-a1", ()), PlannedBuild("b", "key-b1", ())))
    scheduler.submit(first)
    deadline = time.monotonic() + 5
    while len(started) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    # the next commit still wants a (same key) but b changed, and c is new and needs b
    second = BuildPlan(
        builds=(
            PlannedBuild("a", "key-a1", ()),
            PlannedBuild("b", "key-b2", ()),
            PlannedBuild("c", "key-c2", ("b",)),
        )
    )
    scheduler.submit(second)
    gate.set()
    assert scheduler.wait(timeout=10)
    scheduler.close()
    by_key = {r.build.key: r.outcome for r in collector.results}
    assert by_key == {
        "key-a1": Outcome.BUILT,  # kept running across the new submission, built once
        "key-b1": Outcome.CANCELLED,
        "key-b2": Outcome.BUILT,
        "key-c2": Outcome.BUILT,
    }
    assert started.count("key-a1") == 1
    assert started.index("key-b2") < started.index("key-c2")


def outcomes(results: list[Result]) -> dict[str, Outcome]:
    return {result.name: result.outcome for result in results}
