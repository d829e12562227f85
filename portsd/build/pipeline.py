"""From one planned build to a published package.

For each build: export the port directory and the repository paths its ``path`` sources
name from the tree, fetch its url sources, unpack the packages of its build root from the
repository, build in the sandbox, pack DESTDIR into a deterministic package and publish it
(package, signature, then a new index). The build's work directory is removed afterwards;
its log stays.

``ports build`` and the daemon share this; they differ in what they plan and how they
report progress.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Container
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from portsd.build.builder import SOURCE_DATE_EPOCH, BuildRequest, build_port
from portsd.build.fetch import Fetcher, FetchReporter
from portsd.build.needs import check_needs
from portsd.build.seed import Seed, ensure_seed
from portsd.build.store import Store
from portsd.config import Config
from portsd.core.evaluate import Evaluation
from portsd.core.graph import Graph
from portsd.core.index import IndexEntry
from portsd.core.keys import KeySet
from portsd.core.metadata import PackageMeta
from portsd.core.plan import PlannedBuild
from portsd.core.recipe import DepKind
from portsd.errors import RepoError
from portsd.fsio import remove_tree
from portsd.pkg.package import create_package
from portsd.pkg.repo import Repository
from portsd.pkg.sign import SecretKey

log = logging.getLogger(__name__)


class PortSource(Protocol):
    """Where port directories come from: a git commit or a plain directory."""

    def export_port(self, name: str, dest: Path) -> None: ...

    def export_paths(self, name: str, dest: Path) -> dict[str, Path]:
        """The port's ``path`` sources written under ``dest``: filename -> where."""
        ...


@dataclass(frozen=True, slots=True)
class Revision:
    """One evaluated revision of the tree, as every build planned from it sees it.

    ``commit`` is recorded in the index as provenance; None for a plain directory.
    """

    ports: PortSource
    evaluation: Evaluation
    commit: str | None

    @property
    def graph(self) -> Graph:
        return self.evaluation.graph

    @property
    def keys(self) -> KeySet:
        return self.evaluation.keys


