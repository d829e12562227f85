"""Unpacked packages, one directory per build key: the layers build roots are made of.

A package is unpacked once (with every archive safety check) and then shared read-only
by every build that needs it. ``<store>/<key>/`` appears atomically: it is unpacked into a
temporary sibling and renamed, so a crash or a concurrent unpack of the same key never
leaves a half directory under the final name.

A build root of several packages is composed into one tree (``compose_root``) once per set
of build keys: ``<store>/composed/<digest of the sorted keys>/``, made the same way and as
read-only to builds, so a rebuild on the same dependencies composes nothing.

Each use touches the tree's mtime, so ``prune`` (a cluster worker's bounded cache) can
drop the trees used least recently.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from portsd.build.builder import compose_root
from portsd.fsio import remove_tree
from portsd.pkg.package import extract_package


class Store:
    """The directory of unpacked packages under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.composed_root = root / "composed"
        self.composed_root.mkdir(parents=True, exist_ok=True)
        # an unpack or composition a crash interrupted
        for leftover in (*root.glob(".unpack-*"), *self.composed_root.glob(".compose-*")):
            remove_tree(leftover)

    def path(self, key: str) -> Path:
        return self.root / key

    def cached(self, key: str) -> Path | None:
        """The unpacked root of ``key`` if it is here (touched: just used), else None."""
        path = self.path(key)
        if not path.is_dir():
            return None
        os.utime(path)
        return path

    def ensure(
        self, key: str, package: Path, *, sha256: str | None = None, size: int | None = None
    ) -> Path:
        """The unpacked root of the package with build key ``key``, unpacking it if needed."""
        return _once(
            self.path(key),
            f".unpack-{key[:12]}-",
            lambda dest: extract_package(package, dest, expected_sha256=sha256, expected_size=size),
        )

    def composed(self, layers: Sequence[tuple[str, Path]]) -> Path:
        """The tree ``compose_root`` makes of ``layers`` ((build key, unpacked root) pairs),
        composed on first use of this set of keys. Raises ``FileConflict`` as
        ``compose_root`` does, leaving nothing behind."""
        keys = sorted(key for key, _ in layers)
        digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
        roots = [root for _, root in sorted(layers)]
        return _once(
            self.composed_root / digest,
            f".compose-{digest[:12]}-",
            lambda dest: compose_root(roots, dest),
        )

    def prune(self, keep: int) -> int:
        """Remove all but the ``keep`` most recently used unpacked packages, and likewise
        composed roots; returns how many trees went. Only between builds: a tree in use
        by a build must not go."""
        removed = 0
        for parent in (self.root, self.composed_root):
            trees = [
                entry
                for entry in os.scandir(parent)
                if entry.is_dir(follow_symlinks=False)
                and not entry.name.startswith(".")
                and entry.path != str(self.composed_root)
            ]
            trees.sort(key=lambda entry: entry.stat(follow_symlinks=False).st_mtime, reverse=True)
            for entry in trees[keep:]:
                remove_tree(Path(entry.path))
                removed += 1
        return removed


def _once(final: Path, prefix: str, make: Callable[[Path], object]) -> Path:
    """``final``, made by ``make(dest)`` in a temporary sibling and renamed unless it exists:
    never half there, and a concurrent maker of the same tree wins without harm."""
    if final.is_dir():
        os.utime(final)  # used now: kept longest by ``prune``
        return final
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        make(staging / "root")
        try:
            os.rename(staging / "root", final)
        except OSError:
            if not final.is_dir():  # lost a race with an identical tree: fine
                raise
    finally:
        remove_tree(staging)
    return final
