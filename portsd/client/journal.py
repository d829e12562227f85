"""The journal of a transaction: the file operations it performs, and how to undo them.

A transaction is a list of ``JournalOp``s. Each op is one rename-class system call (plus, for a
replacement, a hard link that keeps the old entry), and each can be undone by looking at
the disk alone, whether the op ran, did not run, or its undo already ran: so recovery
after a ``kill -9`` at any instant, even one that hits a recovery, converges.

The journal is ``<root>/var/lib/ports/journal``, written whole (temp file, fsync, rename)
twice per transaction: in state ``staging`` (just the staging directories, so a crash
while packages unpack leaves nothing unaccounted for), then in state ``applying`` with
every op, before the first op runs. Whether a transaction committed is decided by the
package database alone (``PackageDb.committed``): no journal state can disagree with it.

Order of ops: old entries go aside (DELETE), kept config files move (MOVE), emptied
directories go (RMDIR), new directories come (MKDIR), new entries go in (PUT). Undo runs
the list backwards.

``recover`` is what every writer runs first: no journal, nothing to do; a ``staging``
journal, its staging directories go; an ``applying`` journal whose id the database knows,
cleanup is finished (roll forward); one it does not know, every op is undone in reverse
and then cleanup runs (roll back).
"""

from __future__ import annotations

import errno
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from portsd.client.db import PackageDb
from portsd.client.rootfs import ABSENT, RootFs
from portsd.errors import PackageDbError
from portsd.fsio import fsync_dir, write_atomic

log = logging.getLogger(__name__)

DB_DIR = "var/lib/ports"
"""The database's directory in a root: the database, the lock, the journal."""
TX_DIR = f"{DB_DIR}/tx"
"""Where a transaction's staging directory lives on the database's mount."""

JOURNAL_FORMAT = 1


class OpKind(StrEnum):
    """What one op does; the value is its name in the journal."""

    DELETE = "delete"  # path -> backup (same mount)
    MOVE = "move"  # path -> dest: a locally modified config file kept as .portssave
    RMDIR = "rmdir"  # path, if it is empty; undo recreates it with mode and mtime
    MKDIR = "mkdir"  # path; mode and mtime are set once every entry is in place
    PUT = "put"  # source (staged) -> path; an existing entry is first linked to backup


class JournalState(StrEnum):
    STAGING = "staging"  # packages are unpacking into the staging directories
    APPLYING = "applying"  # ops may have run


@dataclass(frozen=True, slots=True)
class JournalOp:
    """One step; every path is root-relative and canonical."""

    kind: OpKind
    path: str
    source: str | None = None  # PUT: the staged entry
    backup: str | None = None  # PUT, DELETE: where the old entry is kept until cleanup
    dest: str | None = None  # MOVE
    mode: int = 0  # MKDIR, RMDIR
    mtime_ns: int = 0  # MKDIR, RMDIR


