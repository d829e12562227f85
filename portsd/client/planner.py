"""Planning a transaction: where every entry goes, what conflicts, which ops to run.

Nothing here changes the root. The planner looks at the root as it *will be* (``RootView``:
the disk and the database, minus the packages leaving, plus what the packages coming in
claim) and refuses, before anything is written:

* a non-directory path owned by another package that stays, or existing and owned by
  none (``FileConflict`` naming both); a directory where a file is wanted or the reverse
  (``FileTypeConflict``). Directories may be shared by any number of packages.
* a path that leads through a symlink no package owns, or resolves above the root
  (``RootError``), and any path below ``var/lib/ports`` (the database's own directory).

**Symlinks in the root.** A package's paths may traverse a symlink that an installed
package (or one coming in, earlier in dependency order) owns, like baselayout's
``bin -> usr/bin``: the planner resolves it itself, inside the root (absolute targets are
relative to the root, ``..`` may not climb above it), and records the file under its
canonical path (``usr/bin/sh``), so two packages writing one file under two names still
conflict. A symlink nobody owns (planted by hand, or by anything but a package) is never
followed, and the write itself never follows any symlink either (``portsd.client.rootfs``).

**Config files** (regular files under ``etc/``): on an upgrade, a file whose content is no
longer what its package installed is kept, and the new version is written beside it as
``<path>.portsnew``; on a removal such a file is renamed ``<path>.portssave`` (so a later
install does not conflict with it). The database records the package's content, so the
file stays "modified" until the user merges it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from portsd.client.db import (
    DbChange,
    InstalledFile,
    InstalledPackage,
    InstallReason,
    PackageDb,
    TransactionRecord,
)
from portsd.client.journal import DB_DIR, TX_DIR, JournalOp, OpKind
from portsd.client.rootfs import RootFs, kind_of
from portsd.errors import FileConflict, FileTypeConflict, InvalidTransaction, RootError
from portsd.pkg.archive import FileType, ManifestEntry
from portsd.pkg.package import PortInfo

CONFIG_DIR = "etc/"
NEW_SUFFIX = ".portsnew"
SAVE_SUFFIX = ".portssave"
_MAX_HOPS = 40  # as the kernel's MAXSYMLINKS
_NS = 1_000_000_000
_DIRECTORY, _FILE, _SYMLINK = "directory", "file", "symlink"
_WORDS = {
    FileType.DIR: _DIRECTORY,
    FileType.FILE: _FILE,
    FileType.HARDLINK: _FILE,
    FileType.SYMLINK: _SYMLINK,
}


@dataclass(frozen=True, slots=True)
class Request:
    """A package to bring in: its verified file, its manifest, why, and what it replaces."""

    path: Path
    info: PortInfo
    reason: InstallReason
    origin: str = ""
    sha256: str | None = None
    replaces: InstalledPackage | None = None


@dataclass(frozen=True, slots=True)
class Placement:
    """Where one manifest entry of a new package goes.

    ``path`` is canonical (what the database records); ``dest`` is where it is written:
    ``path``, or ``path.portsnew`` beside a locally modified config file. ``staged`` is its
    name in a staging directory (non-directories); ``link`` the staged file a hardlink
    shares; ``backup`` keeps the entry it replaces until cleanup. ``record`` is False for
    a directory the package reaches twice (``bin`` and ``usr/bin`` through ``bin ->
    usr/bin``), which is recorded once.
    """

    entry: ManifestEntry
    path: str
    dest: str
    staged: str | None = None
    backup: str | None = None
    link: str | None = None
    target: str | None = None  # symlink target as packaged; a hardlink's canonical file
    mkdir: bool = False
    adopted: bool = False
    record: bool = True


@dataclass(frozen=True, slots=True)
class TransactionPlan:
    """What a transaction will do; ``ops`` needs the mtimes learned while staging."""

    packages: tuple[tuple[Request, tuple[Placement, ...]], ...]
    removals: tuple[JournalOp, ...]  # DELETE, MOVE, RMDIR, in that order
    leaving: tuple[str, ...]  # names whose database rows go (removed and upgraded)
    staging: tuple[str, ...]  # one staging directory per mount touched
    times: tuple[tuple[str, int], ...]  # existing directories it touches: their mtimes (ns)
    notes: tuple[str, ...]

    @property
    def installs(self) -> tuple[Request, ...]:
        return tuple(request for request, _ in self.packages if request.replaces is None)

    @property
    def upgrades(self) -> tuple[Request, ...]:
        return tuple(request for request, _ in self.packages if request.replaces is not None)

    def ops(self, mtimes: Mapping[str, int]) -> tuple[JournalOp, ...]:
        """Every op in order; ``mtimes`` gives each new directory's (canonical path) mtime
        in seconds, as the package has it."""
        made = [
            JournalOp(OpKind.MKDIR, p.path, mode=p.entry.mode, mtime_ns=mtimes.get(p.path, 0) * _NS)
            for _, placements in self.packages
            for p in placements
            if p.mkdir
        ]
        puts = [
            JournalOp(OpKind.PUT, p.dest, source=p.staged, backup=p.backup)
            for _, placements in self.packages
            for p in placements
            if p.staged is not None
        ]
        return (*self.removals, *made, *puts)

    def change(self, record: TransactionRecord, mtimes: Mapping[str, list[int]]) -> DbChange:
        """The database rows: ``mtimes`` maps a package name to its entries' mtimes."""
        add = []
        for request, placements in self.packages:
            info = request.info
            old = request.replaces
            package = InstalledPackage(
                meta=info.meta,
                installed_at=record.time,
                reason=request.reason if old is None else old.reason,
                origin=request.origin,
            )
            times = mtimes[info.meta.name]
            files = tuple(
                InstalledFile(
                    path=p.path,
                    package=info.meta.name,
                    type=p.entry.type,
                    mode=p.entry.mode,
                    size=p.entry.size,
                    sha256=p.entry.sha256,
                    target=p.target,
                    mtime=times[index],
                    adopted=p.adopted,
                )
                for index, p in enumerate(placements)
                if p.record
            )
            add.append((package, files))
        return DbChange(record, self.leaving, tuple(add))


