"""The bootstrap seed: the one package made of host files, and the only way they enter.

Every build's root is made of packages. The first packages need a compiler, a shell and
the core utilities from somewhere: the seed is that somewhere, made once by ``ports seed``
from an explicit list of Debian packages (``PROGRAM_PACKAGES``, ``RUNTIME_PACKAGES``) and
identified by its content id, which enters the key of every build that uses it. It is
what Nix's bootstrap-tools and Guix's bootstrap binaries are, but regenerated from the
host by anyone, deterministically: the same host files give the same bytes, so two users
compare seeds by content id (``ports seed --check``).

What it holds, under a merged /usr:

- the files of the listed packages (no docs, man pages, locales or /etc);
- their shared libraries: the C and C++ runtime's (``RUNTIME_PACKAGES``: glibc, libgcc,
  libstdc++ and their development files) where the compiler and loader look for them;
  every other library the programs need (``NEEDED``, transitively: zlib, zstd, gmp, mpfr,
  bfd, pcre2, ...) in ``PRIVATE_LIBDIR``, found only through a RUNPATH the seed sets on
  the files that need them (patchelf). So ``-lz`` finds no zlib, no header of zlib, bzip2
  or xz is present, and a port's own ``libz.so.1`` is the one its tests load;
- the ``/usr/bin`` links Debian keeps in ``/etc/alternatives`` (``cc``, ``awk``),
  resolved to plain relative links;
- ``MANIFEST``: the packages with their versions, and where each private library came
  from, so a seed says what it is made of.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import posixpath
import shutil
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from portsd.build.builder import SOURCE_DATE_EPOCH
from portsd.build.run import run
from portsd.core.linkage import LIBRARY_DIRS, MERGED_USR
from portsd.core.metadata import PACKAGE_SUFFIX, PackageMeta
from portsd.errors import ConfigError, PackageError
from portsd.fsio import remove_tree
from portsd.pkg.archive import content_id
from portsd.pkg.elf import read_linkage
from portsd.pkg.package import create_package, extract_package, read_portinfo

SEED_FORMAT = 1
"""Bumped whenever the same host files would give a different seed."""

NAME = "seed"
PRIVATE_LIBDIR = "usr/lib/portsd-seed"
MANIFEST = "usr/share/portsd/seed.manifest"

PROGRAM_PACKAGES = (
    "bash",
    "binutils",
    "binutils-x86-64-linux-gnu",
    "bzip2",
    "coreutils",
    "cpp",
    "cpp-12",
    "dash",
    "debianutils",
    "diffutils",
    "findutils",
    "g++",
    "g++-12",
    "gcc",
    "gcc-12",
    "grep",
    "gzip",
    "libperl5.36",
    "make",
    "mawk",
    "patch",
    "perl",
    "perl-base",
    "perl-modules-5.36",
    "pkgconf",
    "pkgconf-bin",
    "sed",
    "tar",
    "util-linux",
    "xz-utils",
    "zstd",
)
"""What builds run: compiler, binutils, make, a shell, core utilities (with util-linux's
getopt, setsid and flock), the decompressors of every source archive tar unpacks, perl
and pkg-config."""

RUNTIME_PACKAGES = (
    "libasan8",
    "libatomic1",
    "libc-dev-bin",
    "libc6",
    "libc6-dev",
    "libcrypt-dev",
    "libcrypt1",
    "libgcc-12-dev",
    "libgcc-s1",
    "libgomp1",
    "libitm1",
    "liblsan0",
    "libquadmath0",
    "libstdc++-12-dev",
    "libstdc++6",
    "libtsan2",
    "libubsan1",
    "linux-libc-dev",
)
"""The C and C++ runtime programs are compiled against: its libraries stay public."""

DROPPED = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/bash-completion",
    "usr/share/gdb",
    "usr/share/zsh",
    "usr/share/menu",
)
"""Documentation and integration files no build reads."""

HOST_LIBDIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib")


@dataclass(frozen=True, slots=True)
class DebianPackage:
    name: str
    version: str
    arch: str
    paths: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Seed:
    """A seed package on disk: ``content_id`` is what enters build keys; ``root`` is it
    unpacked, shared read-only by every build that stands on it."""

    path: Path
    content_id: str
    build_key: str
    manifest: str
    root: Path


@dataclass(slots=True)
class _Model:
    """The seed before it is written: relative path -> host file, or -> link target."""

    files: dict[str, Path] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # target: a path inside the seed
    origin: dict[str, str] = field(default_factory=dict)
    private: dict[str, Path] = field(default_factory=dict)  # soname -> host file

    def holds(self, rel: str) -> bool:
        """A file or link at ``rel`` (a dictionary look-up; ``exists`` also scans for
        directories, which no library is)."""
        return rel in self.files or rel in self.links

    def exists(self, rel: str) -> bool:
        return self.holds(rel) or self.is_dir(rel)

    def is_dir(self, rel: str) -> bool:
        prefix = rel + "/"
        return any(p.startswith(prefix) for p in (*self.files, *self.links))


def seed_path(rel: str) -> str | None:
    """Where host path ``rel`` (no leading slash) lands in the merged-/usr seed, or None."""
    top, _, rest = rel.partition("/")
    if top in MERGED_USR:
        rel = f"{MERGED_USR[top]}/{rest}" if rest else MERGED_USR[top]
    elif top != "usr":
        return None
    rel = posixpath.normpath(rel)
    if rel == "usr" or any(rel == d or rel.startswith(d + "/") for d in DROPPED):
        return None
    return rel


def host_packages(names: Iterable[str]) -> list[DebianPackage]:
    """Each named package as dpkg knows it: version, architecture and its paths."""
    packages = []
    for name in names:
        query = _lines(["dpkg-query", "-W", "-f", "${Version} ${Architecture}\n", name])
        listing = _lines(["dpkg-query", "-L", name]) if query else None
        if not query or listing is None:
            raise ConfigError(f"the seed needs the Debian package {name}: it is not installed")
        version, arch = query[0].split()
        paths = tuple(line for line in listing if line.startswith("/"))
        packages.append(DebianPackage(name, version, arch, paths))
    return packages


def _lines(argv: list[str]) -> list[str] | None:
    """The output lines of a successful command, None if it failed."""
    lines: list[str] = []
    return lines if run(argv, on_line=lines.append).ok else None


def plan_seed(packages: Iterable[DebianPackage], host: Path = Path("/")) -> _Model:
    """What the seed holds: every regular file and link, from the host's files."""
    model = _Model()
    runtime = set(RUNTIME_PACKAGES)
    raw_links: dict[str, tuple[str, str]] = {}  # rel -> (host dir of the link, raw target)
    for package in sorted(packages, key=lambda p: p.name):
        for path in package.paths:
            rel = seed_path(path.lstrip("/"))
            if rel is None or model.exists(rel) and not model.is_dir(rel):
                continue
            source = host / path.lstrip("/")
            mode = source.lstat().st_mode if os.path.lexists(source) else 0
            if stat.S_ISLNK(mode) and path.lstrip("/") in MERGED_USR:
                continue  # a merged-/usr host's /bin -> usr/bin: the seed is merged itself
            if stat.S_ISLNK(mode):
                raw_links[rel] = (posixpath.dirname("/" + path.lstrip("/")), os.readlink(source))
            elif stat.S_ISREG(mode):
                model.files[rel] = source
            else:
                continue
            model.origin[rel] = package.name
    _add_alternatives(model, raw_links, host)
    for rel, (directory, target) in raw_links.items():
        resolved = seed_path(posixpath.normpath(posixpath.join(directory, target)).lstrip("/"))
        if resolved is not None:
            model.links[rel] = resolved
    _privatise(model, runtime)
    _close_over_needed(model, host)
    _drop_dangling(model)
    return model


