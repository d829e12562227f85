"""Build keys and plans: exactly the right things change, and nothing else; a rebuild
that comes out identical stops the cascade (early cutoff)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portsd.core.graph import Graph
from portsd.core.keys import BUILDER_FORMAT, KeySet, build_key
from portsd.core.plan import make_plan
from portsd.core.recipe import Recipe, Source
from portsd.errors import BrokenDependency, DependencyCycle, FileProblem, RecipeError
from tests.test_evaluate import eager_pending
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
                [["libc", "c1"], ["zlib", "c2"]],
            ]
        )
    ).hexdigest()
    assert (
        build_key("t1", [SHA_A], "x86_64", TOOLCHAIN, [("zlib", "c2"), ("libc", "c1")]) == expected
    )


Build = Callable[[str, str], str]  # (port, key) -> the content id its build comes out with


class EveryKeyBuilt:
    """Contents as if every key were built, each to its own content (the key itself):
    for tests of what goes into keys, where no build happens between evaluations."""

    def get(self, key: str, /) -> str:
        return key


def distinct(name: str, key: str) -> str:
    """Every build comes out different: keys cascade as if they contained keys."""
    return hashlib.sha256(f"content of {key}".encode()).hexdigest()


def build_all(
    graph: Graph,
    tree_ids: dict[str, str],
    contents: dict[str, str],
    build: Build = distinct,
    keys: KeySet | None = None,
    affected: frozenset[str] = frozenset(),
) -> KeySet:
    """What a build host does: key what it can, build it (record its content), advance,
    until nothing is pending on a build. ``contents`` collects every build."""
    keys = KeySet.compute(graph, tree_ids, TOOLCHAIN, contents, previous=keys, affected=affected)
    while keys.unbuilt:
        for name in keys.unbuilt:
            contents[keys.keys[name]] = build(name, keys.keys[name])
        keys = KeySet.compute(graph, tree_ids, TOOLCHAIN, contents, previous=keys)
    assert not keys.pending
    return keys


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
    return build_all(Graph.build(ports, arch), tree_ids, {})


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


def same_output(name: str, key: str) -> str:
    """A build whose output ignores everything but the port's name (a comment, a bumped
    release): what a rebuild that comes out identical looks like."""
    return hashlib.sha256(f"content of {name}".encode()).hexdigest()


def test_nothing_built_keys_the_leaves_and_the_rest_waits() -> None:
    ports = tree()
    keys = KeySet.compute(Graph.build(ports, "x86_64"), ids(ports), TOOLCHAIN, {})
    assert set(keys.keys) == keys.unbuilt == {"libc", "doc"}
    assert keys.pending == {n: "libc" for n in ("zlib", "ssl", "png", "checker", "app", "make")}


def test_a_rebuild_that_comes_out_identical_rebuilds_nothing_downstream() -> None:
    ports = tree()
    graph = Graph.build(ports, "x86_64")
    contents: dict[str, str] = {}
    before = build_all(graph, ids(ports), contents, same_output)
    edited = ids(ports) | {"zlib": "zlib-with-a-comment"}
    first = KeySet.compute(
        graph, edited, TOOLCHAIN, contents, previous=before, affected=frozenset({"zlib"})
    )
    assert first.unbuilt == {"zlib"} and set(first.pending) == {"ssl", "png", "app"}
    built = len(contents)
    after = build_all(graph, edited, contents, same_output, first)
    assert len(contents) == built + 1  # zlib, and nothing else, was built
    assert changed(before, after) == {"zlib"}


@settings(max_examples=60, deadline=None)
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["libc", "zlib", "ssl", "png", "checker", "app", "make", "doc"]),
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_incremental_cutoff_equals_a_full_recomputation(edits: list[tuple[str, bool]]) -> None:
    """Edit ports one by one, some (``identical``) in ways that do not change what they
    build: the incremental keys, built wave by wave, equal a full evaluation's over the
    same packages, and exactly the ports whose inputs' content changed were built."""
    ports = tree()
    graph = Graph.build(ports, "x86_64")
    tree_ids = ids(ports)
    outputs = {name: name for name in ports}  # what each port's build comes out as

    def build(name: str, key: str) -> str:
        return hashlib.sha256(f"{outputs[name]} built on {key_inputs[name]}".encode()).hexdigest()

    contents: dict[str, str] = {}
    key_inputs: dict[str, str] = {}

    def inputs_of(keys: KeySet) -> None:  # a build's output: its own + its build root's
        for name in ports:
            root = keys.build_root(graph, name)
            key_inputs[name] = ",".join(f"{dep}={outputs[dep]}" for dep in root)

    inputs_of(KeySet.compute(graph, tree_ids, TOOLCHAIN, {}))
    keys = build_all(graph, tree_ids, contents, build)
    for step, (name, identical) in enumerate(edits):
        tree_ids = tree_ids | {name: f"{name}-{step}"}
        if not identical:
            outputs[name] = f"{name}-{step}"
        before = dict(keys.keys)
        keys = build_all(graph, tree_ids, contents, build, keys, frozenset({name}))
        full = KeySet.compute(graph, tree_ids, TOOLCHAIN, contents)
        assert keys.keys == full.keys and keys.contents == full.contents
        assert not full.pending and not full.unbuilt
        rebuilt = {n for n in ports if keys.keys[n] != before[n]}
        expected = {name} | (graph.reverse_closure([name]) if not identical else set())
        # a real change rebuilds at most its reverse closure: a dependent whose own
        # output ignores it still comes out the same (the toy build is deterministic)
        assert rebuilt == expected if identical else rebuilt <= expected and name in rebuilt


