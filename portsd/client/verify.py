"""``ports verify``: rebuild packages here by their build keys and compare them with what
the caches serve.

Builds are hermetic, so a package built here from the ports checkout's inputs must be
byte-identical to the one a cache serves under the same key. For each name: the cache's
package for the checkout's key is downloaded (size, sha256 and its signature by a trusted
key checked) into ``<cache>/verify/``, never into the client's store, so a package that
disagrees is not installed later; the build root's packages are obtained as for an
install (store, caches, or built); the port is built here from its order, and the two
files are compared. A difference is named by the files whose members differ.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp

from portsd.build.pipeline import Revision
from portsd.client.download import Download, download_all
from portsd.client.obtain import Obtainer, ObtainReporter
from portsd.client.remote import ask_for_key
from portsd.client.session import Sources, store_of
from portsd.core.metadata import PackageMeta
from portsd.core.plan import PlannedBuild
from portsd.errors import ConfigError, InstallError
from portsd.fsio import file_sha256, remove_tree
from portsd.pkg.package import differences, read_portinfo


@dataclass(frozen=True, slots=True)
class Verdict:
    """One package: the cache's and this machine's builds of its key."""

    name: str
    key: str
    served: str  # sha256 of the package the cache serves
    built: str  # sha256 of the package built here
    files: tuple[str, ...] = ()  # the files whose members differ

    @property
    def agrees(self) -> bool:
        return self.served == self.built


def verify(sources: Sources, names: Sequence[str], reporter: ObtainReporter) -> list[Verdict]:
    """Rebuild ``names`` here and compare each with the cache's package of its key."""
    checkout = sources.checkout
    if checkout is None:
        raise ConfigError("ports verify rebuilds from a ports tree: set tree, or --tree")
    if not sources.caches.usable:
        raise ConfigError("ports verify compares with a cache: set caches, or --cache")
    settings = sources.settings
    store = store_of(settings)
    graph, keys = checkout.evaluation.graph, checkout.evaluation.keys
    revision = Revision(checkout.tree, checkout.evaluation, checkout.commit)
    obtainer = Obtainer(settings, store.config, sources.caches, checkout, reporter)
    work = settings.cache / "verify"
    remove_tree(work)
    verdicts = []
    try:
        for name in names:
            recipe = graph.recipe(name)
            key = keys.key(name)
            if recipe is None or key is None:
                raise InstallError(f"{name}: not a port the tree at {settings.tree} can build")
            served = _served(sources, name, key, work / "served")
            root = keys.build_root(graph, name)
            obtainer.obtain([_meta(revision, dep) for dep in root])
            cancel = threading.Event()
            order = store.order(revision, PlannedBuild(name, key, ()), cancel)
            built = store.producer().produce(
                order,
                cancel,
                partial(_keep, into=work / "built"),
                log=store.config.logs / name / f"verify-{key[:12]}.log",
                on_line=partial(reporter.builds.step, name),
            )
            verdict = Verdict(name, key, file_sha256(served), file_sha256(built))
            if not verdict.agrees:
                files = differences(read_portinfo(served), read_portinfo(built))
                verdict = Verdict(name, key, verdict.served, verdict.built, files)
            verdicts.append(verdict)
    finally:
        remove_tree(work)
    return verdicts


def _keep(package: Path, meta: PackageMeta, content: str, *, into: Path) -> Path:
    """The package built here, kept beyond its build directory."""
    return Path(shutil.move(package, into / package.name))


def _meta(revision: Revision, name: str) -> PackageMeta:
    recipe = revision.graph.recipe(name)
    assert recipe is not None, f"{name} is in a build root without a recipe"
    return PackageMeta.of(recipe, revision.keys.keys[name], revision.graph.arch)


def _served(sources: Sources, name: str, key: str, into: Path) -> Path:
    """The verified package the caches serve for ``key``, downloaded into ``into``."""
    (into.parent / "built").mkdir(parents=True, exist_ok=True)

    async def fetch() -> Path:
        async with aiohttp.ClientSession() as session:
            offer = sources.caches.by_key(key) or await ask_for_key(
                session, [cache.url for cache in sources.caches.usable], key
            )
            if offer is None:
                raise InstallError(f"{name}: no cache has a package of key {key[:12]}")
            download = Download(
                label=f"{name} (key {key[:12]}) from {offer.cache}",
                urls=(offer.url,),
                size=offer.entry.size,
                sha256=offer.entry.sha256,
                dest=into / offer.entry.file,
                signature_urls=(offer.signature_url,) if offer.signature_url else (),
            )
            await download_all(session, [download], sources.settings.trusted_keys)
            return download.dest

    return asyncio.run(fetch())
