"""Which package satisfies a dependency: the one rule the builder and the installer share.

The graph (``portsd.core.graph``) resolves every dependency of a recipe to the port whose
package goes into the build root, and so into the build key; the install resolver
(``portsd.core.resolve``) and the transaction's checks (``portsd.client.relations``)
resolve the same dependencies against packages. If they chose differently, a client would
install another package than the one the build was keyed against. So both ask here:

1. The package of that exact name, if it satisfies the constraint.
2. Else the first package, by name, whose ``provides`` satisfies it.

A package *offers* a version for a name: its own full version (``version-release``) for
its own name, the version of its ``provides`` entry for a provided name. A constraint is
checked with vercmp against what is offered. An unversioned ``provides`` (``sh``) offers
no version: it satisfies an unconstrained need only (pacman's rule: a package that does
not say which ``sh`` it is cannot promise ``sh>=1``). Its own name comes first: a package
``foo`` with a ``provides`` entry ``foo=2`` still offers its own version for ``foo``.

Where the builder and the installer used to differ, this module takes the installer's
reading: a ``provides`` entry with an operator other than ``=`` (``sh>=1``, which recipes
reject but an index or a package file could carry) offers no version, since it names no
version the package is; the builder's old reading took ``1`` as the version offered.

Pure functions over names, ``Dependency`` values and ``PackageMeta``; the callers keep
their own lookup tables (the graph updates its table incrementally, the installer builds
one per index).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from portsd.core.metadata import PackageMeta
from portsd.core.recipe import Dependency
from portsd.core.version import ConstraintOp


def offered_version(
    name: str, full_version: str, provides: Iterable[Dependency], wanted: str
) -> str | None:
    """The version package ``name`` (at ``full_version``, with ``provides``) offers for
    ``wanted``: its full version, a ``provides`` entry's version, ``""`` for an entry that
    names no version, or None when it offers nothing by that name."""
    if wanted == name:
        return full_version
    for entry in provides:
        if entry.name == wanted:
            return entry.version or "" if entry.op in (None, ConstraintOp.EQ) else ""
    return None


def meets(offered: str | None, dep: Dependency) -> bool:
    """Whether a package offering ``offered`` for ``dep.name`` satisfies ``dep`` (for a
    conflict entry: is matched by it)."""
    if offered is None:
        return False
    return dep.op is None or (bool(offered) and dep.accepts(offered))


def package_meets(package: PackageMeta, dep: Dependency | str) -> bool:
    """Whether ``package`` satisfies ``dep`` (parsed if a string). An unreadable
    dependency or ``provides`` entry raises ValueError."""
    wanted = dep if isinstance(dep, Dependency) else Dependency.parse(dep)
    provides = map(Dependency.parse, package.provides)
    return meets(offered_version(package.name, package.full_version, provides, wanted.name), wanted)


def choose_provider(
    dep: Dependency,
    exact: bool,
    providers: Iterable[str],
    offered: Callable[[str], str | None],
) -> str | None:
    """The package that satisfies ``dep``, or None.

    ``exact`` says whether a package called ``dep.name`` is among those to choose from;
    ``providers`` are the names of the packages with a ``provides`` entry for ``dep.name``,
    sorted (the exact name may be among them: it is skipped); ``offered(package)`` is the
    version ``package`` offers for ``dep.name`` (``offered_version``).
    """
    if exact and meets(offered(dep.name), dep):
        return dep.name
    for candidate in providers:
        if candidate != dep.name and meets(offered(candidate), dep):
            return candidate
    return None
