"""The installed-package database of a root: ``<root>/var/lib/ports/installed.sqlite``.

sqlite in WAL mode: readers (``ports info``, ``search``, ``files``, ``owner``) never wait
for a transaction and never see half of one. Commits are ``synchronous=FULL``: a commit
is the commit point of an install transaction (``portsd.client.transaction``), so it must
be on disk when ``commit()`` returns.

What it holds: every installed package (its manifest's metadata, when and why it was
installed, where it came from), every path it owns (type, mode, size, sha256, link
target, mtime), the history of transactions, and a small key-value ``meta`` table (the
highest index serial seen per signing key, and the sha256 of the index accepted at it:
rollback and fork protection for the client).

Paths are root-relative and *canonical*: the installer resolves a package's paths through
the symlinks other packages own (``bin -> usr/bin``), so a file has one path here whatever
path its package used. A directory may be owned by many packages; anything else by one
(a unique index says so, so a bug elsewhere cannot record a file twice).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

from portsd.core.metadata import FACTS, LIST_FACTS, PackageMeta
from portsd.core.provider import package_meets
from portsd.core.recipe import Dependency
from portsd.errors import PackageDbError
from portsd.pkg.archive import FileType
from portsd.sqlitedb import TIMEOUT, open_database, transaction

SCHEMA_VERSION = 2  # 2: sonames

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS packages (
    name TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    release INTEGER NOT NULL,
    arch TEXT NOT NULL,
    build_key TEXT NOT NULL,
    summary TEXT NOT NULL,
    license TEXT NOT NULL,
    depends TEXT NOT NULL,
    provides TEXT NOT NULL,
    conflicts TEXT NOT NULL,
    installed_size INTEGER NOT NULL,
    sonames TEXT NOT NULL,
    installed_at REAL NOT NULL,
    reason TEXT NOT NULL,
    origin TEXT NOT NULL,
    tx TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    path TEXT NOT NULL,
    package TEXT NOT NULL REFERENCES packages(name) ON DELETE CASCADE,
    type TEXT NOT NULL,
    mode INTEGER NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT,
    target TEXT,
    mtime INTEGER NOT NULL,
    adopted INTEGER NOT NULL,
    PRIMARY KEY (path, package)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_by_package ON files(package, path);
CREATE UNIQUE INDEX IF NOT EXISTS files_one_owner ON files(path) WHERE type != 'dir';
CREATE TABLE IF NOT EXISTS transactions (
    id TEXT PRIMARY KEY,
    time REAL NOT NULL,
    command TEXT NOT NULL,
    installed TEXT NOT NULL,
    upgraded TEXT NOT NULL,
    removed TEXT NOT NULL
);
"""

_PACKAGE_COLUMNS = ", ".join((*FACTS, "installed_at", "reason", "origin"))
_FILE_COLUMNS = "path, package, type, mode, size, sha256, target, mtime, adopted"
_SERIAL = "serial:"
_DIGEST = "index-sha256:"


class InstallReason(StrEnum):
    """Why a package is installed: asked for by name, or pulled in by another's depends."""

    EXPLICIT = "explicit"
    DEPENDENCY = "dependency"


@dataclass(frozen=True, slots=True)
class InstalledPackage:
    """One installed package: its manifest's facts, when and why it was installed, and
    ``origin``, where it came from (a cache URL, a build)."""

    meta: PackageMeta
    installed_at: float
    reason: InstallReason
    origin: str


@dataclass(frozen=True, slots=True)
class InstalledFile:
    """A path owned by ``package``: canonical, root-relative, as installed.

    ``target`` is a symlink's target (as in the package) or a hardlink's file (canonical).
    ``adopted`` marks a directory that existed, owned by no package, when a package first
    claimed it: it is never removed when its owners go.
    """

    path: str
    package: str
    type: FileType
    mode: int
    size: int = 0
    sha256: str | None = None
    target: str | None = None
    mtime: int = 0
    adopted: bool = False


@dataclass(frozen=True, slots=True)
class TransactionRecord:
    """One committed transaction; package lists hold ``name version-release`` strings."""

    id: str
    time: float
    command: str
    installed: tuple[str, ...]
    upgraded: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class DbChange:
    """What one transaction does to the database: rows of ``drop`` go, ``add`` come in.

    An upgrade drops the old package's name and adds the new one under it.
    """

    record: TransactionRecord
    drop: tuple[str, ...]
    add: tuple[tuple[InstalledPackage, tuple[InstalledFile, ...]], ...]