def _add_alternatives(model: _Model, raw: dict[str, tuple[str, str]], host: Path) -> None:
    """``/usr/bin/cc -> /etc/alternatives/cc -> gcc``: links dpkg lists in no package."""
    for directory in ("usr/bin", "usr/sbin"):
        for entry in sorted(os.scandir(host / directory), key=lambda e: e.name):
            if not entry.is_symlink() or not os.readlink(entry.path).startswith("/etc/"):
                continue
            final = Path(os.path.realpath(entry.path))
            rel = seed_path(str(final.relative_to(host)).lstrip("/")) if final.is_file() else None
            name = f"{directory}/{entry.name}"
            if rel is not None and rel in model.files and name not in model.files:
                raw[name] = ("/" + directory, "/" + rel)
                model.origin[name] = "alternatives"


def _privatise(model: _Model, runtime: set[str]) -> None:
    """Move every library of a non-runtime package out of the linker's and loader's way."""
    moved: dict[str, str] = {}
    for rel in sorted((*model.files, *model.links)):
        directory, name = posixpath.split(rel)
        if directory in LIBRARY_DIRS and name.startswith("lib") and ".so" in name:
            if model.origin.get(rel) not in runtime:
                moved[rel] = f"{PRIVATE_LIBDIR}/{name}"
    for old, new in moved.items():
        if old in model.files:
            model.files[new] = model.files.pop(old)
        else:
            model.links[new] = model.links.pop(old)
        model.origin[new] = model.origin.pop(old)
    for rel, target in list(model.links.items()):
        model.links[rel] = moved.get(target, target)