@dataclass(frozen=True, slots=True)
class Node:
    """What is at a path in the root-to-be: its kind (a word), a symlink's target, and the
    package owning it afterwards (None: nobody; for a directory, any staying owner)."""

    kind: str
    target: str | None
    owner: str | None


@dataclass(slots=True)
class _Claim:
    kind: str
    target: str | None
    packages: list[str]
    adopted: bool = False


@dataclass(slots=True)
class RootView:
    """The root as it will be after a transaction: the disk and the database, without the
    ``leaving`` packages' entries, with the ``claims`` of the packages coming in.

    Lookups are cached: the planner runs while the root is locked and unchanged.
    """

    fs: RootFs
    db: PackageDb
    leaving: frozenset[str] = frozenset()
    claims: dict[str, _Claim] = field(default_factory=dict)
    _stats: dict[str, os.stat_result | None] = field(default_factory=dict)
    _owners: dict[str, list[InstalledFile]] = field(default_factory=dict)

    def lstat(self, path: str) -> os.stat_result | None:
        if path not in self._stats:
            parent = path.rpartition("/")[0]
            if path and parent and not _is_dir(self.lstat(parent)):
                # below something absent or not a directory: the disk would say the same,
                # at the price of a failed openat (and an exception) per path
                self._stats[path] = None
            else:
                self._stats[path] = self.fs.lstat(path)
        return self._stats[path]

    def owners(self, path: str) -> list[InstalledFile]:
        if path not in self._owners:
            self._owners[path] = self.db.owners(path)
        return self._owners[path]

    def on_disk(self, path: str) -> Node | None:
        """What is at ``path`` now, minus entries of leaving packages."""
        st = self.lstat(path)
        if st is None:
            return None
        kind = kind_of(st)
        staying = [row for row in self.owners(path) if row.package not in self.leaving]
        if kind == _DIRECTORY:
            return Node(kind, None, staying[0].package if staying else None)
        owner = None
        for row in self.owners(path):
            if row.type is not FileType.DIR and _WORDS[row.type] == kind:
                if row.package in self.leaving:
                    return None  # it goes aside before anything comes in
                owner = row.package
        target = self.fs.readlink(path) if kind == _SYMLINK else None
        return Node(kind, target, owner)

    def node(self, path: str) -> Node | None:
        claim = self.claims.get(path)
        if claim is not None:
            return Node(claim.kind, claim.target, claim.packages[0])
        return self.on_disk(path)

    def resolve(
        self, package: str, label: str, base: str, rest: Iterable[str], follow_last: bool
    ) -> str:
        """The canonical path of ``base`` (canonical) joined with components ``rest``,
        following the symlinks packages own; RootError for any other symlink on the way
        (``label`` is the path being resolved, for messages)."""
        stack = base.split("/") if base else []
        pending = list(reversed(list(rest)))
        hops = 0
        while pending:
            part = pending.pop()
            if part in ("", "."):
                continue
            if part == "..":
                if not stack:
                    raise RootError(self.fs.full(label), f"{package}: resolves above the root")
                stack.pop()
                continue
            stack.append(part)
            if not pending and not follow_last:
                break
            here = "/".join(stack)
            node = self.node(here)
            if node is None or node.kind != _SYMLINK:
                continue  # a directory, one to be made, or a conflict its claim will report
            if node.owner is None:
                raise RootError(
                    self.fs.full(here),
                    f"{package}: /{label} leads through this symlink, which no package owns;"
                    " refusing to follow it",
                )
            hops += 1
            if hops > _MAX_HOPS:
                raise RootError(self.fs.full(label), f"{package}: too many levels of symlinks")
            stack.pop()
            target = node.target or ""
            if target.startswith("/"):
                stack = []
            pending.extend(reversed(target.split("/")))
        return "/".join(stack)


