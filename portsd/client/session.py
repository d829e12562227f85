"""What the client commands do to a root: open the caches and the ports checkout, resolve,
obtain the packages, and commit one transaction.

    with Installed.open(root) as installed:        # the lock, and a crash recovered
        sources = open_sources(settings, installed.db, reporter)
        result = install(installed, sources, ["curl"], reporter)

Where packages come from: with a ports checkout configured (``tree``), the checkout says
which packages exist and which build key each would have, and every key is then obtained
(``portsd.client.obtain``): from a cache that has that very key, else by building it. With
no checkout, the caches' verified indexes are the catalogue. ``source = always`` ignores
the caches; ``never`` forbids builds.

A key contains the content ids of its dependencies' packages, which the caches' indexes
and the local store give. A port whose dependency neither has is pending: before
resolving, the dependencies the request waits for are obtained (downloaded by key, or
built here when every cache is down), wave by wave, until every key it needs is known.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import aiohttp

from portsd.build.pipeline import Workspace, seed_of
from portsd.client.db import InstalledPackage, InstallReason
from portsd.client.obtain import Obtainer, ObtainReporter
from portsd.client.progress import Progress
from portsd.client.relations import check_relations
from portsd.client.remote import Caches, SerialBook, open_caches
from portsd.client.seed import take_seed
from portsd.client.settings import ClientSettings, SourcePolicy
from portsd.client.transaction import Installed, TransactionResult
from portsd.config import Config, load_config
from portsd.core.keys import Contents
from portsd.core.metadata import PACKAGE_SUFFIX, PackageMeta
from portsd.core.recipe import Dependency
from portsd.core.resolve import Action, Mode, Resolution, resolve
from portsd.core.toolchain import TOOLCHAIN_FILE
from portsd.errors import (
    BrokenDependencies,
    ConfigError,
    InstallError,
    InvalidTransaction,
    PackageError,
    ResolutionError,
)
from portsd.pkg.discover import browse, trusted_caches
from portsd.pkg.package import read_portinfo
from portsd.pkg.repo import StoredContents
from portsd.pkg.sign import verify_file
from portsd.tree.checkout import Checkout, open_checkout

DISCOVER_SECONDS = 1.5  # how long ``discover = true`` listens for caches before each run


class ClientReporter(ObtainReporter, Protocol):
    """What the commands tell the user about, beyond downloads and builds."""

    def warn(self, text: str) -> None: ...

    def resolved(self, resolution: Resolution) -> None: ...

    def transaction(self) -> Progress: ...


@dataclass(slots=True)
class Sources:
    """Where packages can come from in this run, and what the catalogue offers."""

    settings: ClientSettings
    caches: Caches
    checkout: Checkout | None
    available: dict[str, PackageMeta]
    origin: str  # "the cache", "the ports tree": for resolution errors
    files: dict[str, Path] = field(default_factory=dict)  # build key -> given package file
    failure: str | None = None  # why nothing can be installed (said only if something must)


def open_sources(
    settings: ClientSettings,
    serials: SerialBook,
    reporter: ClientReporter,
    *,
    files_given: bool = False,
) -> Sources:
    """Open the caches (unless every package is built here) and the ports checkout.
    ``files_given``: package files are asked for, which need neither."""
    urls = list(settings.caches)
    if settings.discover and settings.source is not SourcePolicy.ALWAYS:
        urls += _discovered(settings, urls)
    if urls and settings.source is not SourcePolicy.ALWAYS:
        if not settings.trusted_keys:
            raise ConfigError("caches are configured but no trusted key (trusted-keys, --key)")
        caches = asyncio.run(_open_caches(settings, urls, serials))
        for url, problem in caches.problems:
            reporter.warn(f"not using {url}: {problem}")
    else:
        caches = Caches(usable=(), problems=())
    checkout = None
    if settings.tree is not None:
        config = store_config(settings)
        # the caches' keys stand on their seed: take it rather than make one (said so)
        take_seed(
            [cache.url for cache in caches.usable],
            config.seed,
            settings.arch,
            settings.trusted_keys,
            reporter.warn,
            reporter.downloads,
        )
        seed = seed_of(config, reporter.warn)
        contents = _Contents(caches, store_of(settings).contents)
        checkout = open_checkout(
            settings.tree,
            None,
            settings.cache / "recipes",
            settings.arch,
            seed.content_id,
            contents,
        )
        available = _buildable(checkout, settings.arch)
        origin = f"the ports tree {settings.tree}"
    elif settings.source is SourcePolicy.ALWAYS:
        raise ConfigError("source = always needs a ports tree to build from (tree, or --tree)")
    else:
        available = {entry.meta.name: entry.meta for entry in caches.entries()}
        origin = "the cache" if len(caches.usable) <= 1 else "the caches"
        if not urls and not files_given:
            raise ConfigError(
                "no caches configured, and no ports tree: nothing to install from "
                "(--cache URL --key KEY, which the root remembers; or caches, tree in the config)"
            )
    sources = Sources(settings, caches, checkout, available, origin)
    if checkout is None and not caches.usable:  # fail closed: nothing of a bad cache is used
        problems = "".join(f"\n{url}: {problem}" for url, problem in caches.problems)
        sources.failure = f"no cache can be used, and no ports tree is configured{problems}"
    return sources


class _Contents:
    """Content ids by key: the caches' verified indexes, then the local store."""

    def __init__(self, caches: Caches, store: StoredContents) -> None:
        self.caches = caches
        self.store = store

    def get(self, key: str, /) -> str | None:
        return self.caches.get(key) or self.store.get(key)


