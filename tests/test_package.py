"""Binary packages: round trips, byte-identical rebuilds, and every archive attack refused.

Attack archives are written here with ``tarfile`` and ``zstandard`` directly (not with our
writer), each with a manifest that is otherwise consistent, so what is refused is the one
defect under test; a control case shows the same helper's clean archive extracts fine.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import socket
import stat
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from portsd.core.metadata import PackageMeta
from portsd.errors import PackageError, UnsafeArchive
from portsd.pkg.archive import TarHeader, TarStream, member_header, read_header, write_members
from portsd.pkg.package import (
    PACKAGE_FORMAT,
    FileType,
    ManifestEntry,
    PackageReader,
    PortInfo,
    _Spool,
    create_package,
    extract_package,
    read_portinfo,
)
from tests.fixtures import Repeated, pack_repeating

EPOCH = 1_700_000_000
KEY = "0123456789abcdef" * 4
META = PackageMeta(
    "demo",
    "1.2.3",
    2,
    "x86_64",
    KEY,
    summary="A demo package",
    license="MIT",
    depends=("zlib>=1.2", "musl"),
    provides=("sh",),
    conflicts=("busybox<1.0",),
)
LONG = "x" * 60 + "/" + "y" * 70  # 131 bytes: needs a pax path record


DIRS = ("usr/bin", "usr/lib", f"usr/share/{LONG}", "etc", "sbin")
FILES = (
    ("usr/bin/tool", b"#!/bin/sh\necho hi\n", 0o755),
    ("usr/lib/libz.so.1", b"\x7fELF" * 3000, 0o644),
    ("usr/lib/empty", b"", 0o644),
    (f"usr/share/{LONG}/file", b"long path\n", 0o644),
    ("etc/conf", b"a = 1\n", 0o640),
    ("sbin/su", b"setuid", 0o4755),
)


def populate(root: Path, *, reverse: bool = False, when: int = 1_000_000) -> None:
    """A DESTDIR with every kind of member; ``reverse`` creates things in the other order."""
    for directory in reversed(DIRS) if reverse else DIRS:
        (root / directory).mkdir(parents=True, exist_ok=True)
    for path, data, mode in reversed(FILES) if reverse else FILES:
        (root / path).write_bytes(data)
        os.chmod(root / path, mode)
    os.chmod(root / "etc", 0o750)
    os.symlink("/usr/lib/libz.so.1", root / "usr/lib/libz.so")  # absolute: inside the root
    os.symlink("libz.so.1", root / "usr/lib/libz.so.1.3")
    os.symlink("../../" + "t" * 120, root / "usr/lib/longlink")  # needs a pax linkpath
    os.link(root / "usr/bin/tool", root / "usr/bin/tool-alias")
    os.link(root / "usr/bin/tool", root / "usr/bin/a-tool")  # sorts first: it is the file
    for child in sorted(root.rglob("*"), reverse=True):
        os.utime(child, (when, when), follow_symlinks=False)


def build(tmp_path: Path, name: str = "destdir", *, reverse: bool = False, when: int = 0) -> Path:
    root = tmp_path / name
    root.mkdir()
    populate(root, reverse=reverse, when=when)
    return root


Snapshot = dict[str, tuple[str, int, object]]


def snapshot(root: Path) -> Snapshot:
    """Type, mode and content (or target) of everything below root."""
    result: Snapshot = {}
    for path in sorted(root.rglob("*")):
        st_ = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(st_.st_mode):
            result[rel] = ("link", 0o777, os.readlink(path))
        elif stat.S_ISDIR(st_.st_mode):
            result[rel] = ("dir", stat.S_IMODE(st_.st_mode), None)
        else:
            result[rel] = ("file", stat.S_IMODE(st_.st_mode), path.read_bytes())
    return result


# --- writing and reading back --------------------------------------------------------------


def test_round_trip(tmp_path: Path) -> None:
    destdir = build(tmp_path)
    built = create_package(destdir, META, tmp_path / "out", epoch=EPOCH)
    assert built.path.name == "demo-1.2.3-2-x86_64-0123456789ab.pkg.tar.zst"
    assert built.path.name == META.filename
    assert built.size == built.path.stat().st_size
    assert built.sha256 == hashlib.sha256(built.path.read_bytes()).hexdigest()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [built.path.name]

    info = read_portinfo(built.path)
    assert info == built.info
    assert (info.meta.name, info.meta.version, info.meta.release) == ("demo", "1.2.3", 2)
    assert info.meta.depends == ("zlib>=1.2", "musl") and info.meta.provides == ("sh",)
    by_path = {entry.path: entry for entry in info.files}
    assert [e.path for e in info.files] == sorted(by_path, key=lambda p: p.encode())
    assert by_path["usr/bin/a-tool"].type is FileType.FILE
    assert by_path["usr/bin/tool"] == ManifestEntry(
        "usr/bin/tool", FileType.HARDLINK, 0o755, 0, None, "usr/bin/a-tool"
    )
    assert by_path["usr/lib/libz.so"] == ManifestEntry(
        "usr/lib/libz.so", FileType.SYMLINK, 0o777, target="/usr/lib/libz.so.1"
    )
    assert by_path["etc"] == ManifestEntry("etc", FileType.DIR, 0o750)
    assert by_path["sbin/su"].mode == 0o4755
    assert by_path["usr/lib/empty"].sha256 == hashlib.sha256(b"").hexdigest()
    files = [e for e in info.files if e.type is FileType.FILE]
    assert info.meta.installed_size == sum(e.size for e in files) > 12000

    out = tmp_path / "unpacked"
    assert (
        extract_package(built.path, out, expected_sha256=built.sha256, expected_size=built.size)
        == info
    )
    assert snapshot(out) == snapshot(destdir)
    assert os.stat(out / "usr/bin/tool").st_ino == os.stat(out / "usr/bin/a-tool").st_ino
    for path in out.rglob("*"):
        assert path.lstat().st_mtime == EPOCH, path


def test_a_key_twice_anywhere_in_the_manifest_is_refused(tmp_path: Path) -> None:
    """msgpack keeps the last copy: a reader of the first 'mode' would see 644, not 4755."""
    info = create_package(build(tmp_path), META, tmp_path / "out", epoch=EPOCH).info
    raw = msgpack.unpackb(info.to_bytes())
    plain = next(i for i, f in enumerate(raw["files"]) if f["mode"] == 0o644)
    raw["files"][plain] = Repeated(raw["files"][plain], again=(("mode", 0o4755),))
    with pytest.raises(PackageError, match="duplicate key 'mode'"):
        PortInfo.from_bytes(pack_repeating(raw), "demo.pkg")
    top = Repeated(msgpack.unpackb(info.to_bytes()), again=(("name", "other"),))
    with pytest.raises(PackageError, match="duplicate key 'name'"):
        PortInfo.from_bytes(pack_repeating(top), "demo.pkg")
    assert PortInfo.from_bytes(pack_repeating(msgpack.unpackb(info.to_bytes())), "x") == info


def test_packages_are_byte_identical_whatever_the_disk_says(tmp_path: Path) -> None:
    one = build(tmp_path, "one", when=1_000_000)
    two = build(tmp_path, "two", reverse=True, when=2_000_000_000)
    if os.geteuid() == 0:  # owners must not leak either
        for path in two.rglob("*"):
            os.chown(path, 1234, 5678, follow_symlinks=False)
        os.chmod(two / "sbin/su", 0o4755)  # chown cleared the setuid bit, as it does
    a = create_package(one, META, tmp_path / "a", epoch=EPOCH)
    b = create_package(two, META, tmp_path / "b", epoch=EPOCH)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.sha256 == b.sha256
    c = create_package(one, META, tmp_path / "c", epoch=EPOCH + 1)
    assert c.sha256 != a.sha256  # the epoch is in every header


def test_output_does_not_depend_on_the_thread_count(tmp_path: Path) -> None:
    destdir = tmp_path / "big"
    destdir.mkdir()
    rng = random.Random(7)
    # > 3 zstd jobs of 8 MiB, some compressible and some not, so the workers really split it
    (destdir / "noise").write_bytes(rng.randbytes(8 << 20))
    (destdir / "text").write_bytes(
        b"".join(rng.randbytes(64) * rng.randint(1, 50) for _ in range(5000))
    )
    (destdir / "zeros").write_bytes(bytes(10 << 20))
    assert sum(p.stat().st_size for p in destdir.iterdir()) > 3 * (8 << 20)
    digests = {
        threads: create_package(
            destdir, META, tmp_path / f"t{threads}", epoch=EPOCH, threads=threads
        ).sha256
        for threads in (1, 2, 8)
    }
    assert len(set(digests.values())) == 1, digests
    assert create_package(destdir, META, tmp_path / "all", epoch=EPOCH).sha256 == digests[1]


def test_the_zstd_and_tar_tools_read_our_packages(tmp_path: Path) -> None:
    destdir = build(tmp_path)
    built = create_package(destdir, META, tmp_path / "out", epoch=EPOCH)
    tar = subprocess.run(
        f"zstd -dc '{built.path}' | tar -tf -",
        shell=True,
        check=True,
        capture_output=True,
        text=True,
    )
    names = [n.rstrip("/") for n in tar.stdout.splitlines()]
    assert names == [".PORTINFO", *(e.path for e in built.info.files)]
    out = tmp_path / "by-tar"
    out.mkdir()
    subprocess.run(f"zstd -dc '{built.path}' | tar -C '{out}' -xf -", shell=True, check=True)
    (out / ".PORTINFO").unlink()
    assert snapshot(out) == snapshot(destdir)
    assert (
        msgpack.unpackb(
            subprocess.run(
                ["sh", "-c", f"zstd -dc '{built.path}' | tar -xOf - .PORTINFO"],
                check=True,
                capture_output=True,
            ).stdout
        )["name"]
        == "demo"
    )


def test_read_portinfo_reads_only_the_first_member(tmp_path: Path) -> None:
    destdir = tmp_path / "d"
    destdir.mkdir()
    (destdir / "big").write_bytes(random.Random(1).randbytes(4 << 20))
    built = create_package(destdir, META, tmp_path / "out", epoch=EPOCH)
    cut = tmp_path / "cut.pkg.tar.zst"
    cut.write_bytes(built.path.read_bytes()[: 64 << 10])  # the manifest frame and a bit
    assert read_portinfo(cut) == built.info
    with pytest.raises(PackageError, match="truncated"):
        extract_package(cut, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_package_reader_streams_verified_members(tmp_path: Path) -> None:
    destdir = build(tmp_path)
    built = create_package(destdir, META, tmp_path / "out", epoch=EPOCH)
    seen = {}
    with PackageReader(built.path, expected_sha256=built.sha256) as reader:
        assert reader.info == built.info
        members = reader.members()
        for member in members:
            assert member.mtime == EPOCH
            if member.entry.path != "usr/lib/empty":  # unread content is still verified
                seen[member.entry.path] = b"".join(bytes(c) for c in member.chunks())
        with pytest.raises(PackageError, match="only once"):
            next(reader.members())
        with pytest.raises(PackageError, match="after the reader moved on"):
            next(member.chunks())
    assert seen["etc/conf"] == b"a = 1\n"
    assert seen["usr/bin/tool"] == b""  # a hardlink has no content of its own
    assert list(seen) == [e.path for e in built.info.files if e.path != "usr/lib/empty"]


def test_package_is_replaced_atomically_and_failures_leave_no_files(tmp_path: Path) -> None:
    destdir = build(tmp_path)
    out = tmp_path / "out"
    built = create_package(destdir, META, out, epoch=EPOCH)
    before = built.path.read_bytes()
    os.mkfifo(destdir / "zz-fifo")  # sorts last: everything else is packed first
    with pytest.raises(PackageError) as err:
        create_package(destdir, META, out, epoch=EPOCH + 5)
    assert str(destdir / "zz-fifo") in str(err.value) and "FIFO" in str(err.value)
    assert [p.name for p in out.iterdir()] == [built.path.name]
    assert built.path.read_bytes() == before


def test_destdir_with_a_socket_or_device_is_refused(tmp_path: Path) -> None:
    destdir = tmp_path / "d"
    destdir.mkdir()
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(destdir / "s"))
        with pytest.raises(PackageError, match="socket") as err:
            create_package(destdir, META, tmp_path / "out", epoch=EPOCH)
        assert str(destdir / "s") in str(err.value)
    finally:
        sock.close()
    os.unlink(destdir / "s")
    try:
        os.mknod(destdir / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        return  # only root can make device nodes; CI runs as root
    with pytest.raises(PackageError, match="device node"):
        create_package(destdir, META, tmp_path / "out", epoch=EPOCH)


@pytest.mark.parametrize(
    ("link", "target"),
    [("escape", "../../etc/passwd"), ("usr/up", "../.."), ("usr/via", "d/../..")],
)
def test_destdir_with_links_leading_outside_is_refused(
    tmp_path: Path, link: str, target: str
) -> None:
    destdir = tmp_path / "d"
    (destdir / "usr").mkdir(parents=True)
    os.symlink("/", destdir / "usr/d")  # d/.. is harmless-looking but is the root's parent
    os.symlink(target, destdir / link)
    with pytest.raises(UnsafeArchive, match="outside the root") as err:
        create_package(destdir, META, tmp_path / "out", epoch=EPOCH)
    assert err.value.member == link


def test_destdir_with_a_non_utf8_name_is_refused(tmp_path: Path) -> None:
    destdir = tmp_path / "d"
    destdir.mkdir()
    (Path(os.fsdecode(bytes(destdir) + b"/caf\xe9"))).write_bytes(b"x")
    with pytest.raises(PackageError, match="not UTF-8"):
        create_package(destdir, META, tmp_path / "out", epoch=EPOCH)


def test_bad_epoch_is_refused_before_packing(tmp_path: Path) -> None:
    destdir = tmp_path / "d"
    destdir.mkdir()
    with pytest.raises(PackageError, match="SOURCE_DATE_EPOCH"):
        create_package(destdir, META, tmp_path / "out", epoch=-1)


@pytest.mark.parametrize(("seen", "words"), [(3, "grew"), (100, "shrank")])
def test_files_changing_size_while_packed_are_refused(
    tmp_path: Path, seen: int, words: str
) -> None:
    """``seen`` is the size the scan saw; the file on disk has 10 bytes by the time it is read."""
    (tmp_path / "f").write_bytes(b"0123456789")
    real = os.lstat(tmp_path / "f")
    stale = os.stat_result((*real[:6], seen, *real[7:10]))
    compressor = zstandard.ZstdCompressor().compressobj()
    with pytest.raises(PackageError, match=words) as err:
        write_members(str(tmp_path), [("f", stale)], EPOCH, compressor, lambda data: None)
    assert str(tmp_path / "f") in str(err.value)


def test_big_outputs_spill_to_an_unlinked_file(tmp_path: Path) -> None:
    with _Spool(tmp_path, limit=10) as spool:
        for piece in (b"abcd", b"efgh", b"ijkl", b"mnop"):
            spool.write(piece)
        assert list(tmp_path.iterdir()) == []  # unlinked: nothing to clean up after a crash
        assert b"".join(spool.chunks()) == b"abcdefghijklmnop"
    with _Spool(tmp_path, limit=100) as spool:
        spool.write(b"small")
        assert list(spool.chunks()) == [b"small"]


def test_sizes_past_8_gib_go_in_a_pax_record(tmp_path: Path) -> None:
    size = 9 << 30  # too big for ustar's 11 octal digits
    header = member_header("usr/big", FileType.FILE, 0o644, size, "", EPOCH)
    assert len(header) == 3 * 512 and b"size=9663676416" in header
    stream_file = tmp_path / "stream.zst"
    stream_file.write_bytes(zstandard.ZstdCompressor().compress(header))
    fd = os.open(stream_file, os.O_RDONLY)
    try:
        parsed = read_header(TarStream(fd, "label"))
    finally:
        os.close(fd)
    assert parsed == TarHeader("usr/big", FileType.FILE, 0o644, size, "", EPOCH)
    listing = subprocess.run(
        ["tar", "-tvf", "-"], input=header + bytes(1024), capture_output=True, check=False
    )
    assert b"9663676416" in listing.stdout  # GNU tar reads the record too


# --- attacks -------------------------------------------------------------------------------


def ti(
    name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, link: str = ""
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.mtime = kind, mode, link, EPOCH
    return info


def f(path: str, data: bytes, mode: int = 0o644) -> ManifestEntry:
    return ManifestEntry(path, FileType.FILE, mode, len(data), hashlib.sha256(data).hexdigest())


def d(path: str, mode: int = 0o755) -> ManifestEntry:
    return ManifestEntry(path, FileType.DIR, mode)


def sym(path: str, target: str) -> ManifestEntry:
    return ManifestEntry(path, FileType.SYMLINK, 0o777, target=target)


def manifest(*entries: ManifestEntry) -> bytes:
    meta = PackageMeta("evil", "1", 1, "x86_64", KEY, installed_size=sum(e.size for e in entries))
    return PortInfo(meta, entries).to_bytes()


Member = tuple[tarfile.TarInfo, bytes]


def craft(
    path: Path,
    info: bytes,
    members: list[Member],
    *,
    first: list[Member] | None = None,
    trailer: bytes = b"",
) -> Path:
    """A package written with tarfile (pax format) and zstandard; ``trailer`` is raw zstd."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in [*(first or []), (ti(".PORTINFO"), info), *members]:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    path.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()) + trailer)
    return path


