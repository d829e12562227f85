"""What to install: the runtime-dependency closure of a request, in dependency order.

Pure: values in, values out. The available packages (the facts of a signed index's
entries, or of what recipes would build with their build keys) and the installed ones are
all ``PackageMeta``; the answer is a ``Resolution`` listing what to install or replace,
each with why it is there.

A dependency (or a requested name) is resolved by the rule the builder uses too (see
``portsd.core.provider``), first against the system as it will be after the transaction,
then against what is available:

1. a package that will be on the system (installed and kept, or already chosen) with that
   exact name, if it satisfies the constraint, else the first such package, by name,
   whose ``provides`` satisfies it: an installed package that satisfies is kept;
2. else the available package with that exact name, if it satisfies, else the first
   available package, by name, whose ``provides`` satisfies it. It is chosen, and its
   own dependencies are resolved in turn; if a package of its name is installed, it
   replaces that one.

An unversioned ``provides`` meets no versioned constraint. In ``upgrade`` mode every
package of the request's closure, installed ones included, is replaced by the available
package of its name whenever their build keys differ (a rebuild with the same version
counts) and the available one still satisfies what needs it; an upgrade with no names
upgrades everything installed.

The walk is greedy and breadth-first (so each package's reason is its shortest chain from
the request), and the result is then checked as a whole: every request (one met at first
may have been replaced since, for a need found later), every dependency of every chosen
package, and every dependency of a kept package on something replaced, must hold on the
final system, and no two packages on it may conflict (``conflicts`` entries match names
and ``provides`` like dependencies do, in both directions). Anything else raises a
``ResolutionError`` that names the chain of needs. Equal inputs give equal answers,
whatever the order of the mappings. The one lookup table over the available packages
(provided name -> providers) is a ``Catalog``, built once per index; the rest is
proportional to the closure.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from portsd.core.metadata import PackageMeta
from portsd.core.provider import choose_provider, meets, offered_version
from portsd.core.recipe import Dependency
from portsd.core.version import full_version, vercmp
from portsd.errors import ResolutionError


class Mode(StrEnum):
    """What the request asks for."""

    INSTALL = "install"  # what is missing or does not satisfy; installed packages stay
    UPGRADE = "upgrade"  # ... and every package of the closure with a new build key


class Action(StrEnum):
    """What a step does to the system."""

    INSTALL = "install"  # nothing of that name was installed
    UPGRADE = "upgrade"  # replaces an older version
    DOWNGRADE = "downgrade"  # replaces a newer version
    REBUILD = "rebuild"  # replaces the same version, built from other inputs (another key)


@dataclass(frozen=True, slots=True)
class InstallStep:
    """Install ``package`` (replacing ``replaces``, the installed package of its name)."""

    action: Action
    package: PackageMeta
    replaces: PackageMeta | None
    chain: tuple[str, ...]
    """From the request to this package: ``("app",)`` when requested, else
    ``("app", "libfoo", "zlib")``."""

    @property
    def requested(self) -> bool:
        return len(self.chain) == 1

    @property
    def why(self) -> str:
        """``requested``, or the chain of dependencies that pulls it in."""
        return "requested" if self.requested else " -> ".join(self.chain)


@dataclass(frozen=True, slots=True)
class Resolution:
    """The steps, dependencies before what needs them (a dependency cycle, which a ports
    tree cannot have, is cut where the walk entered it); ``satisfied``: requests that the
    system already meets, so they need no step."""

    steps: tuple[InstallStep, ...]
    satisfied: tuple[str, ...] = ()

    def __iter__(self) -> Iterator[InstallStep]:
        return iter(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def names(self) -> tuple[str, ...]:
        return tuple(step.package.name for step in self.steps)


@dataclass(frozen=True, slots=True)
class Catalog:
    """The available packages with their lookup table, built once and shared by every
    resolution against them (an index is fetched once and asked many times).

    ``providers`` maps a name that packages provide to the names of those packages,
    sorted (a package's own name aside).
    """

    packages: Mapping[str, PackageMeta]
    providers: Mapping[str, tuple[str, ...]]

    @classmethod
    def of(cls, packages: Mapping[str, PackageMeta]) -> Catalog:
        """``packages`` (name -> package) and their lookup table: one pass over them."""
        return cls(packages, _providers(packages))


def resolve(
    available: Mapping[str, PackageMeta] | Catalog,
    installed: Mapping[str, PackageMeta],
    request: Sequence[str],
    mode: Mode = Mode.INSTALL,
    *,
    origin: str = "the cache",
) -> Resolution:
    """Resolve ``request`` (names, each optionally constrained: ``zlib>=1.3``).

    ``available`` and ``installed`` map a package name to its package (``available`` may
    come as a ``Catalog``, to build its lookup table once for many resolutions).
    ``origin`` names where the available packages come from, in error messages. Raises
    ``ResolutionError``.
    """
    if isinstance(request, str):
        raise TypeError("request is a sequence of names, not one string")
    catalog = available if isinstance(available, Catalog) else Catalog.of(available)
    names = list(request) or (sorted(installed) if mode is Mode.UPGRADE else [])
    return _Resolver(catalog, installed, mode, origin).run(list(dict.fromkeys(names)))


# -- the walk ------------------------------------------------------------------------------


class _Resolver:
    """One resolution's working state (the providers indexes are built once per call)."""

    def __init__(
        self,
        catalog: Catalog,
        installed: Mapping[str, PackageMeta],
        mode: Mode,
        origin: str,
    ) -> None:
        self.available = catalog.packages
        self.installed = installed
        self.mode = mode
        self.origin = origin
        self.parsed: dict[str, Dependency] = {}
        self.available_providers = catalog.providers
        self.installed_providers = _providers(installed)
        self.chosen: dict[str, PackageMeta] = {}  # name -> the available package chosen (in order)
        self.chosen_providers: dict[str, list[str]] = {}
        self.chosen_for: dict[str, tuple[tuple[str, ...], Dependency]] = {}  # needer, need
        self.asked: dict[str, str] = {}  # requested name -> the request's text
        self.chains: dict[str, tuple[str, ...]] = {}  # name -> why it is walked
        self.queue: deque[str] = deque()

    def run(self, request: list[str]) -> Resolution:
        wanted: dict[str, tuple[Dependency, str]] = {}  # text -> (parsed, what it resolved to)
        for text in request:
            try:
                dep = Dependency.parse(text)
            except ValueError:
                raise ResolutionError(
                    self.mode.value, text, (), "is not a package name or name<op>version"
                ) from None
            target = self.resolve(dep, ())
            if target is None:
                raise ResolutionError(self.mode.value, text, (), self.shortfall(dep))
            wanted[text] = (dep, target)
            self.asked.setdefault(target, text)
            self.walk(target, (target,))
        while self.queue:
            self.expand(self.queue.popleft())
        self.verify(wanted)
        # what a request resolved to may have been replaced since, to meet another need
        satisfied = tuple(
            text
            for text, (_, target) in wanted.items()
            if self.mode is Mode.INSTALL and target not in self.chosen
        )
        return Resolution(self.ordered(), satisfied)

    def walk(self, name: str, chain: tuple[str, ...]) -> None:
        """Queue ``name``'s dependencies (chosen packages; any package when upgrading)."""
        if name in self.chains:
            return
        if name in self.chosen or self.mode is Mode.UPGRADE:
            self.chains[name] = chain
            self.queue.append(name)

    def expand(self, name: str) -> None:
        chain = self.chains[name]
        package = self.package(name)
        for text in package.depends:
            dep = self.parse(text)
            target = self.resolve(dep, chain)
            if target is None:
                raise self.error(chain, f"needs {dep}, but {self.shortfall(dep)}")
            self.walk(target, (*chain, target))

    def resolve(self, dep: Dependency, needer: tuple[str, ...]) -> str | None:
        """The name ``dep`` (a need of the end of ``needer``, or a request when it is
        empty) resolves to, choosing an available package if needed."""
        kept = self.on_system(dep)
        if kept is not None:
            if self.mode is Mode.UPGRADE and kept not in self.chosen:
                newer = self.available.get(kept)
                if newer is not None and newer.build_key != self.package(kept).build_key:
                    if self.meets(newer, dep):
                        self.choose(newer, needer, dep)
            return kept
        found = self.first(dep, self.available, self.available_providers)
        if found is None:
            return None
        self.choose(self.available[found], needer, dep)
        return found

    def on_system(self, dep: Dependency) -> str | None:
        """Rule 1: the package on the final system (as known so far) that satisfies ``dep``."""
        name = dep.name
        return choose_provider(
            dep,
            self.current(name) is not None,
            self.system_providers(name),
            lambda provider: self.offered(self.package(provider), name),
        )

    def system_providers(self, name: str) -> Iterator[str]:
        """The packages on the final system that provide ``name``, by name (sorted only
        when asked for: the exact name usually satisfies)."""
        yield from sorted(
            {
                *(p for p in self.installed_providers.get(name, ()) if p not in self.chosen),
                *self.chosen_providers.get(name, ()),
            }
        )

    def first(
        self,
        dep: Dependency,
        packages: Mapping[str, PackageMeta],
        providers: Mapping[str, tuple[str, ...]],
    ) -> str | None:
        """Rule 2 over ``packages``: the exact name if it satisfies, else the first provider."""
        return choose_provider(
            dep,
            dep.name in packages,
            providers.get(dep.name, ()),
            lambda provider: self.offered(packages[provider], dep.name),
        )

    def choose(self, package: PackageMeta, needer: tuple[str, ...], dep: Dependency) -> None:
        self.chosen[package.name] = package
        self.chosen_for[package.name] = (needer, dep)
        if package.name in self.chains:
            # walked already as the installed package it now replaces: walk its own needs
            self.queue.append(package.name)
        for text in package.provides:
            entry = self.parse(text)
            if entry.name != package.name:
                self.chosen_providers.setdefault(entry.name, []).append(package.name)

    def current(self, name: str) -> PackageMeta | None:
        """The package called ``name`` on the final system, as known so far."""
        chosen = self.chosen.get(name)
        return chosen if chosen is not None else self.installed.get(name)

    def package(self, name: str) -> PackageMeta:
        package = self.current(name)
        assert package is not None, name
        return package

    # -- checking the whole -------------------------------------------------------------

    def verify(self, wanted: Mapping[str, tuple[Dependency, str]]) -> None:
        """Every request and every need on the final system holds, and nothing on it
        conflicts."""
        for text, (dep, target) in wanted.items():
            if self.on_system(dep) is not None:
                continue
            # met when asked for, then replaced to meet a need found later
            needer, need = self.chosen_for[target]
            package = self.package(target)
            now = f"{target} would be {full_version(package.version, package.release)}"
            if needer:
                problem = f"{' -> '.join(needer)} needs {need}, so {now}"
            else:
                problem = f"{need} is requested too, so {now}"
            raise ResolutionError(self.mode.value, text, (), problem)
        replaced = [name for name in self.chosen if name in self.installed]
        touched: set[str] = set()
        for name in replaced:
            touched.add(name)
            touched.update(self.provided_names(self.installed[name]))
        for name in self.chosen:
            self.check_needs(name, self.chains[name], None)
        if touched:
            for name in sorted(self.installed):
                if name not in self.chosen:
                    self.check_needs(name, (name,), touched, installed=True)
        self.check_conflicts()

    def check_needs(
        self,
        name: str,
        chain: tuple[str, ...],
        only: set[str] | None,
        *,
        installed: bool = False,
    ) -> None:
        """Every need of ``name`` (or those on names in ``only``) holds on the final system."""
        for text in self.package(name).depends:
            dep = self.parse(text)
            if only is not None and dep.name not in only:
                continue
            if self.on_system(dep) is not None:
                continue
            now = self.current(dep.name)
            found = (
                f"{dep.name} would be {full_version(now.version, now.release)}"
                if now is not None
                else f"nothing would provide {dep.name}"
            )
            if installed:
                culprit = self.replacer(dep.name)
                pulled = self.chains[culprit] if culprit else (name,)
                raise ResolutionError(
                    self.mode.value,
                    self.asked.get(pulled[0], pulled[0]),
                    (),
                    f"installed {name} needs {dep}, but {found}"
                    + (f" ({' -> '.join(pulled)})" if len(pulled) > 1 else ""),
                )
            raise self.error(chain, f"needs {dep}, but {found}")

    def replacer(self, provided: str) -> str | None:
        """The chosen package that replaces the installed one offering ``provided``."""
        for name in self.chosen:
            old = self.installed.get(name)
            if old is not None and provided in self.provided_names(old):
                return name
        return None

    def check_conflicts(self) -> None:
        final: dict[str, PackageMeta] = {
            name: package for name, package in self.installed.items() if name not in self.chosen
        }
        final.update(self.chosen)
        by_provided: dict[str, list[str]] = {}
        for name in sorted(final):
            for provided in self.provided_names(final[name]):
                by_provided.setdefault(provided, []).append(name)
        # Chosen packages against everything; kept packages against the chosen ones only
        # (conflicts among kept packages are the system's, not this transaction's).
        for name in [*self.chosen, *sorted(n for n in final if n not in self.chosen)]:
            package = final[name]
            for text in package.conflicts:
                entry = self.parse(text)
                for other in by_provided.get(entry.name, ()):
                    if other == name or (name not in self.chosen and other not in self.chosen):
                        continue
                    if self.meets(final[other], entry):
                        self.raise_conflict(name, text, other)

    def raise_conflict(self, name: str, entry: str, other: str) -> None:
        def label(who: str) -> str:
            package = self.package(who)
            version = f"{who} {full_version(package.version, package.release)}"
            if who not in self.chosen:
                return f"installed {version}"
            chain = self.chains[who]
            return f"{version} (wanted: {'requested' if len(chain) == 1 else ' -> '.join(chain)})"

        if name in self.chosen:
            raise self.error(
                self.chains[name], f"conflicts with {label(other)} ({name} conflicts: {entry})"
            )
        raise self.error(
            self.chains[other], f"conflicts with {label(name)} ({name} conflicts: {entry})"
        )

    # -- order ----------------------------------------------------------------------------

    def ordered(self) -> tuple[InstallStep, ...]:
        """The chosen packages, each after the chosen packages it depends on."""
        # Each need as the final system meets it, not as it was met while walking: a later
        # choice may replace the package it went to by one that no longer provides it (an
        # upgrade that drops a provides), and another chosen package meets it then.
        edges = {
            name: [
                target
                for text in package.depends
                if (target := self.on_system(self.parse(text))) is not None
            ]
            for name, package in self.chosen.items()
        }
        steps: list[InstallStep] = []
        done: set[str] = set()
        for root in self.chosen:
            if root in done:
                continue
            done.add(root)
            stack = [(root, iter(edges[root]))]
            while stack:
                name, targets = stack[-1]
                for target in targets:
                    if target not in done and target in self.chosen:
                        done.add(target)  # on the stack: a cycle back to it is cut here
                        stack.append((target, iter(edges[target])))
                        break
                else:
                    stack.pop()
                    steps.append(self.step(name))
        return tuple(steps)

    def step(self, name: str) -> InstallStep:
        package = self.chosen[name]
        old = self.installed.get(name)
        if old is None:
            action = Action.INSTALL
        else:
            order = vercmp(
                full_version(package.version, package.release),
                full_version(old.version, old.release),
            )
            action = Action.UPGRADE if order > 0 else Action.DOWNGRADE if order else Action.REBUILD
        return InstallStep(action, package, old, self.chains[name])

    # -- words ----------------------------------------------------------------------------

    def error(self, chain: tuple[str, ...], problem: str) -> ResolutionError:
        return ResolutionError(self.mode.value, self.asked.get(chain[0], chain[0]), chain, problem)

    def shortfall(self, dep: Dependency) -> str:
        """What there is instead of something satisfying ``dep``."""
        offers: list[str] = []
        exact = self.available.get(dep.name)
        if exact is not None:
            offers.append(f"{dep.name} {full_version(exact.version, exact.release)}")
        for provider in self.available_providers.get(dep.name, ()):
            offered = self.offered(self.available[provider], dep.name) or "no version"
            offers.append(f"{provider} provides {dep.name} ({offered})")
        text = (
            f"{self.origin} has {', '.join(offers)}"
            if offers
            else f"{self.origin} has no {dep.name} and nothing that provides it"
        )
        installed = self.installed.get(dep.name)
        if installed is not None:
            text += f" (installed: {full_version(installed.version, installed.release)})"
        return text

    def parse(self, text: str) -> Dependency:
        """A dependency string of a package (valid: ``PackageMeta`` checks them), parsed
        once per resolution."""
        try:
            return self.parsed[text]
        except KeyError:
            dep = self.parsed[text] = Dependency.parse(text)
            return dep

    def offered(self, package: PackageMeta, name: str) -> str | None:
        """The version ``package`` offers for ``name`` ('' for an unversioned provides)."""
        provides = map(self.parse, package.provides)
        return offered_version(package.name, package.full_version, provides, name)

    def meets(self, package: PackageMeta, dep: Dependency) -> bool:
        """Whether ``package`` satisfies ``dep`` (for a conflict entry: matches it)."""
        return meets(self.offered(package, dep.name), dep)

    def provided_names(self, package: PackageMeta) -> set[str]:
        return {package.name, *(self.parse(text).name for text in package.provides)}


def _providers(packages: Mapping[str, PackageMeta]) -> dict[str, tuple[str, ...]]:
    """Provided name -> names of the packages providing it, sorted (own names aside)."""
    providers: dict[str, list[str]] = {}
    for name, package in packages.items():
        for text in package.provides:
            provided = Dependency.parse(text).name
            if provided != name:
                providers.setdefault(provided, []).append(name)
    return {provided: tuple(sorted(names)) for provided, names in providers.items()}
