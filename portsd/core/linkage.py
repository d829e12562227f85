"""What a package's ELF files need at run time, what it provides, and what nobody does.

The rule dpkg-shlibdeps and namcap apply: every soname a file of a package needs
(``DT_NEEDED``), and its interpreter (``PT_INTERP``), must come from the package itself
or from the packages its runtime dependencies install, transitively; anything else is a
package that works in its build root and breaks where it is installed. The facts are
read from the files elsewhere (``portsd.pkg.elf``); here they are compared.

A package *provides* the sonames (``DT_SONAME``) of its shared libraries in the
directories the loader searches (``LIBRARY_DIRS``): those are recorded in its metadata
for whoever depends on it. A library without a SONAME provides its file name, which is
what the linker records as NEEDED then (musl's ``libc.so``, its own loader, has none).
Within one package any SONAME counts: a program may reach a private library of its own
package through its RUNPATH.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Container, Iterable, Mapping
from dataclasses import dataclass

LIBRARY_DIRS = ("usr/lib/x86_64-linux-gnu", "usr/lib")
"""Where the loader looks on a merged-/usr system (Debian's glibc, which the seed holds,
searches its multiarch directory, then /usr/lib): a library here is public."""

MERGED_USR = {"bin": "usr/bin", "sbin": "usr/sbin", "lib": "usr/lib", "lib64": "usr/lib64"}
"""Top-level directories that are usr/'s on a merged-/usr system."""

SONAME_PATTERN = re.compile(r"[A-Za-z0-9_+@-][A-Za-z0-9_+@.-]*")
"""A soname: a plain file name (``libz.so.1``, ``ld-linux-x86-64.so.2``)."""


@dataclass(frozen=True, slots=True)
class ElfLinkage:
    """One ELF file's dynamic-linking facts. ``machine`` is e_machine (``EM_X86_64``), so a
    library of another architecture never satisfies a need."""

    machine: str
    elfclass: int
    interpreter: str | None = None
    needed: tuple[str, ...] = ()
    soname: str | None = None
    runpath: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Miss:
    """A need nobody meets: ``path`` (relative to the package root) needs ``what``, a
    soname or, when ``interpreter``, the absolute path of its interpreter."""

    path: str
    what: str
    interpreter: bool = False


def usr_path(rel: str) -> str:
    """Where ``rel`` (relative to a root, no leading slash) is on a merged-/usr system."""
    top, _, rest = rel.partition("/")
    merged = MERGED_USR.get(top)
    if merged is None:
        return rel
    return f"{merged}/{rest}" if rest else merged


def provided_sonames(
    files: Mapping[str, ElfLinkage], library_dirs: Collection[str] = LIBRARY_DIRS
) -> tuple[str, ...]:
    """The sonames of the shared libraries among ``files`` (path relative to the root ->
    linkage) that the loader finds: those in ``library_dirs``, sorted."""
    found = set()
    for path, linkage in files.items():
        directory, _, name = usr_path(path).rpartition("/")
        soname = _soname(name, linkage)
        if soname is not None and directory in library_dirs:
            found.add(soname)
    return tuple(sorted(found))


def _soname(name: str, linkage: ElfLinkage) -> str | None:
    """The name a program linked against the library file ``name`` needs it by: its
    SONAME, else (a shared library without one) the file name the linker found."""
    if linkage.soname is not None:
        return linkage.soname
    return name if ".so" in name else None


def interpreters(files: Mapping[str, ElfLinkage]) -> set[str]:
    """The interpreters ``files`` name (absolute paths)."""
    return {linkage.interpreter for linkage in files.values() if linkage.interpreter}


def misses(
    files: Mapping[str, ElfLinkage],
    provided: Container[str],
    present_interpreters: Container[str],
    allowed: Iterable[str] = (),
) -> tuple[Miss, ...]:
    """Every need of ``files`` that nothing meets, by path then need.

    ``provided`` are the sonames the runtime closure (and the C runtime) provide; any
    SONAME of ``files`` counts too. ``present_interpreters`` are the interpreter paths
    that exist in the package or its closure. ``allowed`` (the recipe's
    ``allow-missing-sonames``) are sonames or interpreter paths never reported.
    """
    own = {_soname(path.rpartition("/")[2], linkage) for path, linkage in files.items()}
    excused = set(allowed)
    found: list[Miss] = []
    for path in sorted(files):
        linkage = files[path]
        interpreter = linkage.interpreter
        if interpreter and interpreter not in present_interpreters and interpreter not in excused:
            found.append(Miss(path, interpreter, interpreter=True))
        for soname in linkage.needed:
            if soname not in own and soname not in provided and soname not in excused:
                found.append(Miss(path, soname))
    return tuple(found)