NAMES = ["libc", "zlib", "ssl", "png", "checker", "app", "make", "doc"]


@settings(max_examples=80, deadline=None)
@given(
    commits=st.lists(
        st.tuples(st.sets(st.sampled_from(NAMES), min_size=1, max_size=3), st.booleans()),
        min_size=1,
        max_size=4,
    ),
    order=st.randoms(use_true_random=False),
)
def test_every_wave_equals_a_full_recomputation(
    commits: list[tuple[set[str], bool]], order: random.Random
) -> None:
    """Commits editing several ports at once (one above another: the pending sweep from
    both), then their builds finishing one at a time, in any order: after each commit
    and each build the incremental keys, pending ports (and what each waits for,
    checked against its definition) and blocked ports equal a full evaluation's."""
    ports = tree()
    graph = Graph.build(ports, "x86_64")
    tree_ids = ids(ports)
    contents: dict[str, str] = {}
    keys = build_all(graph, tree_ids, contents, same_output)

    def check(keys: KeySet) -> None:
        full = KeySet.compute(graph, tree_ids, TOOLCHAIN, contents)
        assert keys.keys == full.keys and keys.contents == full.contents
        assert keys.unbuilt == full.unbuilt and keys.blocked == full.blocked
        assert keys.pending == full.pending == eager_pending(graph, full)

    for step, (edited, identical) in enumerate(commits):
        tree_ids = tree_ids | {name: f"{name}-{step}" for name in edited}
        keys = KeySet.compute(graph, tree_ids, TOOLCHAIN, contents, keys, frozenset(edited))
        check(keys)
        while keys.unbuilt:
            name = order.choice(sorted(keys.unbuilt))
            contents[keys.keys[name]] = (same_output if identical else distinct)(
                name, keys.keys[name]
            )
            keys = KeySet.compute(graph, tree_ids, TOOLCHAIN, contents, keys)
            check(keys)


def test_incremental_keys_equal_a_full_evaluation() -> None:
    rng = random.Random(7)
    ports = tree()
    tree_ids = ids(ports)
    graph = Graph.build(ports, "x86_64")
    contents: dict[str, str] = {}
    keys = build_all(graph, tree_ids, contents)
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
        keys = build_all(graph, tree_ids, contents, keys=keys, affected=affected)
        full = KeySet.compute(graph, tree_ids, TOOLCHAIN, contents)
        assert keys.keys == full.keys
        assert {n: str(p) for n, p in keys.blocked.items()} == {
            n: str(p) for n, p in full.blocked.items()
        }


def test_plan_builds_what_is_keyed_and_lists_what_waits() -> None:
    ports = tree()
    graph = Graph.build(ports, "x86_64")
    keys = KeySet.compute(graph, ids(ports), TOOLCHAIN, {})
    plan = make_plan(graph, keys, present=set())
    assert plan.names() == ["doc", "libc"] and all(not b.needs for b in plan.builds)
    assert set(plan.pending) == set(ports) - {"doc", "libc"}
    assert set(plan.pending.values()) == {"libc"}

    contents: dict[str, str] = {}
    keys = build_all(graph, ids(ports), contents)
    assert make_plan(graph, keys, set(contents)).builds == ()
    edited = ids(ports) | {"zlib": "edited"}
    keys = KeySet.compute(
        graph, edited, TOOLCHAIN, contents, previous=keys, affected=frozenset({"zlib"})
    )
    partial = make_plan(graph, keys, set(contents))
    assert partial.names() == ["zlib"]
    assert partial.pending == {"ssl": "zlib", "png": "zlib", "app": "zlib"}


def test_plan_of_named_ports_covers_what_they_need() -> None:
    ports = tree()
    ports["bad"] = port("bad", depends=("missing",))
    ports["uses-bad"] = port("uses-bad", depends=("bad", "zlib"))
    graph = Graph.build(ports, "x86_64")
    keys = build_all(graph, ids(ports), {})
    plan = make_plan(graph, keys, set(), wanted=["png", "uses-bad"])
    assert plan.names() == ["libc", "checker", "zlib", "png"]
    assert set(plan.blocked) == {"bad", "uses-bad"}
    assert "missing" in str(plan.blocked["uses-bad"])


def test_a_port_removed_while_its_build_ran_is_forgotten() -> None:
    ports = tree()
    graph = Graph.build(ports, "x86_64")
    contents: dict[str, str] = {}
    keys = KeySet.compute(graph, ids(ports), TOOLCHAIN, contents)
    contents[keys.keys["doc"]] = "d" * 64  # doc's build finished, in the commit removing it
    graph, affected = graph.updated({"doc": None})
    tree_ids = ids(ports)
    del tree_ids["doc"]
    after = KeySet.compute(graph, tree_ids, TOOLCHAIN, contents, previous=keys, affected=affected)
    assert "doc" not in after.keys and after.unbuilt == {"libc"}
