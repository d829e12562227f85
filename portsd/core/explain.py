"""Why a port must be (re)built: the answer of ``ports why`` and of the status page's plan.

Pure: it compares two evaluations of the tree (an earlier revision and the current one)
and is told, for each port, the commits that touched its directory in between. A port's
key changes exactly when its own directory changed, when one of its dependencies now
resolves to another port, or when the content of something in its build root changed; the
explanation names each root cause and the dependency edges through which it reaches the
port. A dependency rebuilt with a new key but identical content changes nothing above it:
the explanation says where such a cascade was cut off. A port whose key waits for a
dependency's package says which.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass

from portsd.core.graph import Edge, Graph
from portsd.core.keys import KeySet


@dataclass(frozen=True, slots=True)
class Touch:
    """One commit that changed files of a port's directory."""

    commit: str
    summary: str
    files: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Evaluated:
    """One revision's view: its graph, its keys and each port's tree id."""

    revision: str
    graph: Graph
    keys: KeySet
    tree_ids: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Cause:
    """A root cause reaching ``port`` from ``origin`` through ``path`` (edges from port down)."""

    origin: str
    what: str
    touches: tuple[Touch, ...]
    path: tuple[Edge, ...]


@dataclass(frozen=True, slots=True)
class Explanation:
    port: str
    key: str | None
    old_key: str | None
    present: bool
    causes: tuple[Cause, ...]
    blocked: str | None = None
    compared: bool = True  # False: no earlier revision to compare with
    waits_for: str | None = None  # pending: the build whose package its key needs
    cut_off: tuple[str, ...] = ()  # dependencies rebuilt identical: the cascade stopped
    stage_one_only: bool = False  # left out on the fixed point: only stage 1 needs it

    def lines(self) -> list[str]:
        """Human-readable lines, the first a verdict."""
        if self.blocked is not None:
            return [f"{self.port} cannot be built: {self.blocked}"]
        if self.waits_for is not None:
            return [
                f"{self.port} is pending: its key needs the package of {self.waits_for}, "
                f"and it is rebuilt only if that comes out different"
            ]
        assert self.key is not None
        cut = [f"  cut off: {name} rebuilt identical" for name in self.cut_off]
        short = self.key[:12]
        if self.present:
            lines = [f"{self.port} is up to date: key {short} is in the repository"]
        elif self.stage_one_only:
            lines = [
                f"{self.port} is not built for the tree (key {short}): only stage 1 of the"
                f" toolchain needs it (bootstrap-depends); `ports build {self.port}` builds it"
            ]
        elif not self.compared:
            lines = [f"{self.port} must be built: the repository has no package for key {short}"]
        elif self.old_key is None:
            lines = [f"{self.port} must be built: it is new (key {short})"]
        elif self.old_key == self.key:
            lines = [
                f"{self.port} must be built: its inputs did not change (key {short}), "
                "but the repository has no package for that key"
            ]
        else:
            lines = [f"{self.port} must be rebuilt: key {self.old_key[:12]} -> {short}"]
        lines += cut
        for cause in self.causes:
            lines.append(f"  {cause.what}")
            for touch in cause.touches:
                files = ", ".join(touch.files)
                lines.append(f"    {touch.commit[:10]} {touch.summary} ({files})")
            if cause.path:
                lines.append(f"    reaches {self.port} through {chain(self.port, cause.path)}")
        return lines


def explain(
    port: str,
    old: Evaluated | None,
    new: Evaluated,
    touches: Mapping[str, Sequence[Touch]],
    present: Container[str],
    stage_one_only: Container[str] = (),
) -> Explanation:
    """Explain ``port``'s state at ``new`` relative to ``old`` (None: nothing to compare);
    ``stage_one_only``: the ports the plan leaves out on the fixed point."""
    key = new.keys.key(port)
    old_key = old.keys.key(port) if old else None
    blocked = new.keys.blocked.get(port)
    if key is None:
        waits = new.keys.pending.get(port)
        if waits is not None:
            return Explanation(port, None, old_key, False, (), waits_for=waits)
        reason = str(blocked).splitlines()[0] if blocked else "it is not available for this arch"
        return Explanation(port, None, old_key, False, (), blocked=reason)
    causes: list[Cause] = []
    cut_off: list[str] = []
    if old is not None:
        paths = _paths_down(new.graph, port)
        if old_key != key:
            for origin, path in paths.items():
                what = _own_change(origin, old, new)
                if what is not None:
                    causes.append(Cause(origin, what, tuple(touches.get(origin, ())), path))
        cut_off = [name for name in sorted(paths) if name != port and _identical(name, old, new)]
    return Explanation(
        port,
        key,
        old_key,
        key in present,
        tuple(causes),
        compared=old is not None,
        cut_off=tuple(cut_off),
        stage_one_only=port in stage_one_only,
    )


def _identical(name: str, old: Evaluated, new: Evaluated) -> bool:
    """Whether ``name`` was rebuilt (a new key) and came out with the content it had."""
    before, after = old.keys.key(name), new.keys.key(name)
    content = new.keys.contents.get(name)
    return before != after and content is not None and old.keys.contents.get(name) == content


def _own_change(name: str, old: Evaluated, new: Evaluated) -> str | None:
    """What changed in ``name`` itself between the two revisions, if anything."""
    before = old.tree_ids.get(name)
    if before is None:
        return f"{name} was added in {new.revision[:10]}"
    if before != new.tree_ids.get(name):
        return f"ports/{name} changed since {old.revision[:10]}"
    old_edges = {(e.kind, str(e.dependency)): e.target for e in old.graph.edges(name)}
    moved = []
    for edge in new.graph.edges(name):
        was = old_edges.get((edge.kind, str(edge.dependency)), edge.target)
        if was != edge.target:
            moved.append(f"'{edge.dependency}' now resolves to {edge.target} (was {was})")
    if moved:
        return f"{name}: " + "; ".join(moved)
    return None


def _paths_down(graph: Graph, port: str) -> dict[str, tuple[Edge, ...]]:
    """The shortest dependency path from ``port`` to everything its build involves."""
    paths: dict[str, tuple[Edge, ...]] = {port: ()}
    queue = deque([port])
    while queue:
        name = queue.popleft()
        for edge in graph.edges(name):
            if edge.target not in paths:
                paths[edge.target] = (*paths[name], edge)
                queue.append(edge.target)
    return paths


def chain(port: str, path: Sequence[Edge]) -> str:
    """``base -(depends)-> mid -(build-depends)-> port``: each arrow reads "is a ... of"."""
    nodes = [port, *(edge.target for edge in path)]
    text = nodes[-1]
    for index in range(len(path) - 1, -1, -1):
        text += f" -({path[index].kind})-> {nodes[index]}"
    return text
