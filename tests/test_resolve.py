"""Resolution: closures, constraints, provides, upgrades, conflicts, errors, properties."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TypeVar

import pytest
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from portsd.core.metadata import PackageMeta
from portsd.core.recipe import Dependency, parse_recipe
from portsd.core.resolve import (
    Action,
    Catalog,
    InstallStep,
    Mode,
    Resolution,
    resolve,
)
from portsd.core.version import full_version
from portsd.errors import InstallError, ResolutionError


def pkg(
    name: str,
    version: str = "1.0",
    release: int = 1,
    depends: Sequence[str] = (),
    provides: Sequence[str] = (),
    conflicts: Sequence[str] = (),
    build: str = "",
) -> PackageMeta:
    """A candidate; its key follows from everything else (``build`` varies only the key)."""
    seed = repr((name, version, release, depends, provides, conflicts, build))
    return PackageMeta(
        name,
        version,
        release,
        "x86_64",
        hashlib.sha256(seed.encode()).hexdigest(),
        depends=tuple(depends),
        provides=tuple(provides),
        conflicts=tuple(conflicts),
    )


def repo(*packages: PackageMeta) -> dict[str, PackageMeta]:
    return {package.name: package for package in packages}


def plan(
    available: Iterable[PackageMeta],
    request: Sequence[str],
    installed: Iterable[PackageMeta] = (),
    mode: Mode = Mode.INSTALL,
) -> Resolution:
    return resolve(repo(*available), repo(*installed), request, mode)


def summary(resolution: Resolution) -> list[tuple[str, str, str]]:
    """(action, name version, why) per step."""
    return [
        (
            step.action.value,
            f"{step.package.name} {full_version(step.package.version, step.package.release)}",
            step.why,
        )
        for step in resolution
    ]


def refused(
    available: Iterable[PackageMeta],
    request: Sequence[str],
    installed: Iterable[PackageMeta] = (),
    mode: Mode = Mode.INSTALL,
) -> str:
    with pytest.raises(ResolutionError) as caught:
        plan(available, request, installed, mode)
    assert isinstance(caught.value, InstallError)
    return str(caught.value)


MUSL = pkg("musl", "1.2.5")
ZLIB = pkg("zlib", "1.3.1", depends=["musl"])
LIBFOO = pkg("libfoo", "2.0", depends=["zlib>=1.3", "musl"])
APP = pkg("app", "1.0", depends=["libfoo", "musl"])


# -- closures and order --------------------------------------------------------------------


def test_closure_in_dependency_order_with_reasons() -> None:
    result = plan([MUSL, ZLIB, LIBFOO, APP, pkg("unrelated")], ["app"])
    assert summary(result) == [
        ("install", "musl 1.2.5-1", "app -> musl"),
        ("install", "zlib 1.3.1-1", "app -> libfoo -> zlib"),
        ("install", "libfoo 2.0-1", "app -> libfoo"),
        ("install", "app 1.0-1", "requested"),
    ]
    assert result.satisfied == ()
    assert [step.requested for step in result] == [False, False, False, True]
    assert all(step.replaces is None for step in result)


def test_installed_package_that_satisfies_is_kept() -> None:
    result = plan([MUSL, ZLIB, LIBFOO, APP], ["app"], installed=[MUSL, pkg("zlib", "1.3")])
    assert result.names() == ("libfoo", "app")


def test_installed_package_too_old_is_upgraded_and_says_what_it_replaces() -> None:
    old = pkg("zlib", "1.2.13")
    result = plan([MUSL, ZLIB, LIBFOO, APP], ["app"], installed=[MUSL, old])
    assert summary(result)[0] == ("upgrade", "zlib 1.3.1-1", "app -> libfoo -> zlib")
    assert result.steps[0].replaces == old


def test_requests_already_met_need_no_step() -> None:
    result = plan([MUSL, ZLIB], ["zlib", "musl>=1"], installed=[MUSL, ZLIB])
    assert result.steps == () and result.satisfied == ("zlib", "musl>=1")
    assert len(plan([MUSL, ZLIB], ["zlib", "zlib"])) == 2  # a repeated name counts once


def test_request_with_constraint_chooses_and_explains() -> None:
    assert plan([MUSL, ZLIB], ["zlib>=1.3"]).names() == ("musl", "zlib")
    assert (
        refused([MUSL, ZLIB], ["zlib>=2"]) == "cannot install zlib>=2: the cache has zlib 1.3.1-1"
    )


def test_a_dependency_on_yourself_or_a_cycle_ends() -> None:
    selfish = pkg("selfish", depends=["selfish"])
    a, b = pkg("a", depends=["b"]), pkg("b", depends=["a"])
    assert plan([selfish], ["selfish"]).names() == ("selfish",)
    result = plan([a, b], ["a"])
    assert result.names() == ("b", "a") and result.steps[0].why == "a -> b"


# -- provides ------------------------------------------------------------------------------


BUSYBOX = pkg("busybox", "1.36", provides=["sh=1.36", "awk"])
DASH = pkg("dash", "0.5", provides=["sh=0.5"])


@pytest.mark.parametrize(
    "dependency, available, expected",
    [
        ("sh", [BUSYBOX, DASH], "busybox"),  # the first provider by name
        ("sh>=1", [DASH, BUSYBOX], "busybox"),  # ... that satisfies
        ("sh<1", [BUSYBOX, DASH], "dash"),
        ("sh", [BUSYBOX, pkg("sh", "9")], "sh"),  # the exact name first ...
        ("sh<2", [BUSYBOX, pkg("sh", "9")], "busybox"),  # ... if it satisfies
        ("awk", [BUSYBOX, pkg("mawk", provides=["awk"])], "busybox"),
    ],
)
def test_provider_choice(dependency: str, available: list[PackageMeta], expected: str) -> None:
    result = plan([*available, pkg("app", depends=[dependency])], ["app"])
    assert result.names() == (expected, "app")


def test_unversioned_provides_meets_no_constraint() -> None:
    message = refused([BUSYBOX, pkg("app", depends=["awk>=1"])], ["app"])
    assert message == (
        "cannot install app: app needs awk>=1, but the cache has busybox provides awk (no version)"
    )


def test_installed_provider_is_kept() -> None:
    app = pkg("app", depends=["sh"])
    assert plan([DASH, app], ["app"], installed=[BUSYBOX]).names() == ("app",)
    assert plan([DASH, app], ["sh"], installed=[BUSYBOX]).satisfied == ("sh",)


def test_provider_chosen_earlier_in_the_same_transaction_is_used() -> None:
    first = pkg("first", depends=["sh"])
    second = pkg("second", depends=["sh"])
    result = plan([DASH, BUSYBOX, first, second, pkg("sh", "0.1")], ["dash", "first", "second"])
    assert result.names() == ("dash", "first", "second")


# -- errors --------------------------------------------------------------------------------


def test_unsatisfiable_dependency_names_the_chain() -> None:
    old = pkg("zlib", "1.2.13", depends=["musl"])
    message = refused([MUSL, old, LIBFOO, APP], ["app"])
    assert (
        message
        == "cannot install app: app -> libfoo needs zlib>=1.3, but the cache has zlib 1.2.13-1"
    )


def test_missing_everything_and_what_is_installed() -> None:
    assert refused([APP], ["app"]) == (
        "cannot install app: app needs libfoo, but the cache has no libfoo and nothing that "
        "provides it"
    )
    assert refused([], ["nope"]) == (
        "cannot install nope: the cache has no nope and nothing that provides it"
    )
    message = refused([pkg("zlib", "1.2"), pkg("a", depends=["zlib>=1.3"])], ["a"], [pkg("zlib")])
    assert message.endswith("the cache has zlib 1.2-1 (installed: 1.0-1)")


def test_invalid_strings_are_refused() -> None:
    assert "is not a package name" in refused([], ["Bad Name"])
    with pytest.raises(ValueError, match="depends: invalid item 'b>>1'"):
        pkg("a", depends=["b>>1"])  # no package can carry it: its facts are checked
    with pytest.raises(TypeError):
        resolve({}, {}, "zlib")


def test_later_choice_breaking_an_earlier_one_is_refused() -> None:
    available = [
        pkg("zlib", "1.3"),
        pkg("old", depends=["zlib<1.3"]),
        pkg("new", depends=["zlib>=1.3"]),
    ]
    message = refused(available, ["old", "new"], installed=[pkg("zlib", "1.2")])
    assert message == "cannot install old: old needs zlib<1.3, but zlib would be 1.3-1"


def test_replacing_what_an_installed_package_needs_is_refused() -> None:
    installed = [pkg("zlib", "1.2"), pkg("legacy", depends=["zlib<1.3"])]
    available = [pkg("zlib", "1.3"), pkg("app", depends=["zlib>=1.3"])]
    assert refused(available, ["app"], installed) == (
        "cannot install app: installed legacy needs zlib<1.3, but zlib would be 1.3-1 (app -> zlib)"
    )


def test_a_request_met_at_first_then_replaced_for_a_later_need_is_refused() -> None:
    """The installed a 1.1 meets 'a>1.0' when asked; e, walked later, needs a=1.0."""
    available = [pkg("a", "1.0"), pkg("e", depends=["a=1.0"])]
    for request in (["e", "a>1.0"], ["a>1.0", "e"]):
        assert refused(available, request, [pkg("a", "1.1")]) == (
            "cannot install a>1.0: e needs a=1.0, so a would be 1.0-1"
        )
    assert refused([pkg("a", "1.0")], ["a>=1.1", "a=1.0"], [pkg("a", "1.1")]) == (
        "cannot install a>=1.1: a=1.0 is requested too, so a would be 1.0-1"
    )
    # the same world, the other way round: an installed e pins a=1.0
    installed = [pkg("a", "1.0"), pkg("e", depends=["a=1.0"])]
    assert refused([pkg("a", "1.1")], ["a>1.0"], installed) == (
        "cannot install a>1.0: installed e needs a=1.0, but a would be 1.1-1"
    )


def test_a_catalog_is_built_once_and_answers_as_the_mapping_does() -> None:
    available = repo(MUSL, ZLIB, BUSYBOX, DASH, pkg("app", depends=["sh>=1", "zlib"]))
    catalog = Catalog.of(available)
    assert catalog.providers == {"sh": ("busybox", "dash"), "awk": ("busybox",)}
    assert resolve(catalog, {}, ["app"]) == resolve(available, {}, ["app"])
    assert resolve(catalog, {}, ["app"]).names() == ("busybox", "musl", "zlib", "app")


# -- conflicts -----------------------------------------------------------------------------


OPENSSL = pkg("openssl", "3.0")
LIBRESSL = pkg("libressl", "3.9", provides=["openssl=3.0"], conflicts=["openssl"])


def test_new_package_conflicting_with_installed_one() -> None:
    curl = pkg("curl", depends=["libressl"])
    assert refused([LIBRESSL, curl], ["curl"], installed=[OPENSSL]) == (
        "cannot install curl: curl -> libressl conflicts with installed openssl 3.0-1 "
        "(libressl conflicts: openssl)"
    )


def test_installed_package_conflicting_with_new_one() -> None:
    picky = pkg("picky", conflicts=["libressl>=3"])
    assert refused([LIBRESSL], ["libressl"], installed=[picky]) == (
        "cannot install libressl: libressl conflicts with installed picky 1.0-1 "
        "(picky conflicts: libressl>=3)"
    )
    assert len(plan([LIBRESSL], ["libressl"], [pkg("picky", conflicts=["libressl<3"])])) == 1


def test_two_new_packages_conflicting() -> None:
    app = pkg("app", depends=["libressl", "tool"])
    tool = pkg("tool", depends=["openssl>=3"])
    # openssl>=3 is met by libressl's provides: no conflict
    assert plan([LIBRESSL, OPENSSL, app, tool], ["app"]).names() == ("libressl", "tool", "app")
    message = refused([LIBRESSL, OPENSSL, app, tool], ["openssl", "app"])
    assert message == (
        "cannot install app: app -> libressl conflicts with openssl 3.0-1 (wanted: requested) "
        "(libressl conflicts: openssl)"
    )


def test_conflicts_through_provides_and_with_self() -> None:
    own = pkg("mksh", provides=["sh=59"], conflicts=["sh"])  # the usual "one sh" idiom
    assert plan([own], ["mksh"]).names() == ("mksh",)
    assert "conflicts with installed dash 0.5-1" in refused([own], ["mksh"], installed=[DASH])


def test_the_replaced_package_conflicts_no_more() -> None:
    old = pkg("tool", "1.0", conflicts=["libressl"])
    new = pkg("tool", "2.0")
    result = plan([new, LIBRESSL], ["tool>=2", "libressl"], installed=[old])
    assert [step.action for step in result] == [Action.UPGRADE, Action.INSTALL]


# -- upgrade -------------------------------------------------------------------------------


def test_upgrade_replaces_on_a_new_build_key_not_only_a_new_version() -> None:
    installed = [MUSL, ZLIB, LIBFOO, APP]
    rebuilt = pkg("zlib", "1.3.1", depends=["musl"], build="new inputs")
    newer, older = pkg("libfoo", "2.1", depends=["zlib"]), pkg("app", "0.9", depends=["libfoo"])
    result = plan([MUSL, rebuilt, newer, older], ["app"], installed, Mode.UPGRADE)
    assert summary(result) == [
        ("rebuild", "zlib 1.3.1-1", "app -> libfoo -> zlib"),
        ("upgrade", "libfoo 2.1-1", "app -> libfoo"),
        ("downgrade", "app 0.9-1", "requested"),
    ]
    assert [step.replaces for step in result] == [ZLIB, LIBFOO, APP]
    # install mode leaves all of it alone
    assert plan([MUSL, rebuilt, newer, older], ["app"], installed).steps == ()


def test_upgrade_without_names_upgrades_everything_installed() -> None:
    installed = [MUSL, ZLIB, pkg("tool")]
    newer = [pkg("musl", "1.2.6"), ZLIB, pkg("tool", "2.0"), pkg("other")]
    result = plan(newer, [], installed, Mode.UPGRADE)
    assert [(step.package.name, step.why) for step in result] == [
        ("musl", "requested"),
        ("tool", "requested"),
    ]
    assert plan(newer, [], installed, Mode.INSTALL).steps == ()


def test_upgrade_keeps_a_package_whose_new_version_breaks_a_constraint() -> None:
    installed = [pkg("zlib", "1.2"), pkg("legacy", depends=["zlib<1.3"])]
    available = [pkg("zlib", "1.3"), pkg("legacy", "1.1", depends=["zlib<1.3"])]
    result = plan(available, ["legacy"], installed, Mode.UPGRADE)
    assert result.names() == ("legacy",)


def test_upgrade_pulls_in_new_dependencies_of_a_replacement() -> None:
    installed = [pkg("app", depends=["musl"]), MUSL]
    available = [pkg("app", "2.0", depends=["musl", "libnew"]), MUSL, pkg("libnew")]
    result = plan(available, ["app"], installed, Mode.UPGRADE)
    assert summary(result) == [
        ("install", "libnew 1.0-1", "app -> libnew"),
        ("upgrade", "app 2.0-1", "requested"),
    ]


def test_a_need_met_by_a_provides_an_upgrade_drops_is_ordered_after_its_new_provider() -> None:
    """b needs ``sh``: the installed a provides it when b is walked, then b's need of a
    upgrades a to a build that provides it no more, and e (also requested) does. b goes in
    after e, not after a (found by the property test below)."""
    installed = [pkg("a", provides=["sh"])]
    available = [pkg("a", build="new"), pkg("b", depends=["sh", "a"]), pkg("e", provides=["sh"])]
    result = plan(available, ["b", "e"], installed, Mode.UPGRADE)
    names = result.names()
    assert set(names) == {"a", "b", "e"} and names.index("e") < names.index("b")


# -- candidates of other shapes ------------------------------------------------------------


def test_what_a_recipe_would_build_is_a_candidate() -> None:
    key = "ab" * 32
    recipe = parse_recipe(
        'name = "tool"\nversion = "2.1"\nrelease = 3\nsummary = "t"\nlicense = "MIT"\n'
        'depends = ["zlib>=1.0"]\nprovides = ["cc=1"]\nconflicts = ["gcc"]\n',
        "ports/tool/port.toml",
        "tool",
    )
    offer = PackageMeta.of(recipe, key, "x86_64")
    assert offer == PackageMeta(
        "tool", "2.1", 3, "x86_64", key, "t", "MIT", ("zlib>=1.0",), ("cc=1",), ("gcc",)
    )
    installed = {"zlib": PackageMeta("zlib", "1.0", 1, "x86_64", key)}
    assert resolve({"tool": offer}, installed, ["cc"], origin="the ports tree").names() == ("tool",)
    with pytest.raises(ResolutionError, match="tool>3: the ports tree has tool 2.1-3"):
        resolve({"tool": offer}, installed, ["tool>3"], origin="the ports tree")


# -- properties ----------------------------------------------------------------------------

T = TypeVar("T")
POOL = ["a", "b", "c", "d", "e", "f", "g"]
VIRTUALS = ["v", "w"]
VERSIONS = ["1.0", "1.1", "2.0"]
OPS = ["", "", "", "", "=", "<", "<=", ">", ">="]  # mostly unconstrained


def one_in(
    count: int, rare: st.SearchStrategy[T], usual: st.SearchStrategy[T]
) -> st.SearchStrategy[T]:
    """``rare`` about once in ``count`` draws (``one_of`` would pick each branch as often,
    however many times a branch is repeated)."""
    return st.tuples(st.integers(1, count), rare, usual).map(
        lambda drawn: drawn[1] if drawn[0] == 2 else drawn[2]
    )


def constraints(names: Sequence[str]) -> st.SearchStrategy[str]:
    return st.builds(
        lambda name, op, version: name + (op + version if op else ""),
        st.sampled_from(names),
        st.sampled_from(OPS),
        st.sampled_from(VERSIONS),
    )


PROVIDES = st.lists(
    st.sampled_from([*VIRTUALS, *(f"{v}={x}" for v in VIRTUALS for x in VERSIONS)]),
    min_size=0,
    max_size=1,
)


def packages(position: int, *, conflicts: bool) -> st.SearchStrategy[PackageMeta]:
    """Package POOL[position]: it depends only on earlier names and virtuals (a DAG)."""
    return st.builds(
        pkg,
        st.just(POOL[position]),
        st.sampled_from(VERSIONS),
        st.integers(1, 2),
        depends=st.lists(constraints(POOL[:position] * 2 + VIRTUALS), max_size=3, unique=True)
        if position
        else st.just([]),
        provides=PROVIDES,
        conflicts=one_in(6, st.lists(constraints(POOL), min_size=1, max_size=1), st.just([]))
        if conflicts
        else st.just([]),
        build=st.sampled_from(["", "x"]),
    )


World = tuple[dict[str, PackageMeta], dict[str, PackageMeta], list[str], Mode]


def _world(
    available: Sequence[PackageMeta | None],
    installed: Sequence[PackageMeta | None],
    request: Sequence[tuple[int, str]],
    mode: Mode,
) -> World:
    offered = {p.name: p for p in available if p is not None}
    # most requests name an available package (the last ones have the largest closures);
    # a few name anything, so that refusals are exercised too
    names = sorted(offered, reverse=True) * 8 + POOL + VIRTUALS
    wanted = [names[position % len(names)] + constraint for position, constraint in request]
    return offered, {p.name: p for p in installed if p is not None}, wanted, mode


def worlds(*, conflicts: bool = True) -> st.SearchStrategy[World]:
    """Available and installed packages (each name maybe in either), a request, a mode."""
    nothing = st.none()
    available: list[st.SearchStrategy[PackageMeta | None]] = [
        packages(0, conflicts=conflicts)
    ]  # never an empty world
    available += [one_in(6, nothing, packages(n, conflicts=conflicts)) for n in range(1, len(POOL))]
    installed = [one_in(3, packages(n, conflicts=conflicts), nothing) for n in range(len(POOL))]
    constraint = one_in(
        5,
        st.builds(str.__add__, st.sampled_from(OPS[-5:]), st.sampled_from(VERSIONS)),
        st.just(""),
    )
    return st.builds(
        _world,
        st.tuples(*available),
        st.tuples(*installed),
        st.lists(st.tuples(st.integers(0, 40), constraint), min_size=1, max_size=3),
        st.sampled_from(list(Mode)),
    )


def satisfied_by(packages: Iterable[PackageMeta], text: str) -> bool:
    """An independent, naive reading of "something satisfies this need"."""
    dep = Dependency.parse(text)
    for package in packages:
        offered = None
        if package.name == dep.name:
            offered = full_version(package.version, package.release)
        for entry in map(Dependency.parse, package.provides):
            if entry.name == dep.name:
                offered = entry.version or ""
        if offered is not None and (dep.op is None or (offered and dep.accepts(offered))):
            return True
    return False


def check(world: World, result: Resolution | ResolutionError) -> None:
    """What any answer to ``world`` must be: a resolution that leaves every request met,
    closed, consistent, in dependency order; or a refusal that names the request."""
    available, installed, request, mode = world
    if isinstance(result, ResolutionError):
        assert str(result).startswith(f"cannot {mode.value} ")
        assert result.request in (request or sorted(installed)), result.request
        return
    chosen = {step.package.name: step.package for step in result}
    final: dict[str, PackageMeta] = {**installed, **chosen}
    assert len(chosen) == len(result)
    for text in request:  # every request holds afterwards
        assert satisfied_by(final.values(), text), text
    before: list[PackageMeta] = [p for n, p in installed.items() if n not in chosen]
    for step in result:
        package = step.package
        assert available[package.name] is package
        assert step.replaces is installed.get(package.name)
        for text in package.depends:  # closed, every constraint met, dependencies first
            assert satisfied_by(final.values(), text), (package.name, text)
            if not satisfied_by([*before, package], text):  # only to close a cycle
                later = [p for p in chosen.values() if p not in before and p is not package]
                assert any(
                    satisfied_by([p], text) and depends_on(final, p, package) for p in later
                ), (
                    package.name,
                    text,
                    "too early",
                )
        for text in package.conflicts:  # nothing on the system conflicts with it
            others = [p for p in final.values() if p.name != package.name]
            assert not satisfied_by(others, text), (package.name, text)
        before.append(package)
        assert step.chain[-1] == package.name
        if mode is Mode.INSTALL:  # each link of the chain really needs the next
            for parent, child in zip(step.chain, step.chain[1:], strict=False):
                needs = final[parent].depends
                assert any(satisfied_by([final[child]], text) for text in needs)
    for name, package in installed.items():
        if name not in chosen:  # kept packages: nothing conflicts with them ...
            for text in package.conflicts:
                assert not satisfied_by(list(chosen.values()), text)
            for text in package.depends:  # ... and what they had, they keep
                if satisfied_by(installed.values(), text):
                    assert satisfied_by(final.values(), text), (name, text)
    for text in result.satisfied:  # "already met" means no step was needed for it
        assert text in request and satisfied_by(before[: len(before) - len(result)], text)


def depends_on(final: Mapping[str, PackageMeta], start: PackageMeta, target: PackageMeta) -> bool:
    """Whether ``start`` needs ``target``, directly or not, on the system ``final``."""
    seen: set[str] = set()
    todo = [start]
    while todo:
        package = todo.pop()
        if package is target:
            return True
        if package.name not in seen:
            seen.add(package.name)
            for text in package.depends:
                todo.extend(p for p in final.values() if satisfied_by([p], text))
    return False


def answer(world: World) -> Resolution | ResolutionError:
    available, installed, request, mode = world
    try:
        return resolve(available, installed, request, mode)
    except ResolutionError as error:
        return error


@given(worlds())
@settings(max_examples=300, deadline=None)
def test_resolutions_are_closed_consistent_ordered_and_deterministic(world: World) -> None:
    result = answer(world)
    check(world, result)
    # deterministic, whatever the order of the mappings
    available, installed, request, mode = world
    flipped = answer(
        (dict(reversed(available.items())), dict(reversed(installed.items())), request, mode)
    )
    if isinstance(result, ResolutionError):
        assert isinstance(flipped, ResolutionError) and str(flipped) == str(result)
    else:
        assert flipped == result == resolve(available, installed, request, mode)


def test_the_property_rejects_wrong_answers() -> None:
    """``check`` is a real test: each way of being wrong is caught."""
    sh = pkg("sh", "2.0", provides=["v=2.0"])
    world: World = (
        repo(MUSL, ZLIB, LIBFOO, APP, sh, pkg("pick", conflicts=["app"])),
        repo(pkg("zlib", "1.2"), pkg("old", depends=["zlib<1.3"]), pkg("x", conflicts=["sh"])),
        ["libfoo"],
        Mode.INSTALL,
    )
    available, installed, _, _ = world
    right = resolve(available, {}, ["app"])
    check((available, {}, ["app"], Mode.INSTALL), right)
    steps = right.steps

    def wrong(world: World, result: Resolution | ResolutionError) -> None:
        with pytest.raises(AssertionError):
            check(world, result)

    clean: World = (available, {}, ["app"], Mode.INSTALL)
    wrong(clean, Resolution(steps[::-1]))  # dependants first
    wrong(clean, Resolution(steps[1:]))  # not closed
    wrong(clean, Resolution(steps[:-1]))  # the request not met
    wrong(
        clean, Resolution((*steps, InstallStep(Action.INSTALL, available["pick"], None, ("pick",))))
    )
    wrong(clean, ResolutionError("install", "nothing", (), "made up"))  # names no request
    upgraded = InstallStep(Action.UPGRADE, ZLIB, installed["zlib"], ("libfoo", "zlib"))
    wrong(world, Resolution((upgraded,)))  # the request is not installed ...
    with_libfoo = Resolution((upgraded, InstallStep(Action.INSTALL, LIBFOO, None, ("libfoo",))))
    wrong(world, with_libfoo)  # ... and installed "old" loses its zlib<1.3
    wrong(
        (available, installed, ["sh"], Mode.INSTALL),
        Resolution((InstallStep(Action.INSTALL, sh, None, ("sh",)),)),  # installed x conflicts
    )
    check(
        (available, {}, ["sh"], Mode.INSTALL),
        Resolution((InstallStep(Action.INSTALL, sh, None, ("sh",)),)),
    )


def _by_provides(world: World, step: InstallStep) -> bool:
    """Whether ``step`` came in for a need naming something it provides, not its name."""
    if len(step.chain) < 2:
        return False
    available, installed, _, _ = world
    parent = available.get(step.chain[-2]) or installed[step.chain[-2]]
    return step.package.name not in {Dependency.parse(text).name for text in parent.depends}


CASES: dict[str, Callable[[World, Resolution], bool]] = {
    "replaced": lambda _, result: any(step.replaces for step in result) and len(result) > 2,
    "rebuilt": lambda _, result: any(step.action is Action.REBUILD for step in result),
    "downgraded": lambda _, result: any(step.action is Action.DOWNGRADE for step in result),
    "provided": lambda world, result: any(_by_provides(world, step) for step in result),
    "already met": lambda _, result: bool(result.satisfied) and len(result) > 0,
}


def test_the_generated_worlds_reach_every_case() -> None:
    """The property above is not vacuous: its worlds resolve in every way, and refuse."""
    seen: set[str] = set()

    def everything_seen(world: World) -> bool:
        result = answer(world)
        if isinstance(result, ResolutionError):
            seen.add("refused")
        else:
            seen.update(case for case, holds in CASES.items() if holds(world, result))
        return seen == {*CASES, "refused"}

    generate = settings(max_examples=2000, phases=[Phase.generate], database=None, deadline=None)
    try:
        find(worlds(), everything_seen, settings=generate)
    except NoSuchExample:
        pytest.fail(f"never reached: {sorted({*CASES, 'refused'} - seen)}")


@given(worlds(conflicts=False))
@settings(max_examples=100, deadline=None)
def test_without_constraints_every_closure_resolves(
    world: World,
) -> None:
    available, _, request, _ = world
    free = {
        name: PackageMeta(
            name,
            p.version,
            p.release,
            p.arch,
            p.build_key,
            depends=tuple(
                d for d in (Dependency.parse(t).name for t in p.depends) if d in available
            ),
        )
        for name, p in available.items()
    }
    wanted = [name if name in free else "a" for name in (Dependency.parse(t).name for t in request)]
    result = resolve(free, {}, wanted)
    closure: set[str] = set()
    stack = list(wanted)
    while stack:
        name = stack.pop()
        if name not in closure:
            closure.add(name)
            stack.extend(free[name].depends)
    assert set(result.names()) == closure