def _close_over_needed(model: _Model, host: Path) -> None:
    """Copy in every library a seed file needs and the seed lacks, as a private one."""
    seen: set[str] = set()
    todo = sorted(model.files)
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        seen.add(rel)
        linkage = read_linkage(model.files[rel])
        if linkage is None:
            continue
        origin = posixpath.dirname(rel)
        own = [d.replace("$ORIGIN", "/" + origin).lstrip("/") for d in linkage.runpath]
        for soname in linkage.needed:
            if _provides(model, soname, own):
                continue
            found = _host_library(host, soname)
            if found is None:
                raise ConfigError(f"the seed's {rel} needs {soname}, which the host lacks")
            private = f"{PRIVATE_LIBDIR}/{soname}"
            model.files[private] = found
            model.origin[private] = "needed"
            model.private[soname] = found
            todo.append(private)


def _provides(model: _Model, soname: str, runpath: Iterable[str]) -> bool:
    directories = (*runpath, *LIBRARY_DIRS, PRIVATE_LIBDIR)
    return any(model.holds(posixpath.normpath(f"{d}/{soname}")) for d in directories)


def _host_library(host: Path, soname: str) -> Path | None:
    for directory in HOST_LIBDIRS:
        candidate = host / directory.lstrip("/") / soname
        if candidate.exists():
            return Path(os.path.realpath(candidate))
    return None


def _drop_dangling(model: _Model) -> None:
    """A link to something the seed does not hold (a library of an unlisted package)."""
    changed = True
    while changed:
        changed = False
        for rel, target in list(model.links.items()):
            if not model.exists(target):
                del model.links[rel]
                changed = True


def manifest_text(packages: Iterable[DebianPackage], model: _Model) -> str:
    lines = [f"portsd seed format {SEED_FORMAT}"]
    for package in sorted(packages, key=lambda p: p.name):
        role = "runtime" if package.name in RUNTIME_PACKAGES else "program"
        lines.append(f"package {package.name} {package.version} {package.arch} {role}")
    for soname, source in sorted(model.private.items()):
        lines.append(f"needed {soname} {source}")
    return "\n".join(lines) + "\n"


def write_seed(model: _Model, manifest: str, stage: Path) -> None:
    """Materialise ``model`` under ``stage``: copies, links, RUNPATHs, the manifest."""
    for rel, source in sorted(model.files.items()):
        target = stage / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        # no setuid/setgid in a package; owner bits as the host has them
        os.chmod(target, stat.S_IMODE(source.stat().st_mode) & 0o1777 | 0o200)
    for rel, target_rel in sorted(model.links.items()):
        link = stage / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(posixpath.relpath(target_rel, posixpath.dirname(rel)))
    private = set(model.private) | {
        posixpath.basename(r) for r in model.files if r.startswith(PRIVATE_LIBDIR + "/")
    }
    private |= {posixpath.basename(r) for r in model.links if r.startswith(PRIVATE_LIBDIR + "/")}
    for rel in sorted(model.files):
        linkage = read_linkage(stage / rel)
        if linkage is None or not set(linkage.needed) & private:
            continue
        runpath = ":".join(["/" + PRIVATE_LIBDIR, *linkage.runpath])
        result = run(["patchelf", "--set-rpath", runpath, str(stage / rel)])
        if not result.ok:
            raise ConfigError(f"patchelf could not set the RUNPATH of the seed's {rel}")
    path = stage / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(manifest)
    for directory, subdirectories, files in os.walk(stage):
        for name in subdirectories:
            os.chmod(os.path.join(directory, name), 0o755)
        for name in files:
            full = os.path.join(directory, name)
            if not os.path.islink(full):
                os.chmod(full, os.stat(full).st_mode & 0o1755)