def _buildable(checkout: Checkout, arch: str) -> dict[str, PackageMeta]:
    """The ports of the checkout whose keys are known (no broken or pending ones); while
    the tree's toolchain is short of its fixed point here, only the toolchain's."""
    graph, keys = checkout.evaluation.graph, checkout.evaluation.keys.keys
    scope = checkout.evaluation.stages.scope(None)
    available: dict[str, PackageMeta] = {}
    for name, key in keys.items():
        if scope is not None and name not in scope:
            continue
        recipe = graph.recipe(name)
        if recipe is not None:
            available[name] = PackageMeta.of(recipe, key, arch)
    return available


def _settle(
    sources: Sources, requests: Sequence[str], obtainer: Obtainer, contents: Contents
) -> None:
    """Obtain what the ports ``requests`` name (and what they need) wait for, wave by wave,
    until none of them is pending: then their keys are known and they can be resolved.
    The tree's toolchain comes first, stage by stage, where no cache has its packages."""
    checkout = sources.checkout
    if checkout is None:
        return
    graph = checkout.evaluation.graph
    obtained: set[str] = set()
    while not checkout.evaluation.stages.converged:
        stages = checkout.evaluation.stages
        keys = stages.current.keys
        # the stage's toolchain ports no cache has, or what they wait for (gmp, stage 1's
        # cross compiler): built here, then the next stage is keyed on their content
        waits = {keys.pending[n] for n in stages.members if n in keys.pending}
        waits.update(n for n in stages.members if n in keys.unbuilt)
        if not waits or obtained.issuperset(keys.keys[n] for n in waits):
            problems = [str(keys.blocked[n]) for n in sorted(stages.members) if n in keys.blocked]
            raise InstallError(
                f"the tree's toolchain ({TOOLCHAIN_FILE}) cannot be built: "
                + (problems[0].splitlines()[0] if problems else stages.describe())
            )
        checkout = _obtain(obtainer, checkout, sorted(waits), obtained, contents)
    asked = [n for n in (Dependency.parse(r).name for r in requests) if n in graph]
    closure = graph.runtime_closure(
        graph.dependency_closure(asked, checkout.evaluation.keys.on_seed)
    )
    while checkout.evaluation.stages.converged:
        keys = checkout.evaluation.keys
        waits = {keys.pending[n] for n in closure if n in keys.pending}
        if not waits or obtained.issuperset(keys.keys[n] for n in waits):
            break  # nothing waits, or on nothing new: resolving says what is missing
        checkout = _obtain(obtainer, checkout, sorted(waits), obtained, contents)
    sources.checkout = checkout
    sources.available = _buildable(checkout, graph.arch)


