"""Which package satisfies a dependency, and that builds and installs agree on it."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portsd.core.graph import Graph
from portsd.core.metadata import PackageMeta
from portsd.core.provider import choose_provider, offered_version, package_meets
from portsd.core.recipe import Dependency, Recipe
from portsd.core.resolve import Catalog, resolve
from portsd.errors import MissingDependency, ResolutionError


def deps(*texts: str) -> tuple[Dependency, ...]:
    return tuple(map(Dependency.parse, texts))


@pytest.mark.parametrize(
    ("provides", "wanted", "expected"),
    [
        ((), "zlib", "1.3-2"),  # its own name: its full version
        (("libz=1.3",), "libz", "1.3"),
        (("sh",), "sh", ""),  # unversioned: offers no version
        (("sh>=1",), "sh", ""),  # not '=': names no version the package is
        (("zlib=9",), "zlib", "1.3-2"),  # its own name comes first
        (("sh=1",), "bash", None),
    ],
)
def test_offered_version(provides: tuple[str, ...], wanted: str, expected: str | None) -> None:
    assert offered_version("zlib", "1.3-2", deps(*provides), wanted) == expected


@pytest.mark.parametrize(
    ("dependency", "name", "version", "provides", "expected"),
    [
        ("zlib", "zlib", "1.3", (), True),
        ("zlib>=1.3", "zlib", "1.3", (), True),
        ("zlib>=1.4", "zlib", "1.3", (), False),
        ("zlib<1.3", "zlib", "1.3", (), False),
        ("zlib>=1.4", "zlib", "1.3", ("zlib=2",), False),  # its own name comes first
        ("sh", "busybox", "1.36", ("sh",), True),
        ("sh>=1.0", "busybox", "1.36", ("sh",), False),  # unversioned provides: no
        ("sh>=1.0", "busybox", "1.36", ("sh=1.36",), True),
        ("sh>=2", "busybox", "1.36", ("sh=1.36",), False),
        ("sh<2", "busybox", "1.36", ("sh=1.36",), True),
        ("sh", "dash", "0.5", ("bash",), False),
    ],
)
def test_package_meets(
    dependency: str, name: str, version: str, provides: tuple[str, ...], expected: bool
) -> None:
    package = PackageMeta(name, version, 1, "x86_64", "ab" * 32, provides=provides)
    assert package_meets(package, dependency) is expected
    assert package_meets(package, Dependency.parse(dependency)) is expected


OFFERS = {"sh": "1.0-1", "bash": "5.2", "busybox": "1.36", "dash": "0.5", "toybox": ""}


@pytest.mark.parametrize(
    ("dependency", "exact", "expected"),
    [
        ("sh", True, "sh"),  # the exact name first
        ("sh>=1", True, "sh"),
        ("sh>=2", True, "bash"),  # then providers by name
        ("sh<1", True, "dash"),
        ("sh", False, "bash"),
        ("sh>9", True, None),
    ],
)
def test_choose_provider(dependency: str, exact: bool, expected: str | None) -> None:
    providers = ["bash", "busybox", "dash", "sh", "toybox"]  # the exact name may be listed
    choice = choose_provider(Dependency.parse(dependency), exact, providers, OFFERS.get)
    assert choice == expected


# -- the builder and the installer agree ---------------------------------------------------

NAMES = ["a", "b", "c", "sh", "cc"]
WANTED = [*NAMES, "awk", "gone"]  # "awk" only ever provided, "gone" never there
VERSIONS = ["1", "1.1", "2"]
OPS = ["", "", "=", "<", "<=", ">", ">="]


def constrained(names: list[str]) -> st.SearchStrategy[str]:
    return st.builds(
        lambda name, op, version: name + (op + version if op else ""),
        st.sampled_from(names),
        st.sampled_from(OPS),
        st.sampled_from(VERSIONS),
    )


def dependency_list(names: list[str]) -> st.SearchStrategy[tuple[Dependency, ...]]:
    """At most three entries, one per name (as recipes require)."""
    return st.lists(
        constrained(names).map(Dependency.parse), max_size=3, unique_by=lambda d: d.name
    ).map(tuple)


def recipe(name: str) -> st.SearchStrategy[Recipe]:
    provided = st.sampled_from(["", *(f"={v}" for v in VERSIONS)])
    return st.builds(
        Recipe,
        name=st.just(name),
        version=st.sampled_from(VERSIONS),
        release=st.integers(1, 2),
        summary=st.just(name),
        license=st.just("MIT"),
        arch=st.sampled_from([("any",), ("riscv64",)]),
        depends=dependency_list(WANTED),
        build_depends=dependency_list(WANTED),
        check_depends=dependency_list(WANTED),
        provides=st.lists(
            st.builds(str.__add__, st.sampled_from([*NAMES, "awk"]), provided).map(
                Dependency.parse
            ),
            max_size=2,
            unique_by=lambda d: d.name,
        ).map(tuple),
    )


TREES = st.tuples(*(st.one_of(st.none(), recipe(name)) for name in NAMES)).map(
    lambda recipes: {r.name: r for r in recipes if r is not None}
)


def installer_choice(catalog: Catalog, dep: Dependency) -> str | None:
    """What installing ``dep`` into an empty root picks for it, or None if nothing fits."""
    try:
        resolution = resolve(catalog, {}, [str(dep)], origin="the ports tree")
    except ResolutionError as error:
        # refused further down: the chain starts at what the request resolved to
        return error.chain[0] if error.chain else None
    return next(step.package.name for step in resolution if step.requested)


@given(TREES)
def test_builds_and_installs_choose_the_same_provider(recipes: dict[str, Recipe]) -> None:
    graph = Graph.build(recipes, "x86_64")
    offers = {  # every port this architecture can build, as the client offers them
        name: PackageMeta.of(recipe, hashlib.sha256(name.encode()).hexdigest(), "x86_64")
        for name, recipe in recipes.items()
        if graph.recipe(name) is not None
    }
    catalog = Catalog.of(offers)
    for name in recipes:
        problem = graph.problem(name)
        if isinstance(problem, MissingDependency):
            assert installer_choice(catalog, Dependency.parse(problem.dependency)) is None
        for edge in graph.edges(name):
            assert installer_choice(catalog, edge.dependency) == edge.target, (name, edge)