@dataclass(slots=True)
class Workspace:
    """The long-lived pieces a builder needs: repository, sources, unpacked packages."""

    config: Config
    repo: Repository
    fetcher: Fetcher
    store: Store
    seed: Seed
    hidden: tuple[Path, ...] = field(default=())

    @classmethod
    def open(
        cls,
        config: Config,
        reporter: FetchReporter | None = None,
        say: Callable[[str], None] = log.info,
    ) -> Workspace:
        """Open (creating on first use) everything under the config's state directory;
        ``say`` hears about work done on first use (making the seed)."""
        for directory in (config.state_dir, config.work, config.logs):
            directory.mkdir(parents=True, exist_ok=True)
        seed = seed_of(config, say)
        key = ensure_signing_key(config)
        repo = Repository(
            config.repo,
            config.arch,
            key,
            expires_in=int(config.index_expiry_days * 86400),
            cosigners=next_signing_keys(config),
        )
        fetcher = Fetcher(
            config.distfiles,
            config.mirrors,
            named_mirrors=dict(config.named_mirrors),
            reporter=reporter,
        )
        hidden = (config.state_dir.resolve(), config.secret_key.resolve())
        return cls(config, repo, fetcher, Store(config.store), seed, hidden)

    def present(self) -> Container[str]:
        """The build keys the repository can serve without building."""
        return self.repo.stored_keys()

    def log_path(self, build: PlannedBuild) -> Path:
        return self.config.logs / build.name / f"{build.key[:12]}.log"

    def build(
        self,
        revision: Revision,
        build: PlannedBuild,
        cancel: threading.Event,
        *,
        log: Path | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> IndexEntry:
        """Build, pack and publish one planned port; raises a PortsdError on failure.

        Setting ``cancel`` (from another thread) stops it soon, in any stage: downloading
        its sources (``FetchCancelled``) or running a build step."""
        recipe = revision.graph.recipe(build.name)
        assert recipe is not None, f"{build.name} was planned without a recipe"
        log = log or self.log_path(build)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.unlink(missing_ok=True)
        with self._workdir(build) as workdir:
            port_dir = workdir / "port"
            revision.ports.export_port(build.name, port_dir)
            urls = [source for source in recipe.sources if source.url is not None]
            sources = self.fetcher.fetch_sync(build.name, urls, cancel)
            sources.update(revision.ports.export_paths(build.name, workdir / "paths"))
            layers = [
                self._unpacked(revision, dep)
                for dep in revision.keys.build_root(revision.graph, build.name)
            ]
            # several packages: one tree per set of keys, composed once and then reused
            if len(layers) > 1:
                roots: tuple[Path, ...] = (self.store.composed(layers),)
            else:
                roots = tuple(root for _, root in layers)
            result = build_port(
                BuildRequest(
                    recipe=recipe,
                    key=build.key,
                    port_dir=port_dir,
                    sources=sources,
                    workdir=workdir / "build",
                    log=log,
                    arch=self.config.arch,
                    toolchain=self.seed.root,
                    dependency_roots=roots,
                    jobs=self.config.make_jobs,
                    timeout=self.config.build_timeout,
                    source_date_epoch=SOURCE_DATE_EPOCH,
                    hidden=self.hidden,
                    on_line=on_line,
                    cancel=cancel,
                )
            )
            runtime = revision.graph.runtime_closure(
                edge.target
                for edge in revision.graph.edges(build.name)
                if edge.kind is DepKind.RUNTIME
            )
            sonames = check_needs(
                recipe,
                result.destdir,
                log,
                seed_root=self.seed.root,
                closure=[self._provisions(revision, dep) for dep in sorted(runtime)],
            )
            meta = replace(PackageMeta.of(recipe, build.key, self.config.arch), sonames=sonames)
            built = create_package(result.destdir, meta, workdir, epoch=SOURCE_DATE_EPOCH)
            return self.repo.publish(built.path, built.info.meta, commit=revision.commit)

    def _provisions(self, revision: Revision, name: str) -> tuple[Path, tuple[str, ...]]:
        """A runtime dependency's unpacked root and the sonames its package provides."""
        entry = self.repo.find_key(revision.keys.keys[name])
        return self._unpacked(revision, name)[1], entry.meta.sonames if entry else ()

    def _unpacked(self, revision: Revision, name: str) -> tuple[str, Path]:
        """The build key of dependency ``name`` and its unpacked package."""
        key = revision.keys.keys[name]
        entry = self.repo.find_key(key)
        if entry is None:
            raise RepoError(
                str(self.repo.path), f"the package of {name} (key {key[:12]}) is missing"
            )
        return key, self.store.ensure(
            key, self.repo.package_path(entry), sha256=entry.sha256, size=entry.size
        )

    def _workdir(self, build: PlannedBuild) -> _Scratch:
        return _Scratch(self.config.work / f"{build.name}-{build.key[:12]}")


class _Scratch:
    """A fresh directory for one build, removed when the build is over, whatever happened."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        remove_tree(self.path)  # a crash's leftover, read-only parts and all
        self.path.mkdir(parents=True)
        return self.path

    def __exit__(self, *exc: object) -> None:
        remove_tree(self.path)


def seed_of(config: Config, say: Callable[[str], None] = log.info) -> Seed:
    """The bootstrap seed builds of ``config`` stand on, made from this host on first use."""
    config.work.mkdir(parents=True, exist_ok=True)
    return ensure_seed(config.seed, config.work, config.arch, say)


def next_signing_keys(config: Config) -> tuple[SecretKey, ...]:
    """The key that signs beside the current one while it is rotated (`portsd key`)."""
    if config.next_secret_key.exists():
        return (SecretKey.load(config.next_secret_key),)
    return ()


def ensure_signing_key(config: Config) -> SecretKey:
    """The repository's signing key, generated (with its public half) on first use."""
    if config.secret_key.exists():
        return SecretKey.load(config.secret_key)
    config.secret_key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = SecretKey.generate()
    key.save(config.secret_key)
    key.public_key.save(config.public_key, overwrite=True)
    return key
