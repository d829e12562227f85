"""Build keys: the identity of a build's inputs.

A port's key is the sha256 of a canonical msgpack encoding of

    ["portsd-build-key", BUILDER_FORMAT, arch, tree id of ports/<name>,
     [sha256 of each url source, in recipe order],
     content id of the toolchain every build stands on (the bootstrap seed),
     [[name, content id] of every port in its build root, sorted by name]]

where the build root is the port's runtime, build and check dependencies plus their
runtime dependencies, transitively, and a dependency's content id is the digest of its
package's files (``portsd.pkg.archive.content_id``), not of its own key or metadata. So a
rebuild that comes out identical (a comment, a bumped ``release``) changes no key above
it: the cascade is cut off there (early cutoff).

The price: a port's key is known only once every port of its build root has a package.
Until then it is **pending** on the dependency it waits for, and a plan is "at most these":
the pending ports may or may not need a build, which only the dependency's content tells.
The pending ports are exactly those, not blocked, above a keyed port without a package.

``KeySet.compute`` evaluates a whole tree; given the previous ``KeySet`` and the ports
whose graph facts changed, it re-examines only those, the ports waiting on a dependency
whose content has become known, and, from there, only the dependents whose inputs came
out different. Where a port that had a package loses it (a commit to it), the ports above
it are marked pending in one sweep, not examined: with early cutoff none of them has a
key until it is rebuilt, and which build each waits for is worked out only when asked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
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


class Pending(Mapping[str, str]):
    """The pending ports of a ``KeySet``, each mapped to the keyed, unbuilt port whose
    package it waits for: of the dependencies without a package, the first by name, or
    the port that one waits for. Worked out when asked and remembered: a commit to a port
    most of the tree builds on makes 23,000 ports pending, and nobody asks about most."""

    __slots__ = ("_keys", "_found")

    def __init__(self, keys: KeySet) -> None:
        self._keys = keys
        self._found: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._keys._pending)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys._pending)

    def __contains__(self, name: object) -> bool:
        return name in self._keys._pending

    def __getitem__(self, name: str) -> str:
        keys, found = self._keys, self._found
        if name not in keys._pending:
            raise KeyError(name)
        # Down through the first dependency without a package until a keyed one: iterative,
        # since a chain of pending ports may be deeper than the recursion limit.
        path: list[str] = []
        current = name
        while current not in found and current in keys._pending:
            path.append(current)
            current = min(
                e.target
                for e in keys._graph.build_edges(current, keys.on_seed)
                if e.target not in keys.contents
            )
        waits = found.get(current, current)
        for port in path:
            found[port] = waits
        return waits


class KeySet:
    """The build key of every port whose inputs are known, the ports that wait for a
    dependency's package (``pending``) or cannot be built (``blocked``), and the content
    ids the keys were computed from. Not changed once computed."""

    __slots__ = (
        "keys",
        "blocked",
        "contents",
        "unbuilt",
        "toolchain",
        "on_seed",
        "pending",
        "_pending",
        "_graph",
        "_closures",
        "_pack",
    )

    def __init__(self, toolchain: str, graph: Graph, on_seed: bool = True) -> None:
        self.toolchain = toolchain
        self.on_seed = on_seed
        """the builds stand on the seed (no toolchain stage): bootstrap-depends count"""
        self.keys: dict[str, str] = {}
        self.blocked: dict[str, PortProblem] = {}
        self.contents: dict[str, str] = {}
        """port -> content id of the package of its key, for the keyed ports built"""
        self.unbuilt: set[str] = set()
        """keyed ports without a package (yet): what pending ports wait for"""
        self._pending: set[str] = set()
        self.pending: Mapping[str, str] = Pending(self)
        """port -> the keyed, unbuilt port whose package it waits for (its own dependency,
        or the one a dependency waits for)"""
        self._graph = graph
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
        result = cls(toolchain, graph, on_seed)
        if previous is None or (previous.toolchain, previous.on_seed) != (toolchain, on_seed):
            done: set[str] = set()
            for name in graph.names():
                result._visit(
                    graph,
                    name,
                    done,
                    _always,
                    lambda n: result._evaluate(graph, n, tree_ids[n], contents),
                )
            return result
        affected = set(affected)
        removed = {name for name in affected if name not in graph}
        affected -= removed
        built = {name for name in previous.unbuilt - removed if contents.get(previous.keys[name])}
        # Copy everything and mend what is stale: copying a dict is a memcpy, where
        # filtering 30,000 names in Python took longer than the rest of a small commit.
        result.keys = dict(previous.keys)
        result.blocked = dict(previous.blocked)
        result._pending = set(previous._pending)
        result.contents = dict(previous.contents)
        result.unbuilt = set(previous.unbuilt)
        result._closures = dict(previous._closures)
        for name in removed:
            result._forget(name)
            result._closures.pop(name, None)
        result._mend_closures(graph, affected)
        result._propagate(graph, tree_ids, contents, affected | built, previous)
        return result

    def _mend_closures(self, graph: Graph, affected: set[str]) -> None:
        """Drop the memoised runtime closures that an edge change made stale: those holding
        a port whose own closure came out different."""
        stale = set()
        for name in affected:
            old = self._closures.pop(name, None)
            if old is not None and self._runtime_closure(graph, name) != old:
                stale.add(name)
        # (the ports above a changed one may have memoised a stale closure meanwhile too)
        for name in _closure(stale, lambda name: _runtime_dependents(graph, name)):
            self._closures.pop(name, None)

    def _propagate(
        self,
        graph: Graph,
        tree_ids: Mapping[str, str],
        contents: Contents,
        seeds: set[str],
        previous: KeySet,
    ) -> None:
        """Re-examine ``seeds``, then, dependencies first, each port depending on a port
        whose state came out different: where a state is unchanged, the cascade stops.

        Where a port that had a package is left without one (keyed anew, or pending), the
        ports above it that are not blocked are all pending now, whatever else changed:
        they are marked so in one sweep at the end, and the walk stops there."""
        changed: set[str] = set()
        holds: list[str] = []  # ports that lost their package
        done: set[str] = set()
        queue = list(seeds)
        below: dict[str, bool] = {}  # port -> whether a seed is among its dependencies

        def may_change(name: str) -> bool:
            """Whether ``name`` is a seed or above one. A port with a problem of its own
            (every port on a cycle has one) keeps its state unless it is a seed, so the
            search never goes through one, and never meets a cycle."""
            if name in seeds:
                return True
            if graph.problem(name) is not None:
                return False
            stack = [name]
            while stack:
                current = stack[-1]
                if current in below:
                    stack.pop()
                    continue
                targets = [e.target for e in graph.edges(current)]
                deeper = [
                    t
                    for t in targets
                    if t not in below and t not in seeds and graph.problem(t) is None
                ]
                if deeper:
                    stack.extend(deeper)
                    continue
                stack.pop()
                below[current] = any(t in seeds or below.get(t, False) for t in targets)
            return below[name]

        def examine(name: str) -> None:
            if name not in seeds and changed.isdisjoint(e.target for e in graph.edges(name)):
                return
            self._forget(name)
            self._evaluate(graph, name, tree_ids[name], contents)
            if name in self._pending or name in self.unbuilt:
                if name in previous.contents:
                    holds.append(name)
                    return
                if name in previous._pending or name in previous.unbuilt:
                    return  # what is above it waited before, and still waits
            elif (
                name not in seeds
                and name not in previous._pending  # pending then, not now: changed
                and self._state(name) == previous._state(name)
            ):
                return
            changed.add(name)
            queue.extend(graph.dependents(name))

        while queue:
            name = queue.pop()
            if name not in done:
                self._visit(graph, name, done, may_change, examine)
        if holds:
            # From the ports directly above: a port that lost its package above another
            # one (both edited) was keyed from stale states, and is pending too.
            starts = {d for h in holds for d in self._built_on(graph, h)}
            if self.on_seed:
                above = graph.reverse_closure(starts)
            else:
                above = _closure(starts, lambda name: self._built_on(graph, name))
            above.difference_update(self.blocked)
            if len(above) * 8 < len(self.keys):
                for name in above:
                    self.keys.pop(name, None)
                    self.contents.pop(name, None)
            else:  # thousands: filtering the whole dicts once is faster than popping each
                self.keys = {k: v for k, v in self.keys.items() if k not in above}
                self.contents = {k: v for k, v in self.contents.items() if k not in above}
            self.unbuilt -= above
            self._pending |= above

    @staticmethod
    def _visit(
        graph: Graph,
        start: str,
        done: set[str],
        include: Callable[[str], bool],
        examine: Callable[[str], None],
    ) -> None:
        """``examine`` ``start`` after each of its dependencies not ``done`` that
        ``include`` takes, transitively (an iterative depth-first walk: chains of ports
        can be deeper than the recursion limit). On a cycle, the port first reached is
        examined last; every port on it has a problem of its own, and reads no other's."""
        if start in done:
            return
        done.add(start)
        stack = [(start, iter(graph.edges(start)))]
        while stack:
            name, rest = stack[-1]
            for edge in rest:
                target = edge.target
                if target not in done and include(target):
                    done.add(target)
                    stack.append((target, iter(graph.edges(target))))
                    break
            else:
                stack.pop()
                examine(name)

    def _state(self, name: str) -> tuple[str | None, str | None, bool, str | None]:
        problem = self.blocked.get(name)
        return (
            self.keys.get(name),
            self.contents.get(name),
            name in self._pending,
            None if problem is None else str(problem),
        )

    def _forget(self, name: str) -> None:
        self.keys.pop(name, None)
        self.blocked.pop(name, None)
        self._pending.discard(name)
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
        # decide: one blocked blocks this port (the first by name names the cause), one
        # without a package makes it wait.
        keys, pending, blocked, built = self.keys, self._pending, self.blocked, self.contents
        cause = None
        waits = False
        for edge in graph.build_edges(name, self.on_seed):
            dep = edge.target
            if dep in blocked or (dep not in keys and dep not in pending):
                if cause is None or dep < cause:
                    cause = dep
            elif dep not in built:
                waits = True
        if cause is not None:
            blocked[name] = self._blocked_by(name, cause)
            return
        if waits:
            pending.add(name)
            return
        sources = [s.sha256 for s in recipe.sources if s.url is not None and s.sha256]
        pairs = []
        for dep in self.build_root(graph, name):
            content = built.get(dep)
            if content is None:
                # Only above a port that lost its package in this very walk, whose
                # dependents' states are stale until its sweep makes them all pending.
                pending.add(name)
                return
            pairs.append((dep, content))
        key = _key(self._pack, tree_id, sources, graph.arch, self.toolchain, pairs)
        keys[name] = key
        content = contents.get(key)
        if content is None:
            self.unbuilt.add(name)
        else:
            built[name] = content

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

    def _built_on(self, graph: Graph, name: str) -> Iterable[str]:
        """The ports whose build root has ``name`` as a direct dependency (on a toolchain
        stage, a bootstrap dependency is none)."""
        if self.on_seed:
            return graph.dependents(name)
        return (
            d
            for d in graph.dependents(name)
            if any(e.target == name for e in graph.build_edges(d, False))
        )

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


def _always(name: str) -> bool:
    return True


def _runtime_dependents(graph: Graph, name: str) -> Iterator[str]:
    for dependent in graph.dependents(name):
        if any(e.target == name and e.kind is DepKind.RUNTIME for e in graph.edges(dependent)):
            yield dependent


def _closure(names: Iterable[str], step: Callable[[str], Iterable[str]]) -> set[str]:
    """Everything reachable from ``names`` by ``step``, ``names`` included."""
    seen: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name not in seen:
            seen.add(name)
            stack.extend(step(name))
    return seen