def zero_frames(total: int, frame: int = 64 << 20) -> bytes:
    """zstd frames that decompress to ``total`` zero bytes, made cheaply by repeating one."""
    compressor = zstandard.ZstdCompressor(level=1).compressobj()
    one = b"".join(compressor.compress(bytes(1 << 20)) for _ in range(frame >> 20))
    one += compressor.flush()
    return one * (total // frame)


def file_member(name: str, data: bytes, mode: int = 0o644) -> Member:
    return ti(name, mode=mode), data


def link_member(name: str, kind: bytes, target: str) -> Member:
    return ti(name, kind, 0o777 if kind == tarfile.SYMTYPE else 0o644, target), b""


def with_pax(member: tarfile.TarInfo, records: dict[str, str]) -> tarfile.TarInfo:
    member.pax_headers = records
    return member


GOOD = b"good data\n"
# Each attack: (manifest, members, the member the refusal must name, words in the message).
ATTACKS: dict[str, tuple[bytes, list[Member], str, str]] = {
    "absolute path": (
        manifest(d("etc"), f("etc/passwd", GOOD)),
        [(ti("etc/", tarfile.DIRTYPE, 0o755), b""), file_member("/etc/passwd", GOOD)],
        "/etc/passwd",
        "absolute",
    ),
    "dotdot": (
        manifest(f("evil", GOOD)),
        [file_member("../evil", GOOD)],
        "../evil",
        "'..'",
    ),
    "dotdot inside": (
        manifest(d("a"), f("a/evil", GOOD)),
        [(ti("a", tarfile.DIRTYPE, 0o755), b""), file_member("a/../../evil", GOOD)],
        "a/../../evil",
        "'..'",
    ),
    "not canonical": (
        manifest(d("a"), f("a/x", GOOD)),
        [(ti("a", tarfile.DIRTYPE, 0o755), b""), file_member("a/./x", GOOD)],
        "a/./x",
        "canonical",
    ),
    "manifest writes through a symlink": (
        manifest(sym("lib", "/tmp"), f("lib/evil", GOOD)),
        [link_member("lib", tarfile.SYMTYPE, "/tmp"), file_member("lib/evil", GOOD)],
        "lib/evil",
        "through symlink",
    ),
    "symlink where the manifest has a directory": (
        manifest(d("lib"), f("lib/evil", GOOD)),
        [link_member("lib", tarfile.SYMTYPE, "/etc"), file_member("lib/evil", GOOD)],
        "lib",
        "symlink but the manifest says dir",
    ),
    "symlink outside": (
        manifest(sym("link", "../../etc/shadow")),
        [link_member("link", tarfile.SYMTYPE, "../../etc/shadow")],
        "link",
        "outside the root",
    ),
    "symlink outside through its own symlink": (
        manifest(d("usr"), sym("usr/d", "/"), sym("usr/up", "d/..")),
        [
            (ti("usr", tarfile.DIRTYPE, 0o755), b""),
            link_member("usr/d", tarfile.SYMTYPE, "/"),
            link_member("usr/up", tarfile.SYMTYPE, "d/.."),
        ],
        "usr/up",
        "outside the root",
    ),
    "symlink target differs from the manifest": (
        manifest(sym("link", "/usr/lib/x")),
        [link_member("link", tarfile.SYMTYPE, "/../../etc/shadow")],
        "link",
        "not the manifest's",
    ),
    "hardlink outside": (
        manifest(ManifestEntry("hl", FileType.HARDLINK, 0o644, target="../../etc/shadow")),
        [link_member("hl", tarfile.LNKTYPE, "../../etc/shadow")],
        "hl",
        "outside the root",
    ),
    "hardlink to a file not in the package": (
        manifest(ManifestEntry("hl", FileType.HARDLINK, 0o644, target="etc/shadow")),
        [link_member("hl", tarfile.LNKTYPE, "etc/shadow")],
        "hl",
        "not an earlier file",
    ),
    "hardlink target differs from the manifest": (
        manifest(f("a", GOOD), f("b", GOOD)),
        [file_member("a", GOOD), link_member("b", tarfile.LNKTYPE, "a")],
        "b",
        "hardlink but the manifest says file",
    ),
    "character device": (
        manifest(f("dev-null", b"")),
        [(ti("dev-null", tarfile.CHRTYPE, 0o666), b"")],
        "dev-null",
        "device",
    ),
    "block device": (
        manifest(f("sda", b"")),
        [(ti("sda", tarfile.BLKTYPE, 0o660), b"")],
        "sda",
        "device",
    ),
    "fifo": (
        manifest(f("pipe", b"")),
        [(ti("pipe", tarfile.FIFOTYPE), b"")],
        "pipe",
        "FIFO",
    ),
    "gnu long name": (
        manifest(f("x", GOOD)),
        [(ti("x", tarfile.GNUTYPE_LONGNAME), GOOD)],
        "x",
        "unsupported type",
    ),
    "duplicate member": (
        manifest(f("a", GOOD)),
        [file_member("a", GOOD), file_member("a", b"evil\n")],
        "a",
        "duplicate",
    ),
    "duplicate in the manifest": (
        manifest(f("a", GOOD), f("a", GOOD)),
        [file_member("a", GOOD), file_member("a", GOOD)],
        "a",
        "duplicate",
    ),
    "undeclared setuid": (
        manifest(f("su", GOOD, 0o755)),
        [file_member("su", GOOD, 0o4755)],
        "su",
        "setuid",
    ),
    "undeclared setgid": (
        manifest(f("sg", GOOD, 0o755)),
        [file_member("sg", GOOD, 0o2755)],
        "sg",
        "setuid/setgid",
    ),
    "member not in the manifest": (
        manifest(f("a", GOOD)),
        [file_member("a", GOOD), file_member("b", GOOD)],
        "b",
        "not in the manifest",
    ),
    "member missing from the archive": (
        manifest(f("a", GOOD), f("b", GOOD), f("c", GOOD)),
        [file_member("a", GOOD), file_member("c", GOOD)],
        "b",
        "not the archive",
    ),
    "last member missing": (
        manifest(f("a", GOOD), f("b", GOOD)),
        [file_member("a", GOOD)],
        "b",
        "not the archive",
    ),
    "content differs from its sha256": (
        manifest(f("a", GOOD)),
        [file_member("a", b"evil data\n")],
        "a",
        "sha256",
    ),
    "size differs": (
        manifest(f("a", GOOD)),
        [file_member("a", GOOD + b"more")],
        "a",
        "size",
    ),
    "second portinfo": (
        manifest(f("a", GOOD)),
        [file_member(".PORTINFO", b"x"), file_member("a", GOOD)],
        ".PORTINFO",
        "not in the manifest",
    ),
    "unsupported pax record": (
        manifest(f("a", GOOD)),
        [(with_pax(ti("a"), {"SCHILY.xattr.security.capability": "x"}), GOOD)],
        "a",
        "unsupported pax record",
    ),
    "zstd bomb after the end of the archive": (
        manifest(f("a", GOOD)),
        [file_member("a", GOOD)],
        "(end of archive)",
        "decompresses to more",
    ),
}


@pytest.mark.parametrize("case", list(ATTACKS), ids=list(ATTACKS))
@pytest.mark.parametrize("dest_exists", [False, True], ids=["new-dest", "empty-dest"])
def test_attack_is_refused_and_dest_left_as_it_was(
    tmp_path: Path, case: str, dest_exists: bool
) -> None:
    info, members, member, words = ATTACKS[case]
    trailer = zero_frames(1 << 40) if "bomb" in case else b""  # 1 TiB: unbounded never ends
    package = craft(tmp_path / "evil.pkg.tar.zst", info, members, trailer=trailer)
    dest = tmp_path / "dest"
    if dest_exists:
        dest.mkdir()
    started = time.monotonic()
    with pytest.raises(UnsafeArchive) as err:
        extract_package(package, dest)
    assert err.value.member == member
    assert f"'{member}'" in str(err.value) and words in str(err.value), str(err.value)
    assert str(package) in str(err.value)
    assert (sorted(dest.iterdir()) == []) if dest_exists else not dest.exists()
    assert time.monotonic() - started < 30
    assert not (tmp_path / "etc").exists() and not (tmp_path / "evil").exists()


def test_control_a_clean_crafted_archive_extracts(tmp_path: Path) -> None:
    """The attack helper makes archives we accept: the refusals above are the defects'."""
    info = manifest(
        d("etc"), sym("etc/link", "passwd"), f("etc/passwd", GOOD), f("su", GOOD, 0o4755)
    )
    members = [
        (ti("etc/", tarfile.DIRTYPE, 0o755), b""),
        link_member("etc/link", tarfile.SYMTYPE, "passwd"),
        file_member("etc/passwd", GOOD),
        file_member("su", GOOD, 0o4755),
    ]
    package = craft(tmp_path / "ok.pkg.tar.zst", info, members)
    extract_package(package, tmp_path / "dest")
    assert (tmp_path / "dest/etc/link").read_bytes() == GOOD
    assert stat.S_IMODE((tmp_path / "dest/su").stat().st_mode) == 0o4755


def test_portinfo_must_come_first(tmp_path: Path) -> None:
    info = manifest(f("a", GOOD))
    package = craft(tmp_path / "p", info, [file_member("a", GOOD)], first=[file_member("a", GOOD)])
    with pytest.raises(PackageError, match="first member is not .PORTINFO"):
        extract_package(package, tmp_path / "dest")
    with pytest.raises(PackageError, match="first member is not .PORTINFO"):
        read_portinfo(package)
    assert not (tmp_path / "dest").exists()


def test_oversized_manifest_and_pax_headers_are_refused_unread(tmp_path: Path) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = ti(".PORTINFO")
        info.size = 1 << 30
        tar.addfile(info)  # header only: the claim alone must be refused
    package = tmp_path / "p"
    package.write_bytes(zstandard.ZstdCompressor().compress(raw.getvalue()))
    with pytest.raises(UnsafeArchive, match="more than a manifest may be"):
        read_portinfo(package)
    big = bytes(1 << 20)  # the manifest accounts for more than the pax header
    big_pax = with_pax(ti("a"), {"comment": "x" * (100 << 10)})
    package = craft(
        tmp_path / "q",
        manifest(f("a", GOOD), f("b", big)),
        [(big_pax, GOOD), file_member("b", big)],
    )
    with pytest.raises(UnsafeArchive, match="followed by a pax header of"):
        extract_package(package, tmp_path / "dest")


def test_failure_after_writing_removes_everything(tmp_path: Path) -> None:
    """The last file is bad: all the directories (one read-only) and files before it go."""
    info = manifest(d("ro", 0o555), f("ro/a", GOOD), d("rw"), f("rw/b", GOOD), f("z", GOOD))
    members = [
        (ti("ro", tarfile.DIRTYPE, 0o555), b""),
        file_member("ro/a", GOOD),
        (ti("rw", tarfile.DIRTYPE, 0o755), b""),
        file_member("rw/b", GOOD),
        file_member("z", b"bad data!\n"),
    ]
    package = craft(tmp_path / "p", info, members)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(UnsafeArchive, match="sha256"):
        extract_package(package, dest)
    assert list(dest.iterdir()) == []


def test_file_level_checks(tmp_path: Path) -> None:
    destdir = build(tmp_path)
    built = create_package(destdir, META, tmp_path / "out", epoch=EPOCH)
    dest = tmp_path / "dest"
    with pytest.raises(PackageError, match="sha256 mismatch"):
        extract_package(built.path, dest, expected_sha256="0" * 64)
    assert not dest.exists()
    with pytest.raises(PackageError, match="size"):
        extract_package(built.path, dest, expected_size=built.size + 1)
    data = bytearray(built.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt = tmp_path / "corrupt.pkg.tar.zst"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(PackageError):
        extract_package(corrupt, dest)
    assert not dest.exists()
    with pytest.raises(PackageError, match="No such file"):
        read_portinfo(tmp_path / "missing.pkg.tar.zst")
    with pytest.raises(PackageError, match="No such file"):
        create_package(tmp_path / "no-destdir", META, tmp_path / "out", epoch=EPOCH)
    (tmp_path / "junk").write_bytes(b"not zstd at all")
    with pytest.raises(PackageError):
        read_portinfo(tmp_path / "junk")
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(PackageError, match="not an empty directory"):
        extract_package(built.path, dest)
    assert (dest / "keep").read_text() == "mine" and len(list(dest.iterdir())) == 1


# --- the manifest --------------------------------------------------------------------------


def valid_info(*files: ManifestEntry) -> dict[str, object]:
    return msgpack.unpackb(manifest(*files))  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda m: m.update(format=1), "unsupported package format"),
        (lambda m: m.update(format=3), "unsupported package format"),
        (lambda m: m.update(format=True), "unsupported package format"),
        (lambda m: m.update(release=True), "'release': expected an integer, got bool"),
        (lambda m: m.update(name=1), "'name': expected a string, got int"),
        (lambda m: m.update(extra=1), "unknown keys ['extra']"),
        (lambda m: m.pop("license"), "missing keys ['license']"),
        (lambda m: m.update(depends="ok"), "'depends': expected a list of strings"),
        (lambda m: m.update(depends=["ok", 3]), "'depends': invalid item 3"),
        (lambda m: m.update(depends=["zlib >= 1"]), "invalid item 'zlib >= 1'"),
        (lambda m: m.update(build_key="ABC"), "'build_key': invalid value 'ABC'"),
        (lambda m: m.update(arch="X86"), "'arch': invalid value 'X86'"),
        (lambda m: m.update(installed_size=1), "installed_size"),
        (lambda m: m.pop("sonames"), "missing keys ['sonames']"),
        (lambda m: m.update(sonames=["lib/x.so.1"]), "'sonames': invalid soname"),
        (lambda m: m.update(sonames=["libz.so.1", "liba.so.1"]), "not sorted and distinct"),
        (lambda m: m.update(files={}), "'files' must be a list"),
        (lambda m: m["files"][0].update(type="fifo"), "no valid type"),
        (lambda m: m["files"][0].update(type=["file"]), "no valid type"),
        (lambda m: m["files"][0].update(mode=True), "wrong type"),
        (lambda m: m["files"][0].update(mode=0o17777), "invalid mode"),
        (lambda m: m["files"][0].pop("sha256"), "missing keys ['sha256']"),
        (lambda m: m["files"][0].update(sha256="xyz"), "sha256"),
        (lambda m: m["files"].reverse(), "out of order"),
        (lambda m: m["files"][1].update(path="zz/b"), "not a directory of the package"),
    ],
)
def test_from_bytes_refuses_bad_manifests(
    change: Callable[[dict[str, object]], None], words: str
) -> None:
    raw = valid_info(f("a", GOOD), f("b", GOOD))
    change(raw)
    with pytest.raises(PackageError) as err:
        PortInfo.from_bytes(msgpack.packb(raw), "pkg.tar.zst")
    assert str(err.value).startswith("pkg.tar.zst: ") and words in str(err.value), str(err.value)


