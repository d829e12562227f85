"""Build keys: the identity of a build's inputs.

A port's key is the sha256 of a canonical msgpack encoding of

    ["portsd-build-key", BUILDER_FORMAT, arch, tree id of ports/<name>,
     [sha256 of each url source, in recipe order],
     content id of the toolchain every build stands on (the bootstrap seed),
     [[name, content id] of every port in its build root, sorted by name]]

where the build root is the port's runtime, build and check dependencies (and, for a
build on the seed, its bootstrap dependencies) plus their runtime dependencies,
transitively, and a dependency's content id is the digest of its
package's files (``portsd.pkg.archive.content_id``), not of its own key or metadata. So a
rebuild that comes out identical (a comment, a bumped ``release``) changes no key above
it: the cascade is cut off there (early cutoff).

The price: a port's key is known only once every port of its build root has a package.
Until then it is **pending** on the dependency it waits for, and a plan is "at most these":
the pending ports may or may not need a build, which only the dependency's content tells.

``KeySet.compute`` evaluates a whole tree; given the previous ``KeySet`` and the ports
whose graph facts changed, it re-examines only those, the ports waiting on a dependency
whose content has become known, and, from there, only the dependents whose inputs came
out different.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import msgpack

from portsd.core.graph import Graph, PortProblem
from portsd.core.recipe import DepKind
from portsd.errors import BrokenDependency

BUILDER_FORMAT = 4
"""Bumped whenever the builder changes how the same inputs turn into a package
(4: dependencies enter keys by content id)."""


class Contents(Protocol):
    """Content ids of built packages by build key: a repository's records, an index."""

    def get(self, key: str, /) -> str | None: ...


def build_key(
    tree_id: str,
    sources: Sequence[str],
    arch: str,
    toolchain: str,
    build_root: Iterable[tuple[str, str]],
) -> str:
    """The key of one port from its inputs; ``build_root`` pairs are (name, content id)."""
    return _key(msgpack.packb, tree_id, list(sources), arch, toolchain, sorted(build_root))


def _key(
    pack: Callable[[object], bytes],
    tree_id: str,
    sources: list[str],
    arch: str,
    toolchain: str,
    build_root: list[tuple[str, str]],
) -> str:
    # msgpack packs tuples and lists alike, as arrays
    payload = ["portsd-build-key", BUILDER_FORMAT, arch, tree_id, sources, toolchain, build_root]
    return hashlib.sha256(pack(payload)).hexdigest()