def _obtain(
    obtainer: Obtainer,
    checkout: Checkout,
    names: Sequence[str],
    obtained: set[str],
    contents: Contents,
) -> Checkout:
    """Obtain the packages of ``names`` (keyed ports of the checkout's current stage) and
    return the checkout evaluated again with their content known."""
    keys = checkout.evaluation.keys
    graph = checkout.evaluation.graph
    obtained.update(keys.keys[n] for n in names)
    obtainer.checkout = checkout  # it builds the keys of this evaluation
    recipes = [(name, graph.recipe(name)) for name in names]
    obtainer.obtain(
        [
            PackageMeta.of(recipe, keys.keys[name], graph.arch)
            for name, recipe in recipes
            if recipe is not None
        ]
    )
    evaluation = checkout.evaluation.advance(checkout.evaluation.listing, {}, contents)
    return replace(checkout, evaluation=evaluation)


async def _open_caches(
    settings: ClientSettings, urls: Sequence[str], serials: SerialBook
) -> Caches:
    async with aiohttp.ClientSession() as session:
        return await open_caches(
            session,
            urls,
            settings.arch,
            settings.trusted_keys,
            serials,
            now=int(time.time()),
            read_within=settings.index_timeout,
        )


def _discovered(settings: ClientSettings, known: Sequence[str]) -> list[str]:
    """URLs of caches on the LAN whose advertised key this client trusts (a hint only:
    their indexes are verified against the configured keys like any other)."""
    found = trusted_caches(browse(DISCOVER_SECONDS), settings.trusted_keys)
    return [j.url for j in found if j.trusted and j.url not in known]


def add_package_files(sources: Sources, requests: Sequence[str], *, unsigned: bool) -> list[str]:
    """Turn requests naming package files (``./x.pkg.tar.zst``) into names, offering those
    files first. Each file's ``.minisig`` must verify with a trusted key unless ``unsigned``."""
    names = []
    for request in requests:
        if not request.endswith(PACKAGE_SUFFIX):
            names.append(request)
            continue
        path = Path(request).absolute()
        if not unsigned:
            signature = Path(str(path) + ".minisig")
            try:
                text = signature.read_text()
            except OSError as error:
                raise PackageError(
                    str(path), f"no signature to check ({signature}: {error.strerror})"
                ) from None
            verify_file(path, text, sources.settings.trusted_keys)
        info = read_portinfo(path)
        meta = info.meta
        if meta.arch not in (sources.settings.arch, "any"):
            raise PackageError(str(path), f"is for {meta.arch}, not {sources.settings.arch}")
        sources.available[meta.name] = meta
        sources.files[meta.build_key] = path
        names.append(meta.name)
    return names


def store_of(settings: ClientSettings) -> Workspace:
    """The client's private repository and build space, under the cache directory."""
    return Workspace.open(store_config(settings))


def store_config(settings: ClientSettings) -> Config:
    """The builder's settings for source builds: state in the client's cache."""
    return load_config(settings.cache, None, {"arch": settings.arch})


def install(
    installed: Installed,
    sources: Sources,
    requests: Sequence[str],
    reporter: ClientReporter,
    *,
    mode: Mode = Mode.INSTALL,
    force: bool = False,
) -> TransactionResult | None:
    """Install (or upgrade) ``requests`` and what they need, all or nothing; None when the
    system already has everything asked for."""
    obtainer = None
    evaluation = sources.checkout.evaluation if sources.checkout is not None else None
    if evaluation is not None and (evaluation.keys.pending or not evaluation.stages.converged):
        obtainer = _obtainer(sources, reporter)
        _settle(
            sources, requests, obtainer, _Contents(sources.caches, StoredContents(obtainer.repo))
        )
        obtainer.checkout = sources.checkout
    resolution = plan(installed, sources, requests, mode)
    if not resolution.steps:
        _mark_explicit(installed, requests)
        return None
    if sources.failure and not sources.files:
        raise InstallError(sources.failure)
    reporter.resolved(resolution)
    obtainer = obtainer or _obtainer(sources, reporter)
    packages = obtainer.obtain([step.package for step in resolution])
    tx = installed.transaction()
    for step in resolution:
        got = packages[step.package.build_key]
        if step.action is Action.INSTALL:
            reason = InstallReason.EXPLICIT if step.requested else InstallReason.DEPENDENCY
            tx.install(got.path, got.info, reason, origin=got.origin)
        else:
            tx.upgrade(got.path, got.info, origin=got.origin)
    result = tx.commit(reporter.transaction(), force=force)
    _mark_explicit(installed, requests)
    return result


