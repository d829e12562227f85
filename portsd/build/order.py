"""A build order: one build, self-contained, by content.

Whoever builds an order needs nothing of the coordinator but what the order names: the
port directory and its ``path`` sources as bytes (a tar), the url sources by sha256, the
packages of the build root and of the runtime closure by build key (with their file name,
size and sha256, so they can be fetched from any copy of the repository and verified),
and the builder format and seed its key was computed for. A builder whose format or seed
differs would make other bytes under the same key, so it refuses the order
(``check_builder``). An order with no seed (a stage of a self-contained toolchain) is
built in a root of its packages alone, so any builder's seed will do.

The builder returns a package file; only the coordinator checks, signs and publishes it.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

from portsd.core.recipe import Recipe, Source
from portsd.errors import ConfigError, PackageError

TREE_LIMIT = 256 << 20
"""The largest port directory with its path sources an order carries (bytes)."""


@dataclass(frozen=True, slots=True)
class Layer:
    """One package an order stands on, named by its build key."""

    name: str
    key: str
    file: str  # its file name in the repository's packages/
    size: int
    sha256: str
    sonames: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BuildOrder:
    """Everything one build needs (see the module docstring).

    ``tree`` is a tar of ``port/`` (the port directory) and of the exported ``path``
    sources; ``paths`` maps each path source's filename to its place in that tar.
    ``root`` are the build root's packages, ``runtime`` the runtime closure's (their
    sonames are what the built files may need)."""

    recipe: Recipe
    key: str
    arch: str
    tree: bytes
    paths: tuple[tuple[str, str], ...]
    root: tuple[Layer, ...]
    runtime: tuple[Layer, ...]
    seed: str | None  # content id of the bootstrap seed beneath the root; None: no seed
    builder: int  # BUILDER_FORMAT
    jobs: int
    timeout: float

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def sources(self) -> tuple[Source, ...]:
        """The url sources, fetched by sha256."""
        return tuple(source for source in self.recipe.sources if source.url is not None)

    @property
    def label(self) -> str:
        return f"{self.name} (key {self.key[:12]})"


def pack_tree(directory: Path) -> bytes:
    """``directory``'s files as an uncompressed tar, in path order, owners and times
    normalised (the bytes depend only on the content)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(directory.rglob("*")):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(directory).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            if info.isfile():
                with path.open("rb") as data:
                    tar.addfile(info, data)
            else:
                tar.addfile(info)
            if buffer.tell() > TREE_LIMIT:
                raise PackageError(str(directory), f"more than {TREE_LIMIT} bytes to send")
    return buffer.getvalue()


def unpack_tree(order: BuildOrder, dest: Path) -> tuple[Path, dict[str, Path]]:
    """Write the order's tree under ``dest``: (the port directory, filename -> path
    source). Tar's ``data`` filter refuses anything that would land outside ``dest``."""
    with tarfile.open(fileobj=io.BytesIO(order.tree), mode="r:") as tar:
        try:
            tar.extractall(dest, filter="data")
        except tarfile.FilterError as error:
            raise PackageError(order.label, f"unsafe port tree: {error}") from None
    return dest / "port", {name: dest / where for name, where in order.paths}


def check_builder(order: BuildOrder, *, builder: int, seed: str, arch: str) -> None:
    """Refuse an order this builder would build differently from its key's promise."""
    for what, wanted, have in (
        ("builder format", order.builder, builder),
        ("seed", order.seed or seed, seed),
        ("arch", order.arch, arch),
    ):
        if wanted != have:
            raise ConfigError(
                f"{order.label}: the order wants {what} {wanted}, this builder has {have}"
            )