class Planner:
    """Builds the ``TransactionPlan`` of one transaction (see the module docstring for the rules).

    ``requests`` come in the order their entries are placed: dependencies first
    (``relations.install_order``), so a symlink a dependency ships can be followed.
    """

    def __init__(
        self,
        fs: RootFs,
        db: PackageDb,
        tx: str,
        requests: Sequence[Request],
        removals: Sequence[InstalledPackage],
    ) -> None:
        leaving = [p.meta.name for p in removals] + [
            r.replaces.meta.name for r in requests if r.replaces
        ]
        self._fs = fs
        self._tx = tx
        self._requests = tuple(requests)
        self._removed = frozenset(p.meta.name for p in removals)
        self._leaving = tuple(leaving)
        self._view = RootView(fs, db, frozenset(leaving))
        self._old_files: dict[str, InstalledFile] = {}
        self._old_dirs: set[str] = set()
        for name in leaving:
            for row in db.files(name):
                if row.type is FileType.DIR:
                    self._old_dirs.add(row.path)
                else:
                    self._old_files[row.path] = row
        self._kept: set[str] = set()  # modified config files that stay as they are
        self._notes: list[str] = []
        self._names = 0
        main = fs.mount(TX_DIR)
        self._staging: dict[int, str] = {main: f"{TX_DIR}/{tx}"}
        self._mounts: dict[str, int] = {TX_DIR: main}

    def plan(self) -> TransactionPlan:
        packages = tuple((r, self._place(r)) for r in self._requests)
        removals = self._removals()
        staging = tuple(self._staging.values())
        # every directory whose entries change, so that a rollback restores its mtime
        touched = {path.rpartition("/")[0] for path in staging}
        touched.update(op.path.rpartition("/")[0] for op in removals)
        touched.update(
            p.dest.rpartition("/")[0]
            for _, placements in packages
            for p in placements
            if p.staged is not None or p.mkdir
        )
        times = []
        for path in sorted(touched):
            st = self._view.lstat(path)
            if _is_dir(st):
                assert st is not None
                times.append((path, st.st_mtime_ns))
        return TransactionPlan(
            packages, removals, self._leaving, staging, tuple(times), tuple(self._notes)
        )

    # -- new packages ----------------------------------------------------------------

    def _place(self, request: Request) -> tuple[Placement, ...]:
        info = request.info
        name = info.meta.name
        canonical: dict[str, str] = {}  # manifest path -> canonical path
        staged: dict[str, str] = {}  # manifest path -> staged name (files)
        placements = []
        for entry in info.files:
            parent, _, last = entry.path.rpartition("/")
            base = canonical[parent] if parent else ""  # parents are earlier DIR entries
            if entry.type is FileType.DIR:
                path = self._view.resolve(name, entry.path, base, [last], follow_last=True)
            else:
                path = f"{base}/{last}" if base else last
            canonical[entry.path] = path
            if path.startswith(DB_DIR + "/"):
                raise InvalidTransaction(
                    name, f"ships /{entry.path}, inside the package database's directory"
                )
            if entry.type is FileType.DIR:
                placements.append(self._claim_dir(name, entry, path))
                continue
            placement = self._claim_entry(name, entry, path, base)
            if entry.type is FileType.HARDLINK:
                assert entry.target is not None
                placement = replace(
                    placement, link=staged[entry.target], target=canonical[entry.target]
                )
            if placement.staged is not None:
                staged[entry.path] = placement.staged
            placements.append(placement)
        return tuple(placements)

    def _claim_dir(self, package: str, entry: ManifestEntry, path: str) -> Placement:
        if not path:  # a symlink of the package's own making led back to the root
            return Placement(entry, path, path, record=False)
        claim = self._view.claims.get(path)
        if claim is not None:
            if claim.kind != _DIRECTORY:
                raise FileTypeConflict(package, path, claim.packages[0], _DIRECTORY, claim.kind)
            if package in claim.packages:
                return Placement(entry, path, path, record=False)
            claim.packages.append(package)
            return Placement(entry, path, path, adopted=claim.adopted)
        node = self._view.on_disk(path)
        if node is not None and node.kind != _DIRECTORY:
            raise FileTypeConflict(package, path, node.owner, _DIRECTORY, node.kind)
        rows = self._view.owners(path)
        adopted = node is not None and (not rows or any(row.adopted for row in rows))
        self._view.claims[path] = _Claim(_DIRECTORY, None, [package], adopted)
        if node is None:
            self._staging_for(path.rpartition("/")[0])  # the mount must be synced
        return Placement(entry, path, path, mkdir=node is None, adopted=adopted)

    def _claim_entry(self, package: str, entry: ManifestEntry, path: str, parent: str) -> Placement:
        kind = _WORDS[entry.type]
        claim = self._view.claims.get(path)
        if claim is not None:
            if claim.kind == _DIRECTORY:
                raise FileTypeConflict(package, path, claim.packages[0], kind, _DIRECTORY)
            raise FileConflict(package, path, claim.packages[0])
        node = self._view.on_disk(path)
        if node is not None:
            if node.kind == _DIRECTORY:
                raise FileTypeConflict(package, path, node.owner, kind, node.kind)
            raise FileConflict(package, path, node.owner)
        if entry.type is FileType.SYMLINK and _escapes(parent, entry.target or ""):
            raise RootError(
                self._fs.full(path),
                f"{package}: symlink to '{entry.target}' would point outside the root here",
            )
        self._view.claims[path] = _Claim(kind, entry.target, [package])
        dest = path
        if self._modified_config(entry, path):
            self._kept.add(path)
            dest = path + NEW_SUFFIX
            self._notes.append(f"/{path}: modified locally and kept; the new version is /{dest}")
            if self._view.lstat(dest) is not None:
                node = self._view.on_disk(dest)
                if node is None or node.kind == _DIRECTORY or node.owner is not None:
                    raise FileConflict(package, dest, node.owner if node else None)
        staging = self._staging_for(parent)
        backup = self._name(staging) if self._view.lstat(dest) is not None else None
        target = entry.target if entry.type is FileType.SYMLINK else None
        return Placement(
            entry, path, dest, staged=self._name(staging), backup=backup, target=target
        )

    def _modified_config(self, entry: ManifestEntry, path: str) -> bool:
        """Whether ``path`` is a config file replaced by ``entry`` whose content the user
        changed (and which the new version does not match either)."""
        old = self._old_files.get(path)
        if (
            entry.type is not FileType.FILE
            or not path.startswith(CONFIG_DIR)
            or old is None
            or old.type is not FileType.FILE
        ):
            return False
        current = self._hash(path)
        return current is not None and current != old.sha256 and current != entry.sha256

    def _hash(self, path: str) -> str | None:
        st = self._view.lstat(path)
        if st is None or not stat.S_ISREG(st.st_mode):
            return None
        return self._fs.sha256(path)

    # -- what leaves -----------------------------------------------------------------

    def _removals(self) -> tuple[JournalOp, ...]:
        deletes: list[JournalOp] = []
        moves: list[JournalOp] = []
        for path, row in sorted(self._old_files.items()):
            claim = self._view.claims.get(path)
            if path in self._kept or (claim is not None and claim.kind != _DIRECTORY):
                continue  # replaced by a PUT that keeps the old entry as its backup
            st = self._view.lstat(path)
            if st is None or _WORDS[row.type] != kind_of(st):
                continue  # gone, or replaced by hand: not ours to touch
            parent = path.rpartition("/")[0]
            if row.package in self._removed and self._modified_config_on_disk(row):
                save = path + SAVE_SUFFIX
                node = self._view.on_disk(save)
                if node is not None and (node.kind == _DIRECTORY or node.owner is not None):
                    self._notes.append(f"/{path}: modified locally; left in place, unowned")
                    continue
                if self._view.lstat(save) is not None:
                    deletes.append(
                        JournalOp(OpKind.DELETE, save, backup=self._name(self._staging_for(parent)))
                    )
                moves.append(JournalOp(OpKind.MOVE, path, dest=save))
                self._notes.append(f"/{path}: modified locally; saved as /{save}")
                continue
            deletes.append(
                JournalOp(OpKind.DELETE, path, backup=self._name(self._staging_for(parent)))
            )
        rmdirs = []
        for path in sorted(self._old_dirs, reverse=True):  # children before parents
            if path in self._view.claims:
                continue
            rows = self._view.owners(path)
            if any(r.package not in self._view.leaving or r.adopted for r in rows):
                continue
            st = self._view.lstat(path)
            if st is None or not stat.S_ISDIR(st.st_mode):
                continue
            self._staging_for(path.rpartition("/")[0])
            mode = stat.S_IMODE(st.st_mode)
            rmdirs.append(JournalOp(OpKind.RMDIR, path, mode=mode, mtime_ns=st.st_mtime_ns))
        return (*deletes, *moves, *rmdirs)

    def _modified_config_on_disk(self, row: InstalledFile) -> bool:
        if row.type is not FileType.FILE or not row.path.startswith(CONFIG_DIR):
            return False
        current = self._hash(row.path)
        return current is not None and current != row.sha256

    # -- staging locations -----------------------------------------------------------

    def _staging_for(self, directory: str) -> str:
        """The staging directory on the mount of ``directory`` (renames cannot cross
        mounts): ``var/lib/ports/tx/<id>`` on its own mount, else ``.ports-tx-<id>`` at
        the top of that mount inside the root."""
        existing = directory
        while existing and not _is_dir(self._view.lstat(existing)):
            existing = existing.rpartition("/")[0]  # to be made: on its parent's mount
        mount = self._mount(existing)
        staging = self._staging.get(mount)
        if staging is None:
            parts = existing.split("/") if existing else []
            top = existing
            for depth in range(len(parts) + 1):
                candidate = "/".join(parts[:depth])
                if self._mount(candidate) == mount:
                    top = candidate
                    break
            name = f".ports-tx-{self._tx}"
            staging = f"{top}/{name}" if top else name
            self._staging[mount] = staging
        return staging

    def _mount(self, directory: str) -> int:
        if directory not in self._mounts:
            self._mounts[directory] = self._fs.mount(directory)
        return self._mounts[directory]

    def _name(self, staging: str) -> str:
        self._names += 1
        return f"{staging}/{self._names}"


def _is_dir(st: os.stat_result | None) -> bool:
    return st is not None and stat.S_ISDIR(st.st_mode)


def _escapes(parent: str, target: str) -> bool:
    """Whether a symlink in ``parent`` to ``target`` climbs above the root, read lexically
    (the package's own check followed its links; its paths may have moved since)."""
    if not target or target.startswith("/"):
        return False
    depth = len(parent.split("/")) if parent else 0
    for part in target.split("/"):
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False
