"""The builds of a bootstrap told apart by toolchain stage: per stage the ports built,
each build's time, and the stage's wall time against the sum of its build times.

Pure: build records in, a table out. A build records the stage its key stood on
(``toolchain`` in ``/api/v1/builds``: ``stage 2 of ... (built on stage 1's packages)``, or
``the seed ...`` for a tree without a toolchain). The fixed point's stage builds two
things: the toolchain once more (the ports its stage before built too) and then every
other port of the tree; the second part is reported as ``final``. Two stages are compared
by the content ids of their builds' packages (``identical``): stage 3 against stage 2 is
the fixed point's evidence, port by port. A build's own steps (prepare, build, check,
package: ``step_seconds`` of its log) against its whole time tell what portsd adds to
the real work: setting up the build root, packing, checking and signing the package.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from portsd.build.builder import STEP_DONE

_STAGE = re.compile(r"stage (\d+) of ")
_FIXED_POINT = re.compile(r"^stage (\d+) of .*\(its fixed point\)$")
FINAL = "final"


@dataclass(frozen=True, slots=True)
class TimedBuild:
    """What a summary needs of one build (``BuildRow`` and the API's JSON have it)."""

    port: str
    state: str
    toolchain: str
    started: float | None
    finished: float | None
    steps: float | None = None  # the seconds of its recipe's steps (``step_seconds``)

    @classmethod
    def of(cls, data: Mapping[str, object], steps: float | None = None) -> TimedBuild:
        """From one build of ``/api/v1/builds`` (and ``step_seconds`` of its log)."""
        started, finished = data.get("started"), data.get("finished")
        return cls(
            str(data["port"]),
            str(data["state"]),
            str(data.get("toolchain") or ""),
            float(started) if isinstance(started, (int, float)) else None,
            float(finished) if isinstance(finished, (int, float)) else None,
            steps,
        )

    @property
    def seconds(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started


@dataclass(frozen=True, slots=True)
class StageSummary:
    """One stage: its builds (oldest first), wall time (first start to last end) and the
    sum of its build times."""

    name: str  # "stage 1 (on the seed)", "stage 2", ..., "final", "the seed", "unrecorded"
    builds: tuple[TimedBuild, ...]
    wall: float
    work: float

    @property
    def built(self) -> tuple[str, ...]:
        """The ports this stage built, each once, in build order."""
        return tuple(dict.fromkeys(b.port for b in self.builds if b.state == "built"))

    @property
    def overhead(self) -> float | None:
        """Wall time over the sum of build times, in percent (negative: builds overlapped)."""
        return (self.wall - self.work) / self.work * 100 if self.work > 0 else None

    @property
    def outside_steps(self) -> float | None:
        """Of the time of the builds whose steps are known, the share outside the recipe's
        steps, in percent: build roots, packing, checks, signing, publishing."""
        known = [b for b in self.builds if b.state == "built" and b.seconds and b.steps is not None]
        whole = sum(b.seconds or 0.0 for b in known)
        inside = sum(b.steps or 0.0 for b in known)
        return (whole - inside) / whole * 100 if whole > 0 else None

    def as_json(self) -> dict[str, object]:
        return {
            "stage": self.name,
            "built": list(self.built),
            "wall": round(self.wall, 1),
            "work": round(self.work, 1),
            "overhead": _round(self.overhead),
            "outside_steps": _round(self.outside_steps),
            "builds": [
                {
                    "port": b.port,
                    "state": b.state,
                    "seconds": _round(b.seconds),
                    "steps": _round(b.steps),
                }
                for b in self.builds
            ],
        }


def step_seconds(log: Iterable[str]) -> float | None:
    """The seconds a build's recipe steps took, from its log's lines (the builder ends
    each step with ``==> build: ok in 12.34 s``); None when no step finished."""
    found = [float(m.group(2)) for line in log if (m := STEP_DONE.match(line.rstrip("\n")))]
    return sum(found) if found else None


def fixed_point(status_toolchain: str) -> int | None:
    """The stage number of the fixed point from the status's ``toolchain`` line, if reached."""
    found = _FIXED_POINT.match(status_toolchain)
    return int(found.group(1)) if found else None


def stage_of(toolchain: str) -> int | None:
    """The stage a build's ``toolchain`` names; None for the seed of a tree without one."""
    found = _STAGE.match(toolchain)
    return int(found.group(1)) if found else None


def summarise(
    builds: Iterable[TimedBuild], final: int | None, *, since: float = 0.0
) -> list[StageSummary]:
    """Per stage, in order, the builds that started at ``since`` or later (and finished).
    ``final`` is the fixed point's stage: its builds of ports the stage before did not
    build are the ``final`` stage. Every build (older ones too) says which ports a stage
    built, so a resumed run still tells the toolchain's last rebuild from the rest."""
    every = list(builds)
    ported: dict[int | None, set[str]] = {}
    for build in every:
        ported.setdefault(stage_of(build.toolchain), set()).add(build.port)
    groups: dict[tuple[int, str], list[TimedBuild]] = {}
    for build in every:
        if build.started is None or build.finished is None or build.started < since:
            continue
        number = stage_of(build.toolchain)
        if number is None:
            order, name = (0, "unrecorded") if not build.toolchain else (0, "the seed")
        elif number == final and number > 1 and build.port not in ported.get(number - 1, ()):
            order, name = (number + 1, FINAL)
        else:
            order, name = number, f"stage {number}" + (" (on the seed)" if number == 1 else "")
        groups.setdefault((order, name), []).append(build)
    summaries = []
    for (_, name), members in sorted(groups.items()):
        members.sort(key=lambda b: (b.started or 0.0, b.port))
        start = min(b.started or 0.0 for b in members)
        end = max(b.finished or 0.0 for b in members)
        work = sum(b.seconds or 0.0 for b in members)
        summaries.append(StageSummary(name, tuple(members), end - start, work))
    return summaries


def identical(
    earlier: Mapping[str, str], later: Mapping[str, str]
) -> tuple[list[str], list[str]]:  # fmt: skip
    """Of the ports both stages built (port -> content id): (same content, different)."""
    both = sorted(set(earlier) & set(later))
    return [p for p in both if earlier[p] == later[p]], [p for p in both if earlier[p] != later[p]]


def latest_content(
    builds: Sequence[tuple[str, str, str]], stage: int
) -> dict[str, str]:  # fmt: skip
    """Port -> content id of its newest build on ``stage``, from (port, toolchain, content)
    triples, newest first (the API's order)."""
    found: dict[str, str] = {}
    for port, toolchain, content in builds:
        if stage_of(toolchain) == stage:
            found.setdefault(port, content)
    return found


def compare_stages(builds: Sequence[tuple[str, str, str]]) -> list[dict[str, object]]:
    """Each stage against the one before (2 against 1, 3 against 2...), from (port,
    toolchain, content) triples, newest first: the ports both built with the same content
    and those that differ. The fixed point's evidence, stage by stage."""
    numbers = sorted({n for _, toolchain, _ in builds if (n := stage_of(toolchain))})
    compared: list[dict[str, object]] = []
    for later in numbers[1:]:
        same, differ = identical(latest_content(builds, later - 1), latest_content(builds, later))
        compared.append({"stages": [later - 1, later], "identical": same, "differ": differ})
    return compared


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
