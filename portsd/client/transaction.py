"""Changing an installation root: verified, all-or-nothing, journaled transactions.

    with Installed.open(root) as installed:         # locks the root, recovers a crash
        tx = installed.transaction()
        tx.install(path, read_portinfo(path), InstallReason.EXPLICIT, origin=url)
        tx.upgrade(other_path, other_info)
        tx.remove("oldthing")
        result = tx.commit(progress)               # all of it, or none of it

A commit runs in this order, and a ``kill -9`` (or power loss) anywhere leaves the root
and the database recoverable to exactly the state before or exactly the state after:

1. **check**: requests against the database (installed or not, dependencies, package
   conflicts), then the planner (``portsd.client.planner``) places every entry and
   refuses every file conflict. Nothing has been written yet.
2. **stage**: the journal is written in state ``staging`` (naming the staging
   directories), then every package is unpacked with ``PackageReader`` (which verifies
   the manifest, every member, sizes, hashes, and the archive's end as it streams) into
   private (0700) staging directories, one per mount the transaction touches, so each
   entry can later be renamed into place. A file gets its mode, setuid bits included,
   only once its content is complete and its sha256 checked. The filesystems are synced.
3. **journal**: the journal is rewritten in state ``applying``, listing every op.
4. **apply**: old entries go aside into the staging directories (never deleted yet),
   new entries are renamed into place (a replaced entry is first hard-linked aside, so
   its path is never missing), new directories get their modes and mtimes; synced.
5. **commit**: one sqlite transaction records the new state and the transaction's id.
   This is the commit point.
6. **cleanup**: the staging directories (with the old entries) and the journal go.

Recovery, run by every ``Installed.open`` for writing: no journal, nothing to do; a
``staging`` journal, its staging directories are removed; an ``applying`` journal whose
id the database knows, cleanup is finished (roll forward); one it does not know, every op
is undone in reverse (``portsd.client.journal``) and then cleanup runs (roll back).
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from portsd.client import journal
from portsd.client.db import (
    InstalledFile,
    InstalledPackage,
    InstallReason,
    PackageDb,
    TransactionRecord,
)
from portsd.client.journal import (
    DB_DIR,
    TX_DIR,
    Journal,
    JournalOp,
    JournalState,
    Recovery,
    RecoveryAction,
    cleanup,
    recover,
    roll_back,
)
from portsd.client.lock import RootLock, command_line
from portsd.client.planner import Planner, Request, RootView
from portsd.client.progress import Checkpoint, Phase, Progress
from portsd.client.relations import check_relations, install_order
from portsd.client.rootfs import RootFs
from portsd.client.staging import stage_all
from portsd.errors import InvalidTransaction, PackageDbError, RootError
from portsd.pkg.archive import FileType
from portsd.pkg.package import PortInfo

__all__ = [
    "Checkpoint",
    "Installed",
    "Phase",
    "Progress",
    "Recovery",
    "RecoveryAction",
    "Transaction",
    "TransactionResult",
]

log = logging.getLogger(__name__)

DB_NAME = "installed.sqlite"
LOCK_NAME = "lock"
JOURNAL_NAME = "journal"


@dataclass(frozen=True, slots=True)
class TransactionResult:
    """What a commit did. ``notes`` are config files kept or saved (say them to the user)."""

    id: str
    installed: tuple[InstalledPackage, ...]
    upgraded: tuple[tuple[InstalledPackage, InstalledPackage], ...]  # (old, new)
    removed: tuple[InstalledPackage, ...]
    notes: tuple[str, ...]
    files: int
    bytes: int


class Installed:
    """An installation root and its package database, opened for reading or changing.

    Open with ``Installed.open``; close (or use ``with``) to release the lock.
    """

    def __init__(
        self,
        root: Path,
        fs: RootFs,
        db: PackageDb,
        lock: RootLock | None,
        command: str,
        recovered: Recovery | None,
    ) -> None:
        self.root = root
        self.fs = fs
        self.db = db
        self.command = command
        self.recovered = recovered
        self._lock = lock

    @classmethod
    def open(
        cls,
        root: Path,
        *,
        readonly: bool = False,
        wait: float = 0.0,
        command: str | None = None,
    ) -> Installed:
        """Open ``root`` (an existing directory).

        For changing (the default): create ``var/lib/ports`` if needed, take the root's
        lock (RootLocked at once, or after ``wait`` seconds, naming the holder), open the
        database and recover any interrupted transaction (``recovered`` says what was
        done). ``readonly``: no lock and no recovery; the database as last committed (a
        root without one reads as empty), for queries while another client works.
        ``command`` goes into the lock file and the history (default: this process's).
        """
        command = command if command is not None else command_line(os.getpid())
        fs = RootFs(root)
        db: PackageDb | None = None
        lock: RootLock | None = None
        try:
            if readonly:
                db = PackageDb(root / DB_DIR / DB_NAME, readonly=True)
                return cls(root, fs, db, None, command, None)
            fs.makedirs(DB_DIR)
            lock = RootLock.acquire(
                root / DB_DIR / LOCK_NAME, wait=wait, command=command, dir_fd=fs.dir(DB_DIR)
            )
            fs.makedirs(TX_DIR)
            db = PackageDb(root / DB_DIR / DB_NAME)
            recovered = recover(fs, db, root / DB_DIR / JOURNAL_NAME)
            return cls(root, fs, db, lock, command, recovered)
        except PermissionError as exc:  # not a traceback: the usual mistake of a user
            _close(db, lock, fs)
            raise RootError(str(root), f"cannot change the root: {exc.strerror}") from None
        except BaseException:
            _close(db, lock, fs)
            raise

    def close(self) -> None:
        self.db.close()
        self.fs.close()
        if self._lock is not None:
            self._lock.release()

    def __enter__(self) -> Installed:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def writable(self) -> bool:
        return self._lock is not None and self._lock.held

    def transaction(self) -> Transaction:
        """A new, empty transaction on this root (which must be open for changing)."""
        if not self.writable:
            raise PackageDbError(str(self.db.path), "the root is open read-only")
        return Transaction(self)

    def resolve(self, path: str) -> str:
        """The canonical root-relative form of ``path`` (``/bin/sh`` -> ``usr/bin/sh``
        when ``bin -> usr/bin`` is a package's symlink); the last component is not
        followed. RootError for a path through a symlink no package owns."""
        parts = [p for p in path.split("/") if p]
        if not parts:
            return ""
        view = RootView(self.fs, self.db)
        return view.resolve("ports", path.lstrip("/"), "", parts, follow_last=False)

    def owners(self, path: str) -> list[InstalledFile]:
        """Who owns ``path`` (as a user writes it, inside the root): ``ports owner``."""
        return self.db.owners(self.resolve(path))

    def verify(self, name: str) -> list[str]:
        """Differences between package ``name``'s files on disk and the database: one
        line each (missing, wrong type, mode or content); empty when intact."""
        problems = []
        for row in self.db.files(name):
            st = self.fs.lstat(row.path)
            if st is None:
                problems.append(f"/{row.path}: missing")
                continue
            if row.type is FileType.SYMLINK:
                if self.fs.readlink(row.path) != row.target:
                    problems.append(f"/{row.path}: symlink target changed")
                continue
            if (st.st_mode & 0o7777) != row.mode and row.type is not FileType.DIR:
                problems.append(f"/{row.path}: mode {st.st_mode & 0o7777:o}, not {row.mode:o}")
            if row.type in (FileType.FILE, FileType.HARDLINK) and row.sha256 is not None:
                if self.fs.sha256(row.path) != row.sha256:
                    problems.append(f"/{row.path}: content changed")
        return problems


class Transaction:
    """Changes to one root, collected, then committed all at once with ``commit``.

    ``install``, ``upgrade`` and ``remove`` check their request against the database at
    once (InvalidTransaction); everything else is checked by ``commit``, before anything
    is written. A transaction commits at most once.
    """

    def __init__(self, installed: Installed) -> None:
        self._installed = installed
        self._requests: list[Request] = []
        self._removals: list[InstalledPackage] = []
        self._names: set[str] = set()
        self._done = False

    @property
    def empty(self) -> bool:
        return not self._requests and not self._removals

    def install(
        self,
        path: Path,
        info: PortInfo,
        reason: InstallReason = InstallReason.EXPLICIT,
        *,
        origin: str = "",
        sha256: str | None = None,
    ) -> None:
        """Install the package file ``path`` whose manifest is ``info`` (checked again here:
        PackageError/UnsafeArchive naming the member; the file itself is verified while it
        is unpacked, against this manifest).

        ``origin`` (a cache URL, "built from <commit>") is recorded; ``sha256``, if given,
        is checked against the file while it is read.
        """
        info.check(str(path))  # the planner relies on a sound manifest
        self._check_name(info.meta.name)
        current = self._installed.db.installed(info.meta.name)
        if current is not None:
            raise InvalidTransaction(
                info.meta.name,
                f"{current.meta.full_version} is already installed; upgrade replaces it",
            )
        self._names.add(info.meta.name)  # only once the request is sound
        self._requests.append(Request(path, info, reason, origin, sha256))

    def upgrade(
        self,
        path: Path,
        info: PortInfo,
        *,
        origin: str = "",
        sha256: str | None = None,
        reinstall: bool = False,
    ) -> None:
        """Replace the installed package of the same name by this build (any version, a
        different build key, or with ``reinstall`` the same one: every file written again);
        it keeps being explicit or a dependency as before."""
        info.check(str(path))
        self._check_name(info.meta.name)
        current = self._installed.db.installed(info.meta.name)
        if current is None:
            raise InvalidTransaction(info.meta.name, "is not installed")
        if current.meta.build_key == info.meta.build_key and not reinstall:
            raise InvalidTransaction(
                info.meta.name, f"build {info.meta.build_key[:12]} is installed already"
            )
        self._names.add(info.meta.name)
        self._requests.append(Request(path, info, current.reason, origin, sha256, current))

    def remove(self, name: str) -> None:
        """Remove package ``name``: the files it owns, and directories left empty that
        no other package owns. Refused at commit if others depend on it (unless forced)."""
        self._check_name(name)
        current = self._installed.db.installed(name)
        if current is None:
            raise InvalidTransaction(name, "is not installed")
        self._names.add(name)
        self._removals.append(current)

    def _check_name(self, name: str) -> None:
        if self._done:
            raise InvalidTransaction(name, "the transaction was already committed")
        if name in self._names:
            raise InvalidTransaction(name, "named twice in one transaction")

    def commit(self, progress: Progress | None = None, *, force: bool = False) -> TransactionResult:
        """Carry out the whole transaction, or nothing of it.

        Raises, with the root and database unchanged: InvalidTransaction (package
        conflicts), BrokenDependencies (unless ``force``), FileConflict, RootError,
        PackageError/UnsafeArchive (a package file fails verification, naming the member).
        After such a refusal the transaction may be committed again (with ``force``, say).
        """
        if self._done:
            raise InvalidTransaction(", ".join(sorted(self._names)), "already committed")
        progress = progress or Progress()
        installed = self._installed
        fs, db = installed.fs, installed.db
        progress.phase(Phase.CHECK, 0, 0)
        tx = f"{int(time.time())}-{secrets.token_hex(4)}"
        if not force:
            check_relations(db.packages(), self._requests, self._removals)
        requests = install_order(self._requests)
        plan = Planner(fs, db, tx, requests, self._removals).plan()
        journal_path = installed.root / DB_DIR / JOURNAL_NAME
        mtimes, sizes = stage_all(fs, plan, tx, journal_path, progress)
        dir_mtimes = {
            p.path: mtimes[request.info.meta.name][index]
            for request, placements in plan.packages
            for index, p in enumerate(placements)
            if p.mkdir
        }
        ops = plan.ops(dir_mtimes)
        record = TransactionRecord(
            tx,
            time.time(),
            installed.command,
            tuple(_label(r.info) for r in plan.installs),
            tuple(_label(r.info) for r in plan.upgrades),
            tuple(f"{p.meta.name} {p.meta.full_version}" for p in self._removals),
        )
        change = plan.change(record, mtimes)
        applying = Journal(tx, JournalState.APPLYING, plan.staging, ops, plan.times)
        try:  # from here on, undo (which is a no-op for ops that did not run) cleans up
            progress.reached(Checkpoint.STAGED)
            applying.write(journal_path)
            progress.reached(Checkpoint.JOURNALED)
            progress.phase(Phase.APPLY, 0, len(ops))
            for op in ops:
                _run(fs, op)
                progress.advance(0, 1)
            journal.finish(fs, ops)
            for staging in plan.staging:
                fs.sync(staging)
            progress.reached(Checkpoint.APPLIED)
            db.apply(change)
        except BaseException:
            if db.committed(tx):
                self._done = True
                raise  # the commit point was passed: the next open finishes the cleanup
            roll_back(fs, applying, journal_path)
            raise
        self._done = True
        progress.reached(Checkpoint.COMMITTED)
        progress.phase(Phase.CLEANUP, 0, 0)
        try:
            cleanup(fs, plan.staging, journal_path)
        except OSError as exc:  # committed: the next open of the root finishes this
            log.warning("cleanup of transaction %s failed (%s); it is finished later", tx, exc)
        new_rows = {package.meta.name: package for package, _ in change.add}
        return TransactionResult(
            id=tx,
            installed=tuple(new_rows[r.info.meta.name] for r in plan.installs),
            upgraded=tuple(
                (r.replaces, new_rows[r.info.meta.name]) for r in plan.upgrades if r.replaces
            ),
            removed=tuple(self._removals),
            notes=plan.notes,
            files=sizes[0],
            bytes=sizes[1],
        )


def _close(db: PackageDb | None, lock: RootLock | None, fs: RootFs) -> None:
    if db is not None:
        db.close()
    if lock is not None:
        lock.release()
    fs.close()


def _label(info: PortInfo) -> str:
    return f"{info.meta.name} {info.meta.full_version}"


def _run(fs: RootFs, op: JournalOp) -> None:
    try:
        journal.apply(fs, op)
    except OSError as exc:
        raise fs.error(op.path, exc, f"{op.kind.value} it") from exc