def test_the_bytes_of_a_manifest_are_pinned() -> None:
    """``.PORTINFO`` is hashed into every package (and so into what dependents' build keys
    cover): this digest changes only with ``PACKAGE_FORMAT``."""
    sha = "cd" * 32
    meta = PackageMeta(
        "zlib",
        "1.3.1",
        2,
        "x86_64",
        "ab" * 32,
        "Compression",
        "Zlib",
        ("musl>=1.2",),
        ("libz=1.3.1",),
        ("zlib-ng",),
        5,
        ("libz.so.1",),
    )
    files = (
        d("usr"),
        d("usr/lib"),
        sym("usr/lib/libz.so", "libz.so.1"),
        ManifestEntry("usr/lib/libz.so.1", FileType.FILE, 0o644, 5, sha),
    )
    assert PACKAGE_FORMAT == 2
    assert hashlib.sha256(PortInfo(meta, files).to_bytes()).hexdigest() == (
        "cb0599a2d69fe36dcc36c17b3e0b18ecb4114cc5ebe72eda34249f5f1fbcc3b2"
    )


@pytest.mark.parametrize(
    "data", [b"", b"\xc1", b"\x92\x01\x02", msgpack.packb([1, 2]), b"\x81\xa1a"]
)
def test_from_bytes_refuses_garbage(data: bytes) -> None:
    with pytest.raises(PackageError, match="^label: "):
        PortInfo.from_bytes(data, "label")


