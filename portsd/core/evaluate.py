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
from portsd.errors import RecipeError


@dataclass(frozen=True, slots=True)
class Evaluation:
    """One commit's ports tree evaluated for one architecture.

    ``changed`` holds the ports whose ids differ from the evaluation this one was advanced
    from (empty for a full evaluation).
    """

    listing: Mapping[str, str]
    graph: Graph
    keys: KeySet
    changed: frozenset[str] = frozenset()

    @classmethod
    def full(
        cls,
        listing: Mapping[str, str],
        ports: Mapping[str, Recipe | RecipeError],
        arch: str,
        toolchain: str,
        contents: Contents,
    ) -> Evaluation:
        """Evaluate a whole tree: ``ports`` maps every name of ``listing`` to its parse;
        ``toolchain`` is the content id of what every build stands on (the seed);
        ``contents`` the content ids of the packages built so far, by key."""
        if ports.keys() != listing.keys():
            raise ValueError("every port of the listing needs its recipe or error, and no others")
        graph = Graph.build(ports, arch)
        return cls(listing, graph, KeySet.compute(graph, listing, toolchain, contents))

    def advance(
        self,
        listing: Mapping[str, str],
        changes: Mapping[str, PortChange],
        contents: Contents,
    ) -> Evaluation:
        """The evaluation of the next commit, or of the same one (no ``changes``) now that
        more packages are built: ``contents`` must hold every content id it held before.

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
        keys = self.keys
        if not changes:
            if not any(contents.get(keys.keys[name]) for name in keys.unbuilt):
                return Evaluation(listing, self.graph, keys)
            keys = KeySet.compute(self.graph, listing, keys.toolchain, contents, previous=keys)
            return Evaluation(listing, self.graph, keys)
        graph, affected = self.graph.updated(changes)
        keys = KeySet.compute(
            graph, listing, keys.toolchain, contents, previous=keys, affected=affected
        )
        return Evaluation(listing, graph, keys, frozenset(changes))


def changes_between(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, str | None]:
    """Ports whose tree ids differ: name -> new tree id, or None if removed. O(ports)."""
    changes: dict[str, str | None] = {
        name: tree_id for name, tree_id in new.items() if old.get(name) != tree_id
    }
    changes.update((name, None) for name in old.keys() - new.keys())
    return changes