def reinstall(
    installed: Installed, sources: Sources, names: Sequence[str], reporter: ClientReporter
) -> TransactionResult:
    """Install ``names`` again, every file rewritten: what repairs a package whose files a
    disk error or a hand edit damaged. Each comes from the catalogue (the same build when
    it still offers that one); a package only there in another build is upgraded."""
    wanted = []
    for name in names:
        if installed.db.installed(name) is None:
            raise InvalidTransaction(name, "is not installed")
        meta = sources.available.get(name)
        if meta is None:
            raise InstallError(sources.failure or f"{name} is not offered by {sources.origin}")
        wanted.append(meta)
    obtainer = _obtainer(sources, reporter)
    packages = obtainer.obtain(wanted)
    tx = installed.transaction()
    for meta in wanted:
        got = packages[meta.build_key]
        tx.upgrade(got.path, got.info, origin=got.origin, reinstall=True)
    return tx.commit(reporter.transaction())


def _obtainer(sources: Sources, reporter: ClientReporter) -> Obtainer:
    return Obtainer(
        sources.settings,
        store_config(sources.settings),
        sources.caches,
        sources.checkout,
        reporter,
        sources.files,
    )


def plan(installed: Installed, sources: Sources, requests: Sequence[str], mode: Mode) -> Resolution:
    """What installing (or upgrading) ``requests`` would do; changes nothing (a dry run)."""
    current = {p.meta.name: p.meta for p in installed.db.packages()}
    try:
        return resolve(sources.available, current, requests, mode, origin=sources.origin)
    except ResolutionError:
        if sources.failure:
            raise InstallError(sources.failure) from None
        raise


def removal(installed: Installed, names: Sequence[str], *, force: bool) -> list[InstalledPackage]:
    """What removing ``names`` would remove, refused as ``remove`` would refuse it; changes
    nothing (a dry run)."""
    if not names:
        raise InstallError("name at least one package to remove")
    packages = []
    for name in names:
        package = installed.db.installed(name)
        if package is None:
            raise InvalidTransaction(name, "is not installed")
        packages.append(package)
    if not force:
        try:
            check_relations(installed.db.packages(), [], packages)
        except BrokenDependencies as error:
            raise _removal_hint(error) from None
    return packages


def _mark_explicit(installed: Installed, requests: Sequence[str]) -> None:
    """A package asked for by name is no longer only a dependency (kept on its own)."""
    for text in requests:
        name = Dependency.parse(text).name
        package = installed.db.installed(name)
        if package is not None and package.reason is not InstallReason.EXPLICIT:
            installed.db.set_reason(name, InstallReason.EXPLICIT)


def remove(
    installed: Installed, names: Sequence[str], reporter: ClientReporter, *, force: bool = False
) -> TransactionResult:
    """Remove ``names``: refused (BrokenDependencies) if an installed package needs one,
    unless ``force``."""
    if not names:
        raise InstallError("name at least one package to remove")
    tx = installed.transaction()
    for name in names:
        tx.remove(name)
    try:
        return tx.commit(reporter.transaction(), force=force)
    except BrokenDependencies as error:
        raise _removal_hint(error) from None


def _removal_hint(error: BrokenDependencies) -> BrokenDependencies:
    """A removal that breaks dependents is fixed by removing them too (or forcing it)."""
    dependents = sorted({package for package, _ in error.unmet})
    error.hint = f"remove {', '.join(dependents)} too, or give --force to break them"
    return error