_name = st.text("abcxyz019._-", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))


@st.composite
def port_infos(draw: st.DrawFn) -> PortInfo:
    dirs: set[str] = set()
    for _ in range(draw(st.integers(0, 6))):
        parts = draw(st.lists(_name, min_size=1, max_size=3))
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    leaves: set[str] = set()
    for name in draw(st.lists(_name, max_size=8)):
        nested = bool(dirs) and draw(st.booleans())
        leaves.add(f"{draw(st.sampled_from(sorted(dirs)))}/{name}" if nested else name)
    leaves -= dirs
    leaves = {p for p in leaves if not any(p == x or x.startswith(p + "/") for x in dirs)}
    entries: list[ManifestEntry] = []
    files: list[str] = []
    for path in sorted(dirs | leaves):
        if path in dirs:
            entries.append(ManifestEntry(path, FileType.DIR, draw(st.integers(0, 0o7777))))
            continue
        kind = draw(st.sampled_from([FileType.FILE, FileType.SYMLINK, FileType.HARDLINK]))
        if kind is FileType.HARDLINK and files:
            entries.append(ManifestEntry(path, kind, 0o644, target=draw(st.sampled_from(files))))
        elif kind is FileType.SYMLINK:
            target = "/" + draw(st.text("abc/é", min_size=1, max_size=10))
            entries.append(ManifestEntry(path, kind, 0o777, target=target))
        else:
            data = draw(st.binary(max_size=8))
            entries.append(
                ManifestEntry(
                    path,
                    FileType.FILE,
                    draw(st.integers(0, 0o7777)),
                    draw(st.integers(0, 2**40)),
                    hashlib.sha256(data).hexdigest(),
                )
            )
            files.append(path)
    deps = st.lists(
        st.from_regex(r"[a-z][a-z0-9+._-]{0,8}(>=[0-9][a-z0-9.]{0,4})?", fullmatch=True), max_size=3
    )
    meta = PackageMeta(
        name=draw(st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,10}", fullmatch=True)),
        version=draw(st.from_regex(r"([0-9]+:)?[0-9A-Za-z][A-Za-z0-9._+]{0,8}", fullmatch=True)),
        release=draw(st.integers(0, 2**31)),
        arch=draw(st.sampled_from(["x86_64", "aarch64", "any"])),
        summary=draw(st.text(max_size=30)),
        license=draw(st.text(max_size=10)),
        depends=tuple(draw(deps)),
        provides=tuple(draw(deps)),
        conflicts=tuple(draw(deps)),
        build_key=draw(st.text("0123456789abcdef", min_size=64, max_size=64)),
        installed_size=sum(e.size for e in entries),
    )
    return PortInfo(meta, tuple(entries))


