"""Build keys: the identity of a build's inputs.

A port's key is the sha256 of a canonical msgpack encoding of

    ["portsd-build-key", BUILDER_FORMAT, arch, tree id of ports/<name>,
     [sha256 of each url source, in recipe order],
     content id of the toolchain every build stands on (the bootstrap seed),
     [[name, key] of every port in its build root, sorted by name]]

where the build root is the port's runtime, build and check dependencies plus their
runtime dependencies, transitively. Keys nest, so a change anywhere below a port changes
its key; identical inputs give identical keys on every machine.

``KeySet.compute`` evaluates a whole tree; given the previous commit's ``KeySet`` and the
ports whose graph facts changed, it recomputes only those and their reverse closure.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import msgpack

from portsd.core.graph import Graph, PortProblem
from portsd.core.recipe import DepKind
from portsd.errors import BrokenDependency

BUILDER_FORMAT = 3
"""Bumped whenever the builder changes how the same inputs turn into a package."""


def build_key(
    tree_id: str,
    sources: Sequence[str],
    arch: str,
    toolchain: str,
    build_root: Iterable[tuple[str, str]],
) -> str:
    """The key of one port from its inputs; ``build_root`` pairs are (name, build key)."""
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
    """The build key of every buildable port of a tree, and why the others have none."""

    __slots__ = ("keys", "blocked", "toolchain", "_closures", "_pack")

    def __init__(self, toolchain: str) -> None:
        self.toolchain = toolchain
        self.keys: dict[str, str] = {}
        self.blocked: dict[str, PortProblem] = {}
        # runtime closures, memoised per evaluation: many ports share deep dependencies
        self._closures: dict[str, frozenset[str]] = {}
        self._pack = msgpack.Packer().pack  # one packer for all keys: packb makes one per call

    @classmethod
    def compute(
        cls,
        graph: Graph,
        tree_ids: Mapping[str, str],
        toolchain: str,
        previous: KeySet | None = None,
        affected: Iterable[str] = (),
    ) -> KeySet:
        """Keys for every port of ``graph``, built on the toolchain of content id ``toolchain``.

        With ``previous`` (of the same toolchain), only ``affected`` ports (those whose tree
        id or graph facts changed, removed ports included) and everything depending on them
        are recomputed; the rest is carried over.
        """
        result = cls(toolchain)
        if previous is None or previous.toolchain != toolchain:
            todo = set(graph.names())
        else:
            affected = set(affected)
            todo = graph.reverse_closure(name for name in affected if name in graph)
            # Copy everything and drop what is stale: copying a dict is a memcpy, where
            # filtering 30,000 names in Python took longer than the rest of a small commit.
            result.keys = dict(previous.keys)
            result.blocked = dict(previous.blocked)
            result._closures = dict(previous._closures)
            for name in todo | affected:
                result.keys.pop(name, None)
                result.blocked.pop(name, None)
                result._closures.pop(name, None)
        for name in graph.order(todo):
            result._evaluate(graph, name, tree_ids[name])
        return result

    def _evaluate(self, graph: Graph, name: str, tree_id: str) -> None:
        problem = graph.problem(name)
        recipe = graph.recipe(name)
        if recipe is None or problem is not None:
            if problem is not None:
                self.blocked[name] = problem
            return
        build_root = self.build_root(graph, name)
        keys = self.keys
        for dep in build_root:
            if dep not in keys:
                self.blocked[name] = self._blocked_by(name, dep)
                return
        sources = [s.sha256 for s in recipe.sources if s.url is not None and s.sha256]
        pairs = [(dep, keys[dep]) for dep in build_root]  # sorted: build_root is
        keys[name] = _key(self._pack, tree_id, sources, graph.arch, self.toolchain, pairs)

    def _blocked_by(self, name: str, dep: str) -> BrokenDependency:
        cause = self.blocked.get(dep)
        if isinstance(cause, BrokenDependency):
            return BrokenDependency(name, cause.dependency, cause.reason)
        reason = str(cause).splitlines()[0] if cause else "it is not available"
        return BrokenDependency(name, dep, reason)

    def build_root(self, graph: Graph, name: str) -> list[str]:
        """The ports installed to build ``name``, sorted (memoised runtime closures)."""
        root: set[str] = set()
        for edge in graph.edges(name):
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
