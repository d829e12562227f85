"""Binary packages: the ``.PORTINFO`` manifest, and creating, reading and extracting packages.

A package is ``<name>-<version>-<release>-<arch>-<key12>.pkg.tar.zst``: a POSIX tar whose
first member is ``.PORTINFO`` (a msgpack manifest of every other member), then the members
of DESTDIR in bytewise path order, every header normalised (mtime = the build's
SOURCE_DATE_EPOCH, uid/gid 0, owner ``root``), so the same DESTDIR gives the same bytes on
any machine. The tar and zstd layer and the rules for members are in ``portsd.pkg.archive``.

The file is two zstd frames: the first holds ``.PORTINFO``, the second the other members
and the end marker. Any zstd reader sees one tar stream; the split lets each file be read
once, hashed while zstd's workers compress, and still have the manifest (which needs every
hash) come first. ``read_portinfo`` decompresses little more than the manifest.

Same bytes whatever the core count: zstd's multithreaded mode cuts its input into jobs by
a job size derived from the compression parameters, never from the worker count, and each
job's output depends only on its input and the overlap window before it, so any worker
count >= 1 gives the same frame (tests prove 1, 2 and 8 agree). Worker count 0, zstd's
single-threaded mode, writes a different frame, so we always run the multithreaded mode
with at least one worker; the job size and overlap are pinned so a change of zstd's
defaults cannot slip in. Identical bytes hold for one libzstd version, which the pinned
zstandard wheel bundles.

Reading trusts nothing, whatever signature vouched for the file: ``PackageReader`` checks
the manifest (``PortInfo.from_bytes``), then that the members are exactly, in order, its entries
(path, type, mode, size, target, and each file's sha256), and stops decompressing once the
stream outgrows what the manifest accounts for (zstd bombs). Every violation raises
``UnsafeArchive`` naming the member.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import msgpack
import zstandard

from portsd.core.metadata import InvalidField, MetaLayout, PackageMeta, unpack
from portsd.errors import PackageError, UnsafeArchive
from portsd.fsio import remove_tree
from portsd.pkg.archive import (
    BLOCK,
    MAX_OCTAL,
    PORTINFO,
    FileType,
    ManifestEntry,
    TarStream,
    allowance,
    canonical_path_problem,
    check_entries,
    match_header,
    member_header,
    read_first,
    read_header,
    scan,
    write_members,
)

__all__ = [
    "PACKAGE_FORMAT",
    "BuiltPackage",
    "ManifestEntry",
    "FileType",
    "Member",
    "PackageReader",
    "PortInfo",
    "create_package",
    "extract_package",
    "read_portinfo",
    "differences",
]

PACKAGE_FORMAT = 2
"""Version of the layout of ``.PORTINFO`` and of the archive; bumped on any change
(2: ``sonames``)."""

ZSTD_LEVEL = 3
_JOB_SIZE = 8 << 20  # zstd's own default at level 3 (4 << windowLog 21), pinned: see above
_OVERLAP_LOG = 6  # zstd's default overlap for its fast strategies, pinned likewise
_SPOOL_LIMIT = 256 << 20  # compressed bytes kept in memory before spilling to disk
_COPY_CHUNK = 4 << 20
# Packages smaller than this (compressed) are decompressed on the reading thread: their
# whole stream is a buffer or two, so a thread could not run ahead, and starting one with
# its 4 MiB of buffers costs more than it overlaps. bench/install.py, 2 idle cores: staging
# 200 small packages 700 -> 250 ms; for 100 MB in one package the thread saves a third.
_THREAD_MIN = 1 << 20


_LAYOUT = MetaLayout(
    (
        "format",
        "name",
        "version",
        "release",
        "arch",
        "summary",
        "license",
        "depends",
        "provides",
        "conflicts",
        "build_key",
        "installed_size",
        "sonames",
        "files",
    ),
    build_key="build_key",
)
"""The keys of ``.PORTINFO``, in the order they are written: the package's facts, the
format and the files."""


@dataclass(frozen=True, slots=True)
class PortInfo:
    """The manifest in ``.PORTINFO``: the package's facts and its files, in the archive's
    (bytewise) order.

    ``meta.installed_size`` is the sum of the sizes of the regular files (a hardlinked
    file counted once). ``from_bytes`` accepts only what ``to_bytes`` could have written
    for a safe package: see ``check`` for the rules.
    """

    meta: PackageMeta
    files: tuple[ManifestEntry, ...]

    def to_bytes(self) -> bytes:
        """The canonical msgpack encoding (fixed key order), as stored in packages."""
        files = []
        for entry in self.files:
            item: dict[str, object] = {
                "path": entry.path,
                "type": str(entry.type),
                "mode": entry.mode,
                "size": entry.size,
            }
            if entry.sha256 is not None:
                item["sha256"] = entry.sha256
            if entry.target is not None:
                item["target"] = entry.target
            files.append(item)
        data: bytes = msgpack.packb(_LAYOUT.encode(self.meta, (PACKAGE_FORMAT, files)))
        return data

    @classmethod
    def from_bytes(cls, data: bytes, label: str) -> PortInfo:
        """Decode and ``check`` a manifest; any problem raises PackageError naming ``label``."""
        try:
            raw = unpack(data)
        except Exception as exc:  # msgpack raises a variety; all mean "not a manifest"
            raise PackageError(label, f"{PORTINFO} is not valid msgpack: {exc}") from None
        top = _record(raw, _TOP_KEYS, label, PORTINFO)
        if top.get("format") != PACKAGE_FORMAT or type(top["format"]) is not int:
            raise PackageError(label, f"unsupported package format {top['format']!r}")
        files = top["files"]
        if not isinstance(files, list):
            raise PackageError(label, f"{PORTINFO}: 'files' must be a list")
        try:
            meta = _LAYOUT.decode(top)
        except InvalidField as error:
            raise PackageError(label, f"{PORTINFO}: '{error.field}': {error.message}") from None
        info = cls(meta, tuple(_file_entry(item, label) for item in files))
        info.check(label)
        return info

    def check(self, label: str) -> None:
        """Raise PackageError (UnsafeArchive for a dangerous entry) unless this is sound.

        The files obey ``portsd.pkg.archive.check_entries`` (canonical sorted unique paths,
        parents that are directories of the package, links that stay inside the root) and
        add up to ``installed_size``; the facts checked themselves when they were made.
        """
        total = check_entries(self.files, label)
        if total != self.meta.installed_size:
            raise PackageError(
                label,
                f"installed_size {self.meta.installed_size} is not the files' total {total}",
            )


@dataclass(frozen=True, slots=True)
class BuiltPackage:
    """A package file just written: where, how big, its sha256 (hex) and its manifest."""

    path: Path
    size: int
    sha256: str
    info: PortInfo


def create_package(
    destdir: Path,
    meta: PackageMeta,
    out_dir: Path,
    *,
    epoch: int,
    level: int = ZSTD_LEVEL,
    threads: int = -1,
) -> BuiltPackage:
    """Pack DESTDIR into ``out_dir / meta.filename`` and describe what was written.

    ``epoch`` (SOURCE_DATE_EPOCH) is every member's mtime; ``threads`` is zstd's worker
    count (-1: one per usable CPU) and never changes the bytes. ``meta.installed_size`` is
    ignored: the manifest gets the size of what was packed. The file appears under its
    final name only when complete (temp file, fsync, rename), replacing any file there.
    Raises PackageError naming the path for what a package may not hold: device nodes,
    FIFOs, sockets, non-UTF-8 names, links leading outside DESTDIR. DESTDIR must not change
    while it is packed: a size change is detected, and a same-size rewrite would be refused
    by every reader (its sha256 would not match).
    """
    root = str(destdir)
    if not 0 <= epoch < MAX_OCTAL:
        raise PackageError(root, f"SOURCE_DATE_EPOCH {epoch} is out of range")
    workers = max(1, len(os.sched_getaffinity(0)) if threads < 0 else threads)
    cctx = zstandard.ZstdCompressor(compression_params=compression_parameters(level, workers))
    out_dir.mkdir(parents=True, exist_ok=True)
    name = meta.filename
    final = out_dir / name
    with _Spool(out_dir, _SPOOL_LIMIT) as body:
        try:
            entries = write_members(root, scan(root), epoch, cctx.compressobj(), body.write)
        except OSError as exc:
            raise PackageError(exc.filename or root, exc.strerror or str(exc)) from None
        installed = sum(entry.size for entry in entries)
        info = PortInfo(replace(meta, installed_size=installed), tuple(entries))
        info.check(root)  # never write what our own reader would refuse
        manifest = info.to_bytes()
        head = member_header(PORTINFO, FileType.FILE, 0o644, len(manifest), "", epoch)
        first = cctx.compress(head + manifest + bytes(-len(manifest) % BLOCK))
        digest = hashlib.sha256()
        size = 0
        fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=out_dir)
        try:
            try:
                for chunk in itertools.chain([first], body.chunks()):
                    digest.update(chunk)
                    size += len(chunk)
                    _write_all(fd, chunk)
                os.fchmod(fd, 0o644)  # mkstemp's 0600 would keep it from being served
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, final)
        except BaseException:
            os.unlink(temp)
            raise
    return BuiltPackage(final, size, digest.hexdigest(), info)


def compression_parameters(level: int, workers: int) -> zstandard.ZstdCompressionParameters:
    """zstd's parameters for packages; ``workers`` (>= 1) never changes the bytes."""
    return zstandard.ZstdCompressionParameters.from_level(
        level,
        threads=workers,
        job_size=_JOB_SIZE,
        overlap_log=_OVERLAP_LOG,
        write_checksum=True,
    )