class PackageDb:
    """The database of one root. Not thread-safe: one connection, one thread.

    ``readonly`` opens an existing file for queries only (a missing one reads as empty;
    one in a directory this user cannot write, as immutable);
    otherwise the file and its schema are created as needed. Every sqlite failure is
    raised as PackageDbError naming the file.
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        try:
            if readonly and not path.exists():
                self._db = sqlite3.connect(":memory:", isolation_level=None)
                self._db.executescript(_SCHEMA)
            elif readonly:
                # sqlite's WAL needs a -shm file beside the database: where this user may
                # not create one, read the file as immutable (what the last writer left;
                # every ports command checkpoints the WAL into the file when it closes)
                immutable = not os.access(path.parent, os.W_OK)
                uri = f"file:{path}?mode=ro" + ("&immutable=1" if immutable else "")
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=TIMEOUT)
            else:
                self._db = open_database(path, durable=True)  # a commit is a commit point
                self._db.executescript(_SCHEMA)
            if not readonly:
                with self._write() as db:
                    row = db.execute("SELECT value FROM meta WHERE name = 'schema'").fetchone()
                    if row is None:
                        db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            version = self._one("SELECT value FROM meta WHERE name = 'schema'")
            if version is not None and int(version[0]) != SCHEMA_VERSION:
                raise PackageDbError(
                    str(path), f"schema {version[0]}; this ports knows schema {SCHEMA_VERSION}"
                )
        except sqlite3.Error as exc:
            raise PackageDbError(str(path), f"cannot open the database: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> PackageDb:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- plumbing ------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        if self.readonly:
            raise PackageDbError(str(self.path), "opened read-only")
        with transaction(self._db, partial(PackageDbError, str(self.path))) as db:
            yield db

    def _all(self, sql: str, parameters: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, parameters).fetchall()
        except sqlite3.Error as exc:
            raise PackageDbError(str(self.path), f"query failed: {exc}") from None

    def _one(self, sql: str, parameters: Sequence[object] = ()) -> tuple[Any, ...] | None:
        rows = self._all(sql, parameters)
        return rows[0] if rows else None

    # -- packages ------------------------------------------------------------------------

    def installed(self, name: str) -> InstalledPackage | None:
        """The installed package called ``name`` (not a provider of it), or None."""
        row = self._one(f"SELECT {_PACKAGE_COLUMNS} FROM packages WHERE name = ?", (name,))
        return None if row is None else _package(row, self.path)

    def packages(self) -> list[InstalledPackage]:
        """Every installed package, by name."""
        return [
            _package(row, self.path)
            for row in self._all(f"SELECT {_PACKAGE_COLUMNS} FROM packages ORDER BY name")
        ]

    def search(self, text: str) -> list[InstalledPackage]:
        """Packages whose name or summary contains ``text`` (ASCII case-insensitive), by name."""
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._all(
            f"SELECT {_PACKAGE_COLUMNS} FROM packages "
            "WHERE name LIKE ?1 ESCAPE '\\' OR summary LIKE ?1 ESCAPE '\\' ORDER BY name",
            (pattern,),
        )
        return [_package(row, self.path) for row in rows]

    def providers(self, dependency: str | Dependency) -> list[InstalledPackage]:
        """Installed packages that meet ``dependency`` (by name or ``provides``)."""
        return [p for p in self.packages() if package_meets(p.meta, dependency)]

    def dependents(self, name: str) -> list[tuple[InstalledPackage, str]]:
        """Installed packages with a dependency that package ``name`` meets, and that
        dependency: who needs it (whether or not another package could stand in)."""
        target = self.installed(name)
        if target is None:
            return []
        return [
            (package, dependency)
            for package in self.packages()
            if package.meta.name != name
            for dependency in package.meta.depends
            if package_meets(target.meta, dependency)
        ]

    def set_reason(self, name: str, reason: InstallReason) -> None:
        """Mark an installed package explicit (asked for) or a dependency."""
        with self._write() as db:
            cursor = db.execute("UPDATE packages SET reason = ? WHERE name = ?", (reason, name))
        if cursor.rowcount == 0:
            raise PackageDbError(str(self.path), f"{name} is not installed")

    # -- files ---------------------------------------------------------------------------

    def files(self, name: str) -> list[InstalledFile]:
        """The paths package ``name`` owns, in bytewise order (parents before children)."""
        rows = self._all(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE package = ? ORDER BY path", (name,)
        )
        return [_file(row) for row in rows]

    def owners(self, path: str) -> list[InstalledFile]:
        """Who owns canonical root-relative ``path``: several for a shared directory."""
        rows = self._all(
            f"SELECT {_FILE_COLUMNS} FROM files WHERE path = ? ORDER BY package", (path,)
        )
        return [_file(row) for row in rows]

    # -- transactions --------------------------------------------------------------------

    def apply(self, change: DbChange) -> None:
        """Commit ``change`` as one sqlite transaction: all of it or none of it."""
        record = change.record
        with self._write() as db:
            db.executemany("DELETE FROM packages WHERE name = ?", [(n,) for n in change.drop])
            db.executemany(
                f"INSERT INTO packages ({_PACKAGE_COLUMNS}, tx) "
                f"VALUES ({', '.join('?' * (len(FACTS) + 4))})",
                [
                    (
                        *_meta_row(package.meta),
                        package.installed_at,
                        package.reason.value,
                        package.origin,
                        record.id,
                    )
                    for package, _ in change.add
                ],
            )
            # every package row first (files reference them), then all files in one call
            db.executemany(
                f"INSERT INTO files ({_FILE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        f.path,
                        f.package,
                        f.type.value,
                        f.mode,
                        f.size,
                        f.sha256,
                        f.target,
                        f.mtime,
                        int(f.adopted),
                    )
                    for _, files in change.add
                    for f in files
                ],
            )
            db.execute(
                "INSERT INTO transactions VALUES (?, ?, ?, ?, ?, ?)",
                (
                    record.id,
                    record.time,
                    record.command,
                    json.dumps(record.installed),
                    json.dumps(record.upgraded),
                    json.dumps(record.removed),
                ),
            )

    def committed(self, tx: str) -> bool:
        """Whether transaction ``tx`` reached its commit point (journal recovery asks)."""
        return self._one("SELECT 1 FROM transactions WHERE id = ?", (tx,)) is not None

    def history(self, limit: int = 100) -> list[TransactionRecord]:
        """Committed transactions, newest first."""
        rows = self._all(
            "SELECT id, time, command, installed, upgraded, removed FROM transactions "
            "ORDER BY time DESC, id DESC LIMIT ?",
            (limit,),
        )
        return [
            TransactionRecord(
                str(id_),
                float(time),
                str(command),
                tuple(json.loads(installed)),
                tuple(json.loads(upgraded)),
                tuple(json.loads(removed)),
            )
            for id_, time, command, installed, upgraded, removed in rows
        ]

    # -- meta ----------------------------------------------------------------------------

    def last_serial(self, key_id: str) -> int | None:
        """The highest index serial recorded for signing key ``key_id``, or None."""
        row = self._one("SELECT value FROM meta WHERE name = ?", (_SERIAL + key_id,))
        return None if row is None else int(row[0])

    def record_serial(self, key_id: str, serial: int) -> int:
        """Remember ``serial`` for ``key_id`` unless a higher one is known; return the highest.

        Never lowers the stored value, so a client that records every index it accepts
        can refuse any older one afterwards.
        """
        with self._write() as db:
            row = db.execute(
                "SELECT value FROM meta WHERE name = ?", (_SERIAL + key_id,)
            ).fetchone()
            highest = serial if row is None else max(int(row[0]), serial)
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (_SERIAL + key_id, str(highest))
            )
        return highest

    def serial_digest(self, key_id: str, serial: int) -> str | None:
        """The sha256 of the index accepted at ``serial`` for ``key_id``, if recorded."""
        row = self._one("SELECT value FROM meta WHERE name = ?", (_DIGEST + key_id,))
        if row is None:
            return None
        recorded, _, sha256 = str(row[0]).partition(":")
        return sha256 if int(recorded) == serial else None

    def record_digest(self, key_id: str, serial: int, sha256: str) -> None:
        """Remember which index content was accepted at ``serial`` (the highest seen)."""
        with self._write() as db:
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                (_DIGEST + key_id, f"{serial}:{sha256}"),
            )


def _meta_row(meta: PackageMeta) -> tuple[object, ...]:
    """The first columns of a package's row: its facts, lists as JSON."""
    return tuple(
        json.dumps(getattr(meta, fact)) if fact in LIST_FACTS else getattr(meta, fact)
        for fact in FACTS
    )


def _package(row: tuple[Any, ...], path: Path) -> InstalledPackage:
    facts, (installed_at, reason, origin) = row[: len(FACTS)], row[len(FACTS) :]
    values: dict[str, Any] = {
        fact: tuple(json.loads(value)) if fact in LIST_FACTS else value
        for fact, value in zip(FACTS, facts, strict=True)
    }
    try:
        meta = PackageMeta(**values)
    except ValueError as error:
        raise PackageDbError(str(path), f"package {values['name']!r}: {error}") from None
    return InstalledPackage(meta, float(installed_at), InstallReason(reason), str(origin))


def _file(row: tuple[Any, ...]) -> InstalledFile:
    path, package, type_, mode, size, sha256, target, mtime, adopted = row
    return InstalledFile(
        path=str(path),
        package=str(package),
        type=FileType(type_),
        mode=int(mode),
        size=int(size),
        sha256=None if sha256 is None else str(sha256),
        target=None if target is None else str(target),
        mtime=int(mtime),
        adopted=bool(adopted),
    )
