"""Build one port in the sandbox: fetched sources and dependency trees in, a DESTDIR out.

``build_port(request)`` runs the steps prepare, build, check and package, each as
``sh -eu -c <script>`` inside the sandbox of portsd/build/sandbox.py, and returns where the
installed tree (DESTDIR) and the log are. Fetching sources, extracting dependency packages
and packaging the DESTDIR happen around it (portsd/build/fetch.py, portsd/pkg/package.py).

Inside the sandbox every build sees the same paths, wherever the host keeps its files:

    /build/src        SRCDIR: archives unpacked, files and paths copied here (writable)
    /build/pkg        DESTDIR (writable)
    /build/home       HOME (writable, private)
    /tmp              TMPDIR (writable, private)
    /build/sources/F  each fetched source and ``path`` source, read-only
    /build/port       the port directory (port.toml, patches, files), read-only

The dependency roots are composed into one tree (``compose_root``) whose ``usr/`` the
sandbox lays over the toolchain's /usr, so headers, libraries and pkg-config files of declared
dependencies are at their standard paths and nothing undeclared is.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from portsd.build import sandbox, styles
from portsd.build.run import Limits, run
from portsd.build.sandbox import Host, Mount, SandboxSpec
from portsd.config import format_size
from portsd.core.recipe import BuildStep, Recipe
from portsd.errors import (
    BuildError,
    ConfigError,
    FetchError,
    FileConflict,
    OverLimit,
    PackageError,
)
from portsd.fsio import remove_tree

SOURCE_DATE_EPOCH = 315532800
"""1980-01-01, for every build: a function of no input but the builder, so packages are
byte-identical across machines and commits, and old enough for zip-based formats."""

SRCDIR = "/build/src"
DESTDIR = "/build/pkg"
HOME = "/build/home"
SOURCES = "/build/sources"
PORTDIR = "/build/port"
TMPDIR = "/tmp"

ARCHIVE_SUFFIXES = (
    ".tar.gz",
    ".tgz",
    ".tar.xz",
    ".txz",
    ".tar.bz2",
    ".tbz2",
    ".tar.zst",
    ".tzst",
    ".tar",
)
"""Sources unpacked into SRCDIR (by GNU tar, which detects the compression itself)."""

STEP_DONE = re.compile(r"^==> ([a-z]+): ok in (\d+(?:\.\d+)?) s$")
"""The log line that ends a recipe step that succeeded (``_finished`` writes it; the
summary of a bootstrap sums them: ``stagetimes.step_seconds``)."""

MERGED_USR = sandbox.LAYOUT
"""Top-level directories of a dependency merged into usr/: what the sandbox links there."""

NO_SHELL = (
    "the build root has no /bin/sh: the toolchain is self-contained (toolchain.toml), so"
    " one of its ports must provide the shell, as busybox does"
)
NOT_FOUND = 127  # the shell's status for a command it cannot find
NO_SEED = (
    "this build root has nothing of the seed or the host: only packages (a self-contained"
    " toolchain's, or the root of --on-root) and the port's dependencies"
)

_WORK_DIRS = ("src", "pkg", "home", "tmp", "etc", "usr", "deps")
_HOST_ENV = {"PATH": sandbox.SYSTEM_PATH, "LANG": "C.UTF-8"}


@dataclass(frozen=True, slots=True)
class BuildRequest:
    """Everything one build needs; the builder reads nothing else from the host.

    ``sources`` maps each url source's filename to its verified file, and each ``path``
    source's filename to the file or directory exported for it (file sources are taken
    from ``port_dir``). ``dependency_roots`` are extracted dependency packages, each the
    root of one package (``usr/include/...``); a single root is used as it is, so a caller
    may pass one tree composed once with ``compose_root`` and cached by the set of
    dependency keys. ``toolchain`` is the unpacked root (the seed's) whose ``usr/`` is the
    build's /usr: nothing of the host's is. ``self_contained``: that root is a tree of
    packages with no seed in it (a self-contained toolchain's stage), which must bring
    its own /bin/sh. ``workdir`` is this build's private directory
    (its subdirectories are wiped first); ``hidden`` are host paths the build must never
    see (state directory, signing key). ``timeout`` (seconds) bounds the whole build;
    setting ``cancel`` stops it. ``limits`` bound each step's processes, memory and open
    files; its disk limit bounds ``workdir``.
    """

    recipe: Recipe
    key: str
    port_dir: Path
    sources: Mapping[str, Path]
    workdir: Path
    log: Path
    arch: str
    toolchain: Path
    self_contained: bool = False
    dependency_roots: tuple[Path, ...] = ()
    jobs: int = 1
    timeout: float = 3600.0
    source_date_epoch: int = 0
    hidden: tuple[Path, ...] = ()
    on_line: Callable[[str], None] | None = None
    run_check: bool = True
    host: Host | None = None
    cancel: threading.Event | None = None
    limits: Limits = Limits()


@dataclass(frozen=True, slots=True)
class StepTime:
    """How long one step took, sandbox start-up included."""

    step: BuildStep
    seconds: float


@dataclass(frozen=True, slots=True)
class BuildResult:
    """A successful build: the installed tree, the log, and where the time went."""

    port: str
    destdir: Path
    log: Path
    builddir: str
    steps: tuple[StepTime, ...]

    def seconds(self, step: BuildStep) -> float | None:
        """Duration of ``step``; None if it did not run (no script)."""
        return next((s.seconds for s in self.steps if s.step is step), None)


def is_archive(filename: str) -> bool:
    """Whether a source of this name is unpacked rather than copied."""
    return filename.endswith(ARCHIVE_SUFFIXES)


def first_archive(recipe: Recipe) -> str | None:
    """Filename of the recipe's first url source that is an archive."""
    return next((s.filename for s in recipe.sources if s.url and is_archive(s.filename)), None)


def prepare_script(recipe: Recipe, builddir: str, *, skip: str | None = None) -> str:
    """The prepare step: unpack and copy the sources, cd to ``builddir``, patch, then the
    recipe's own prepare script. ``skip`` is an archive already unpacked."""
    lines: list[str] = []
    for source in recipe.sources:
        name = shlex.quote(source.filename)
        if source.url is not None:
            if source.filename == skip:
                continue
            if is_archive(source.filename):
                lines.append(f'tar -xf {SOURCES}/{name} -C "$SRCDIR"')
            else:
                lines.append(f'cp -- {SOURCES}/{name} "$SRCDIR"/{name}')
        elif source.path is not None:
            # -R -P: a directory with its symlinks as symlinks, never followed
            lines.append(f'cp -R -P -- {SOURCES}/{name} "$SRCDIR"/{name}')
        elif not source.is_patch:
            lines.append(f'cp -- {PORTDIR}/{shlex.quote(source.file or "")} "$SRCDIR"/{name}')
    lines.append(f"cd -- {shlex.quote(builddir)}")
    for source in recipe.sources:
        if source.is_patch:
            lines.append(f"patch -p1 -i {PORTDIR}/{shlex.quote(source.file or '')}")
    own = recipe.build.prepare
    if own is not None and own.strip():
        lines.append(own)
    return "\n".join(lines)


def build_environment(request: BuildRequest) -> tuple[tuple[str, str], ...]:
    """The whole environment of every step: nothing else reaches the build."""
    return (
        ("SRCDIR", SRCDIR),
        ("DESTDIR", DESTDIR),
        ("PREFIX", "/usr"),
        ("JOBS", str(request.jobs)),
        ("MAKEFLAGS", f"-j{request.jobs}"),
        ("SOURCE_DATE_EPOCH", str(request.source_date_epoch)),
        ("CARCH", request.arch),
        ("HOME", HOME),
        ("PORTNAME", request.recipe.name),
        ("PORTVERSION", request.recipe.version),
        ("PATH", sandbox.SYSTEM_PATH),
        ("LANG", "C.UTF-8"),
        ("LC_ALL", "C.UTF-8"),
        ("TZ", "UTC"),
        ("TMPDIR", TMPDIR),
    )


def compose_root(roots: Sequence[Path], dest: Path) -> Path:
    """Merge the dependency trees ``roots`` into a new tree ``dest`` and return it.

    Files are hard-linked (copied across file systems), so composing costs one link per
    file and no data. Only ``usr/`` is merged, plus the top-level bin, sbin, lib and lib64,
    which land in usr/ as on a merged-/usr system; other top-level entries (etc/, var/)
    have no place in a build root and are left out. Directories merge; any other path
    shipped by two roots raises ``FileConflict`` naming both.
    """
    dest.mkdir(parents=True)
    (dest / "usr").mkdir()
    owners: dict[str, Path] = {}
    directories: dict[str, Path] = {"usr": dest}
    for root in roots:
        for top, into in (("usr", "usr"), *MERGED_USR):
            source = root / top
            if source.is_dir() and not source.is_symlink():
                _merge(root, source, into, dest, owners, directories)
    return dest


def _merge(
    root: Path,
    source: Path,
    into: str,
    dest: Path,
    owners: dict[str, Path],
    directories: dict[str, Path],
) -> None:
    if into not in directories:
        if into in owners:
            raise FileConflict(str(root), into, str(owners[into]))
        (dest / into).mkdir(parents=True)
        directories[into] = root
    target = f"{dest}/{into}/"  # strings, not Paths: this loop runs once per file
    with os.scandir(source) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = f"{into}/{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                _merge(root, Path(entry.path), path, dest, owners, directories)
                continue
            owner = owners.get(path) or directories.get(path)
            if owner is not None:
                raise FileConflict(str(root), path, str(owner))
            try:
                os.link(entry.path, target + entry.name, follow_symlinks=False)
            except OSError:
                _link(Path(entry.path), dest / path)
            owners[path] = root


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError as error:
        # another file system, or protected_hardlinks on a file we do not own
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
        mode = source.lstat().st_mode
        if stat.S_ISLNK(mode):
            target.symlink_to(source.readlink())
        elif stat.S_ISREG(mode):
            shutil.copy2(source, target)
        else:
            raise PackageError(str(source), "not a regular file, directory or symlink") from None


def build_port(request: BuildRequest) -> BuildResult:
    """Build ``request.recipe`` and return the DESTDIR it installed into.

    Raises ``BuildError`` naming the port, the step, what happened (``exit 2``,
    ``timed out after 30 s``) and the log; ``FetchError`` for a url or path source missing from
    ``request.sources``; ``FileConflict`` for two dependencies shipping the same file;
    ``ConfigError`` when the sandbox cannot be set up (no bwrap, a hidden path exposed).
    """
    return _Build(request).run()


class _Build:
    """The state of one ``build_port`` call."""

    spec: SandboxSpec
    builddir: str

    def __init__(self, request: BuildRequest) -> None:
        self.request = request
        self.recipe = request.recipe
        self.work = request.workdir.resolve()  # mounts and hidden-path checks need absolutes
        self.deadline = time.monotonic() + request.timeout
        self.log = request.log.resolve()

    def run(self) -> BuildResult:
        request = self.request
        for source in self.recipe.sources:
            if source.path is not None and source.filename not in request.sources:
                raise FetchError(
                    self.recipe.name, source.filename, f"path '{source.path}' was not exported"
                )
            if source.url is not None and source.filename not in request.sources:
                raise FetchError(self.recipe.name, source.filename, "not among the fetched sources")
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_bytes(b"")
        shell = request.toolchain / "usr" / "bin" / "sh"
        if request.self_contained and not os.path.lexists(shell):
            self._say(f"==> prepare: {NO_SHELL}")
            raise BuildError(self.recipe.name, BuildStep.PREPARE.value, NO_SHELL, str(self.log))
        self.spec = self._setup()
        sandbox.check(self.spec)
        self._say(
            f"==> {self.recipe.name} {self.recipe.full_version} for {request.arch}"
            f" (key {request.key}), jobs {request.jobs}, timeout {request.timeout:g} s"
        )
        times = [StepTime(BuildStep.PREPARE, self._prepare())]
        for step in (BuildStep.BUILD, BuildStep.CHECK, BuildStep.PACKAGE):
            script = styles.script(self.recipe.build, step)
            if script is None or not script.strip():
                continue
            if step is BuildStep.CHECK and not request.run_check:
                self._say("==> check: skipped (checks disabled)")
                continue
            times.append(StepTime(step, self._step(step, script, self.builddir)))
        return BuildResult(
            self.recipe.name, self.work / "pkg", self.log, self.builddir, tuple(times)
        )

    def _setup(self) -> SandboxSpec:
        request = self.request
        host = request.host or Host.probe()
        for name in _WORK_DIRS:
            remove_tree(self.work / name)
        for name in _WORK_DIRS[:-1]:  # deps/ is made by compose_root, if at all
            (self.work / name).mkdir(parents=True)
        for name, content in sandbox.etc_files():
            (self.work / "etc" / name).write_text(content)
        mounts = [
            Mount(self.work / "src", SRCDIR, writable=True),
            Mount(self.work / "pkg", DESTDIR, writable=True),
            Mount(self.work / "home", HOME, writable=True),
            Mount(self.work / "tmp", TMPDIR, writable=True),
            Mount(request.port_dir.resolve(), PORTDIR),
        ]
        for source in self.recipe.sources:
            if source.url is not None or source.path is not None:
                path = request.sources[source.filename].resolve()
                mounts.append(Mount(path, f"{SOURCES}/{source.filename}"))
        return SandboxSpec(
            host=host,
            toolchain=request.toolchain.resolve(),
            etc=self.work / "etc",
            mounts=tuple(mounts),
            cwd=SRCDIR,
            env=build_environment(request),
            root=self._root(),
            mountpoint=self.work / "usr",
            hidden=tuple(path.resolve() for path in request.hidden),
        )

    def _root(self) -> Path | None:
        roots = [root.resolve() for root in self.request.dependency_roots]
        # composing links files in: check before, not only after
        for root in (*roots, self.request.toolchain.resolve()):
            for hidden in self.request.hidden:
                if sandbox.reveals(root, hidden.resolve()):
                    raise ConfigError(
                        f"build root {root} would expose {hidden} to the build",
                        path=str(hidden),
                    )
        if not roots:
            return None
        if len(roots) == 1 and _usable_as_is(roots[0]):
            return roots[0]
        return compose_root(roots, self.work / "deps")

    def _prepare(self) -> float:
        start = time.monotonic()
        builddir = self.recipe.build.dir
        first = first_archive(self.recipe)
        unpacked: str | None = None
        if builddir is None and first is not None:
            # The default build dir is the first archive's single top directory: unpack it
            # alone to see what it holds.
            self._run(BuildStep.PREPARE, f'tar -xf {SOURCES}/{shlex.quote(first)} -C "$SRCDIR"')
            unpacked = first
            tops = list((self.work / "src").iterdir())
            if len(tops) == 1 and tops[0].is_dir() and not tops[0].is_symlink():
                builddir = tops[0].name
        self.builddir = f"{SRCDIR}/{builddir}" if builddir else SRCDIR
        self._run(BuildStep.PREPARE, prepare_script(self.recipe, self.builddir, skip=unpacked))
        return self._finished(BuildStep.PREPARE, start)

    def _step(self, step: BuildStep, script: str, cwd: str) -> float:
        start = time.monotonic()
        self._run(step, script, cwd)
        return self._finished(step, start)

    def _run(self, step: BuildStep, script: str, cwd: str = SRCDIR) -> None:
        self._say(f"==> {step} (in {cwd})")
        for line in script.splitlines():
            self._say(f"$ {line}")
        spec = replace(self.spec, cwd=cwd)
        argv = sandbox.command(spec, ["sh", "-eu", "-c", script, f"portsd-{step}"])
        remaining = max(self.deadline - time.monotonic(), 0.001)
        result = run(
            argv,
            env=_HOST_ENV,
            log_path=self.log,
            on_line=self.request.on_line,
            timeout=remaining,
            cancel=self.request.cancel,
            limits=replace(self.request.limits, disk_path=self.request.workdir),
        )
        if result.limit is not None:
            what, key, amount = describe_limit(self.request.limits, result.limit)
            self._say(f"==> {step}: killed, over its {what} limit ({amount})")
            raise OverLimit(self.recipe.name, step.value, what, amount, key, str(self.log))
        if not result.ok:
            status = f"timed out after {self.request.timeout:g} s" if result.timed_out else None
            status = status or result.status
            if result.returncode == NOT_FOUND and self.request.self_contained:
                status += f": {NO_SEED}"
            self._say(f"==> {step}: failed ({status}) after {result.duration:.2f} s")
            raise BuildError(self.recipe.name, step.value, status, str(self.log))

    def _finished(self, step: BuildStep, start: float) -> float:
        seconds = time.monotonic() - start
        self._say(f"==> {step}: ok in {seconds:.2f} s")  # STEP_DONE
        return seconds

    def _say(self, line: str) -> None:
        with self.log.open("a") as log:
            log.write(line + "\n")
        if self.request.on_line is not None:
            self.request.on_line(line)


_LIMIT_NAMES = {
    "processes": ("process", "process-limit"),
    "memory": ("memory", "memory-limit"),
    "disk": ("disk", "disk-limit"),
}
"""A limit the reaper reports -> its name in messages, and its [build] setting."""


def describe_limit(limits: Limits, limit: str) -> tuple[str, str, str]:
    """(what, setting, amount) of the limit named ``limit``: ``memory``, ``memory-limit``,
    ``2 GiB``."""
    what, key = _LIMIT_NAMES[limit]
    value = getattr(limits, limit)
    amount = f"{value} processes" if limit == "processes" else format_size(value)
    return what, key, amount


def _usable_as_is(root: Path) -> bool:
    """A single dependency root can be the overlay layer itself (no composing) when it
    has nothing outside usr/ to merge and a name overlayfs' option syntax accepts."""
    if not (root / "usr").is_dir() or set(root.name) & set(",:\\\n"):
        return False
    return not any((root / top).exists() for top, _ in MERGED_USR)


def step_of(line: str) -> str | None:
    """The word a log line announces a step with (``==> build (in /src)``), or None: how
    watchers of ``on_line`` follow a build, matching the lines ``_Build`` writes."""
    if line.startswith("==> ") and ":" not in line:
        return line[4:].split(" ")[0]
    return None