class _Spool:
    """The second frame, kept while the manifest (which needs its hashes) is made: in memory
    up to ``limit`` bytes, past that in an unlinked file beside the package."""

    def __init__(self, directory: Path, limit: int) -> None:
        self._directory = directory
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self._file: IO[bytes] | None = None

    def write(self, data: bytes) -> None:
        if self._file is None and self._size + len(data) > self._limit:
            self._file = tempfile.TemporaryFile(dir=self._directory)
            self._file.writelines(self._chunks)
            self._chunks = []
        if self._file is None:
            self._chunks.append(data)
        else:
            self._file.write(data)
        self._size += len(data)

    def chunks(self) -> Iterator[bytes]:
        if self._file is None:
            yield from self._chunks
            return
        self._file.seek(0)
        yield from iter(lambda: self._file.read(_COPY_CHUNK), b"")  # type: ignore[union-attr]

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_portinfo(path: Path) -> PortInfo:
    """The checked manifest of a package, decompressing only its first member."""
    fd = _open(path)
    try:
        return PortInfo.from_bytes(read_first(TarStream(fd, str(path))), str(path))
    finally:
        os.close(fd)


def differences(one: PortInfo, other: PortInfo) -> tuple[str, ...]:
    """The paths whose members differ between two manifests (content, type, mode, target,
    or present in one only), in path order; ``.PORTINFO`` when only the facts differ."""
    mine = {entry.path: entry for entry in one.files}
    theirs = {entry.path: entry for entry in other.files}
    paths = sorted(p for p in mine.keys() | theirs.keys() if mine.get(p) != theirs.get(p))
    if not paths and one.meta != other.meta:
        return (PORTINFO,)
    return tuple(paths)


