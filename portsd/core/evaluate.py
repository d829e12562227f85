"""Evaluating a ports tree: its dependency graph and build keys, commit after commit.

Pure: takes listings (port name -> the id its key covers: its directory's tree id, or for
a port with ``path`` sources the combined id of ``Tree.inputs()``) and recipes, returns
values. The first evaluation of a tree builds everything; each next commit's evaluation is
derived from the previous one and the ports whose ids changed (``Graph.updated``
re-resolves only what those changes can affect, ``KeySet.compute`` re-examines only their
dependents whose inputs differ), and gives exactly the keys a full evaluation would.

Keys contain the content ids of the dependencies' packages (``Contents``), so the same
commit is advanced again each time packages appear: the ports waiting on them get keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from portsd.core.graph import Graph, PortChange
from portsd.core.keys import Contents, KeySet
from portsd.core.recipe import Recipe
from portsd.core.toolchain import Stages, ToolchainSpec, compute_stages
from portsd.errors import RecipeError

SAME = "same"  # ``advance``: the toolchain spec did not change


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One commit's ports tree evaluated for one architecture: its graph, and the stages of
    its toolchain with their keys (``keys``: the current stage's; with no toolchain
    declared, the one stage on the seed).

    ``changed`` holds the ports whose ids differ from the evaluation this one was advanced
    from (empty for a full evaluation).
    """

    listing: Mapping[str, str]
    graph: Graph
    stages: Stages
    seed: str
    changed: frozenset[str] = frozenset()

    @property
    def keys(self) -> KeySet:
        return self.stages.current.keys

    @classmethod
    def full(
        cls,
        listing: Mapping[str, str],
        ports: Mapping[str, Recipe | RecipeError],
        arch: str,
        seed: str,
        contents: Contents,
        toolchain: ToolchainSpec | None = None,
    ) -> Evaluation:
        """Evaluate a whole tree: ``ports`` maps every name of ``listing`` to its parse;
        ``seed`` is the content id of the bootstrap seed every build stands on;
        ``contents`` the content ids of the packages built so far, by key; ``toolchain``
        what the tree's ``toolchain.toml`` declares (None: no file, the seed alone)."""
        if ports.keys() != listing.keys():
            raise ValueError("every port of the listing needs its recipe or error, and no others")
        graph = Graph.build(ports, arch)
        stages = compute_stages(graph, listing, seed, toolchain, contents)
        return cls(listing, graph, stages, seed)

    def advance(
        self,
        listing: Mapping[str, str],
        changes: Mapping[str, PortChange],
        contents: Contents,
        toolchain: ToolchainSpec | None | str = SAME,
    ) -> Evaluation:
        """The evaluation of the next commit, or of the same one (no ``changes``) now that
        more packages are built: ``contents`` must hold every content id it held before;
        ``toolchain``: the next commit's spec, if it changed.

        ``changes`` maps every port whose id differs between ``self.listing`` and
        ``listing`` (added, edited or removed) to its new recipe, its ``RecipeError``, or
        None when it is gone; ``changes_between`` computes the names when no cheaper
        source (a git diff, ``Tree.changed_ports``) is at hand. Ports not in ``changes``
        must keep their ids.
        """
        for name, change in changes.items():
            if (change is None) != (name not in listing):
                state = "removed" if change is None else "given a recipe"
                raise ValueError(
                    f"{name}: {state} but {'still' if change is None else 'not'} in the new listing"
                )
        spec = self.stages.spec if isinstance(toolchain, str) else toolchain
        previous: Stages | None = self.stages if spec == self.stages.spec else None
        if not changes and previous is not None:
            if self.stages.converged and not any(
                contents.get(self.keys.keys[name]) for name in self.keys.unbuilt
            ):
                return Evaluation(listing, self.graph, self.stages, self.seed)
            stages = compute_stages(self.graph, listing, self.seed, spec, contents, previous)
            return Evaluation(listing, self.graph, stages, self.seed)
        graph, affected = self.graph.updated(changes)
        stages = compute_stages(graph, listing, self.seed, spec, contents, previous, affected)
        return Evaluation(listing, graph, stages, self.seed, frozenset(changes))


def changes_between(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, str | None]:
    """Ports whose tree ids differ: name -> new tree id, or None if removed. O(ports)."""
    changes: dict[str, str | None] = {
        name: tree_id for name, tree_id in new.items() if old.get(name) != tree_id
    }
    changes.update((name, None) for name in old.keys() - new.keys())
    return changes
