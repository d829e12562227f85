"""The installed-package database: real sqlite files, every query the CLI needs."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from portsd.client.db import (
    DbChange,
    InstalledFile,
    InstalledPackage,
    InstallReason,
    PackageDb,
    TransactionRecord,
)
from portsd.core.metadata import PackageMeta
from portsd.errors import PackageDbError
from portsd.pkg.archive import FileType


def package(
    name: str,
    version: str = "1.0",
    *,
    release: int = 1,
    summary: str = "",
    depends: tuple[str, ...] = (),
    provides: tuple[str, ...] = (),
    reason: InstallReason = InstallReason.EXPLICIT,
) -> InstalledPackage:
    meta = PackageMeta(
        name=name,
        version=version,
        release=release,
        arch="x86_64",
        build_key=hashlib.sha256(name.encode()).hexdigest(),
        summary=summary,
        license="MIT",
        depends=depends,
        provides=provides,
        installed_size=10,
    )
    return InstalledPackage(meta, 1000.0, reason, "http://cache.lan/repo")


def file(path: str, owner: str, kind: FileType = FileType.FILE) -> InstalledFile:
    if kind is FileType.DIR:
        return InstalledFile(path, owner, kind, 0o755, mtime=5)
    if kind is FileType.SYMLINK:
        return InstalledFile(path, owner, kind, 0o777, target="x", mtime=5)
    return InstalledFile(path, owner, kind, 0o644, 3, "ab" * 32, mtime=5)


def commit(
    db: PackageDb,
    tx: str,
    add: list[tuple[InstalledPackage, list[InstalledFile]]],
    drop: tuple[str, ...] = (),
) -> None:
    record = TransactionRecord(tx, float(len(db.history()) + 1), "ports test", (), (), drop)
    db.apply(DbChange(record, drop, tuple((p, tuple(files)) for p, files in add)))


@pytest.fixture
def db(tmp_path: Path) -> PackageDb:
    db = PackageDb(tmp_path / "installed.sqlite")
    commit(
        db,
        "t1",
        [
            (
                package("musl", summary="The C library", provides=("libc.so",)),
                [file("usr", "musl", FileType.DIR), file("usr/lib/libc.so", "musl")],
            ),
            (
                package("zlib", "1.3.1", summary="Compression library", depends=("musl",)),
                [file("usr", "zlib", FileType.DIR), file("usr/lib/libz.so", "zlib")],
            ),
            (
                package("curl", "8.5", depends=("zlib>=1.3", "libc.so"), summary="URL tool"),
                [file("usr/bin/curl", "curl"), file("usr/bin/link", "curl", FileType.SYMLINK)],
            ),
            (package("busybox", provides=("sh=1.36",), reason=InstallReason.DEPENDENCY), []),
        ],
    )
    return db


def test_packages_round_trip_and_are_sorted(db: PackageDb) -> None:
    names = [p.meta.name for p in db.packages()]
    assert names == ["busybox", "curl", "musl", "zlib"]
    curl = db.installed("curl")
    assert curl == package("curl", "8.5", depends=("zlib>=1.3", "libc.so"), summary="URL tool")
    assert curl is not None and curl.meta.full_version == "8.5-1"
    assert db.installed("nope") is None
    busybox = db.installed("busybox")
    assert busybox is not None and busybox.reason is InstallReason.DEPENDENCY


def test_files_and_owners(db: PackageDb) -> None:
    assert db.files("curl") == [
        file("usr/bin/curl", "curl"),
        file("usr/bin/link", "curl", FileType.SYMLINK),
    ]
    assert [f.package for f in db.owners("usr")] == ["musl", "zlib"]  # a shared directory
    assert [f.package for f in db.owners("usr/lib/libz.so")] == ["zlib"]
    assert db.owners("usr/lib/nothing") == []


def test_a_non_directory_has_one_owner_and_a_failed_commit_changes_nothing(db: PackageDb) -> None:
    before = list(db._db.iterdump())
    with pytest.raises(PackageDbError, match="write failed"):
        commit(db, "t2", [(package("evil"), [file("usr/lib/libz.so", "evil")])])
    assert list(db._db.iterdump()) == before
    assert not db.committed("t2")


def test_search_matches_name_or_summary_case_insensitively(db: PackageDb) -> None:
    assert [p.meta.name for p in db.search("LIB")] == ["musl", "zlib"]
    assert [p.meta.name for p in db.search("url")] == ["curl"]
    assert db.search("%") == [] and db.search("_") == []  # LIKE wildcards are literal


def test_dependents_and_providers_resolve_provides(db: PackageDb) -> None:
    assert db.dependents("zlib") == [(db.installed("curl"), "zlib>=1.3")]
    assert db.dependents("musl") == [
        (db.installed("curl"), "libc.so"),  # through musl's provides
        (db.installed("zlib"), "musl"),
    ]
    assert db.dependents("curl") == [] and db.dependents("nope") == []
    assert [p.meta.name for p in db.providers("sh>=1")] == ["busybox"]
    assert [p.meta.name for p in db.providers("libc.so")] == ["musl"]


def test_upgrade_replaces_rows_and_history_records_it(db: PackageDb) -> None:
    new = package("zlib", "1.3.2", depends=("musl",))
    commit(db, "t2", [(new, [file("usr/lib/libz.so.2", "zlib")])], drop=("zlib",))
    assert db.installed("zlib") == new
    assert [f.path for f in db.files("zlib")] == ["usr/lib/libz.so.2"]
    assert db.owners("usr/lib/libz.so") == []
    assert db.committed("t1") and db.committed("t2") and not db.committed("t3")
    assert [h.id for h in db.history()] == ["t2", "t1"]
    assert db.history()[0].removed == ("zlib",)


def test_serials_never_go_down(db: PackageDb) -> None:
    assert db.last_serial("KEY1") is None
    assert db.record_serial("KEY1", 7) == 7
    assert db.record_serial("KEY1", 5) == 7  # an older index is not recorded
    assert db.record_serial("KEY2", 1) == 1
    assert db.last_serial("KEY1") == 7 and db.last_serial("KEY2") == 1


def test_set_reason(db: PackageDb) -> None:
    db.set_reason("busybox", InstallReason.EXPLICIT)
    busybox = db.installed("busybox")
    assert busybox is not None and busybox.reason is InstallReason.EXPLICIT
    with pytest.raises(PackageDbError, match="nope is not installed"):
        db.set_reason("nope", InstallReason.EXPLICIT)


def test_state_survives_reopening_and_readers_see_it(db: PackageDb, tmp_path: Path) -> None:
    db.record_serial("K", 3)
    db.close()
    again = PackageDb(tmp_path / "installed.sqlite")
    assert [p.meta.name for p in again.packages()] == ["busybox", "curl", "musl", "zlib"]
    reader = PackageDb(tmp_path / "installed.sqlite", readonly=True)
    assert reader.last_serial("K") == 3
    assert sqlite3.connect(tmp_path / "installed.sqlite").execute(
        "PRAGMA journal_mode"
    ).fetchone() == ("wal",)
    with pytest.raises(PackageDbError, match="read-only"):
        reader.record_serial("K", 4)


def test_readonly_without_a_database_reads_empty(tmp_path: Path) -> None:
    reader = PackageDb(tmp_path / "missing.sqlite", readonly=True)
    assert reader.packages() == [] and reader.last_serial("K") is None
    assert not (tmp_path / "missing.sqlite").exists()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    PackageDb(tmp_path / "db.sqlite").close()
    raw = sqlite3.connect(tmp_path / "db.sqlite")
    raw.execute("UPDATE meta SET value = '99' WHERE name = 'schema'")
    raw.commit()
    raw.close()
    with pytest.raises(PackageDbError, match="schema 99"):
        PackageDb(tmp_path / "db.sqlite")


def test_garbage_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "db.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(PackageDbError) as err:
        PackageDb(tmp_path / "db.sqlite")
    assert str(tmp_path / "db.sqlite") in str(err.value)
