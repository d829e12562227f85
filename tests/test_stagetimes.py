"""A bootstrap's builds per toolchain stage: ports, times, wall time against their sum.
(The same summary of a real daemon's builds: tests/test_daemon.py, the toolchain test.)"""

from __future__ import annotations

import pytest

from portsd.daemon.stagetimes import (
    TimedBuild,
    compare_stages,
    fixed_point,
    identical,
    latest_content,
    stage_of,
    step_seconds,
    summarise,
)

ON = {
    1: "stage 1 of gcc, musl (built on the seed)",
    2: "stage 2 of gcc, musl (built on stage 1's packages, no seed)",
    3: "stage 3 of gcc, musl (built on stage 2's packages, no seed)",
}


def b(port: str, stage: int, started: float, finished: float, state: str = "built") -> TimedBuild:
    return TimedBuild(port, state, ON[stage], started, finished)


def test_the_stages_of_a_line() -> None:
    assert stage_of(ON[2]) == 2 and stage_of("the seed 1a2b3c4d5e6f") is None
    assert fixed_point(ON[3] + " (its fixed point)") == 3
    assert fixed_point(ON[3] + " (not at its fixed point yet)") is None
    assert fixed_point("the seed 1a2b3c4d5e6f") is None


def test_stages_in_order_with_wall_time_against_the_sum_of_build_times() -> None:
    builds = [
        b("musl", 1, 100, 110),
        b("gmp", 1, 110, 130),
        b("gcc", 1, 130, 230),  # stage 1: wall 130, work 130
        b("musl", 2, 240, 250),
        b("gmp", 2, 250, 260, "failed"),
        b("gmp", 2, 262, 282),
        b("gcc", 2, 282, 382),  # stage 2: wall 142, work 140
        b("musl", 3, 400, 410),
        b("gmp", 3, 410, 430),
        b("gcc", 3, 430, 530),
        b("zlib", 3, 540, 545),  # built on the fixed point, never by stage 2: final
        b("vim", 3, 540, 600),
    ]
    summary = summarise(reversed(builds), 3)  # the API lists newest first
    assert [s.name for s in summary] == ["stage 1 (on the seed)", "stage 2", "stage 3", "final"]
    one, two, three, final = summary
    assert one.built == ("musl", "gmp", "gcc") and (one.wall, one.work) == (130, 130)
    assert one.overhead == 0
    assert two.built == ("musl", "gmp", "gcc") and len(two.builds) == 4  # the failure counts
    assert (two.wall, two.work) == (142, 140) and two.overhead == pytest.approx(100 * 2 / 140)
    assert three.built == ("musl", "gmp", "gcc")
    assert final.built == ("vim", "zlib") and (final.wall, final.work) == (60, 65)
    assert final.overhead == pytest.approx(-100 * 5 / 65)  # two builds at once
    shown = final.as_json()
    assert shown["built"] == ["vim", "zlib"] and shown["overhead"] == -7.7
    assert shown["builds"] == [
        {"port": "vim", "state": "built", "seconds": 60.0, "steps": None},
        {"port": "zlib", "state": "built", "seconds": 5.0, "steps": None},
    ]

    # before the fixed point, the last stage is the toolchain's alone
    assert [s.name for s in summarise(builds[:8], None)][-1] == "stage 3"
    # a resumed run times only its own builds, but still knows stage 2's ports
    later = summarise(builds, 3, since=500)
    assert [s.name for s in later] == ["final"] and later[0].built == ("vim", "zlib")


def test_builds_without_a_stage_or_an_end() -> None:
    builds = [
        TimedBuild("hello", "built", "the seed 1a2b3c4d5e6f", 10, 12),
        TimedBuild("old", "built", "", 1, 2),  # before the daemon recorded stages
        TimedBuild("busy", "running", ON[1], 20, None),
        TimedBuild("waiting", "queued", ON[1], None, None),
    ]
    summary = summarise(builds, None)
    assert [(s.name, s.built) for s in summary] == [
        ("the seed", ("hello",)),
        ("unrecorded", ("old",)),
    ]
    assert summarise([], 3) == []
    data = {"port": "musl", "state": "built", "toolchain": ON[1], "started": 1, "finished": 3.5}
    assert TimedBuild.of(data) == TimedBuild("musl", "built", ON[1], 1.0, 3.5)
    assert TimedBuild.of({"port": "x", "state": "queued", "started": None}).seconds is None


def test_stage_2_against_stage_3_by_content_id() -> None:
    newest_first = [
        ("gcc", ON[3], "c3"),
        ("musl", ON[3], "m"),
        ("gcc", ON[2], "c2"),
        ("musl", ON[2], "m"),
        ("musl", ON[2], "old"),  # an earlier build of stage 2: the newest counts
        ("make", ON[2], "k"),  # not rebuilt in stage 3: not compared
        ("musl", ON[1], "m1"),
    ]
    two, three = latest_content(newest_first, 2), latest_content(newest_first, 3)
    assert two == {"gcc": "c2", "musl": "m", "make": "k"}
    assert identical(two, three) == (["musl"], ["gcc"])
    assert compare_stages(newest_first) == [
        {"stages": [1, 2], "identical": [], "differ": ["musl"]},
        {"stages": [2, 3], "identical": ["musl"], "differ": ["gcc"]},
    ]
    assert compare_stages(newest_first[:1]) == []  # one stage: nothing to compare


def test_the_time_outside_a_builds_steps() -> None:
    """The builder's step lines are summed (a failed step or a command is not); the share of
    the builds' time outside them is per stage, over the builds whose steps are known."""
    log = [
        "==> prepare (in /build/src)",
        "$ tar -xf /build/sources/zlib.tar.gz",
        "==> prepare: ok in 1.50 s",
        "==> build: ok in 6 s",
        "echo '==> check: ok in 99 s'",
        "==> check: failed (exit 1) after 2.00 s",
        "==> package: ok in 0.50 s\n",
    ]
    assert step_seconds(log) == 8.0
    assert step_seconds(["==> prepare (in /build/src)"]) is None
    builds = [
        TimedBuild("zlib", "built", ON[1], 0, 10, 8.0),
        TimedBuild("gmp", "built", ON[1], 0, 30, 29.0),
        TimedBuild("mpc", "built", ON[1], 0, 40),  # no log: not counted
        TimedBuild("mpfr", "failed", ON[1], 0, 5, 1.0),  # failed: not counted
    ]
    [stage] = summarise(builds, None)
    assert stage.outside_steps == pytest.approx(100 * 3 / 40)
    assert stage.as_json()["outside_steps"] == 7.5
    listed = stage.as_json()["builds"]
    assert isinstance(listed, list)
    assert [b["steps"] for b in listed] == [29.0, None, 1.0, 8.0]  # gmp, mpc, mpfr, zlib
    assert summarise([TimedBuild("mpc", "built", ON[1], 0, 40)], None)[0].outside_steps is None
