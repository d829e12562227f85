"""Evaluating a ports tree: its dependency graph and build keys, commit after commit.

Pure: takes listings (port name -> the id its key covers: its directory's tree id, or for
a port with ``path`` sources the combined id of ``Tree.inputs()``) and recipes, returns
values. The first evaluation of a tree builds everything; each next commit's evaluation is
derived from the previous one and the ports whose ids changed (``Graph.updated``
re-resolves only what those changes can affect, ``KeySet.compute`` recomputes only their
reverse closure), and gives exactly the keys a full evaluation would.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from portsd.core.graph import Graph, PortChange
from portsd.core.keys import KeySet
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
    ) -> Evaluation:
        """Evaluate a whole tree: ``ports`` maps every name of ``listing`` to its parse;
        ``toolchain`` is the content id of what every build stands on (the seed)."""
        if ports.keys() != listing.keys():
            raise ValueError("every port of the listing needs its recipe or error, and no others")
        graph = Graph.build(ports, arch)
        return cls(listing, graph, KeySet.compute(graph, listing, toolchain))

    def advance(self, listing: Mapping[str, str], changes: Mapping[str, PortChange]) -> Evaluation:
        """The evaluation of the next commit.

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
        if not changes:
            return Evaluation(listing, self.graph, self.keys)
        graph, affected = self.graph.updated(changes)
        keys = KeySet.compute(
            graph, listing, self.keys.toolchain, previous=self.keys, affected=affected
        )
        return Evaluation(listing, graph, keys, frozenset(changes))


def changes_between(old: Mapping[str, str], new: Mapping[str, str]) -> dict[str, str | None]:
    """Ports whose tree ids differ: name -> new tree id, or None if removed. O(ports)."""
    changes: dict[str, str | None] = {
        name: tree_id for name, tree_id in new.items() if old.get(name) != tree_id
    }
    changes.update((name, None) for name in old.keys() - new.keys())
    return changes
