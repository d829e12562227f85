"""The dependency graph: resolution, provides, constraints, cycles, closures, order, updates."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portsd.core.graph import Graph, PortChange
from portsd.core.recipe import Dependency, Recipe
from portsd.errors import DependencyCycle, FileProblem, MissingDependency, RecipeError


def port(
    name: str,
    depends: tuple[str, ...] = (),
    build: tuple[str, ...] = (),
    check: tuple[str, ...] = (),
    provides: tuple[str, ...] = (),
    version: str = "1.0",
    arch: tuple[str, ...] = ("any",),
) -> Recipe:
    return Recipe(
        name=name,
        version=version,
        release=1,
        summary=name,
        license="MIT",
        arch=arch,
        depends=tuple(map(Dependency.parse, depends)),
        build_depends=tuple(map(Dependency.parse, build)),
        check_depends=tuple(map(Dependency.parse, check)),
        provides=tuple(map(Dependency.parse, provides)),
    )


def graph_of(*recipes: Recipe | tuple[str, RecipeError]) -> Graph:
    ports: dict[str, Recipe | RecipeError] = {}
    for item in recipes:
        if isinstance(item, Recipe):
            ports[item.name] = item
        else:
            ports[item[0]] = item[1]
    return Graph.build(ports, "x86_64")


def targets(graph: Graph, name: str) -> list[str]:
    return [edge.target for edge in graph.edges(name)]


def test_resolution_prefers_the_port_of_that_name_then_providers_by_name() -> None:
    graph = graph_of(
        port("sh"),
        port("busybox", provides=("sh=1.36",)),
        port("dash", provides=("sh=0.5",)),
        port("bash", provides=("sh=5.2",)),
        port("a", depends=("sh",)),
        port("b", depends=("sh>=1.0",)),  # sh itself is 1.0-1: satisfies
        port("c", depends=("sh>=2",)),  # bash (5.2) is the first provider by name that satisfies
        port("d", depends=("sh<1",)),  # only dash
    )
    assert targets(graph, "a") == ["sh"]
    assert targets(graph, "b") == ["sh"]
    assert targets(graph, "c") == ["bash"]
    assert targets(graph, "d") == ["dash"]


def test_unversioned_provides_meets_no_constraint() -> None:
    graph = graph_of(
        port("busybox", provides=("sh",)), port("a", depends=("sh",)), port("b", depends=("sh>=1",))
    )
    assert targets(graph, "a") == ["busybox"]
    problem = graph.problem("b")
    assert isinstance(problem, MissingDependency)
    assert (
        str(problem) == "b: depends 'sh>=1' is not provided by any port (busybox offers no version)"
    )


def test_missing_and_unsatisfied_dependencies_name_everything() -> None:
    graph = graph_of(
        port("zlib", version="1.2"),
        port("app", build=("zlib>=1.3",)),
        port("tool", check=("nope",)),
    )
    assert str(graph.problem("app")) == (
        "app: build-depends 'zlib>=1.3' is not provided by any port (zlib offers 1.2-1)"
    )
    assert str(graph.problem("tool")) == "tool: check-depends 'nope' is not provided by any port"
    assert graph.problem("zlib") is None
    assert [name for name, _ in graph.problems()] == ["app", "tool"]


def test_broken_recipe_and_other_arch_are_explained_to_dependents() -> None:
    error = RecipeError("bad", [FileProblem("ports/bad/port.toml", "unknown key 'x'", 3)])
    graph = graph_of(
        ("bad", error),
        port("armonly", arch=("aarch64",)),
        port("a", depends=("bad",)),
        port("b", depends=("armonly",)),
    )
    assert graph.problem("bad") is error
    assert graph.problem("a") is None and targets(graph, "a") == ["bad"]  # blocked via keys
    assert "armonly is not available for x86_64" in str(graph.problem("b"))
    assert not graph.supported("armonly") and "armonly" in graph


@pytest.mark.parametrize(
    ("recipes", "expected"),
    [
        ([port("a", depends=("a",))], "dependency cycle: a -> a"),
        ([port("a", depends=("b",)), port("b", build=("a",))], "dependency cycle: a -> b -> a"),
        (
            [port("a", depends=("b",)), port("b", depends=("c",)), port("c", check=("a",))],
            "dependency cycle: a -> b -> c -> a",
        ),
    ],
)
def test_cycles_name_every_port_on_them(recipes: list[Recipe], expected: str) -> None:
    graph = graph_of(*recipes, port("outside", depends=("a",)), port("fine"))
    for recipe in recipes:
        problem = graph.problem(recipe.name)
        assert isinstance(problem, DependencyCycle) and str(problem) == expected
    assert graph.problem("outside") is None  # blocked later by keys, not itself on the cycle
    assert graph.problem("fine") is None


def test_a_component_with_two_cycles_names_all_its_ports() -> None:
    graph = graph_of(
        port("a", depends=("b", "c")), port("b", depends=("a",)), port("c", depends=("a",))
    )
    problem = graph.problem("c")
    assert isinstance(problem, DependencyCycle) and set(problem.cycle) == {"a", "b", "c"}


def diamond() -> Graph:
    return graph_of(
        port("libc"),
        port("zlib", depends=("libc",)),
        port("ssl", depends=("libc", "zlib")),
        port("png", depends=("zlib",), check=("checker",)),
        port("checker", depends=("libc",)),
        port("app", depends=("ssl", "png"), build=("make",)),
        port("make", depends=("libc",)),
    )


def test_closures_and_build_root() -> None:
    graph = diamond()
    assert graph.build_root("app") == ["libc", "make", "png", "ssl", "zlib"]
    # a check dependency of png is in png's build root but not in its runtime closure
    assert graph.build_root("png") == ["checker", "libc", "zlib"]
    assert graph.runtime_closure(["png"]) == {"png", "zlib", "libc"}
    assert graph.dependency_closure(["png"]) == {"png", "zlib", "libc", "checker"}
    assert graph.reverse_closure(["zlib"]) == {"zlib", "ssl", "png", "app"}
    assert graph.reverse_closure(["checker"]) == {"checker", "png", "app"}
    assert graph.dependents("libc") == {"zlib", "ssl", "checker", "make"}


def test_order_puts_dependencies_first_and_is_deterministic() -> None:
    graph = diamond()
    order = graph.order(graph.names())
    assert order == graph.order(reversed(list(graph.names())))
    for name in order:
        for target in targets(graph, name):
            assert order.index(target) < order.index(name)
    assert graph.order(["ssl", "zlib"]) == ["zlib", "ssl"]
    assert graph.order(["zlib", "libc"]) == ["libc", "zlib"]


def facts(graph: Graph) -> dict[str, tuple[object, ...]]:
    return {
        name: (
            graph.edges(name),
            str(graph.problem(name)),
            graph.supported(name),
            graph.dependents(name),
        )
        for name in graph.names()
    }


@st.composite
def trees_and_changes(
    draw: st.DrawFn,
) -> tuple[dict[str, Recipe | RecipeError], list[dict[str, PortChange]]]:
    rng = random.Random(draw(st.integers(0, 2**32)))
    names = [f"p{i}" for i in range(12)]

    def random_port(name: str) -> Recipe | RecipeError:
        if rng.random() < 0.08:
            return RecipeError(name, [FileProblem(f"ports/{name}/port.toml", "broken")])

        def pick() -> tuple[str, ...]:
            return tuple(rng.sample(names + ["virt", "gone"], rng.randint(0, 2)))

        versions = ["", ">=1", "<2", "=1.0"]
        return port(
            name,
            depends=tuple(d + rng.choice(versions) for d in pick()),
            build=pick(),
            check=pick() if rng.random() < 0.2 else (),
            provides=("virt=1.0",) if rng.random() < 0.15 else (),
            version=rng.choice(["1.0", "2.0"]),
            arch=("aarch64",) if rng.random() < 0.05 else ("any",),
        )

    tree = {name: random_port(name) for name in rng.sample(names, 8)}

    def random_change(name: str) -> PortChange:
        roll = rng.random()
        if roll < 0.2:
            return None
        recipe = tree.get(name)
        if roll < 0.5 and isinstance(recipe, Recipe):  # another version, the same needs
            offered = (
                (Dependency.parse(f"virt={rng.choice(['1.0', '2.0'])}"),) if recipe.provides else ()
            )
            return replace(recipe, version=rng.choice(["1.0", "2.0", "3.0"]), provides=offered)
        return random_port(name)

    changes = [
        {name: random_change(name) for name in rng.sample(names, rng.randint(1, 3))}
        for _ in range(4)
    ]
    return tree, changes


@settings(max_examples=200, deadline=None)
@given(trees_and_changes())
def test_updated_graph_equals_a_fresh_build(
    case: tuple[dict[str, Recipe | RecipeError], list[dict[str, PortChange]]],
) -> None:
    tree, changes = case
    graph = Graph.build(tree, "x86_64")
    for change in changes:
        before = facts(graph)
        graph, affected = graph.updated(change)
        for name, value in change.items():
            if value is None:
                tree.pop(name, None)
            else:
                tree[name] = value
        fresh = Graph.build(tree, "x86_64")
        assert facts(graph) == facts(fresh)
        # every port whose own facts changed is reported as affected
        after = facts(graph)
        for name in after:
            if before.get(name, (None,))[:2] != after[name][:2]:
                assert name in affected
