"""Getting the package file of every build key a resolution chose: the cache is a substituter.

For each key, in this order:

1. the client's own store (a private repository under the cache directory, signed with a
   key of its own): packages it downloaded or built before;
2. a given package file (``ports install ./x.pkg.tar.zst``, its signature already checked);
3. a LAN cache: the verified index of a cache lists the key, else a cache answers the
   substituter query ``/api/v1/keys/<key>`` (that package's own ``.minisig`` is checked);
4. a source build from the client's ports checkout, with the same builder the build host
   uses, so the same inputs give the same key and a byte-identical package.

Every package obtained from outside goes into the store (a hard link, and a signature by
the store's key), because a source build later in the same run may need it in its build
root. Whatever its origin, a package is checked to be the one asked for (name and build
key of its manifest) before anything uses it; the installer verifies its content.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp

from portsd.build.pipeline import Revision, Workspace, ensure_signing_key
from portsd.build.scheduler import Outcome, Reporter, run_plan
from portsd.client.download import Download, DownloadReporter, download_all
from portsd.client.remote import Caches, Substitute, ask_for_key
from portsd.client.settings import ClientSettings, SourcePolicy
from portsd.config import Config
from portsd.core.metadata import PackageMeta
from portsd.core.plan import PlannedBuild, critical_path, make_plan
from portsd.errors import PackageError, PortsdError, Unobtainable
from portsd.pkg.archive import content_id
from portsd.pkg.package import PortInfo, read_portinfo
from portsd.pkg.repo import Repository
from portsd.tree.checkout import Checkout


@dataclass(frozen=True, slots=True)
class Obtained:
    """A package file ready to install; ``origin`` says where it came from."""

    path: Path
    info: PortInfo
    origin: str


class BuildReporter(Reporter, Protocol):
    """Source builds: the scheduler's events, and each line of a running build's log."""

    def step(self, name: str, line: str) -> None: ...


class ObtainReporter(Protocol):
    """Who hears about downloads and source builds."""

    @property
    def downloads(self) -> DownloadReporter: ...

    @property
    def builds(self) -> BuildReporter: ...


class Obtainer:
    """Obtains packages by build key for one client run (see the module docstring)."""

    def __init__(
        self,
        settings: ClientSettings,
        config: Config,
        caches: Caches,
        checkout: Checkout | None,
        reporter: ObtainReporter,
        files: Mapping[str, Path] | None = None,
    ) -> None:
        self.settings = settings
        self.config = config  # the store's: a private repository under the cache directory
        self.repo = Repository(
            config.repo,
            config.arch,
            ensure_signing_key(config),
            expires_in=int(config.index_expiry_days * 86400),
        )
        self._workspace: Workspace | None = None
        self.caches = caches
        self.checkout = checkout
        self.reporter = reporter
        self.files = dict(files or {})  # build key -> a package file given by the user
        self.origins: dict[str, str] = {}  # build key -> where this run got its package
        self.asked: set[str] = set()  # build keys the caches were asked for in this run
        self.lock = threading.Lock()  # the store is shared by build threads

    def obtain(self, packages: Sequence[PackageMeta]) -> dict[str, Obtained]:
        """A verified package file for every candidate's key (Unobtainable, PackageError)."""
        for package in packages:
            given = self.files.get(package.build_key)
            if given is not None and not self._have(package.build_key):
                copy = self._downloads / given.name  # publishing moves it: keep the user's file
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(given, copy)
                self._import(package, copy, str(given))
        missing = [p for p in packages if not self._have(p.build_key)]
        if missing and self.settings.source is not SourcePolicy.ALWAYS:
            asyncio.run(self._substitute(missing))
            missing = [p for p in missing if not self._have(p.build_key)]
        if missing:
            self._build(missing)
        return {p.build_key: self._stored(p) for p in packages}

    def _have(self, key: str) -> bool:
        """Whether the store holds the whole package of ``key`` (not only its record)."""
        return self.repo.find_key(key) is not None

    @property
    def _downloads(self) -> Path:
        return self.config.state_dir / "downloads"

    @property
    def workspace(self) -> Workspace:
        """The builder's workspace, opened for the first source build only: opening it
        makes the bootstrap seed from this host, which a run that downloads never needs."""
        if self._workspace is None:
            self._workspace = Workspace.open(self.config)
        return self._workspace

    # -- substitution ---------------------------------------------------------------------

    async def _substitute(self, packages: Sequence[PackageMeta]) -> None:
        """Download what the caches have of ``packages`` into the store, all at once."""
        self.asked.update(p.build_key for p in packages)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            offers = await asyncio.gather(*(self._offer(session, p) for p in packages))
            found = [(p, s) for p, s in zip(packages, offers, strict=True) if s is not None]
            if not found:
                return
            downloads = [self._download(p, s) for p, s in found]
            await download_all(
                session,
                downloads,
                self.settings.trusted_keys,
                reporter=self.reporter.downloads,
            )
        for (package, substitute), download in zip(found, downloads, strict=True):
            self._import(package, download.dest, substitute.cache)

    async def _offer(
        self, session: aiohttp.ClientSession, package: PackageMeta
    ) -> Substitute | None:
        known = self.caches.by_key(package.build_key)
        if known is not None:
            return known
        urls = [cache.url for cache in self.caches.usable]
        return await ask_for_key(session, urls, package.build_key) if urls else None

    def _download(self, package: PackageMeta, substitute: Substitute) -> Download:
        entry = substitute.entry
        return Download(
            label=f"{package.name} {package.version}-{package.release}",
            urls=(substitute.url,),
            size=entry.size,
            sha256=entry.sha256,
            dest=self._downloads / entry.file,
            signature_urls=(substitute.signature_url,) if substitute.signature_url else (),
        )

    def _import(self, package: PackageMeta, path: Path, origin: str) -> None:
        """Put a verified package file into the store, after checking it is ``package``."""
        info = read_portinfo(path)
        found = info.meta
        if (found.name, found.build_key) != (package.name, package.build_key):
            raise PackageError(
                str(path),
                f"is {found.name} with build key {found.build_key[:12]}, but {package.name} "
                f"with key {package.build_key[:12]} was asked for (from {origin})",
            )
        with self.lock:
            self.repo.publish(path, info.meta, content=content_id(info.files), commit=None)
            self.origins[package.build_key] = origin

    # -- source builds --------------------------------------------------------------------

    def _build(self, packages: Sequence[PackageMeta]) -> None:
        checkout = self.checkout
        if checkout is None or self.settings.source is SourcePolicy.NEVER:
            why = (
                "source builds are off (source = never, or --no-build)"
                if checkout is not None
                else "no ports tree is configured to build it from (tree, or --tree)"
            )
            first = packages[0]
            raise Unobtainable(first.name, first.build_key, [self._cache_summary(), why])
        graph, keys = checkout.evaluation.graph, checkout.evaluation.keys
        for package in packages:
            if keys.keys.get(package.name) != package.build_key:
                raise Unobtainable(
                    package.name,
                    package.build_key,
                    [f"the ports tree at {self.settings.tree} builds another key of it"],
                )
        plan = make_plan(graph, keys, self.workspace.present(), [p.name for p in packages])
        if plan.blocked:
            name, problem = sorted(plan.blocked.items())[0]
            raise Unobtainable(name, "", [str(problem)])
        revision = Revision(checkout.tree, checkout.evaluation, checkout.commit)
        results = run_plan(
            plan,
            self._runner(revision),
            jobs=self.config.jobs,
            priority=critical_path(plan, {}),
            reporter=self.reporter.builds,
        )
        failed = [r for r in results if r.outcome is not Outcome.BUILT]
        if failed:
            reasons = [f"{r.name}: {r.outcome}: {r.reason or ''}".rstrip(": ") for r in failed]
            raise Unobtainable(failed[0].name, failed[0].build.key, reasons)

    def _runner(self, revision: Revision) -> Callable[[PlannedBuild, threading.Event], None]:
        def run(build: PlannedBuild, cancel: threading.Event) -> None:
            # A build-root dependency a cache has need not be built either (the packages
            # asked for first were looked up already: no second round of cache queries).
            recipe = revision.graph.recipe(build.name)
            substitutable = self.settings.source is not SourcePolicy.ALWAYS
            if recipe is not None and substitutable and build.key not in self.asked:
                try:
                    meta = PackageMeta.of(recipe, build.key, revision.graph.arch)
                    asyncio.run(self._substitute([meta]))
                except PortsdError:
                    pass  # a broken substitute is no reason not to build it here
                if self._have(build.key):
                    return
            self.workspace.build(
                revision,
                build,
                cancel,
                on_line=lambda line: self.reporter.builds.step(build.name, line),
            )
            with self.lock:
                self.origins[build.key] = f"built from {self.settings.tree}"

        return run

    # -- the store ------------------------------------------------------------------------

    def _stored(self, package: PackageMeta) -> Obtained:
        repo = self.repo
        entry = repo.find_key(package.build_key)
        if entry is None:
            raise Unobtainable(package.name, package.build_key, ["it vanished from the store"])
        path = repo.package_path(entry)
        origin = self.origins.get(package.build_key, f"the local store ({repo.path})")
        return Obtained(path, read_portinfo(path), origin)

    def _cache_summary(self) -> str:
        if not self.caches.usable and not self.caches.problems:
            return "no cache is configured (caches, or --cache)"
        lines = [f"{url}: {problem}" for url, problem in self.caches.problems]
        lines += [f"{cache.url}: does not have it" for cache in self.caches.usable]
        return "; ".join(lines)
