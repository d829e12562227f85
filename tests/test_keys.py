"""Build keys and plans: exactly the right things change, and nothing else."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import msgpack
import pytest

from portsd.core.graph import Graph
from portsd.core.keys import BUILDER_FORMAT, KeySet, build_key
from portsd.core.plan import make_plan
from portsd.core.recipe import Recipe, Source
from portsd.errors import BrokenDependency, DependencyCycle, FileProblem, RecipeError
from tests.test_graph import port

SHA_A = "a" * 64
TOOLCHAIN = "5" * 64  # the seed's content id


def test_build_key_is_the_documented_encoding() -> None:
    expected = hashlib.sha256(
        msgpack.packb(
            [
                "portsd-build-key",
                BUILDER_FORMAT,
                "x86_64",
                "t1",
                [SHA_A],
                TOOLCHAIN,
                [["libc", "k1"], ["zlib", "k2"]],
            ]
        )
    ).hexdigest()
    assert (
        build_key("t1", [SHA_A], "x86_64", TOOLCHAIN, [("zlib", "k2"), ("libc", "k1")]) == expected
    )


def tree() -> dict[str, Recipe | RecipeError]:
    recipes = [
        port("libc"),
        port("zlib", depends=("libc",)),
        port("ssl", depends=("libc", "zlib")),
        port("png", depends=("zlib",), check=("checker",)),
        port("checker", depends=("libc",)),
        port("app", depends=("ssl", "png"), build=("make",)),
        port("make", depends=("libc",)),
        port("doc"),
    ]
    return {recipe.name: recipe for recipe in recipes}


def ids(ports: dict[str, Recipe | RecipeError]) -> dict[str, str]:
    return {name: f"tree-of-{name}" for name in ports}


def keys_of(
    ports: dict[str, Recipe | RecipeError], tree_ids: dict[str, str], arch: str = "x86_64"
) -> KeySet:
    return KeySet.compute(Graph.build(ports, arch), tree_ids, TOOLCHAIN)


def changed(a: KeySet, b: KeySet) -> set[str]:
    return {name for name in a.keys.keys() | b.keys.keys() if a.keys.get(name) != b.keys.get(name)}


def test_keys_are_deterministic() -> None:
    ports = tree()
    first = keys_of(ports, ids(ports))
    second = keys_of(dict(reversed(list(ports.items()))), ids(ports))
    assert first.keys == second.keys and len(first.keys) == len(ports)
    assert keys_of(ports, ids(ports), arch="aarch64").keys["libc"] != first.keys["libc"]


@pytest.mark.parametrize(
    ("edited", "expected"),
    [
        ("doc", {"doc"}),
        ("app", {"app"}),
        ("zlib", {"zlib", "ssl", "png", "app"}),
        ("checker", {"checker", "png", "app"}),  # a check dependency is in png's build root
        ("make", {"make", "app"}),
        ("libc", {"libc", "zlib", "ssl", "png", "checker", "app", "make"}),
    ],
)
def test_a_changed_port_directory_changes_exactly_its_reverse_closure(
    edited: str, expected: set[str]
) -> None:
    ports = tree()
    before = keys_of(ports, ids(ports))
    tree_ids = ids(ports) | {edited: "edited"}
    assert changed(before, keys_of(ports, tree_ids)) == expected


def test_source_hashes_are_inputs() -> None:
    ports = tree()
    base = ports["zlib"]
    assert isinstance(base, Recipe)
    ports["zlib"] = replace(
        base, sources=(Source("z.tgz", url="https://x.org/z.tgz", sha256=SHA_A),)
    )
    before = keys_of(ports, ids(ports))
    ports["zlib"] = replace(
        base, sources=(Source("z.tgz", url="https://x.org/z.tgz", sha256="b" * 64),)
    )
    assert changed(before, keys_of(ports, ids(ports))) == {"zlib", "ssl", "png", "app"}


def test_blocked_ports_name_the_root_cause() -> None:
    ports = tree()
    ports["libc"] = RecipeError("libc", [FileProblem("ports/libc/port.toml", "unknown key 'x'", 4)])
    ports["loop"] = port("loop", depends=("loop",))
    ports["uses-loop"] = port("uses-loop", build=("loop",))
    keys = keys_of(ports, ids(ports))
    assert set(keys.keys) == {"doc"}
    blocked = keys.blocked["app"]
    assert isinstance(blocked, BrokenDependency) and blocked.dependency == "libc"
    assert str(blocked) == (
        "app: dependency libc cannot be built: ports/libc/port.toml:4: unknown key 'x'"
    )
    assert isinstance(keys.blocked["loop"], DependencyCycle)
    assert str(keys.blocked["uses-loop"]) == (
        "uses-loop: dependency loop cannot be built: dependency cycle: loop -> loop"
    )


def test_incremental_keys_equal_a_full_evaluation() -> None:
    rng = random.Random(7)
    ports = tree()
    tree_ids = ids(ports)
    graph = Graph.build(ports, "x86_64")
    keys = KeySet.compute(graph, tree_ids, TOOLCHAIN)
    names = list(ports) + ["extra1", "extra2"]
    for step in range(300):
        name = rng.choice(names)
        roll = rng.random()
        new: Recipe | RecipeError | None
        if roll < 0.15:
            new = None
        elif roll < 0.25:
            new = RecipeError(name, [FileProblem(f"ports/{name}/port.toml", "broken")])
        else:
            deps = tuple(rng.sample([n for n in names if n != name], rng.randint(0, 2)))
            new = port(name, depends=deps)
        graph, affected = graph.updated({name: new})
        if new is None:
            ports.pop(name, None)
            tree_ids.pop(name, None)
        else:
            ports[name] = new
            tree_ids[name] = f"tree-{step}"
        keys = KeySet.compute(graph, tree_ids, TOOLCHAIN, previous=keys, affected=affected)
        full = keys_of(ports, tree_ids)
        assert keys.keys == full.keys
        assert {n: str(p) for n, p in keys.blocked.items()} == {
            n: str(p) for n, p in full.blocked.items()
        }


def test_plan_builds_missing_keys_dependencies_first() -> None:
    ports = tree()
    graph = Graph.build(ports, "x86_64")
    keys = KeySet.compute(graph, ids(ports), TOOLCHAIN)
    plan = make_plan(graph, keys, present=set())
    order = plan.names()
    assert set(order) == set(ports)
    for build in plan.builds:
        assert build.key == keys.keys[build.name]
        for need in build.needs:
            assert order.index(need) < order.index(build.name)
    app = next(b for b in plan.builds if b.name == "app")
    assert app.needs == ("libc", "make", "png", "ssl", "zlib")

    present = {keys.keys[n] for n in ports if n not in {"zlib", "ssl"}}
    partial = make_plan(graph, keys, present)
    assert partial.names() == ["zlib", "ssl"] and partial.builds[1].needs == ("zlib",)
    assert make_plan(graph, keys, set(keys.keys.values())).builds == ()


def test_plan_of_named_ports_covers_what_they_need() -> None:
    ports = tree()
    ports["bad"] = port("bad", depends=("missing",))
    ports["uses-bad"] = port("uses-bad", depends=("bad", "zlib"))
    graph = Graph.build(ports, "x86_64")
    keys = KeySet.compute(graph, ids(ports), TOOLCHAIN)
    plan = make_plan(graph, keys, set(), wanted=["png", "uses-bad"])
    assert plan.names() == ["libc", "checker", "zlib", "png"]
    assert set(plan.blocked) == {"bad", "uses-bad"}
    assert "missing" in str(plan.blocked["uses-bad"])
