"""transfer.run_all: many calls at once, bounded, with a deadline, fail-fast and a stop
event set from another thread. (The transfers themselves are tested through their two
users, tests/test_fetch.py and tests/test_download.py, against a real server.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import pytest

from portsd.transfer import Overdue, Stopped, run_all


def after(seconds: float, value: str, fail: bool = False) -> Callable[[], Awaitable[str]]:
    async def call() -> str:
        await asyncio.sleep(seconds)
        if fail:
            raise ValueError(value)
        return value

    return call


def test_outcomes_come_in_order_and_jobs_bound_the_concurrency() -> None:
    running, most = 0, 0

    def tracked(value: str) -> Callable[[], Awaitable[str]]:
        async def call() -> str:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await asyncio.sleep(0.02)
            running -= 1
            return value

        return call

    outcomes = asyncio.run(run_all([tracked(str(n)) for n in range(6)], jobs=2))
    assert outcomes == ["0", "1", "2", "3", "4", "5"] and most == 2


def test_every_call_runs_to_its_end_unless_fail_fast() -> None:
    calls = [after(0.01, "bad", fail=True), after(0.1, "slow")]
    first, second = asyncio.run(run_all(calls))
    assert isinstance(first, ValueError) and second == "slow"
    first, second = asyncio.run(run_all(calls, fail_fast=True))
    assert isinstance(first, ValueError) and isinstance(second, asyncio.CancelledError)


def test_the_deadline_cuts_short_what_is_unfinished() -> None:
    done, late = asyncio.run(run_all([after(0, "done"), after(30, "late")], deadline=0.1))
    assert done == "done" and isinstance(late, Overdue)


def test_a_stop_event_set_from_another_thread_stops_every_call() -> None:
    stop = threading.Event()
    threading.Timer(0.1, stop.set).start()
    began = time.monotonic()
    done, stopped = asyncio.run(run_all([after(0, "done"), after(30, "late")], stop=stop))
    assert time.monotonic() - began < 2
    assert done == "done" and isinstance(stopped, Stopped)


def test_jobs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="jobs must be at least 1"):
        asyncio.run(run_all([], jobs=0))