def make_seed(out_dir: Path, work: Path, *, arch: str, epoch: int) -> Seed:
    """Make the seed package in ``out_dir`` from this host's files (``work``: scratch)."""
    names = sorted({*PROGRAM_PACKAGES, *RUNTIME_PACKAGES})
    debian = host_packages(names)
    model = plan_seed(debian)
    manifest = manifest_text(debian, model)
    build_key = hashlib.sha256(manifest.encode()).hexdigest()
    stage = work / "seed-root"
    if stage.exists():
        remove_tree(stage)
    stage.mkdir(parents=True)
    try:
        write_seed(model, manifest, stage)
        gcc = next((p.version for p in debian if p.name == "gcc-12"), "?")
        meta = PackageMeta(
            name=NAME,
            version=f"{SEED_FORMAT}",
            release=1,
            arch=arch,
            build_key=build_key,
            summary=f"Bootstrap seed from Debian (gcc {gcc}): {len(debian)} packages",
            license="various",
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        built = create_package(stage, meta, out_dir, epoch=epoch)
    finally:
        remove_tree(stage)
    return Seed(built.path, content_id(built.info.files), build_key, manifest, out_dir / "root")


def find_seed(directory: Path) -> Seed | None:
    """The seed kept in ``directory`` (package, manifest, unpacked root), if there is one."""
    packages = sorted(directory.glob(f"{NAME}-*{PACKAGE_SUFFIX}"))
    if len(packages) != 1 or not (directory / "manifest").is_file():
        return None
    if not (directory / "root").is_dir():
        return None
    try:
        info = read_portinfo(packages[0])
    except PackageError:
        return None  # a seed of an older package format: made again
    manifest = (directory / "manifest").read_text()
    return Seed(
        packages[0], content_id(info.files), info.meta.build_key, manifest, directory / "root"
    )


def ensure_seed(directory: Path, work: Path, arch: str, say: Callable[[str], None]) -> Seed:
    """The seed kept in ``directory``, made from this host on first use (and said so).
    Concurrent callers wait for one another: the first makes it, the others find it."""
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        seed = find_seed(directory)
        if seed is None:
            say(f"making the bootstrap seed from this host's toolchain in {directory} (first use)")
            (directory / "manifest").unlink(missing_ok=True)
            made = make_seed(work / "seed-new", work, arch=arch, epoch=SOURCE_DATE_EPOCH)
            seed = keep_seed(made, directory)
            say(f"seed {seed.content_id[:12]}: {seed.path.name}")
        return seed


def keep_seed(seed: Seed, directory: Path) -> Seed:
    """Make ``seed`` the one kept in ``directory``, replacing any other, and unpack it."""
    root = _unpack(seed.path, directory)
    _write_manifest(directory, seed.manifest)
    return Seed(directory / seed.path.name, seed.content_id, seed.build_key, seed.manifest, root)


def adopt_seed(package: Path, directory: Path, arch: str) -> Seed:
    """Keep ``package``, a seed made on another machine (a daemon's, its signature checked
    by the caller), as the seed of ``directory``: builds here then stand on the same
    content id, and so have the same keys."""
    info = read_portinfo(package)
    if info.meta.name != NAME or info.meta.arch != arch:
        raise PackageError(
            str(package), f"not a seed for {arch}: {info.meta.name} for {info.meta.arch}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    with (directory / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        (directory / "manifest").unlink(missing_ok=True)
        root = _unpack(package, directory)
        manifest = (root / MANIFEST).read_text()
        _write_manifest(directory, manifest)
        return Seed(
            directory / package.name, content_id(info.files), info.meta.build_key, manifest, root
        )


def _unpack(package: Path, directory: Path) -> Path:
    """Move ``package`` into ``directory`` in place of any other seed, and unpack it."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob(f"{NAME}-*{PACKAGE_SUFFIX}"):
        if old != directory / package.name:
            old.unlink()
    target = directory / package.name
    if package != target:
        os.replace(package, target)
    root = directory / "root"
    if root.exists():
        remove_tree(root)
    unpacking = directory / ".root-new"
    if unpacking.exists():
        remove_tree(unpacking)
    extract_package(target, unpacking)
    os.replace(unpacking, root)
    return root


def _write_manifest(directory: Path, manifest: str) -> None:
    # the manifest last: find_seed sees a whole seed or none
    (directory / "manifest.tmp").write_text(manifest)
    os.replace(directory / "manifest.tmp", directory / "manifest")
