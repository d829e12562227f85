"""From a build order to a package file: what every builder does, on the daemon's machine
or on a cluster worker.

``Producer.produce`` unpacks the order's port tree, fetches its sources (by sha256), gets
the packages of its build root and runtime closure by build key (``Packages``: the local
repository, or a download from the daemon's), unpacks them into the store, builds in the
sandbox, checks the result's ELF needs and packs DESTDIR into a deterministic package.
The package goes to ``deliver`` (publish it here, upload it from a worker) while the
build's work directory still exists; the directory is removed afterwards, whatever
happened. Nothing here signs or publishes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, TypeVar

from portsd.build.builder import SOURCE_DATE_EPOCH, BuildRequest, build_port
from portsd.build.fetch import Fetcher
from portsd.build.needs import check_needs
from portsd.build.order import BuildOrder, Layer, check_builder, unpack_tree
from portsd.build.run import Limits
from portsd.build.seed import Seed
from portsd.build.store import Store
from portsd.config import Config
from portsd.core.keys import BUILDER_FORMAT
from portsd.core.metadata import PackageMeta
from portsd.fsio import remove_tree
from portsd.pkg.archive import content_id
from portsd.pkg.package import create_package

T = TypeVar("T")

Deliver = Callable[[Path, PackageMeta, str], T]  # the package, its facts, its content id
"""What becomes of the built package file (it is removed afterwards unless moved)."""


def limits_of(config: Config) -> Limits:
    """What one build may use on this machine, from its [build] settings (0: no limit)."""
    return Limits(
        processes=config.process_limit or None,
        memory=config.memory_limit or None,
        disk=config.disk_limit or None,
        open_files=config.open_files_limit or None,
    )


class Packages(Protocol):
    """Where the package files of an order's layers come from."""

    def obtain(self, layers: Sequence[Layer], cancel: threading.Event) -> dict[str, Path]:
        """The verified package file of each layer, by build key."""
        ...


@dataclass(slots=True)
class Producer:
    """A builder: its work directory, sources, unpacked packages, seed, and where layers
    come from. ``alter`` (a fault-injection knob of cluster workers) may change DESTDIR
    before it is packed."""

    work: Path
    arch: str
    fetcher: Fetcher
    store: Store
    seed: Seed
    packages: Packages
    hidden: tuple[Path, ...] = ()
    alter: Callable[[Path], None] | None = field(default=None)
    limits: Limits = Limits()

    def produce(
        self,
        order: BuildOrder,
        cancel: threading.Event,
        deliver: Deliver[T],
        *,
        log: Path,
        on_line: Callable[[str], None] | None = None,
    ) -> T:
        """Build ``order`` and hand its package to ``deliver``; raises a PortsdError on
        failure. Setting ``cancel`` stops it soon, in any stage."""
        check_builder(order, builder=BUILDER_FORMAT, seed=self.seed.content_id, arch=self.arch)
        recipe = order.recipe
        log.parent.mkdir(parents=True, exist_ok=True)
        log.unlink(missing_ok=True)
        with Scratch(self.work / f"{order.name}-{order.key[:12]}") as workdir:
            port_dir, sources = unpack_tree(order, workdir / "tree")
            sources.update(self.fetcher.fetch_sync(order.name, order.sources, cancel))
            unpacked = self._unpacked((*order.root, *order.runtime), cancel)
            layers = [(layer.key, unpacked[layer.key]) for layer in order.root]
            seed_root = self.seed.root if order.seed is not None else None
            # several packages: one tree per set of keys, composed once and then reused;
            # with no seed, that tree is the whole /usr (even of one package: composing
            # merges its top-level bin/ and lib/ into usr/)
            if seed_root is None:
                toolchain = self.store.composed(layers)
                roots: tuple[Path, ...] = ()
            elif len(layers) > 1:
                toolchain, roots = seed_root, (self.store.composed(layers),)
            else:
                toolchain, roots = seed_root, tuple(root for _, root in layers)
            result = build_port(
                BuildRequest(
                    recipe=recipe,
                    key=order.key,
                    port_dir=port_dir,
                    sources=sources,
                    workdir=workdir / "build",
                    log=log,
                    arch=order.arch,
                    toolchain=toolchain,
                    self_contained=seed_root is None,
                    dependency_roots=roots,
                    jobs=order.jobs,
                    timeout=order.timeout,
                    source_date_epoch=SOURCE_DATE_EPOCH,
                    hidden=self.hidden,
                    on_line=on_line,
                    cancel=cancel,
                    limits=self.limits,
                )
            )
            sonames = check_needs(
                recipe,
                result.destdir,
                log,
                seed_root=seed_root,
                closure=[(unpacked[layer.key], layer.sonames) for layer in order.runtime],
            )
            if self.alter is not None:
                self.alter(result.destdir)
            meta = replace(PackageMeta.of(recipe, order.key, order.arch), sonames=sonames)
            built = create_package(result.destdir, meta, workdir, epoch=SOURCE_DATE_EPOCH)
            return deliver(built.path, built.info.meta, content_id(built.info.files))

    def _unpacked(self, layers: Sequence[Layer], cancel: threading.Event) -> dict[str, Path]:
        """Each layer unpacked in the store, by build key; fetched only when missing."""
        unpacked: dict[str, Path] = {}
        missing: dict[str, Layer] = {}
        for layer in layers:
            cached = self.store.cached(layer.key)
            if cached is None:
                missing[layer.key] = layer
            else:
                unpacked[layer.key] = cached
        files = self.packages.obtain(list(missing.values()), cancel) if missing else {}
        for key, layer in missing.items():
            unpacked[key] = self.store.ensure(key, files[key], sha256=layer.sha256, size=layer.size)
        return unpacked


class Scratch:
    """A fresh directory for one build, removed when the build is over, whatever happened."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> Path:
        remove_tree(self.path)  # a crash's leftover, read-only parts and all
        self.path.mkdir(parents=True)
        return self.path

    def __exit__(self, *exc: object) -> None:
        remove_tree(self.path)