@dataclass(frozen=True, slots=True)
class Journal:
    id: str
    state: JournalState
    staging: tuple[str, ...]
    ops: tuple[JournalOp, ...] = ()
    times: tuple[tuple[str, int], ...] = ()  # existing directories it touches: mtimes (ns)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "format": JOURNAL_FORMAT,
                "id": self.id,
                "state": self.state.value,
                "staging": list(self.staging),
                "ops": [
                    [op.kind.value, op.path, op.source, op.backup, op.dest, op.mode, op.mtime_ns]
                    for op in self.ops
                ],
                "times": [list(item) for item in self.times],
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes, label: str) -> Journal:
        """Decode a journal; PackageDbError naming ``label`` if it is not one of ours."""
        try:
            raw = json.loads(data)
            if raw["format"] != JOURNAL_FORMAT:
                raise ValueError(f"unknown journal format {raw['format']!r}")
            ops = tuple(
                JournalOp(OpKind(kind), str(path), source, backup, dest, int(mode), int(mtime))
                for kind, path, source, backup, dest, mode, mtime in raw["ops"]
            )
            return cls(
                str(raw["id"]),
                JournalState(raw["state"]),
                tuple(str(s) for s in raw["staging"]),
                ops,
                tuple((str(path), int(ns)) for path, ns in raw["times"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise PackageDbError(label, f"unreadable transaction journal: {exc}") from None

    def write(self, path: Path) -> None:
        write_atomic(path, self.to_bytes(), 0o600)

    @classmethod
    def read(cls, path: Path) -> Journal | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        return cls.from_bytes(data, str(path))


def remove_journal(path: Path) -> None:
    path.unlink(missing_ok=True)
    fsync_dir(path.parent)


def apply(fs: RootFs, op: JournalOp) -> None:
    """Carry out ``op``; OSError on failure (the caller undoes what ran)."""
    fs.trim()
    match op.kind:
        case OpKind.DELETE:
            assert op.backup is not None
            fs.rename(op.path, op.backup)
        case OpKind.MOVE:
            assert op.dest is not None
            fs.rename(op.path, op.dest)
        case OpKind.RMDIR:
            try:
                fs.rmdir(op.path)
            except OSError as exc:
                # something no package owns is left in it: the directory stays, unowned
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EBUSY):
                    raise
        case OpKind.MKDIR:
            fs.mkdir(op.path, 0o700)  # owner-writable while it fills; its mode comes last
        case OpKind.PUT:
            assert op.source is not None
            if op.backup is not None:
                try:
                    # a second name keeps the old entry while rename() swaps in the new
                    # one atomically: the path is never missing, even for an instant
                    fs.link(op.path, op.backup)
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EMLINK, errno.EXDEV):
                        raise
                    fs.rename(op.path, op.backup)  # hardlinks refused: move it aside
            fs.rename(op.source, op.path)


def finish(fs: RootFs, ops: Sequence[JournalOp]) -> None:
    """Give the directories the transaction made their modes and mtimes, deepest first."""
    for op in sorted((op for op in ops if op.kind is OpKind.MKDIR), key=lambda o: o.path)[::-1]:
        fs.trim()
        fd = fs.dir(op.path)
        os.fchmod(fd, op.mode)
        os.utime(fd, ns=(op.mtime_ns, op.mtime_ns))


def undo(fs: RootFs, op: JournalOp) -> None:
    """Undo ``op`` if it ran, judging from the disk; a no-op when it did not, or when it
    was undone already. Tolerates entries that are already gone."""
    fs.trim()
    match op.kind:
        case OpKind.DELETE:
            assert op.backup is not None
            if fs.exists(op.backup):
                fs.rename(op.backup, op.path)
        case OpKind.MOVE:
            assert op.dest is not None
            if fs.exists(op.dest) and not fs.exists(op.path):
                fs.rename(op.dest, op.path)
        case OpKind.RMDIR:
            if not fs.exists(op.path):
                fs.mkdir(op.path, op.mode)
                fd = fs.dir(op.path)
                os.fchmod(fd, op.mode)
                os.utime(fd, ns=(op.mtime_ns, op.mtime_ns))
        case OpKind.MKDIR:
            try:
                fs.rmdir(op.path)
            except OSError as exc:
                if exc.errno not in (*ABSENT, errno.ENOTEMPTY, errno.EEXIST):
                    raise
        case OpKind.PUT:
            assert op.source is not None
            placed = not fs.exists(op.source)  # staged entries exist until their PUT
            if op.backup is None:
                if placed:
                    _unlink(fs, op.path)
            elif fs.exists(op.backup):
                if placed or not fs.exists(op.path):
                    fs.rename(op.backup, op.path)  # atomically puts the old entry back
                else:
                    fs.unlink(op.backup)  # only the extra name was made


def _unlink(fs: RootFs, path: str) -> None:
    try:
        fs.unlink(path)
    except OSError as exc:
        if exc.errno not in ABSENT:
            raise


# -- recovery ----------------------------------------------------------------------------


class RecoveryAction(StrEnum):
    """What recovery did with an interrupted transaction."""

    DISCARDED = "discarded"  # killed while staging: nothing had changed
    ROLLED_BACK = "rolled back"  # killed before the commit point: undone
    ROLLED_FORWARD = "rolled forward"  # killed after the commit point: cleanup finished


@dataclass(frozen=True, slots=True)
class Recovery:
    """What opening the root found of an interrupted transaction, and did about it."""

    tx: str
    action: RecoveryAction


def roll_back(fs: RootFs, journal: Journal, journal_path: Path) -> None:
    """Put the root back as it was before ``journal``'s transaction: undo its ops (any
    prefix of them may have run), remove its staging directories, give the directories
    it touched their mtimes back, make that durable, and only then drop the journal."""
    for op in reversed(journal.ops):
        try:
            undo(fs, op)
        except OSError as exc:
            raise fs.error(op.path, exc, f"undo '{op.kind.value}' of") from exc
    for directory in journal.staging:
        fs.remove_tree(directory)
    for path, ns in journal.times:
        fs.trim()
        try:
            os.utime(fs.dir(path), ns=(ns, ns))
        except OSError as exc:
            if exc.errno not in ABSENT:
                raise
    for directory in journal.staging:
        fs.sync(directory.rpartition("/")[0])
    remove_journal(journal_path)


def cleanup(fs: RootFs, staging: Sequence[str], journal_path: Path) -> None:
    """Remove the staging directories (staged and backed-up entries), then the journal."""
    for directory in staging:
        fs.remove_tree(directory)
    remove_journal(journal_path)


def recover(fs: RootFs, db: PackageDb, journal_path: Path) -> Recovery | None:
    """Finish or undo an interrupted transaction (see the module docstring)."""
    found = Journal.read(journal_path)
    if found is None:
        _sweep(fs)
        return None
    if found.state is JournalState.STAGING:
        action = RecoveryAction.DISCARDED
        roll_back(fs, found, journal_path)  # no op to undo; staging and mtimes go back
    elif db.committed(found.id):
        action = RecoveryAction.ROLLED_FORWARD
        cleanup(fs, found.staging, journal_path)
    else:
        action = RecoveryAction.ROLLED_BACK
        roll_back(fs, found, journal_path)
    log.info("transaction %s was interrupted: %s", found.id, action.value)
    return Recovery(found.id, action)


def _sweep(fs: RootFs) -> None:
    """Without a journal nothing in the transaction directory is wanted."""
    try:
        entries = os.listdir(fs.dir(TX_DIR))
    except OSError as exc:
        if exc.errno in ABSENT:
            return
        raise
    for name in entries:
        fs.remove_tree(f"{TX_DIR}/{name}")
