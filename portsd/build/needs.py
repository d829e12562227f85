"""After a build: does the package say what it needs? The reading half of the check
whose rule is ``portsd.core.linkage``.

Every ELF file of DESTDIR is read once: its needs are compared with what the package,
its runtime closure and the seed's C runtime provide, and its public sonames become the
package's ``sonames``, which is how the closure's are known here (from their index
entries) without reading their files again.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from portsd.core.linkage import (
    LIBRARY_DIRS,
    ElfLinkage,
    interpreters,
    misses,
    provided_sonames,
    usr_path,
)
from portsd.core.recipe import Recipe
from portsd.errors import UnmetNeed
from portsd.pkg.elf import read_linkage


def read_tree(root: Path) -> dict[str, ElfLinkage]:
    """The linkage of every regular ELF file under ``root``, by path relative to it."""
    found: dict[str, ElfLinkage] = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = Path(directory, name)
            if path.is_symlink() or not path.is_file():
                continue
            linkage = read_linkage(path)
            if linkage is not None:
                found[path.relative_to(root).as_posix()] = linkage
    return found


def seed_sonames(seed_root: Path) -> frozenset[str]:
    """What the seed's C runtime provides: the SONAMEs of its public libraries.

    While builds stand on the seed, the libraries every program links (libc.so.6, libm,
    the loader, libgcc_s, libstdc++...) come from it and from no port, so no recipe could
    declare them. They are read from the seed itself rather than listed: exactly what its
    loader finds by default (``LIBRARY_DIRS``), and nothing of its private directory,
    which only the seed's own programs reach. When a port provides the C runtime, this
    gives way to its declared package like any other library.
    """
    files: dict[str, ElfLinkage] = {}
    for directory in LIBRARY_DIRS:
        if not (seed_root / directory).is_dir():
            continue
        for entry in os.scandir(seed_root / directory):
            if ".so" in entry.name and entry.is_file(follow_symlinks=False):
                linkage = read_linkage(Path(entry.path))
                if linkage is not None:
                    files[f"{directory}/{entry.name}"] = linkage
    return frozenset(provided_sonames(files))


def check_needs(
    recipe: Recipe,
    destdir: Path,
    log: Path,
    *,
    seed_root: Path | None,
    closure: Sequence[tuple[Path, Iterable[str]]],
) -> tuple[str, ...]:
    """Check the package built in ``destdir`` and return the sonames it provides.

    ``seed_root`` is the seed beneath the build (None: a self-contained toolchain's stage,
    whose C runtime is a port's like any library). ``closure`` is each runtime
    dependency's unpacked root and recorded sonames. Raises
    ``UnmetNeed`` for the first need nothing meets (unless the recipe allows it), after
    listing every one in ``log``.
    """
    files = read_tree(destdir)
    provided = set(seed_sonames(seed_root)) if seed_root is not None else set()
    for _, sonames in closure:
        provided.update(sonames)
    beneath = () if seed_root is None else (seed_root,)
    roots = (destdir, *beneath, *(root for root, _ in closure))
    present = set()
    for interpreter in interpreters(files):
        rel = interpreter.lstrip("/")
        # packages keep their own layout; the seed's is merged-/usr
        if any(os.path.lexists(root / p) for root in roots for p in (rel, usr_path(rel))):
            present.add(interpreter)
    found = misses(files, provided, present, recipe.build.allow_missing_sonames)
    if found:
        with log.open("a") as out:
            for miss in found:
                kind = "interpreter" if miss.interpreter else "soname"
                out.write(f"==> package: {miss.path} needs {kind} {miss.what}, unprovided\n")
        first = found[0]
        raise UnmetNeed(recipe.name, first.path, first.what, str(log), more=len(found) - 1)
    return provided_sonames(files)