@settings(max_examples=200, deadline=None)
@given(port_infos())
def test_portinfo_round_trips(info: PortInfo) -> None:
    assert PortInfo.from_bytes(info.to_bytes(), "p") == info


@settings(max_examples=200, deadline=None)
@given(port_infos(), st.data())
def test_mangled_manifests_raise_only_package_errors(info: PortInfo, data: st.DataObject) -> None:
    raw = bytearray(info.to_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    try:
        PortInfo.from_bytes(bytes(raw), "p")
    except PackageError:
        pass


@pytest.fixture(scope="module")
def small_package(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, Snapshot]:
    """A real package's decompressed tar stream (both frames), and what it unpacks to."""
    root = tmp_path_factory.mktemp("small")
    destdir = build(root)
    built = create_package(destdir, META, root / "out", epoch=EPOCH)
    reader = zstandard.ZstdDecompressor().stream_reader(
        built.path.read_bytes(), read_across_frames=True
    )
    stream = reader.read()
    assert len(stream) > 20000
    again = root / "again.pkg.tar.zst"  # the unmangled stream, recompressed, is accepted
    again.write_bytes(zstandard.ZstdCompressor().compress(stream))
    extract_package(again, root / "dest")
    assert snapshot(root / "dest") == snapshot(destdir)
    return stream, snapshot(destdir)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_mangled_archives_are_refused_or_unpack_intact(
    small_package: tuple[bytes, Snapshot],
    tmp_path_factory: pytest.TempPathFactory,
    data: st.DataObject,
) -> None:
    """Any byte of the tar stream changed: a PackageError, or (padding) the very same tree."""
    stream, expected = small_package
    mangled = bytearray(stream)
    for _ in range(data.draw(st.integers(1, 3))):
        mangled[data.draw(st.integers(0, len(mangled) - 1))] ^= data.draw(st.integers(1, 255))
    work = tmp_path_factory.mktemp("mangled")
    package = work / "p.pkg.tar.zst"
    package.write_bytes(zstandard.ZstdCompressor().compress(bytes(mangled)))
    try:
        extract_package(package, work / "dest")
    except PackageError:
        assert not (work / "dest").exists()
    else:
        assert snapshot(work / "dest") == expected


def test_big_packages_decompress_on_a_thread_and_are_verified_alike(tmp_path: Path) -> None:
    """Packages of 1 MiB and more (compressed) are read by a decompressing thread: the same
    content, and the same refusal of a tampered byte, as the small ones read inline."""
    destdir = tmp_path / "big"
    (destdir / "usr/lib").mkdir(parents=True)
    blob = random.Random(7).randbytes(3 << 20)  # incompressible: 3 MiB on disk too
    (destdir / "usr/lib/blob").write_bytes(blob)
    built = create_package(destdir, META, tmp_path / "out", epoch=EPOCH)
    assert built.size > 2 << 20
    info = extract_package(built.path, tmp_path / "unpacked", expected_sha256=built.sha256)
    assert info == built.info
    assert (tmp_path / "unpacked/usr/lib/blob").read_bytes() == blob

    data = bytearray(built.path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the blob's zstd block
    tampered = tmp_path / "tampered.pkg.tar.zst"
    tampered.write_bytes(bytes(data))
    with pytest.raises(PackageError):
        extract_package(tampered, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
