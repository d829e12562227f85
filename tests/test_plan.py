"""The planner's rules, as tables of small cases: pure and fast."""

from __future__ import annotations

import pytest

from portsd.core.plan import Plan, PlannedBuild, Skip, skips


def plan_of(needs: dict[str, tuple[str, ...]]) -> Plan:
    """A plan in the given order (dependencies first), each port keyed ``key-<name>``."""
    return Plan(builds=tuple(PlannedBuild(n, f"key-{n}", deps) for n, deps in needs.items()))


DIAMOND = plan_of(
    {
        "libc": (),
        "zlib": ("libc",),
        "ssl": ("libc", "zlib"),
        "png": ("zlib",),
        "app": ("ssl", "png"),
        "other": (),
    }
)


@pytest.mark.parametrize(
    ("failed", "skipped"),
    [
        ((), {}),
        (("other",), {}),
        (("app",), {}),  # nothing needs it
        (("nosuch",), {}),  # not in the plan: needed by nothing planned
        (("png",), {"app": "png"}),
        (("zlib",), {"ssl": "zlib", "png": "zlib", "app": "zlib"}),
        (("libc",), {"zlib": "libc", "ssl": "libc", "png": "libc", "app": "libc"}),
        (("ssl", "png"), {"app": "png"}),  # two failed dependencies: the first by name
        (("zlib", "ssl"), {"png": "zlib", "app": "ssl"}),  # a failure is not also skipped
    ],
)
def test_a_failure_skips_exactly_what_needs_it(
    failed: tuple[str, ...], skipped: dict[str, str]
) -> None:
    found = skips(DIAMOND, failed)
    assert {skip.build.name: skip.failed for skip in found} == skipped
    assert [skip.build.name for skip in found] == [n for n in DIAMOND.names() if n in skipped]


def test_a_skip_names_the_failed_dependency() -> None:
    assert Skip(DIAMOND.builds[-2], "zlib").reason == "dependency zlib failed"
