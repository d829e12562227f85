"""A port built on an installed root: the root's ``usr/`` is the build's whole ``/usr``.

How a distribution shows it rebuilds itself from inside (docs/distro.md): the root's own
shell, make and compiler run the recipe's steps, with nothing of the seed or the host
beneath and no dependency package laid over it, so the root must hold the port's build
dependencies. Everything else is an ordinary build: the same sandbox and step scripts
(``build_port``), the same ELF check (the root's libraries stand where the seed's would)
and the same deterministic package. The package is never published: its key names the
port's inputs and the root's installed packages, which no stage's key does.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import msgpack

from portsd.build.builder import SOURCE_DATE_EPOCH, BuildRequest, build_port
from portsd.build.fetch import Fetcher
from portsd.build.needs import check_needs
from portsd.build.pipeline import PortSource
from portsd.build.produce import Scratch, limits_of
from portsd.config import Config
from portsd.core.keys import BUILDER_FORMAT
from portsd.core.metadata import PackageMeta
from portsd.core.recipe import Recipe
from portsd.pkg.archive import ManifestEntry, content_id
from portsd.pkg.package import create_package


@dataclass(frozen=True, slots=True)
class RootBuild:
    """A package built on a root: its file, manifest, content id and build time."""

    package: Path
    files: tuple[ManifestEntry, ...]
    content: str
    seconds: float


def root_key(input_id: str, installed: Iterable[tuple[str, str]]) -> str:
    """The key of a build on a root: the port's input id and the root's installed
    packages, (name, build key) each."""
    packed = msgpack.packb(["portsd-on-root", BUILDER_FORMAT, input_id, sorted(installed)])
    return hashlib.sha256(packed).hexdigest()


def build_on_root(
    config: Config,
    ports: PortSource,
    recipe: Recipe,
    key: str,
    root: Path,
    out: Path,
    *,
    cancel: threading.Event | None = None,
    on_line: Callable[[str], None] | None = None,
) -> RootBuild:
    """Build ``recipe`` with ``root`` as its /usr and write its package into ``out``.
    Sources come from the config's distfiles and mirrors; the work directory is the
    config's. Raises a PortsdError (``BuildError`` naming the step and the log) on failure."""
    cancel = cancel or threading.Event()
    fetcher = Fetcher(config.distfiles, config.mirrors, named_mirrors=dict(config.named_mirrors))
    urls = [source for source in recipe.sources if source.url is not None]
    start = time.monotonic()
    log = config.logs / recipe.name / f"on-root-{key[:12]}.log"
    with Scratch(config.work / f"{recipe.name}-on-root-{key[:12]}") as work:
        ports.export_port(recipe.name, work / "port")
        sources = ports.export_paths(recipe.name, work / "paths")
        sources.update(fetcher.fetch_sync(recipe.name, urls, cancel))
        result = build_port(
            BuildRequest(
                recipe=recipe,
                key=key,
                port_dir=work / "port",
                sources=sources,
                workdir=work / "build",
                log=log,
                arch=config.arch,
                toolchain=root,
                self_contained=True,  # the root brings its own /bin/sh, or the build says so
                jobs=config.make_jobs,
                timeout=config.build_timeout,
                source_date_epoch=SOURCE_DATE_EPOCH,
                hidden=(config.state_dir.resolve(), config.secret_key.resolve()),
                on_line=on_line,
                cancel=cancel,
                limits=limits_of(config),
            )
        )
        sonames = check_needs(recipe, result.destdir, log, seed_root=root, closure=())
        meta = replace(PackageMeta.of(recipe, key, config.arch), sonames=sonames)
        built = create_package(result.destdir, meta, out, epoch=SOURCE_DATE_EPOCH)
    files = tuple(built.info.files)
    return RootBuild(built.path, files, content_id(files), time.monotonic() - start)
