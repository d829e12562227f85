"""Install transactions into real roots: real packages (create_package on DESTDIRs written
here), real sqlite, real second processes for the lock, real SIGKILLs for recovery, and
crafted hostile archives. "Unchanged" is checked byte for byte: every entry of the root
with its type, mode, content or target, mtime and link count, and the database's dump.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard

from portsd.client import Checkpoint, Installed, InstallReason, Progress, RecoveryAction
from portsd.core.metadata import PackageMeta
from portsd.errors import (
    BrokenDependencies,
    FileConflict,
    FileTypeConflict,
    InvalidTransaction,
    PackageError,
    RootError,
    RootLocked,
    UnsafeArchive,
)
from portsd.pkg.archive import FileType, ManifestEntry
from portsd.pkg.package import PortInfo, create_package, read_portinfo

EPOCH = 315_532_800
DB_DIR = "var/lib/ports"
REPO = Path(__file__).parent.parent


class Dir:
    """A directory entry of a DESTDIR spec (files' parents are made implicitly)."""


@dataclass(frozen=True)
class Link:
    target: str


@dataclass(frozen=True)
class Hard:
    target: str


Spec = dict[str, "bytes | Dir | Link | Hard"]


@dataclass(frozen=True)
class Pkg:
    path: Path
    info: PortInfo


@dataclass
class Factory:
    """Packages built from DESTDIRs written under ``base``."""

    base: Path
    made: list[Path] = field(default_factory=list)

    def __call__(
        self,
        name: str,
        files: Spec,
        *,
        version: str = "1.0",
        build: str = "1",
        depends: tuple[str, ...] = (),
        provides: tuple[str, ...] = (),
        conflicts: tuple[str, ...] = (),
        modes: dict[str, int] | None = None,
    ) -> Pkg:
        destdir = self.base / "destdirs" / f"{name}-{version}-{build}"
        destdir.mkdir(parents=True)
        for path, what in sorted(files.items(), key=lambda item: isinstance(item[1], Hard)):
            full = destdir / path
            full.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(what, Dir):
                full.mkdir(exist_ok=True)
            elif isinstance(what, Link):
                os.symlink(what.target, full)
            elif isinstance(what, Hard):  # after every file: its target exists
                os.link(destdir / what.target, full)
            else:
                full.write_bytes(what)
        for path, mode in (modes or {}).items():
            os.chmod(destdir / path, mode)
        key = hashlib.sha256(f"{name} {version} {build}".encode()).hexdigest()
        meta = PackageMeta(
            name,
            version,
            1,
            "x86_64",
            key,
            summary=f"the {name} package",
            depends=depends,
            provides=provides,
            conflicts=conflicts,
        )
        built = create_package(destdir, meta, self.base / "packages", epoch=EPOCH, threads=1)
        return Pkg(built.path, built.info)


@pytest.fixture
def make(tmp_path: Path) -> Factory:
    return Factory(tmp_path)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


# --- the packages most tests use ------------------------------------------------------------

BASE: Spec = {
    "usr/bin": Dir(),
    "usr/lib": Dir(),
    "usr/share": Dir(),
    "etc/passwd": b"root:x:0:0::/root:/bin/sh\n",
    "bin": Link("usr/bin"),  # merged /usr, as the baselayout port does it
    "lib": Link("usr/lib"),
}


def libz(make: Factory, version: str = "1.3", build: str = "1") -> Pkg:
    files: Spec = {
        "usr/lib/libz.so.1": b"\x7fELF libz " + version.encode() * 100,
        "usr/lib/libz.so": Link("libz.so.1"),
        "usr/include/zlib.h": b"/* zlib " + version.encode() + b" */\n",
        "usr/share/common/zlib.txt": b"shared dir\n",
        "etc/zlib.conf": b"level = 6\n",
    }
    if version == "1.3":
        files["usr/share/doc/zlib/README"] = b"only in 1.3\n"
    else:
        files["usr/share/doc/zlib/NEWS"] = b"new in " + version.encode() + b"\n"
    return make("zlib", files, version=version, build=build, depends=("baselayout",))


def app(make: Factory, build: str = "1") -> Pkg:
    return make(
        "app",
        {
            "bin/app": b"#!/bin/sh\necho app " + build.encode() + b"\n",  # through bin -> usr/bin
            "usr/bin/app-su": b"setuid helper\n",
            "usr/bin/app-alias": Hard("usr/bin/app-su"),
            "usr/share/common/app.txt": b"shared dir\n",
            "etc/app.conf": b"colour = blue\n",
        },
        build=build,
        depends=("zlib>=1.3", "baselayout"),
        modes={"usr/bin/app-su": 0o4755},
    )


def install(root: Path, *packages: Pkg, force: bool = False) -> None:
    with Installed.open(root) as installed:
        tx = installed.transaction()
        for package in packages:
            tx.install(package.path, package.info)
        tx.commit(force=force)


# --- snapshots -------------------------------------------------------------------------------


def tree(root: Path, *, dir_mtimes: bool = True) -> dict[str, tuple[object, ...]]:
    """Everything below ``root`` except the database directory, as comparable values."""
    found: dict[str, tuple[object, ...]] = {}
    for directory, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        if rel_dir == DB_DIR:
            dirs.clear()
            continue
        for name in dirs + files:
            full = os.path.join(directory, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if rel == DB_DIR:
                continue
            st = os.lstat(full)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                found[rel] = ("dir", mode, st.st_mtime_ns if dir_mtimes else None)
            elif stat.S_ISLNK(st.st_mode):
                found[rel] = ("link", os.readlink(full), st.st_mtime_ns)
            else:
                data = Path(full).read_bytes()
                found[rel] = ("file", mode, data, st.st_mtime_ns, st.st_nlink)
    return found


def db_dump(root: Path) -> list[str]:
    path = root / DB_DIR / "installed.sqlite"
    if not path.exists():
        return []
    import sqlite3

    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(connection.iterdump())
    finally:
        connection.close()


def state(root: Path) -> tuple[object, ...]:
    """Byte-for-byte: the tree, the database, and what is in the database directory."""
    db_dir = root / DB_DIR
    listing = (
        sorted(
            str(p.relative_to(db_dir))
            for p in db_dir.rglob("*")
            if not p.name.endswith(("-shm", "-wal"))
        )
        if db_dir.exists()
        else []
    )
    return tree(root), db_dump(root), listing


def logical(root: Path, *, history: bool = True) -> tuple[object, ...]:
    """What a user can tell apart: the tree (without directory mtimes, which any change
    of their entries moves) and the database without times and transaction ids (with
    how many transactions it holds, if ``history``)."""
    with Installed.open(root, readonly=True) as installed:
        db = installed.db
        packages = [
            (
                p.meta.name,
                p.meta.full_version,
                p.meta.build_key,
                p.reason,
                p.meta.depends,
                tuple(db.files(p.meta.name)),
            )
            for p in db.packages()
        ]
        transactions = len(db.history()) if history else None
    return tree(root, dir_mtimes=False), packages, transactions


def assert_clean(root: Path) -> None:
    """No journal, no staging directory, no backup left anywhere in the root."""
    assert not (root / DB_DIR / "journal").exists()
    assert list((root / DB_DIR / "tx").iterdir()) == []
    leftovers = [p for p in root.rglob(".ports-tx-*")]
    assert leftovers == []


def assert_files_match_db(root: Path, name: str) -> None:
    """Every path the database gives ``name`` is on disk exactly as its manifest says."""
    with Installed.open(root, readonly=True) as installed:
        rows = installed.db.files(name)
        assert rows, name
        for row in rows:
            full = root / row.path
            st = full.lstat()
            assert row.mtime == EPOCH, row
            if row.type is FileType.DIR:
                assert stat.S_ISDIR(st.st_mode), row
            elif row.type is FileType.SYMLINK:
                assert os.readlink(full) == row.target
                assert st.st_mtime_ns == EPOCH * 10**9
            else:
                assert stat.S_ISREG(st.st_mode), row
                assert stat.S_IMODE(st.st_mode) == row.mode, row
                assert st.st_mtime_ns == EPOCH * 10**9
                if row.type is FileType.HARDLINK:  # the file it shares is checked as a file
                    assert row.target is not None and row.sha256 is None
                    assert st.st_ino == (root / row.target).lstat().st_ino
                else:
                    assert hashlib.sha256(full.read_bytes()).hexdigest() == row.sha256, row
        assert installed.verify(name) == []


# --- installing ------------------------------------------------------------------------------


def test_install_several_packages_files_and_database_agree(root: Path, make: Factory) -> None:
    base, zlib, application = make("baselayout", BASE), libz(make), app(make)
    with Installed.open(root) as installed:
        assert installed.recovered is None
        tx = installed.transaction()
        # given dependents first: the transaction installs dependencies first, so app's
        # bin/app finds baselayout's bin -> usr/bin symlink
        tx.install(application.path, application.info, origin="http://cache.lan")
        tx.install(zlib.path, zlib.info, InstallReason.DEPENDENCY)
        tx.install(base.path, base.info)
        result = tx.commit()
        assert [p.meta.name for p in result.installed] == ["baselayout", "zlib", "app"]
        assert result.files == 3 + 6 + 5 and result.upgraded == () and result.removed == ()
        db = installed.db
        assert [p.meta.name for p in db.packages()] == ["app", "baselayout", "zlib"]
        zlib_row = db.installed("zlib")
        assert zlib_row is not None and zlib_row.reason is InstallReason.DEPENDENCY
        app_row = db.installed("app")
        assert app_row is not None and app_row.origin == "http://cache.lan"
        # the path through the merged-/usr symlink is recorded canonically
        assert [f.package for f in installed.owners("/bin/app")] == ["app"]
        assert [f.path for f in installed.owners("/bin/app")] == ["usr/bin/app"]
        assert [(f.package, f.type) for f in installed.owners("/bin")] == [
            ("baselayout", FileType.SYMLINK)
        ]
        assert sorted(f.package for f in installed.owners("usr/share/common")) == ["app", "zlib"]
        assert db.dependents("zlib") == [(app_row, "zlib>=1.3")]
        assert [h.installed for h in db.history()] == [
            ("baselayout 1.0-1", "zlib 1.3-1", "app 1.0-1")
        ]
    for name in ("baselayout", "zlib", "app"):
        assert_files_match_db(root, name)
    assert stat.S_IMODE((root / "usr/bin/app-su").stat().st_mode) == 0o4755
    assert (root / "usr/bin/app-alias").stat().st_nlink == 2
    assert (root / "bin").is_symlink() and (root / "usr/bin/app").is_file()
    assert_clean(root)


def test_an_absolute_symlink_of_a_package_resolves_inside_the_root(
    root: Path, make: Factory, tmp_path: Path
) -> None:
    """A package's ``lib64 -> /usr/lib`` would lead the kernel to the host's /usr/lib when
    the root is not /; the installer resolves it inside the root."""
    unique = f"libportstest-{os.getpid()}-{random.randrange(10**9)}.so"
    install(root, make("baselayout", BASE), make("lib64", {"lib64": Link("/usr/lib")}))
    install(root, make("libx", {f"lib64/{unique}": b"x"}))
    assert (root / "usr/lib" / unique).read_bytes() == b"x"
    assert not Path("/usr/lib", unique).exists()
    with Installed.open(root, readonly=True) as installed:
        assert [f.path for f in installed.db.files("libx")] == ["usr/lib", f"usr/lib/{unique}"]


def test_a_symlink_no_package_owns_is_never_followed(
    root: Path, make: Factory, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    install(root, make("baselayout", BASE))
    os.symlink(outside, root / "usr/local")  # planted by hand (or by anything but a package)
    before = state(root)
    with Installed.open(root) as installed, pytest.raises(RootError) as err:
        tx = installed.transaction()
        tx.install(*astuple(make("tool", {"usr/local/bin/tool": b"x"})))
        tx.commit()
    assert "usr/local" in str(err.value) and "no package owns" in str(err.value)
    assert list(outside.iterdir()) == []
    assert state(root) == before


def astuple(package: Pkg) -> tuple[Path, PortInfo]:
    return package.path, package.info


def test_a_package_may_not_write_into_the_database_directory(root: Path, make: Factory) -> None:
    evil = make("evil", {"var/lib/ports/installed.sqlite.evil": b"x"})
    with Installed.open(root) as installed, pytest.raises(InvalidTransaction, match="database"):
        tx = installed.transaction()
        tx.install(evil.path, evil.info)
        tx.commit()


# --- conflicts -------------------------------------------------------------------------------


def refused(root: Path, *packages: Pkg) -> pytest.ExceptionInfo[BaseException]:
    """Install ``packages`` in one transaction, expecting a refusal that changes nothing."""
    with Installed.open(root) as installed:
        before = state(root)
        with pytest.raises((FileConflict, RootError, InvalidTransaction)) as err:
            tx = installed.transaction()
            for package in packages:
                tx.install(package.path, package.info)
            tx.commit()
    assert state(root) == before
    return err


def test_a_file_owned_by_another_package_is_a_conflict(root: Path, make: Factory) -> None:
    install(root, make("baselayout", BASE), libz(make))
    err = refused(root, make("other", {"usr/lib/libz.so.1": b"impostor"}))
    assert isinstance(err.value, FileConflict)
    assert (err.value.package, err.value.path, err.value.owner) == (
        "other",
        "usr/lib/libz.so.1",
        "zlib",
    )
    assert str(err.value) == "other: /usr/lib/libz.so.1 owned by zlib"


def test_two_names_of_one_file_conflict(root: Path, make: Factory) -> None:
    install(root, make("baselayout", BASE), make("coreutils", {"usr/bin/ls": b"ls"}))
    err = refused(root, make("busybox", {"bin/ls": b"busybox ls"}))  # bin -> usr/bin
    assert str(err.value) == "busybox: /usr/bin/ls owned by coreutils"


def test_an_existing_file_no_package_owns_is_a_conflict(root: Path, make: Factory) -> None:
    (root / "etc").mkdir()
    (root / "etc/hostname").write_text("mine\n")
    err = refused(root, make("netbase", {"etc/hostname": b"localhost\n", "etc/hosts": b"\n"}))
    assert str(err.value) == "netbase: /etc/hostname exists and is not owned by any package"


def test_packages_of_one_transaction_conflict_with_each_other(root: Path, make: Factory) -> None:
    err = refused(root, make("a", {"usr/bin/x": b"a"}), make("b", {"usr/bin/x": b"b"}))
    assert str(err.value) == "b: /usr/bin/x owned by a"


def test_a_directory_where_a_file_is_wanted_and_the_reverse(root: Path, make: Factory) -> None:
    install(root, make("docs", {"usr/share/doc/x/README": b"x"}))
    err = refused(root, make("flat", {"usr/share/doc/x": b"a file"}))
    assert isinstance(err.value, FileTypeConflict)
    assert str(err.value) == (
        "flat: wants a file at /usr/share/doc/x, where there is a directory of docs"
    )
    err = refused(root, make("deep", {"usr/share/doc/x/README/more": b"x"}))
    assert isinstance(err.value, FileTypeConflict)
    assert err.value.path == "usr/share/doc/x/README" and err.value.owner == "docs"
    assert "wants a directory" in str(err.value)
    (root / "opt").mkdir()
    (root / "opt/thing").write_text("by hand")
    err = refused(root, make("opt", {"opt/thing/file": b"x"}))
    assert "wants a directory at /opt/thing, where there is a file owned by no package" in str(
        err.value
    )


def test_package_conflicts_and_dependencies_are_checked(root: Path, make: Factory) -> None:
    install(root, make("baselayout", BASE), libz(make))
    err = refused(root, make("zlib-ng", {"usr/lib/ng": b"x"}, conflicts=("zlib",)))
    assert str(err.value) == "zlib-ng: conflicts with zlib 1.3-1 ('zlib')"
    before = state(root)
    with Installed.open(root) as installed, pytest.raises(BrokenDependencies) as broken:
        tx = installed.transaction()
        tx.install(*astuple(make("needy", {"usr/bin/needy": b"x"}, depends=("openssl>=3",))))
        tx.commit()
    assert broken.value.unmet == (("needy", "openssl>=3"),)
    assert state(root) == before
    with Installed.open(root) as installed:  # forced: installed all the same
        tx = installed.transaction()
        tx.install(*astuple(make("needy2", {"usr/bin/needy2": b"x"}, depends=("openssl",))))
        tx.commit(force=True)
        assert installed.db.installed("needy2") is not None


def test_requests_that_make_no_sense_are_refused_at_once(root: Path, make: Factory) -> None:
    zlib = libz(make)
    install(root, make("baselayout", BASE), zlib)
    with Installed.open(root) as installed:
        tx = installed.transaction()
        with pytest.raises(InvalidTransaction, match="zlib: 1.3-1 is already installed"):
            tx.install(zlib.path, zlib.info)
        with pytest.raises(InvalidTransaction, match="is installed already"):
            installed.transaction().upgrade(zlib.path, zlib.info)
        with pytest.raises(InvalidTransaction, match="nope: is not installed"):
            tx.remove("nope")
        tx.remove("zlib")
        with pytest.raises(InvalidTransaction, match="named twice"):
            tx.remove("zlib")


# --- removing --------------------------------------------------------------------------------


def test_remove_deletes_only_what_the_package_owns(root: Path, make: Factory) -> None:
    install(root, make("baselayout", BASE), libz(make), app(make))
    (root / "usr/share/doc/zlib/notes.txt").write_text("mine")  # unowned, in zlib's dir
    before = tree(root, dir_mtimes=False)
    with Installed.open(root) as installed:
        owned = {f.path for name in ("app", "zlib") for f in installed.db.files(name)}
        tx = installed.transaction()
        tx.remove("app")
        tx.remove("zlib")
        result = tx.commit()
        assert [p.meta.name for p in result.removed] == ["app", "zlib"]
        assert [p.meta.name for p in installed.db.packages()] == ["baselayout"]
        assert installed.db.owners("usr/share/common") == []
    after = tree(root, dir_mtimes=False)
    for gone in (
        "usr/bin/app",
        "usr/bin/app-su",
        "usr/lib/libz.so.1",
        "usr/lib/libz.so",
        "usr/include/zlib.h",
        "usr/share/common",
        "usr/include",
        "etc/app.conf",
    ):
        assert gone not in after, gone
    assert after["usr/share/doc/zlib/notes.txt"][2] == b"mine"  # and so its directories stay
    assert after["usr/share/doc/zlib"][0] == "dir" and "usr/share/doc/zlib/README" not in after
    for path, value in before.items():  # baselayout's entries, shared dirs included
        if path not in owned or path in ("usr", "usr/lib", "usr/bin", "usr/share", "etc"):
            assert after[path] == value, path
    assert_files_match_db(root, "baselayout")
    assert_clean(root)


def test_remove_refuses_to_break_a_dependent_unless_forced(root: Path, make: Factory) -> None:
    install(root, make("baselayout", BASE), libz(make), app(make))
    before = state(root)
    with Installed.open(root) as installed:
        with pytest.raises(BrokenDependencies) as err:
            tx = installed.transaction()
            tx.remove("zlib")
            tx.commit()
        assert err.value.unmet == (("app", "zlib>=1.3"),)
        assert str(err.value) == "the change would break dependencies: app needs 'zlib>=1.3'"
        assert state(root) == before
        tx.commit(force=True)  # the refused transaction, again, forced
        assert installed.db.installed("zlib") is None and installed.db.installed("app")
        with pytest.raises(InvalidTransaction, match="already committed"):
            tx.commit()
    assert not (root / "usr/lib/libz.so.1").exists()
    assert_files_match_db(root, "app")


def test_another_provider_keeps_a_dependency_met(root: Path, make: Factory) -> None:
    install(
        root,
        make("busybox", {"usr/bin/busybox": b"bb"}, provides=("sh=1.36",)),
        make("dash", {"usr/bin/dash": b"dash"}, provides=("sh=0.5",)),
        make("script", {"usr/bin/script": b"x"}, depends=("sh",)),
    )
    with Installed.open(root) as installed:
        tx = installed.transaction()
        tx.remove("dash")
        tx.commit()
        tx = installed.transaction()
        tx.remove("busybox")
        with pytest.raises(BrokenDependencies, match="script needs 'sh'"):
            tx.commit()


def test_one_transaction_replaces_a_package_by_another_owning_its_files(
    root: Path, make: Factory
) -> None:
    install(root, make("baselayout", BASE), make("busybox", {"bin/sh": b"busybox"}))
    dash = make("dash", {"usr/bin/sh": b"dash", "usr/bin/dash": b"dash"}, conflicts=("busybox",))
    with Installed.open(root) as installed:
        tx = installed.transaction()
        tx.remove("busybox")
        tx.install(dash.path, dash.info)
        tx.commit()
        assert [f.package for f in installed.owners("/bin/sh")] == ["dash"]
    assert (root / "usr/bin/sh").read_bytes() == b"dash"
    assert_files_match_db(root, "dash")
    assert_clean(root)


class Failing(Progress):
    def __init__(self, at: Checkpoint) -> None:
        self.at = at

    def reached(self, checkpoint: Checkpoint) -> None:
        if checkpoint == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("at", [Checkpoint.STAGED, Checkpoint.JOURNALED, Checkpoint.APPLIED])
def test_an_exception_before_the_commit_point_undoes_everything_at_once(
    root: Path, make: Factory, at: Checkpoint
) -> None:
    install(root, make("baselayout", BASE), libz(make))
    with Installed.open(root) as installed:
        before = state(root)
        tx = installed.transaction()
        tx.upgrade(*astuple(libz(make, "1.3.1")))
        tx.install(*astuple(app(make)))
        with pytest.raises(KeyboardInterrupt):
            tx.commit(Failing(at))
        assert state(root) == before
        assert_clean(root)
        tx.commit()  # nothing happened: it may be tried again
    with Installed.open(root) as installed:
        assert installed.recovered is None
        zlib = installed.db.installed("zlib")
        assert zlib is not None and zlib.meta.version == "1.3.1"


# --- upgrading -------------------------------------------------------------------------------


def test_upgrade_by_build_key_replaces_files_and_drops_vanished_ones(
    root: Path, make: Factory
) -> None:
    install(root, make("baselayout", BASE), libz(make), app(make))
    with Installed.open(root) as installed:
        installed.db.set_reason("zlib", InstallReason.DEPENDENCY)
        old = installed.db.installed("zlib")
        tx = installed.transaction()
        rebuilt = libz(make, "1.3", build="2")  # same version, a new build key
        assert rebuilt.info.meta.build_key != old.meta.build_key if old else False
        tx.upgrade(rebuilt.path, rebuilt.info, origin="built from abc123")
        result = tx.commit()
        assert result.upgraded == ((old, installed.db.installed("zlib")),)
        new = installed.db.installed("zlib")
        assert new is not None and new.meta.build_key == rebuilt.info.meta.build_key
        assert new.reason is InstallReason.DEPENDENCY and new.origin == "built from abc123"
        tx = installed.transaction()
        newer = libz(make, "1.3.1")
        tx.upgrade(newer.path, newer.info)
        tx.commit()
        assert installed.db.history()[0].upgraded == ("zlib 1.3.1-1",)
    assert not (root / "usr/share/doc/zlib/README").exists()  # gone from 1.3.1
    assert (root / "usr/share/doc/zlib/NEWS").read_bytes() == b"new in 1.3.1\n"
    assert (root / "usr/lib/libz.so.1").read_bytes().startswith(b"\x7fELF libz 1.3.1")
    for name in ("zlib", "app", "baselayout"):
        assert_files_match_db(root, name)
    assert_clean(root)


def test_locally_modified_config_files_are_kept(root: Path, make: Factory) -> None:
    install(root, make("baselayout", BASE), libz(make), app(make))
    (root / "etc/app.conf").write_text("colour = red\n")  # the admin's edit
    with Installed.open(root) as installed:
        tx = installed.transaction()
        tx.upgrade(*astuple(app(make, build="2")))
        tx.upgrade(*astuple(libz(make, "1.3.1")))  # etc/zlib.conf: unmodified, replaced
        result = tx.commit()
        assert result.notes == (
            "/etc/app.conf: modified locally and kept; the new version is /etc/app.conf.portsnew",
        )
    assert (root / "etc/app.conf").read_text() == "colour = red\n"
    assert (root / "etc/app.conf.portsnew").read_text() == "colour = blue\n"
    with Installed.open(root) as installed:
        assert installed.verify("app") == ["/etc/app.conf: content changed"]
        tx = installed.transaction()
        tx.remove("app")
        result = tx.commit()
        assert result.notes == (
            "/etc/app.conf: modified locally; saved as /etc/app.conf.portssave",
        )
    assert (root / "etc/app.conf.portssave").read_text() == "colour = red\n"
    assert not (root / "etc/app.conf").exists()
    install(root, app(make, build="3"))  # no conflict with the saved copy
    assert (root / "etc/app.conf").read_text() == "colour = blue\n"


# --- the lock --------------------------------------------------------------------------------

HOLDER = """
import sys
from pathlib import Path
from portsd.client import Installed
with Installed.open(Path(sys.argv[1]), command="ports install holder"):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def hold(root: Path) -> subprocess.Popen[str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_a_second_client_fails_fast_naming_the_holder(root: Path) -> None:
    holder = hold(root)
    try:
        started = time.monotonic()
        with pytest.raises(RootLocked) as err:
            Installed.open(root)
        assert time.monotonic() - started < 1
        assert err.value.pid == holder.pid
        assert f"locked by pid {holder.pid} (ports install holder)" in str(err.value)
        with pytest.raises(RootLocked):
            Installed.open(root, wait=0.3)
        assert time.monotonic() - started >= 0.3
        with Installed.open(root, readonly=True) as reader:  # readers never wait
            assert reader.db.packages() == []
        assert holder.stdin is not None
        holder.stdin.write("release\n")
        holder.stdin.flush()
        with Installed.open(root, wait=30) as installed:  # waits for the release
            assert installed.writable
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_never_blocks(root: Path) -> None:
    holder = hold(root)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert str(holder.pid) in (root / DB_DIR / "lock").read_text()  # stale text, no lock
    with Installed.open(root) as installed:
        assert installed.writable
        assert (root / DB_DIR / "lock").read_text().startswith(f"{os.getpid()}\n")


# --- crashes ---------------------------------------------------------------------------------

CHILD = """
import json, sys, time
from pathlib import Path
from portsd.client import Installed, Progress
from portsd.pkg.package import read_portinfo

root, spec = Path(sys.argv[1]), json.loads(sys.argv[2])

def stop(where):
    Path(spec["marker"]).write_text(where)
    time.sleep(600)

class Pause(Progress):
    applying, done, half = False, 0, -1
    def phase(self, phase, total_bytes, total_files):
        self.applying = phase == "apply"
        if self.applying:
            self.half = max(1, total_files // 2)
        if phase == "check" and spec.get("started"):
            Path(spec["started"]).write_text("started")
    def advance(self, nbytes, nfiles):
        if self.applying:
            self.done += nfiles
            if spec.get("pause") == "ops" and self.done == self.half:
                stop("ops")
    def reached(self, checkpoint):
        if spec.get("pause") == checkpoint:
            stop(checkpoint)

with Installed.open(root, wait=60) as installed:
    tx = installed.transaction()
    for path in spec.get("install", []):
        tx.install(Path(path), read_portinfo(Path(path)))
    for path in spec.get("upgrade", []):
        tx.upgrade(Path(path), read_portinfo(Path(path)))
    for name in spec.get("remove", []):
        tx.remove(name)
    tx.commit(Pause())
"""


def child(root: Path, spec: Mapping[str, object]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", CHILD, str(root), json.dumps(spec)], cwd=REPO)


def wait_for(path: Path, process: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, f"the child exited ({process.returncode}) before {path}"
        assert time.monotonic() < deadline, f"no {path} after {seconds} s"
        time.sleep(0.005)


def kill(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait()


Scenario = tuple[list[Pkg], dict[str, list[str]]]


def scenario(kind: str, make: Factory) -> Scenario:
    """(packages installed first, the transaction under test) for each kind."""
    base, zlib, application = make("baselayout", BASE), libz(make), app(make)
    if kind == "install":
        return [base], {"install": [str(zlib.path), str(application.path)]}
    newer, rebuilt = libz(make, "1.3.1"), app(make, build="2")
    if kind == "upgrade":
        return [base, zlib, application], {"upgrade": [str(newer.path), str(rebuilt.path)]}
    return [base, zlib, application], {"remove": ["app", "zlib"]}


def prepare(root: Path, installed_first: list[Pkg]) -> None:
    """Install, then edit a config file and add a file of one's own, as a user would."""
    install(root, *installed_first)
    edits = [root / "usr/share/mine/notes"]
    edits[0].parent.mkdir(parents=True, exist_ok=True)
    edits[0].write_text("unowned, stays\n")
    if (root / "etc/app.conf").exists():
        (root / "etc/app.conf").write_text("colour = red\n")
        edits.append(root / "etc/app.conf")
    for path in edits:  # so that two roots prepared alike compare equal
        os.utime(path, (EPOCH + 1, EPOCH + 1))


@pytest.mark.parametrize("kind", ["install", "upgrade", "remove"])
@pytest.mark.parametrize(
    ("pause", "action"),
    [
        (Checkpoint.STAGED, RecoveryAction.DISCARDED),
        (Checkpoint.JOURNALED, RecoveryAction.ROLLED_BACK),
        ("ops", RecoveryAction.ROLLED_BACK),  # half of the file operations done
        (Checkpoint.APPLIED, RecoveryAction.ROLLED_BACK),
        (Checkpoint.COMMITTED, RecoveryAction.ROLLED_FORWARD),
    ],
)
def test_sigkill_at_each_phase_recovers_to_before_or_after(
    tmp_path: Path, make: Factory, kind: str, pause: str, action: RecoveryAction
) -> None:
    installed_first, spec = scenario(kind, make)
    reference = tmp_path / "reference"  # the same transaction, uninterrupted
    reference.mkdir()
    prepare(reference, installed_first)
    done = child(reference, spec)
    assert done.wait(timeout=120) == 0
    after = logical(reference)

    root = tmp_path / "root"
    root.mkdir()
    prepare(root, installed_first)
    before, exact = logical(root), state(root)
    assert before != after
    marker = tmp_path / "paused"
    process = child(root, {**spec, "pause": str(pause), "marker": str(marker)})
    wait_for(marker, process)
    kill(process)
    assert (root / DB_DIR / "journal").exists()
    with Installed.open(root) as installed:
        assert installed.recovered is not None
        assert installed.recovered.action is action
    if action is RecoveryAction.ROLLED_FORWARD:
        assert logical(root) == after
    else:  # byte for byte, directory mtimes included
        assert logical(root) == before and state(root) == exact
    assert_clean(root)
    with Installed.open(root) as installed:  # and nothing is left to recover
        assert installed.recovered is None


def test_sigkill_at_random_moments_and_during_recovery(tmp_path: Path, make: Factory) -> None:
    """Upgrade back and forth between two builds of a 300-file package, SIGKILLing the
    transaction at random moments and, half the time, the recovery too: every state seen
    is exactly one of the two."""
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))
    builds = []
    for build in ("1", "2"):
        files: Spec = {
            f"usr/share/big/{i:03d}/{j}": f"{build}:{i}:{j}\n".encode() * (200 + i)
            for i in range(60)
            for j in range(5)
        }
        files["usr/share/big/only-" + build] = build.encode()
        builds.append(make("big", files, build=build))
    root = tmp_path / "root"
    root.mkdir()
    install(root, builds[0])
    states = [logical(root, history=False)]
    reference = tmp_path / "reference"
    reference.mkdir()
    install(reference, builds[1])
    states.append(logical(reference, history=False))
    started = tmp_path / "started"
    # how long one uninterrupted upgrade takes in a child, from its start to its exit
    process = child(reference, {"upgrade": [str(builds[0].path)], "started": str(started)})
    wait_for(started, process)
    began = time.monotonic()
    assert process.wait(timeout=120) == 0
    duration = time.monotonic() - began
    recovered: dict[str, int] = {}
    current = 0
    for _ in range(12):
        started.unlink(missing_ok=True)
        target = builds[1 - current]
        process = child(root, {"upgrade": [str(target.path)], "started": str(started)})
        wait_for(started, process)
        time.sleep(rng.uniform(0, duration * 1.2))
        kill(process)
        if rng.random() < 0.5:  # a recovery killed at a random moment too
            opener = subprocess.Popen([sys.executable, "-c", RECOVER, str(root)], cwd=REPO)
            time.sleep(rng.uniform(0, 0.6))
            kill(opener)
        with Installed.open(root) as installed:
            action = installed.recovered.action.value if installed.recovered else "none"
            recovered[action] = recovered.get(action, 0) + 1
        now = logical(root, history=False)
        assert now in states
        current = states.index(now)
        assert_clean(root)
    print("RECOVERED", recovered, "duration", duration)
    assert sum(n for a, n in recovered.items() if a != "none") >= 1, recovered


RECOVER = """
import sys
from pathlib import Path
from portsd.client import Installed
Installed.open(Path(sys.argv[1]), wait=60).close()
"""


# --- hostile packages ------------------------------------------------------------------------

GOOD = b"good data\n"
KEY = "e" * 64


def entry_file(path: str, data: bytes, mode: int = 0o644) -> ManifestEntry:
    return ManifestEntry(path, FileType.FILE, mode, len(data), hashlib.sha256(data).hexdigest())


def entry_dir(path: str) -> ManifestEntry:
    return ManifestEntry(path, FileType.DIR, 0o755)


def entry_link(path: str, target: str) -> ManifestEntry:
    return ManifestEntry(path, FileType.SYMLINK, 0o777, target=target)


def member(
    name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = kind, mode, link, EPOCH
    return info, data


def craft(
    path: Path,
    entries: list[ManifestEntry],
    members: list[tuple[tarfile.TarInfo, bytes]],
    trailer: bytes = b"",
) -> Pkg:
    """A package written with tarfile and zstandard, not with our writer, whose manifest
    (``info``, unchecked) is otherwise consistent: the one defect is the one under test."""
    meta = PackageMeta("evil", "1.0", 1, "x86_64", KEY, installed_size=sum(e.size for e in entries))
    info = PortInfo(meta, tuple(entries))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item, data in [member(".PORTINFO", info.to_bytes()), *members]:
            item.size = len(data)
            tar.addfile(item, io.BytesIO(data))
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()) + trailer)
    return Pkg(path, info)


def zero_frames(total: int, frame: int = 64 << 20) -> bytes:
    """zstd frames that inflate to ``total`` zero bytes, cheaply (one frame, repeated)."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    one = b"".join(compressor.compress(bytes(1 << 20)) for _ in range(frame >> 20))
    return (one + compressor.flush()) * (total // frame)


ATTACKS: dict[str, tuple[list[ManifestEntry], list[tuple[tarfile.TarInfo, bytes]], str, str]] = {
    "member through a symlink (manifest)": (
        [entry_link("lib", "/tmp"), entry_file("lib/evil", GOOD)],
        [member("lib", kind=tarfile.SYMTYPE, mode=0o777, link="/tmp"), member("lib/evil", GOOD)],
        "lib/evil",
        "through symlink",
    ),
    "member through a symlink (archive)": (
        [entry_dir("lib"), entry_file("lib/evil", GOOD)],
        [member("lib", kind=tarfile.SYMTYPE, mode=0o777, link="/etc"), member("lib/evil", GOOD)],
        "lib",
        "symlink but the manifest says dir",
    ),
    "symlink pointing outside": (
        [entry_dir("usr"), entry_link("usr/escape", "../../etc/shadow")],
        [
            member("usr/", kind=tarfile.DIRTYPE, mode=0o755),
            member("usr/escape", kind=tarfile.SYMTYPE, mode=0o777, link="../../etc/shadow"),
        ],
        "usr/escape",
        "outside the root",
    ),
    "absolute path": (
        [entry_file("x-ports-test", GOOD)],
        [member("/x-ports-test-absolute", GOOD)],
        "/x-ports-test-absolute",
        "absolute",
    ),
    "device node": (
        [entry_file("null", b"")],
        [member("null", kind=tarfile.CHRTYPE, mode=0o666)],
        "null",
        "device",
    ),
    "content differs from the manifest": (
        [entry_file("a", GOOD), entry_file("b", GOOD)],
        [member("a", GOOD), member("b", b"evil data\n")],
        "b",
        "sha256",
    ),
    "undeclared setuid bit": (
        [entry_file("su", GOOD, 0o755)],
        [member("su", GOOD, mode=0o4755)],
        "su",
        "setuid",
    ),
    "dot-dot path": (
        [entry_dir("usr"), entry_file("usr/x", GOOD)],
        [member("usr/", kind=tarfile.DIRTYPE, mode=0o755), member("usr/../../x-ports-test", GOOD)],
        "usr/../../x-ports-test",
        "..",
    ),
    "hardlink pointing outside": (
        [entry_file("a", GOOD)],
        [member("a", kind=tarfile.LNKTYPE, link="../../etc/passwd")],
        "a",
        "link",
    ),
    "fifo": (
        [entry_file("pipe", b"")],
        [member("pipe", kind=tarfile.FIFOTYPE, mode=0o644)],
        "pipe",
        "FIFOs are not allowed",
    ),
    "duplicate path": (
        [entry_file("a", GOOD)],
        [member("a", GOOD), member("a", GOOD)],
        "a",
        "duplicate member",
    ),
    "undeclared setgid bit": (
        [entry_file("sg", GOOD, 0o755)],
        [member("sg", GOOD, mode=0o2755)],
        "sg",
        "setgid",
    ),
    "member the manifest does not list": (
        [entry_file("a", GOOD)],
        [member("a", GOOD), member("extra", GOOD)],
        "extra",
        "manifest",
    ),
    "zstd bomb": (
        [entry_file("a", GOOD)],
        [member("a", GOOD)],
        "(end of archive)",
        "decompresses to more",
    ),
}


@pytest.mark.parametrize("case", list(ATTACKS), ids=list(ATTACKS))
def test_hostile_packages_are_refused_naming_the_member(
    tmp_path: Path, root: Path, make: Factory, case: str
) -> None:
    entries, members, name, words = ATTACKS[case]
    trailer = zero_frames(1 << 40) if "bomb" in case else b""  # 1 TiB if nothing stops it
    evil = craft(tmp_path / "evil.pkg.tar.zst", entries, members, trailer)
    install(root, make("baselayout", BASE))
    good = make("good", {"usr/bin/good": b"good", "etc/good.conf": b"x"})
    before = state(root)
    started = time.monotonic()
    with Installed.open(root) as installed:
        with pytest.raises(UnsafeArchive) as err:
            tx = installed.transaction()
            tx.install(good.path, good.info)  # staged first, then undone with the rest
            tx.install(evil.path, evil.info)
            tx.commit()
    assert err.value.member == name, str(err.value)
    assert words in str(err.value) and str(evil.path) in str(err.value)
    assert time.monotonic() - started < 60
    assert state(root) == before
    assert_clean(root)


def test_a_control_crafted_package_installs(root: Path, tmp_path: Path) -> None:
    """The crafting helper makes packages we accept: the refusals above are the defects'."""
    good = craft(
        tmp_path / "ok.pkg.tar.zst",
        [entry_dir("usr"), entry_link("usr/link", "su"), entry_file("usr/su", GOOD, 0o4755)],
        [
            member("usr/", kind=tarfile.DIRTYPE, mode=0o755),
            member("usr/link", kind=tarfile.SYMTYPE, mode=0o777, link="su"),
            member("usr/su", GOOD, mode=0o4755),
        ],
    )
    install(root, good)
    assert stat.S_IMODE((root / "usr/su").stat().st_mode) == 0o4755
    assert (root / "usr/link").read_bytes() == GOOD


def test_a_package_whose_manifest_was_swapped_is_refused(root: Path, make: Factory) -> None:
    one, other = make("one", {"usr/one": b"1"}), make("other", {"usr/other": b"2"})
    Installed.open(root).close()
    before = state(root)
    with Installed.open(root) as installed, pytest.raises(PackageError, match="manifest"):
        tx = installed.transaction()
        tx.install(one.path, other.info)
        tx.commit()
    assert state(root) == before


def test_the_expected_sha256_of_the_file_is_checked(root: Path, make: Factory) -> None:
    one = make("one", {"usr/one": b"1"})
    with Installed.open(root) as installed, pytest.raises(PackageError, match="sha256 mismatch"):
        tx = installed.transaction()
        tx.install(one.path, one.info, sha256="0" * 64)
        tx.commit()
    assert not (root / "usr/one").exists()
    assert read_portinfo(one.path) == one.info


# --- a root spanning two mounts --------------------------------------------------------------

IN_NAMESPACE = """
import json, os, subprocess, sys, time
from pathlib import Path
from portsd.client import Installed, Progress
from portsd.pkg.package import read_portinfo

root, spec = Path(sys.argv[1]), json.loads(sys.argv[2])
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(root / "usr")], check=True)
facts = {"usr_is_a_mount": os.lstat(root / "usr").st_dev != os.lstat(root).st_dev}

class Look(Progress):
    def reached(self, checkpoint):
        if checkpoint == "staged" and "staging" not in facts:
            found = [*root.glob("*/.ports-tx-*"), *root.glob("var/lib/ports/tx/*")]
            facts["staging"] = sorted(str(p.parent.relative_to(root)) for p in found)

def commit(action, what):
    with Installed.open(root) as installed:
        tx = installed.transaction()
        if action == "remove":
            tx.remove(what)
        else:
            getattr(tx, action)(Path(what), read_portinfo(Path(what)))
        tx.commit(Look())

def leftovers():
    return [str(p) for p in root.rglob(".ports-tx-*")] + os.listdir(root / "var/lib/ports/tx")

commit("install", spec["v1"])
facts["v1"] = (root / "usr/bin/tool").read_text()
marker = Path(spec["marker"])
child = subprocess.Popen([sys.executable, "-c", spec["child"], str(root),
                          json.dumps({"upgrade": [spec["v2"]], "pause": "ops",
                                      "marker": str(marker)})])
deadline = time.monotonic() + 60
while not marker.exists() and time.monotonic() < deadline and child.poll() is None:
    time.sleep(0.01)
child.kill()
child.wait()
with Installed.open(root) as installed:
    facts["recovered"] = installed.recovered.action.value if installed.recovered else None
facts["after_recovery"] = [(root / "usr/bin/tool").read_text(), (root / "usr/lib").exists()]
facts["leftovers_after_recovery"] = leftovers()
commit("upgrade", spec["v2"])
facts["v2"] = [(root / "usr/bin/tool").read_text(), (root / "usr/lib/new").read_text()]
commit("remove", "tool")
facts["removed"] = [(root / "usr/bin/tool").exists(), (root / "etc/tool.conf").exists()]
facts["leftovers"] = leftovers()
print(json.dumps(facts))
"""


def test_a_root_whose_usr_is_another_mount(tmp_path: Path, root: Path, make: Factory) -> None:
    """Renames cannot cross mounts: each mount gets its own staging directory, and a kill
    half-way through an upgrade still rolls back. Runs in a user and mount namespace."""
    v1 = make("tool", {"usr/bin/tool": b"v1", "etc/tool.conf": b"a=1\n"})
    v2 = make(
        "tool", {"usr/bin/tool": b"v2", "usr/lib/new": b"new", "etc/tool.conf": b"a=2\n"}, build="2"
    )
    (root / "usr").mkdir()
    spec = {
        "v1": str(v1.path),
        "v2": str(v2.path),
        "child": CHILD,
        "marker": str(tmp_path / "paused"),
    }
    result = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "--",
            sys.executable,
            "-c",
            IN_NAMESPACE,
            str(root),
            json.dumps(spec),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    facts = json.loads(result.stdout)
    assert facts == {
        "usr_is_a_mount": True,
        "staging": ["usr", "var/lib/ports/tx"],  # where each mount's staging directory was
        "v1": "v1",
        "recovered": "rolled back",
        "after_recovery": ["v1", False],
        "leftovers_after_recovery": [],
        "v2": ["v2", "new"],
        "removed": [False, False],
        "leftovers": [],
    }, facts
