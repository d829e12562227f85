"""`ports why`: root causes, the edges they travel, and the verdicts."""

from __future__ import annotations

from portsd.core.explain import Evaluated, Touch, explain
from portsd.core.graph import Graph
from portsd.core.keys import KeySet
from portsd.core.recipe import Recipe
from portsd.errors import FileProblem, RecipeError
from tests.test_graph import port
from tests.test_keys import Build, build_all, distinct, same_output


def evaluated(
    revision: str,
    ports: dict[str, Recipe | RecipeError],
    tree_ids: dict[str, str],
    build: Build = distinct,
) -> Evaluated:
    """The revision with everything built (``build`` says what each build comes out as)."""
    graph = Graph.build(ports, "x86_64")
    return Evaluated(revision, graph, build_all(graph, tree_ids, {}, build), tree_ids)


PORTS: dict[str, Recipe | RecipeError] = {
    "base": port("base"),
    "mid": port("mid", depends=("base",)),
    "tool": port("tool", build=("mid",)),
    "other": port("other"),
}
IDS = {name: f"t-{name}" for name in PORTS}
TOUCH = Touch("c0ffee1234567890", "base: bump to 2.0", ("port.toml", "fix.patch"))


def test_a_change_deep_down_is_traced_through_every_edge() -> None:
    old = evaluated("a" * 40, PORTS, IDS)
    new = evaluated("b" * 40, PORTS, IDS | {"base": "t-base-2"})
    explanation = explain("tool", old, new, {"base": [TOUCH]}, present=set())
    assert explanation.lines() == [
        f"tool must be rebuilt: key {old.keys.keys['tool'][:12]} -> {new.keys.keys['tool'][:12]}",
        f"  ports/base changed since {'a' * 10}",
        "    c0ffee1234 base: bump to 2.0 (port.toml, fix.patch)",
        "    reaches tool through base -(depends)-> mid -(build-depends)-> tool",
    ]


def test_verdicts() -> None:
    old = evaluated("a" * 40, PORTS, IDS)
    new = evaluated("b" * 40, PORTS | {"fresh": port("fresh")}, IDS | {"fresh": "t-fresh"})
    key = new.keys.keys["other"]
    assert explain("other", old, new, {}, present={key}).lines() == [
        f"other is up to date: key {key[:12]} is in the repository"
    ]
    assert (
        explain("other", old, new, {}, present=set())
        .lines()[0]
        .startswith("other must be built: its inputs did not change")
    )
    assert (
        explain("fresh", old, new, {}, present=set())
        .lines()[0]
        .startswith("fresh must be built: it is new")
    )


def test_resolution_changes_are_causes_too() -> None:
    ports = PORTS | {
        "user": port("user", depends=("sh",)),
        "dash": port("dash", provides=("sh=1",)),
    }
    ids = IDS | {"user": "t-user", "dash": "t-dash"}
    old = evaluated("a" * 40, ports, ids)
    moved = evaluated(
        "b" * 40, ports | {"ash": port("ash", provides=("sh=1",))}, ids | {"ash": "t-ash"}
    )
    assert explain("user", old, moved, {}, present=set()).lines()[1:] == [
        "  user: 'sh' now resolves to ash (was dash)",
        f"  ash was added in {'b' * 10}",
        "    reaches user through ash -(depends)-> user",
    ]


def test_blocked_port_says_why() -> None:
    broken = RecipeError(
        "base", [FileProblem("ports/base/port.toml", "missing required field 'license'")]
    )
    new = evaluated("b" * 40, PORTS | {"base": broken}, IDS)
    assert explain("tool", None, new, {}, present=set()).lines() == [
        "tool cannot be built: tool: dependency base cannot be built: "
        "ports/base/port.toml: missing required field 'license'"
    ]


def test_a_rebuild_that_came_out_identical_is_where_the_cascade_stopped() -> None:
    old = evaluated("a" * 40, PORTS, IDS, same_output)
    new = evaluated("b" * 40, PORTS, IDS | {"base": "t-base-comment"}, same_output)
    key = new.keys.keys["tool"]
    assert key == old.keys.keys["tool"]
    assert explain("tool", old, new, {}, present={key}).lines() == [
        f"tool is up to date: key {key[:12]} is in the repository",
        "  cut off: base rebuilt identical",
    ]


def test_a_pending_port_names_the_build_it_waits_for() -> None:
    graph = Graph.build(PORTS, "x86_64")
    new = Evaluated("b" * 40, graph, KeySet.compute(graph, IDS, "0" * 64, {}), IDS)
    assert explain("tool", None, new, {}, present=set()).lines() == [
        "tool is pending: its key needs the package of base, "
        "and it is rebuilt only if that comes out different"
    ]