class Member:
    """A member whose header matched its manifest entry; a file's bytes come from ``chunks()``.

    Each view ``chunks()`` yields is valid until the next is requested. A file's content is
    checked against its sha256 as its last chunk is read: ``chunks()`` raises UnsafeArchive
    then, before it is exhausted, so whoever stages the file learns of a mismatch before
    committing it. Unread content is read and checked when the reader moves on.
    """

    __slots__ = ("entry", "mtime", "_reader")

    def __init__(self, entry: ManifestEntry, mtime: int, reader: PackageReader) -> None:
        self.entry = entry
        self.mtime = mtime
        self._reader = reader

    def chunks(self) -> Iterator[memoryview]:
        """The content, in order, once; nothing for directories and links.

        Only while this is the reader's current member: afterwards it raises PackageError.
        """
        return self._reader._content(self)


class PackageReader:
    """A package file opened for verified streaming reading (see the module docstring).

    ``info``, the checked manifest, is there once the reader is constructed. ``members()``
    yields each member once its header matched the manifest; the archive as a whole (no
    member missing or extra, nothing but padding after the end marker, the file's size and
    sha256 when expected ones are given) is verified only when ``members()`` ends without
    raising. So an installer stages what it is handed and commits only after the loop.
    """

    def __init__(
        self, path: Path, *, expected_sha256: str | None = None, expected_size: int | None = None
    ) -> None:
        self.path = path
        self._label = str(path)
        self._expected_sha256 = expected_sha256
        self._fd = _open(path)
        try:
            self._size = os.fstat(self._fd).st_size
            if expected_size is not None and self._size != expected_size:
                raise PackageError(
                    self._label, f"size is {self._size} bytes, expected {expected_size}"
                )
            threaded = self._size >= _THREAD_MIN
            self._stream = TarStream(self._fd, self._label, threaded=threaded)
        except BaseException:
            os.close(self._fd)
            raise
        try:
            self.info = PortInfo.from_bytes(read_first(self._stream), self._label)
        except BaseException:
            self.close()
            raise
        self._left = 0  # unread content bytes of the current file
        self._digest: Any = None  # its running sha256, until checked
        self._started = False
        self._current: Member | None = None

    def close(self) -> None:
        """Release the file; idempotent."""
        if self._fd >= 0:
            self._stream.close()
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> PackageReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def members(self) -> Iterator[Member]:
        """Every member after ``.PORTINFO``, in order; may be iterated once."""
        if self._started:
            raise PackageError(self._label, "members() may be iterated only once")
        self._started = True
        stream = self._stream
        files = self.info.files
        stream.set_limit(stream.consumed + allowance(files))
        position = {entry.path: index for index, entry in enumerate(files)}
        for index, expected in enumerate(files):
            header = read_header(stream)
            if header is None:
                raise UnsafeArchive(self._label, expected.path, "in the manifest, not the archive")
            if header.path != expected.path:
                raise self._misplaced(header.path, position.get(header.path, -1), index)
            match_header(header, expected, self._label)
            stream.member = header.path
            self._left = header.size
            self._digest = hashlib.sha256() if header.type is FileType.FILE else None
            self._current = Member(expected, header.mtime, self)
            yield self._current
            for _ in self._content(self._current):
                pass
            self._current = None
            stream.skip(-header.size % BLOCK)
        header = read_header(stream)
        if header is not None:
            raise self._misplaced(header.path, position.get(header.path, -1), len(files))
        stream.member = "(end of archive)"
        stream.expect_zeros_to_eof()
        self._check_file()

    def _misplaced(self, path: str, found: int, index: int) -> UnsafeArchive:
        problem = canonical_path_problem(path)  # manifest paths passed this already
        if problem:
            return UnsafeArchive(self._label, path, problem)
        if found > index:  # a later entry showed up: the expected ones were skipped
            missing = self.info.files[index].path
            return UnsafeArchive(
                self._label, missing, f"in the manifest, not the archive ('{path}' came first)"
            )
        if found >= 0:
            return UnsafeArchive(self._label, path, "duplicate member")
        return UnsafeArchive(self._label, path, "not in the manifest")

    def _content(self, member: Member) -> Iterator[memoryview]:
        if member is not self._current:
            raise PackageError(self._label, f"'{member.entry.path}' read after the reader moved on")
        entry = member.entry
        stream = self._stream
        while self._left:
            view = stream.some(self._left)
            self._digest.update(view)
            self._left -= len(view)
            yield view
        if self._digest is not None:
            actual, self._digest = self._digest.hexdigest(), None
            if actual != entry.sha256:
                raise UnsafeArchive(
                    self._label, entry.path, f"content has sha256 {actual}, not {entry.sha256}"
                )

    def _check_file(self) -> None:
        source = self._stream.source
        if source.size != self._size or os.read(self._fd, 1):
            raise PackageError(self._label, "file changed while it was read")
        actual = source.digest.hexdigest()
        if self._expected_sha256 is not None and actual != self._expected_sha256:
            raise PackageError(
                self._label, f"sha256 mismatch: expected {self._expected_sha256}, got {actual}"
            )


