"""From one planned build to a published package.

For each build: make its order (``order``: the port directory and the repository paths
its ``path`` sources name, exported from the tree, its url sources fetched, its build root
named by build keys), have a builder turn the order into a package (``Producer``: here, or
a cluster worker), and publish it (package, signature, then a new index). Publishing is
this module's alone: the signing key never leaves this machine, and a package made
elsewhere is checked member by member first (``accept``). The build's work directory is
removed afterwards; its log stays.

``ports build`` and the daemon share this; they differ in what they plan and how they
report progress.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from portsd.build.fetch import Fetcher, FetchReporter
from portsd.build.order import BuildOrder, Layer, pack_tree
from portsd.build.produce import Producer, Scratch, limits_of
from portsd.build.seed import Seed, ensure_seed
from portsd.build.store import Store
from portsd.config import Config
from portsd.core.evaluate import Evaluation
from portsd.core.graph import Graph
from portsd.core.index import IndexEntry
from portsd.core.keys import BUILDER_FORMAT, KeySet
from portsd.core.metadata import PackageMeta
from portsd.core.plan import PlannedBuild
from portsd.core.recipe import DepKind
from portsd.core.toolchain import Stage
from portsd.errors import PackageError, RepoError
from portsd.pkg.archive import content_id
from portsd.pkg.package import PackageReader
from portsd.pkg.repo import Repository, StoredContents
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

    @property
    def stage(self) -> Stage:
        """The toolchain stage the planned builds stand on."""
        return self.evaluation.stages.current


@dataclass(slots=True)
class Workspace:
    """The long-lived pieces a builder needs: repository, sources, unpacked packages."""

    config: Config
    repo: Repository
    fetcher: Fetcher
    store: Store
    seed: Seed
    contents: StoredContents  # of the repository's packages: what keys are computed from
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
        return cls(config, repo, fetcher, Store(config.store), seed, StoredContents(repo), hidden)

    def present(self) -> Container[str]:
        """The build keys the repository can serve without building."""
        return self.repo.stored_keys()

    def log_path(self, build: PlannedBuild) -> Path:
        return self.config.logs / build.name / f"{build.key[:12]}.log"

    def producer(self) -> Producer:
        """The builder on this machine: layers come straight from the repository."""
        return Producer(
            self.config.work,
            self.config.arch,
            self.fetcher,
            self.store,
            self.seed,
            _RepoPackages(self.repo),
            self.hidden,
            limits=limits_of(self.config),
        )

    def order(self, revision: Revision, build: PlannedBuild, cancel: threading.Event) -> BuildOrder:
        """The self-contained order of one planned build. Its sources are fetched here
        first, so this machine's distfiles can feed any builder."""
        recipe = revision.graph.recipe(build.name)
        assert recipe is not None, f"{build.name} was planned without a recipe"
        urls = [source for source in recipe.sources if source.url is not None]
        self.fetcher.fetch_sync(build.name, urls, cancel)
        with Scratch(self.config.work / f".order-{build.name}-{build.key[:12]}") as scratch:
            revision.ports.export_port(build.name, scratch / "port")
            paths = revision.ports.export_paths(build.name, scratch / "paths")
            tree = pack_tree(scratch)
        runtime = revision.graph.runtime_closure(
            edge.target for edge in revision.graph.edges(build.name) if edge.kind is DepKind.RUNTIME
        )
        return BuildOrder(
            recipe=recipe,
            key=build.key,
            arch=self.config.arch,
            tree=tree,
            paths=tuple(
                (name, path.relative_to(scratch).as_posix()) for name, path in paths.items()
            ),
            root=self._root(revision, build.name),
            runtime=tuple(self._layer(revision, dep) for dep in sorted(runtime)),
            seed=self.seed.content_id if revision.stage.seed_beneath else None,
            builder=BUILDER_FORMAT,
            jobs=self.config.make_jobs,
            timeout=self.config.build_timeout,
        )

    def build(
        self,
        revision: Revision,
        build: PlannedBuild,
        cancel: threading.Event,
        *,
        log: Path | None = None,
        on_line: Callable[[str], None] | None = None,
    ) -> IndexEntry:
        """Build, pack and publish one planned port here; raises a PortsdError on failure.

        Setting ``cancel`` (from another thread) stops it soon, in any stage: downloading
        its sources (``FetchCancelled``) or running a build step."""
        order = self.order(revision, build, cancel)
        return self.producer().produce(
            order,
            cancel,
            lambda path, meta, content: self.repo.publish(
                path, meta, content=content, commit=revision.commit
            ),
            log=log or self.log_path(build),
            on_line=on_line,
        )

    def accept(self, package: Path, order: BuildOrder, *, commit: str | None) -> IndexEntry:
        """Publish a package another builder made of ``order``, after checking every
        member (``PackageReader``: manifest, paths, types, sizes, sha256s, no bombs) and
        that it says it is what the order asked for. Raises PackageError otherwise."""
        meta, content = check_package(package, order)
        return self.repo.publish(package, meta, content=content, commit=commit)

    def _root(self, revision: Revision, name: str) -> tuple[Layer, ...]:
        """The layers of ``name``'s build root: the tree's toolchain (the stage before's
        packages), unless the port's own build root has that port already, then the
        port's build root."""
        root = revision.keys.build_root(revision.graph, name)
        toolchain = [
            self._layer_of(tool, key) for tool, key, _ in revision.stage.layer if tool not in root
        ]
        return (*toolchain, *(self._layer(revision, dep) for dep in root))

    def _layer(self, revision: Revision, name: str) -> Layer:
        """Dependency ``name``'s package, by its build key."""
        return self._layer_of(name, revision.keys.keys[name])

    def _layer_of(self, name: str, key: str) -> Layer:
        """``key`` (a package of port ``name``) as a layer."""
        entry = self.repo.find_key(key)
        if entry is None:
            raise RepoError(
                str(self.repo.path), f"the package of {name} (key {key[:12]}) is missing"
            )
        return Layer(name, key, entry.file, entry.size, entry.sha256, entry.meta.sonames)


def check_package(package: Path, order: BuildOrder) -> tuple[PackageMeta, str]:
    """The checked manifest and content id of a package built elsewhere from ``order``:
    every archive rule holds and its facts are the order's (only size and sonames are the
    builder's). The content id is computed here, never taken from the builder."""
    with PackageReader(package) as reader:
        for _ in reader.members():
            pass  # reading a member checks it
        meta = reader.info.meta
        content = content_id(reader.info.files)
    expected = PackageMeta.of(order.recipe, order.key, order.arch)
    if replace(meta, installed_size=0, sonames=()) != expected:
        raise PackageError(str(package), f"is not the package {order.label} asked for")
    return meta, content


@dataclass(frozen=True, slots=True)
class _RepoPackages:
    """Layers from the repository on this machine."""

    repo: Repository

    def obtain(self, layers: Sequence[Layer], cancel: threading.Event) -> dict[str, Path]:
        return {layer.key: self.repo.packages_path / layer.file for layer in layers}


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
