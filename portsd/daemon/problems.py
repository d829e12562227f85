"""What is wrong with the tree now, as Hydra shows it: the ports whose current build key
failed (newly, or still: the port failed before this key too), those skipped because a
dependency failed, those that cannot be built at all (a recipe or dependency problem),
and the ports recently fixed.

"Now" means the keys of the latest evaluation: a failure of a key the tree no longer has
is history, not a current failure, so a fix never leaves its old failure listed.
"""

from __future__ import annotations

import re
from collections.abc import Container, Mapping
from dataclasses import dataclass

from portsd.daemon.state import BuildRow, BuildState, State

FIXED_LIMIT = 20  # recent fixes listed
HISTORY = 2000  # recent outcomes read to tell new failures from continued ones


@dataclass(frozen=True, slots=True)
class Problem:
    """A port not published at its current key, and why, in one line without its name."""

    port: str
    reason: str
    build: BuildRow | None = None  # the failed or skipped build (its log, its time)
    newly: bool = False  # failed: the port's previous outcome was not a failure


@dataclass(frozen=True, slots=True)
class Problems:
    ports: int  # in the evaluated tree
    published: int  # of them, at their current key
    failed: tuple[Problem, ...] = ()
    skipped: tuple[Problem, ...] = ()
    blocked: tuple[Problem, ...] = ()
    fixed: tuple[BuildRow, ...] = ()  # newest first: a build that ended a port's failures

    @property
    def failing(self) -> bool:
        return bool(self.failed or self.skipped or self.blocked)


_HOST_LOG = re.compile(r";? log: /\S*")


def one_line(port: str, text: str | None) -> str:
    """The first line of a reason, without the port's name in front (the reader sees the
    name beside it already: never ``nodep: nodep: ...``) and without a log path of the
    build host (older rows carried one; every build's log has its URL)."""
    line = _HOST_LOG.sub("", (text or "").strip().split("\n", 1)[0]).strip()
    prefix = f"{port}: "
    while line.startswith(prefix):
        line = line[len(prefix) :]
    return line


def find_problems(
    state: State,
    keys: Mapping[str, str],
    blocked: Mapping[str, str],
    present: Container[str],
    waiting: Mapping[str, str] | None = None,
) -> Problems:
    """``keys``: port -> current build key; ``blocked``: port -> why it cannot be built;
    ``present``: the keys the repository has; ``waiting``: port -> why it is not built,
    for ports without a key yet (early cutoff) whose dependency failed or was skipped."""
    waiting = waiting or {}
    latest = state.latest_by_key()
    outcomes: dict[str, list[BuildRow]] = {}
    for outcome in state.recent_outcomes(HISTORY):
        outcomes.setdefault(outcome.port, []).append(outcome)
    failed: list[Problem] = []
    skipped: list[Problem] = []
    for port in sorted(keys):
        key = keys[port]
        if port in blocked or key in present:
            continue
        row = latest.get(key)
        if row is None:
            continue
        if row.state is BuildState.FAILED:
            earlier = next((o for o in outcomes.get(port, ()) if o.key != key), None)
            newly = earlier is None or earlier.state is not BuildState.FAILED
            failed.append(Problem(port, one_line(port, row.detail), row, newly))
        elif row.state is BuildState.SKIPPED:
            skipped.append(Problem(port, one_line(port, row.detail), row))
    skipped.extend(Problem(port, reason) for port, reason in waiting.items())
    skipped.sort(key=lambda problem: problem.port)
    fixed = [
        history[0]
        for port, history in outcomes.items()
        if len(history) > 1
        and history[0].state is BuildState.BUILT
        and history[0].key == keys.get(port)
        and history[1].state is BuildState.FAILED
    ]
    fixed.sort(key=lambda row: row.id, reverse=True)
    return Problems(
        ports=len(keys.keys() | blocked.keys() | waiting.keys()),
        published=sum(1 for key in keys.values() if key in present),
        failed=tuple(failed),
        skipped=tuple(skipped),
        blocked=tuple(Problem(p, one_line(p, blocked[p])) for p in sorted(blocked)),
        fixed=tuple(fixed[:FIXED_LIMIT]),
    )