class KeySet:
    """The build key of every port whose inputs are known, what the others wait for (or
    why they cannot be built), and the content ids the keys were computed from."""

    __slots__ = (
        "keys",
        "blocked",
        "pending",
        "contents",
        "unbuilt",
        "toolchain",
        "on_seed",
        "_closures",
        "_pack",
    )

    def __init__(self, toolchain: str, on_seed: bool = True) -> None:
        self.toolchain = toolchain
        self.on_seed = on_seed
        """the builds stand on the seed (no toolchain stage): bootstrap-depends count"""
        self.keys: dict[str, str] = {}
        self.blocked: dict[str, PortProblem] = {}
        self.pending: dict[str, str] = {}
        """port -> the keyed, unbuilt port whose package it waits for (its own dependency,
        or the one a dependency waits for)"""
        self.contents: dict[str, str] = {}
        """port -> content id of the package of its key, for the keyed ports built"""
        self.unbuilt: set[str] = set()
        """keyed ports without a package (yet): what pending ports wait for"""
        # runtime closures, memoised per evaluation: many ports share deep dependencies
        self._closures: dict[str, frozenset[str]] = {}
        self._pack = msgpack.Packer().pack  # one packer for all keys: packb makes one per call

    @classmethod
    def compute(
        cls,
        graph: Graph,
        tree_ids: Mapping[str, str],
        toolchain: str,
        contents: Contents,
        previous: KeySet | None = None,
        affected: Iterable[str] = (),
        on_seed: bool = True,
    ) -> KeySet:
        """Keys for every port of ``graph`` whose build root is built, on the toolchain
        of content id ``toolchain``; ``contents`` gives the content id of a built key.
        ``on_seed``: the builds stand on the seed, not on a stage of the tree's
        toolchain, so their ``bootstrap-depends`` are in their build roots.

        With ``previous`` (of the same toolchain), only ``affected`` ports (those whose tree
        id or graph facts changed, removed ports included), the ports whose package has
        appeared since (``previous.unbuilt`` now in ``contents``) and the dependents whose
        inputs differ in turn are re-examined; the rest is carried over. ``contents`` must
        only grow between the two: a package, once built, keeps its content id.
        """
        result = cls(toolchain, on_seed)
        if previous is None or (previous.toolchain, previous.on_seed) != (toolchain, on_seed):
            names = set(graph.names())
            result._propagate(graph, tree_ids, contents, names, names, cls(toolchain, on_seed))
            return result
        affected = set(affected)
        removed = {name for name in affected if name not in graph}
        affected -= removed
        built = {name for name in previous.unbuilt - removed if contents.get(previous.keys[name])}
        # Copy everything and mend what is stale: copying a dict is a memcpy, where
        # filtering 30,000 names in Python took longer than the rest of a small commit.
        result.keys = dict(previous.keys)
        result.blocked = dict(previous.blocked)
        result.pending = dict(previous.pending)
        result.contents = dict(previous.contents)
        result.unbuilt = set(previous.unbuilt)
        result._closures = dict(previous._closures)
        for name in graph.reverse_closure(affected) if affected else ():
            result._closures.pop(name, None)  # runtime closures follow the graph's edges
        for name in removed:
            result._forget(name)
        seeds = affected | built
        todo = graph.reverse_closure(seeds)
        result._propagate(graph, tree_ids, contents, seeds, todo, previous)
        return result

    def _propagate(
        self,
        graph: Graph,
        tree_ids: Mapping[str, str],
        contents: Contents,
        seeds: set[str],
        todo: set[str],
        previous: KeySet,
    ) -> None:
        """Re-examine ``seeds``, then, dependencies first, each port of ``todo`` depending
        on a port whose state came out different: where a state is unchanged, the cascade
        stops."""
        changed: set[str] = set()
        done: set[str] = set()

        def visit(name: str) -> None:
            done.add(name)
            targets = [e.target for e in graph.edges(name)]
            # ``order`` puts the dependents of a cycle after it, in name order: a
            # dependency not yet seen is examined first, so no stale state is read
            for target in targets:
                if target in todo and target not in done:
                    visit(target)
            if name in seeds:  # re-examined whatever it depends on, and changed by definition
                self._forget(name)
                self._evaluate(graph, name, tree_ids[name], contents)
                changed.add(name)
            elif not changed.isdisjoint(targets):
                before = previous._state(name)
                self._forget(name)
                self._evaluate(graph, name, tree_ids[name], contents)
                if self._state(name) != before:
                    changed.add(name)

        for name in graph.order(todo):
            if name not in done:
                visit(name)

    def _state(self, name: str) -> tuple[str | None, str | None, str | None, str | None]:
        problem = self.blocked.get(name)
        return (
            self.keys.get(name),
            self.contents.get(name),
            self.pending.get(name),
            None if problem is None else str(problem),
        )

    def _forget(self, name: str) -> None:
        self.keys.pop(name, None)
        self.blocked.pop(name, None)
        self.pending.pop(name, None)
        self.contents.pop(name, None)
        self.unbuilt.discard(name)

    def _evaluate(self, graph: Graph, name: str, tree_id: str, contents: Contents) -> None:
        problem = graph.problem(name)
        recipe = graph.recipe(name)
        if recipe is None or problem is not None:
            if problem is not None:
                self.blocked[name] = problem
            return
        # Every dependency's own build root is in this one, so the direct dependencies
        # decide: one blocked blocks this port, one without a package makes it wait.
        waits = None
        targets = sorted({edge.target for edge in graph.build_edges(name, self.on_seed)})
        for dep in targets:
            if dep in self.blocked or (dep not in self.keys and dep not in self.pending):
                self.blocked[name] = self._blocked_by(name, dep)
                return
            if waits is None and dep not in self.contents:
                waits = self.pending.get(dep, dep)
        if waits is not None:
            self.pending[name] = waits
            return
        build_root = self.build_root(graph, name)
        sources = [s.sha256 for s in recipe.sources if s.url is not None and s.sha256]
        pairs = [(dep, self.contents[dep]) for dep in build_root]  # sorted: build_root is
        key = _key(self._pack, tree_id, sources, graph.arch, self.toolchain, pairs)
        self.keys[name] = key
        content = contents.get(key)
        if content is None:
            self.unbuilt.add(name)
        else:
            self.contents[name] = content

    def _blocked_by(self, name: str, dep: str) -> BrokenDependency:
        cause = self.blocked.get(dep)
        if isinstance(cause, BrokenDependency):
            return BrokenDependency(name, cause.dependency, cause.reason)
        reason = str(cause).splitlines()[0] if cause else "it is not available"
        return BrokenDependency(name, dep, reason)

    def build_root(self, graph: Graph, name: str) -> list[str]:
        """The ports installed to build ``name``, sorted (memoised runtime closures)."""
        root: set[str] = set()
        for edge in graph.build_edges(name, self.on_seed):
            root |= self._runtime_closure(graph, edge.target)
        return sorted(root)

    def _runtime_closure(self, graph: Graph, name: str) -> frozenset[str]:
        known = self._closures.get(name)
        if known is not None:
            return known
        # Iterative post-order so a deep chain cannot exhaust the recursion limit; cycles
        # are already reported as problems, the visiting set only keeps this loop finite.
        visiting: set[str] = set()
        stack = [name]
        while stack:
            current = stack[-1]
            if current in self._closures:
                stack.pop()
                continue
            visiting.add(current)
            needed = [
                e.target
                for e in graph.edges(current)
                if e.kind is DepKind.RUNTIME
                and e.target not in self._closures
                and e.target not in visiting
            ]
            if needed:
                stack.extend(needed)
                continue
            stack.pop()
            closure = {current}
            for edge in graph.edges(current):
                if edge.kind is DepKind.RUNTIME:
                    closure |= self._closures.get(edge.target, frozenset({edge.target}))
            self._closures[current] = frozenset(closure)
        return self._closures[name]

    def key(self, name: str) -> str | None:
        return self.keys.get(name)
