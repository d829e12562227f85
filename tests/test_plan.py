"""The planner's rules, as tables of small cases: pure and fast."""

from __future__ import annotations

import pytest

from portsd.core.evaluate import Evaluation
from portsd.core.plan import BuildPlan, PlannedBuild, Skip, skips, triage
from portsd.core.recipe import Recipe
from portsd.errors import RecipeError
from tests.test_evaluate import eager_pending, settle
from tests.test_graph import port


def plan_of(needs: dict[str, tuple[str, ...]]) -> BuildPlan:
    """A plan in the given order (dependencies first), each port keyed ``key-<name>``."""
    return BuildPlan(builds=tuple(PlannedBuild(n, f"key-{n}", deps) for n, deps in needs.items()))


DIAMOND = {  # port -> what it needs, dependencies first
    "libc": (),
    "zlib": ("libc",),
    "ssl": ("libc", "zlib"),
    "png": ("zlib",),
    "app": ("ssl", "png"),
    "other": (),
}


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
    found = skips(plan_of(DIAMOND), failed)
    assert {skip.build.name: skip.failed for skip in found} == skipped
    assert [skip.build.name for skip in found] == [n for n in DIAMOND if n in skipped]


def test_a_skip_names_the_failed_dependency() -> None:
    app = PlannedBuild("app", "key-app", ("ssl", "png"))
    assert Skip(app, "zlib").reason == "dependency zlib failed"


def evaluation_of(*recipes: Recipe) -> Evaluation:
    ports: dict[str, Recipe | RecipeError] = {recipe.name: recipe for recipe in recipes}
    evaluation = Evaluation.full(
        {name: f"tree-of-{name}" for name in ports}, ports, "x86_64", "0" * 64, {}
    )
    return settle(evaluation, {})


TREE = evaluation_of(
    port("libc"),
    port("zlib", depends=("libc",)),
    port("ssl", depends=("libc", "zlib")),
    port("png", depends=("zlib",)),
    port("app", depends=("ssl", "png")),
    port("other"),
    port("broken", depends=("nosuch",)),  # blocked: a missing dependency
    port("uses-broken", depends=("broken",)),  # blocked behind it
)
KEYS = TREE.keys.keys
GRAPH_PROBLEMS = {name: str(problem) for name, problem in TREE.keys.blocked.items()}
BUILDABLE = ["libc", "other", "zlib", "png", "ssl", "app"]  # dependencies first, then by name
FAILED_BEFORE = "failed before, not retried until it changes or `portsd rebuild` asks: "


@pytest.mark.parametrize(
    ("present", "failed", "wanted", "doomed", "failures"),
    [
        ((), {}, BUILDABLE, {}, {}),
        (BUILDABLE, {}, [], {}, {}),
        (("libc", "zlib", "ssl", "png"), {}, ["app", "other"], {}, {}),
        (
            (),
            {"zlib": "zlib: build failed (exit 2)"},
            ["libc", "other"],
            {"png": "zlib", "ssl": "zlib", "app": "zlib"},
            {"zlib": "zlib: build failed (exit 2)"},
        ),
        (  # only the first line of a failure's detail
            ("libc", "zlib", "ssl"),
            {"png": "png: check failed (exit 1)\nlog: /logs/png/7.log"},
            ["other"],
            {"app": "png"},
            {"png": "png: check failed (exit 1)"},
        ),
        (  # a remembered failure of a key the repository has changes nothing
            ("zlib",),
            {"zlib": "it failed, then was built"},
            ["libc", "other", "png", "ssl", "app"],
            {},
            {},
        ),
    ],
)
def test_triage_sorts_an_evaluation(
    present: tuple[str, ...],
    failed: dict[str, str],
    wanted: list[str],
    doomed: dict[str, str],
    failures: dict[str, str],
) -> None:
    triaged = triage(TREE, {KEYS[n] for n in present}, {KEYS[n]: d for n, d in failed.items()})
    assert set(triaged.plan.names()) == set(BUILDABLE) - set(present)
    assert triaged.wanted.names() == wanted
    assert {skip.build.name: skip.failed for skip in triaged.doomed} == doomed
    assert all(skip.build.key == KEYS[skip.build.name] for skip in triaged.doomed)
    assert triaged.blocked == GRAPH_PROBLEMS | {
        name: FAILED_BEFORE + detail for name, detail in failures.items()
    }


def test_graph_problems_block_the_ports_they_name() -> None:
    assert GRAPH_PROBLEMS.keys() == {"broken", "uses-broken"}
    assert "nosuch" in GRAPH_PROBLEMS["broken"] and "broken" in GRAPH_PROBLEMS["uses-broken"]


def test_a_failure_of_an_older_key_is_not_this_ones() -> None:
    triaged = triage(TREE, set(), {"key-of-an-older-zlib": "zlib: build failed (exit 2)"})
    assert triaged.wanted.names() == BUILDABLE
    assert triaged.doomed == ()


@pytest.mark.parametrize(
    ("edited", "failed"),
    [
        (("zlib",), ()),
        (("zlib",), ("zlib",)),
        (("zlib",), ("other",)),
        (("zlib", "other"), ("other",)),
        (("libc", "png"), ("libc",)),
    ],
)
def test_ports_waiting_for_a_failed_build_are_blocked(
    edited: tuple[str, ...], failed: tuple[str, ...]
) -> None:
    """After a commit the ports above an edited one wait for its build; those waiting for
    a remembered failure are blocked, the rest still wait: as worked out port by port."""
    listing = {
        name: f"{tree}-edited" if name in edited else tree for name, tree in TREE.listing.items()
    }
    changes = {name: TREE.graph.recipe(name) for name in edited}
    built = {KEYS[name]: content for name, content in TREE.keys.contents.items()}
    evaluation = TREE.advance(listing, changes, built)
    keys = evaluation.keys
    triaged = triage(evaluation, set(KEYS.values()), {keys.keys[n]: "it failed" for n in failed})
    waits = eager_pending(evaluation.graph, keys)
    assert dict(triaged.plan.pending) == waits and waits
    assert triaged.plan.names() == sorted(edited) or edited == ("libc", "png")
    assert dict(triaged.stranded) == {n: d for n, d in waits.items() if d in failed}
    assert dict(triaged.wanted.pending) == {n: d for n, d in waits.items() if d not in failed}
    assert len(triaged.wanted.pending) == len(waits) - len(triaged.stranded)
    for name, dep in triaged.stranded.items():
        assert triaged.blocked[name] == f"waits for the package of {dep}, which cannot be built now"
