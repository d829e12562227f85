"""Incremental evaluation: advancing commit by commit gives exactly a full evaluation's keys."""

from __future__ import annotations

import hashlib
import random

import pytest

from portsd.core.evaluate import Evaluation, changes_between
from portsd.core.graph import Graph, PortChange
from portsd.core.keys import KeySet
from portsd.core.recipe import Recipe, parse_recipe
from portsd.errors import FileProblem, RecipeError

ARCH = "x86_64"


def random_port(rng: random.Random, name: str, names: list[str], step: int) -> Recipe | RecipeError:
    """A recipe (sometimes broken) with random dependencies: cycles come and go."""
    roll = rng.random()
    if roll < 0.06:
        return RecipeError(name, [FileProblem(f"ports/{name}/port.toml", "broken on purpose")])
    others = [n for n in names if n != name]

    def deps(count: int) -> list[str]:
        chosen = rng.sample(others, min(count, len(others)))
        texts = []
        for dep in chosen:
            constraint = rng.random()
            if constraint < 0.1:
                dep += f">={rng.randrange(1, 4)}.0"  # versions run 1.x to 3.x: may be unmet
            elif constraint < 0.15:
                dep += "<2.0"
            texts.append(dep)
        return texts

    lines = [
        f'name = "{name}"',
        f'version = "{rng.randrange(1, 4)}.{step}"',
        'summary = "random"',
        'license = "MIT"',
        f"depends = {deps(rng.choice((0, 0, 1, 1, 2, 3)))}",
        f"build-depends = {deps(rng.choice((0, 0, 1)))}",
        f"check-depends = {deps(rng.choice((0, 0, 0, 1)))}",
    ]
    if rng.random() < 0.15:
        lines.append(f'provides = ["virt{rng.randrange(3)}={rng.randrange(1, 3)}.0"]')
    if rng.random() < 0.1:
        lines.append('arch = ["aarch64"]')
    if rng.random() < 0.5:
        sha = hashlib.sha256(f"{name}{step}".encode()).hexdigest()
        lines += ["[[source]]", f'url = "https://example.org/{name}.tar.gz"', f'sha256 = "{sha}"']
    text = "\n".join(lines).replace("'", '"') + "\n"
    try:
        return parse_recipe(text, f"ports/{name}/port.toml", name)
    except RecipeError as error:
        return error


def tree_id(port: Recipe | RecipeError, salt: int) -> str:
    return hashlib.sha1(f"{port!r}{salt}".encode()).hexdigest()


def settle(evaluation: Evaluation, contents: dict[str, str]) -> Evaluation:
    """Build what is keyed and unbuilt (content: half of the ports come out the same as
    whatever was built before, the others differ), advance, until nothing waits."""
    while evaluation.keys.unbuilt:
        for name in sorted(evaluation.keys.unbuilt):
            key = evaluation.keys.keys[name]
            same = int(hashlib.sha1(name.encode()).hexdigest(), 16) % 2
            contents[key] = hashlib.sha256((name if same else key).encode()).hexdigest()
        evaluation = evaluation.advance(evaluation.listing, {}, contents)
    assert not evaluation.keys.pending
    return evaluation


def eager_pending(graph: Graph, keys: KeySet) -> dict[str, str]:
    """What ``keys.pending`` must hold, by its definition and worked out for every port,
    dependencies first: a port neither keyed nor blocked waits for the first of its
    dependencies (by name) without a package, or for what that one waits for."""
    waits: dict[str, str] = {}
    for name in graph.order(graph.names()):
        if name in keys.keys or name in keys.blocked or graph.recipe(name) is None:
            continue
        deps = sorted({e.target for e in graph.edges(name)} - keys.contents.keys())
        assert deps, f"{name} is neither keyed, blocked nor waiting"
        waits[name] = waits.get(deps[0], deps[0])
    return waits


def assert_same(a: Evaluation, b: Evaluation) -> None:
    assert a.keys.keys == b.keys.keys
    assert a.keys.contents == b.keys.contents
    assert a.keys.pending == b.keys.pending == eager_pending(a.graph, a.keys)
    assert {n: str(p) for n, p in a.keys.blocked.items()} == {
        n: str(p) for n, p in b.keys.blocked.items()
    }
    assert {n: str(p) for n, p in a.graph.problems()} == {n: str(p) for n, p in b.graph.problems()}
    assert sorted(a.graph.names()) == sorted(b.graph.names())
    for name in a.graph.names():
        assert a.graph.edges(name) == b.graph.edges(name)
        assert a.graph.dependents(name) == b.graph.dependents(name)


@pytest.mark.parametrize("seed", range(6))
def test_advance_equals_a_full_evaluation_after_random_commits(seed: int) -> None:
    rng = random.Random(seed)
    names = [f"p{n}" for n in range(rng.choice((8, 15, 40)))] + ["virt0", "virt1"]
    ports: dict[str, Recipe | RecipeError] = {}
    listing: dict[str, str] = {}
    for name in rng.sample(names, len(names) // 2):
        ports[name] = random_port(rng, name, names, 0)
        listing[name] = tree_id(ports[name], 0)
    contents: dict[str, str] = {}
    evaluation = settle(Evaluation.full(listing, ports, ARCH, "0" * 64, contents), contents)
    assert_same(evaluation, Evaluation.full(listing, ports, ARCH, "0" * 64, contents))
    for step in range(1, 60):
        changes: dict[str, PortChange] = {}
        for _ in range(rng.choice((1, 1, 2, 3, 8))):
            name = rng.choice(names)
            if name in ports and rng.random() < 0.25:
                del ports[name], listing[name]
                changes[name] = None
            else:
                ports[name] = random_port(rng, name, names, step)
                listing[name] = tree_id(ports[name], step)
                changes[name] = ports[name]
        if rng.random() < 0.1:  # a commit that only touches files beside the recipe
            name = rng.choice(sorted(ports))
            listing[name] = tree_id(ports[name], -step)
            changes[name] = ports[name]
        evaluation = evaluation.advance(dict(listing), changes, contents)
        assert evaluation.changed == frozenset(changes)
        assert_same(
            evaluation, Evaluation.full(dict(listing), dict(ports), ARCH, "0" * 64, contents)
        )
        evaluation = settle(evaluation, contents)
        assert_same(
            evaluation, Evaluation.full(dict(listing), dict(ports), ARCH, "0" * 64, contents)
        )


def test_changes_between_listings() -> None:
    old = {"a": "1", "b": "2", "c": "3"}
    new = {"a": "1", "b": "9", "d": "4"}
    assert changes_between(old, new) == {"b": "9", "c": None, "d": "4"}
    assert changes_between(new, new) == {}


def test_advance_refuses_changes_that_contradict_the_listing() -> None:
    port = parse_recipe('name = "a"\nversion = "1"\nsummary = "a"\nlicense = "MIT"\n', "p", "a")
    evaluation = Evaluation.full({"a": "1"}, {"a": port}, ARCH, "0" * 64, {})
    with pytest.raises(ValueError, match="a: removed but still in the new listing"):
        evaluation.advance({"a": "2"}, {"a": None}, {})
    with pytest.raises(ValueError, match="b: given a recipe but not in the new listing"):
        evaluation.advance({"a": "1"}, {"b": port}, {})
    assert evaluation.advance({"a": "1"}, {}, {}).keys is evaluation.keys