def extract_package(
    path: Path, dest: Path, *, expected_sha256: str | None = None, expected_size: int | None = None
) -> PortInfo:
    """Unpack a package into ``dest`` (absent, or an empty directory); return its manifest.

    Every check of ``PackageReader`` applies. Files get their modes (setuid bits only once
    their content is verified) and the archive's mtime; directories get theirs last, after
    their contents. Nothing is written through a symlink: each path is created exclusively
    (O_EXCL, O_NOFOLLOW) below directories this call made. On any failure everything
    written is removed and ``dest`` is left as it was (removed if this call created it).
    Nobody else may write into ``dest`` meanwhile.
    """
    created = not os.path.lexists(dest)
    if created:
        try:
            os.mkdir(dest, 0o755)
        except OSError as exc:
            raise PackageError(str(dest), exc.strerror or str(exc)) from None
    elif dest.is_symlink() or not dest.is_dir() or _has_entries(dest):
        raise PackageError(str(dest), "extraction target is not an empty directory")
    root = str(dest)
    try:
        with PackageReader(
            path, expected_sha256=expected_sha256, expected_size=expected_size
        ) as reader:
            directories: list[tuple[str, int, int]] = []
            for member in reader.members():
                entry = member.entry
                target = f"{root}/{entry.path}"
                try:
                    if entry.type is FileType.FILE:
                        _write_file(target, member)
                    elif entry.type is FileType.DIR:
                        # Owner-writable until the end, so later members (and a cleanup
                        # after a failure) can write in it; its own mode comes last.
                        os.mkdir(target, 0o700)
                        directories.append((target, entry.mode, member.mtime))
                    elif entry.type is FileType.SYMLINK:
                        os.symlink(entry.target or "", target)
                        os.utime(target, ns=_ns(member.mtime), follow_symlinks=False)
                    else:
                        os.link(f"{root}/{entry.target}", target, follow_symlinks=False)
                except OSError as exc:
                    raise PackageError(str(path), f"cannot extract '{entry.path}': {exc}") from None
            for target, mode, mtime in reversed(directories):
                os.chmod(target, mode)
                os.utime(target, ns=_ns(mtime))
            return reader.info
    except BaseException:
        _remove(root, keep_root=not created)
        raise


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise PackageError(str(path), exc.strerror or str(exc)) from None


