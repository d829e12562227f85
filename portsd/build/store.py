"""Unpacked packages, one directory per build key: the layers build roots are made of.

A package is unpacked once (with every archive safety check) and then shared read-only
by every build that needs it. ``<store>/<key>/`` appears atomically: it is unpacked into a
temporary sibling and renamed, so a crash or a concurrent unpack of the same key never
leaves a half directory under the final name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from portsd.fsio import remove_tree
from portsd.pkg.package import extract_package


class Store:
    """The directory of unpacked packages under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob(".unpack-*"):  # an unpack a crash interrupted
            remove_tree(leftover)

    def path(self, key: str) -> Path:
        return self.root / key

    def ensure(
        self, key: str, package: Path, *, sha256: str | None = None, size: int | None = None
    ) -> Path:
        """The unpacked root of the package with build key ``key``, unpacking it if needed."""
        final = self.path(key)
        if final.is_dir():
            return final
        staging = Path(tempfile.mkdtemp(prefix=f".unpack-{key[:12]}-", dir=self.root))
        try:
            extract_package(package, staging / "root", expected_sha256=sha256, expected_size=size)
            try:
                os.rename(staging / "root", final)
            except OSError:
                if not final.is_dir():  # lost a race with an identical unpack: fine
                    raise
        finally:
            remove_tree(staging)
        return final