def _has_entries(directory: Path) -> bool:
    with os.scandir(directory) as entries:
        return any(True for _ in entries)


def _write_file(target: str, member: Member) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        for chunk in member.chunks():
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
        os.fchmod(fd, member.entry.mode)
        os.utime(fd, ns=_ns(member.mtime))
    finally:
        os.close(fd)


def _ns(mtime: int) -> tuple[int, int]:
    return mtime * 1_000_000_000, mtime * 1_000_000_000


def _remove(root: str, *, keep_root: bool) -> None:
    """Remove what an extraction wrote, even below directories that lost their write bits."""
    if not keep_root:
        remove_tree(Path(root))
        return
    with os.scandir(root) as entries:
        for entry in entries:
            remove_tree(Path(entry.path))


# --- decoding ------------------------------------------------------------------------------

_TOP_KEYS = frozenset(_LAYOUT.keys)
_TYPES = {kind.value: kind for kind in FileType}
_FILE_KEYS = {
    FileType.FILE: frozenset({"path", "type", "mode", "size", "sha256"}),
    FileType.DIR: frozenset({"path", "type", "mode", "size"}),
    FileType.SYMLINK: frozenset({"path", "type", "mode", "size", "target"}),
    FileType.HARDLINK: frozenset({"path", "type", "mode", "size", "target"}),
}


def _record(raw: object, keys: frozenset[str], label: str, what: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise PackageError(label, f"{what} must be a map")
    if raw.keys() != keys:
        missing = sorted(keys - raw.keys())
        unknown = sorted(map(str, raw.keys() - keys))
        raise PackageError(label, f"{what}: missing keys {missing}, unknown keys {unknown}")
    return raw


def _file_entry(item: object, label: str) -> ManifestEntry:
    kind = item.get("type") if isinstance(item, dict) else None
    kind = _TYPES.get(kind) if type(kind) is str else None
    if kind is None:
        raise PackageError(label, f"{PORTINFO}: file entry {item!r} has no valid type")
    assert isinstance(item, dict)
    keys = _FILE_KEYS[kind]
    if len(item) != len(keys) or not item.keys() >= keys:
        _record(item, keys, label, f"file entry {item.get('path')!r}")
    path, mode, size = item["path"], item["mode"], item["size"]
    sha256, target = item.get("sha256"), item.get("target")
    # exact types: msgpack bools must not pass as ints
    if (
        type(path) is not str
        or type(mode) is not int
        or type(size) is not int
        or not (sha256 is None or type(sha256) is str)
        or not (target is None or type(target) is str)
    ):
        raise PackageError(label, f"{PORTINFO}: file entry {item!r} has a field of a wrong type")
    return ManifestEntry(path, kind, mode, size, sha256, target)
