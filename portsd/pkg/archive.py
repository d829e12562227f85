"""The container under every package: tar members in a zstd stream, and their safety rules.

This module knows tar and zstd and what a member may be; ``portsd.pkg.package`` builds the
package format (the ``.PORTINFO`` manifest, creating, verifying, extracting) on top of it.

The tar writer and reader are our own rather than ``tarfile``, and that is a measured choice:
bench/pack.py times both, with every check of ours on, against ``tar | zstd -T0`` and
``zstd -dc | tar -x`` (the numbers are in docs/benchmarks.md, "Packing and unpacking");
``tarfile`` with its 'data' filter unpacks several times slower than tar, ours close to it.
What buys it: ustar headers built directly (checksums in C), file data read straight into
one 4 MiB buffer handed to zstd's workers, the decompressed stream read on a second thread
into reused buffers handed out as views, and nothing per member that need not be done.
Only what we write is read: ustar headers, plus pax records for ``path``, ``linkpath`` and
``size`` when those do not fit; anything else (GNU long names, global or other pax records,
devices, FIFOs, sparse files) is refused.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

import msgpack
import zstandard

from portsd.errors import PackageError, UnsafeArchive

PORTINFO = ".PORTINFO"
"""Name of the manifest, the first member of every package."""
MAX_PORTINFO_SIZE = 64 << 20
"""Largest manifest a reader accepts (about 400,000 files); bounds memory before it is read."""
BLOCK = 512
MAX_PATH = 4095  # PATH_MAX minus the NUL: longer paths cannot be created anyway
MAX_OCTAL = 8**11  # a 12-byte ustar field holds 11 octal digits; larger sizes go in pax

USTAR_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12s")
"""name mode uid gid size mtime chksum typeflag linkname magic version uname gname
devmajor devminor prefix, padded to 512 bytes."""

_OWNER = b"root"
_PAX_NAME = b"././@PaxHeader"  # fixed: GNU tar puts its pid here, which is not reproducible
_CHUNK = 4 << 20  # bytes handed to the compressor at once: large, to amortise the calls
_BUFFER = 1 << 20  # decompressed bytes in one chunk handed to a reader
_AHEAD = 4  # chunks a reader's thread may decompress ahead
_READ_SIZE = 256 << 10  # compressed bytes read from the file at once
_MAX_WINDOW = 1 << 27  # zstd's default cap, stated: bounds the decoder's memory
_MAX_PAX = 64 << 10  # our pax records are a few hundred bytes
_SYMLINK_HOPS = 40  # as Linux's MAXSYMLINKS: past this the kernel says ELOOP, no escape
_ZEROS = bytes(_BUFFER)
_ZERO_BLOCK = bytes(BLOCK)
_ZERO_VIEW = memoryview(_ZERO_BLOCK)


class FileType(StrEnum):
    """The kinds of member a package may hold; devices, FIFOs and sockets never."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"


_TYPEFLAGS = {
    FileType.FILE: b"0",
    FileType.HARDLINK: b"1",
    FileType.SYMLINK: b"2",
    FileType.DIR: b"5",
}
_KINDS = {flag: kind for kind, flag in _TYPEFLAGS.items()}
_REFUSED = {
    b"3": "character device nodes are not allowed",
    b"4": "block device nodes are not allowed",
    b"6": "FIFOs are not allowed",
}


@dataclass(frozen=True, slots=True)
class ManifestEntry:
    """One member: ``path`` relative to the root (no leading slash), ``mode`` its 0o7777 bits.

    Files carry ``size`` and ``sha256`` (hex); symlinks and hardlinks carry ``target`` (a
    hardlink's is the path of an earlier file of the package) and size 0; directories neither.
    A hardlink's ``mode`` is its file's (they are one inode); a symlink's is always 0o777.
    """

    path: str
    type: FileType
    mode: int
    size: int = 0
    sha256: str | None = None
    target: str | None = None


# --- the rules -----------------------------------------------------------------------------


def canonical_path_problem(path: str) -> str | None:
    """Why ``path`` may not name a member (absolute, ``..``, ...), or None if it may."""
    if not path:
        return "empty path"
    if path.startswith("/"):
        return "absolute path"
    parts = path.split("/")
    if ".." in parts:
        return "path contains '..'"
    if "" in parts or "." in parts:
        return "path is not canonical (empty or '.' component)"
    if "\0" in path:
        return "path contains NUL"
    if len(path.encode()) > MAX_PATH:
        return "path is too long"
    return None


def check_entries(entries: Sequence[ManifestEntry], label: str) -> int:
    """Check a manifest's members; return the total size of its files.

    Every path is canonical and strictly after the previous one (bytewise sorted, so no
    duplicates); every parent is an earlier directory entry, so nothing is written through
    a symlink; symlinks resolve inside the root (absolute targets are relative to it, the
    package's own symlinks are followed); hardlinks name an earlier regular file. Raises
    UnsafeArchive naming the member, or PackageError for a malformed entry.
    """
    kinds: dict[str, FileType] = {}
    links: dict[str, str] = {}
    previous = ""
    total = 0
    for entry in entries:
        _check_entry(entry, previous, kinds, label)
        if entry.type is FileType.SYMLINK:
            links[entry.path] = entry.target or ""
        kinds[entry.path] = entry.type
        previous = entry.path
        total += entry.size
    for path, target in links.items():
        if _escapes(path, target, links):
            raise UnsafeArchive(label, path, f"symlink to '{target}' points outside the root")
    return total


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _check_entry(
    entry: ManifestEntry, previous: str, kinds: dict[str, FileType], label: str
) -> None:
    path = entry.path
    problem = canonical_path_problem(path)
    if problem:
        raise UnsafeArchive(label, path, problem)
    if path == PORTINFO:
        raise UnsafeArchive(label, path, f"{PORTINFO} may only be the manifest")
    if path <= previous:  # str order is code point order, which is UTF-8 byte order
        what = "duplicate path" if path == previous else f"out of order after '{previous}'"
        raise UnsafeArchive(label, path, what)
    parent = path.rpartition("/")[0]
    if parent:
        kind = kinds.get(parent)
        if kind is FileType.SYMLINK:
            raise UnsafeArchive(label, path, f"written through symlink '{parent}'")
        if kind is not FileType.DIR:
            raise UnsafeArchive(label, path, f"parent '{parent}' is not a directory of the package")
    if not 0 <= entry.mode <= 0o7777:
        raise PackageError(label, f"{path}: invalid mode {entry.mode!r}")
    if entry.type is FileType.FILE:
        if entry.size < 0 or entry.target is not None or not _SHA256.fullmatch(entry.sha256 or ""):
            raise PackageError(label, f"{path}: a file needs a size and a sha256, and no target")
        return
    if entry.size != 0 or entry.sha256 is not None:
        raise PackageError(label, f"{path}: a {entry.type} has size 0 and no sha256")
    target = entry.target
    if entry.type is FileType.DIR:
        if target is not None:
            raise PackageError(label, f"{path}: a directory has no target")
    elif entry.type is FileType.SYMLINK:
        if entry.mode != 0o777:
            raise PackageError(label, f"{path}: a symlink has mode 0o777")
        if not target or "\0" in target or len(target.encode()) > MAX_PATH:
            raise PackageError(label, f"{path}: invalid symlink target {target!r}")
    else:
        if target is None or canonical_path_problem(target):
            raise UnsafeArchive(label, path, f"hardlink to '{target}' points outside the root")
        if kinds.get(target) is not FileType.FILE:
            raise UnsafeArchive(
                label, path, f"hardlink target '{target}' is not an earlier file of the package"
            )


def _escapes(path: str, target: str, links: dict[str, str]) -> bool:
    """Whether symlink ``path -> target`` resolves above the root.

    Resolution follows the package's own symlinks (a link to ``d/..`` where ``d`` links to
    ``/`` escapes although ``d/..`` looks harmless) and takes every other component for a
    directory; absolute targets start at the root. Past 40 hops the kernel says ELOOP, so
    such a chain cannot escape either.
    """
    stack = [] if target.startswith("/") else path.split("/")[:-1]
    pending = list(reversed(target.split("/")))
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return True
            stack.pop()
            continue
        stack.append(part)
        inner = links.get("/".join(stack))
        if inner is not None:
            hops += 1
            if hops > _SYMLINK_HOPS:
                return False
            stack.pop()
            if inner.startswith("/"):
                stack = []
            pending.extend(reversed(inner.split("/")))
    return False


# --- writing -------------------------------------------------------------------------------

# A member found in a directory tree: (path relative to the root, lstat result).
Found = tuple[str, os.stat_result]


def scan(root: str) -> list[Found]:
    """Everything below ``root`` (not following symlinks), in bytewise path order.

    Raises PackageError naming the path for a name that is not UTF-8.
    """
    found: list[Found] = []
    pending = [""]
    while pending:
        prefix = pending.pop()
        with os.scandir(f"{root}/{prefix}" if prefix else root) as entries:
            for dirent in entries:
                rel = f"{prefix}/{dirent.name}" if prefix else dirent.name
                try:
                    rel.encode()
                except UnicodeEncodeError:
                    raise PackageError(f"{root}/{rel}", "file name is not UTF-8") from None
                st = dirent.stat(follow_symlinks=False)
                found.append((rel, st))
                if stat.S_ISDIR(st.st_mode):
                    pending.append(rel)
    found.sort(key=lambda item: item[0])  # code point order is UTF-8 byte order
    return found


def write_members(
    root: str,
    found: Sequence[Found],
    epoch: int,
    compressor: zstandard.ZstdCompressionObj,
    write: Callable[[bytes], object],
) -> list[ManifestEntry]:
    """Compress the tar members of ``found`` and the end marker, handing output to ``write``.

    Each file is read once: straight into the buffer that goes to zstd, hashed on the way
    (zstd's workers compress the previous buffer meanwhile). Returns the entries in order.
    Raises PackageError naming the path for a device node, FIFO or socket, a non-UTF-8
    symlink target, or a file that changes size while it is read.
    """
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    pos = 0
    entries: list[ManifestEntry] = []
    inodes: dict[tuple[int, int], str] = {}

    def put(data: bytes | memoryview) -> None:
        nonlocal pos
        if pos + len(data) > _CHUNK:
            write(compressor.compress(view[:pos]))
            pos = 0
        buf[pos : pos + len(data)] = data
        pos += len(data)

    for rel, st in found:
        full = f"{root}/{rel}"
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            entries.append(ManifestEntry(rel, FileType.DIR, mode))
            put(member_header(rel + "/", FileType.DIR, mode, 0, "", epoch))
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(full)
            try:
                target.encode()
            except UnicodeEncodeError:
                raise PackageError(full, "symlink target is not UTF-8") from None
            entries.append(ManifestEntry(rel, FileType.SYMLINK, 0o777, target=target))
            put(member_header(rel, FileType.SYMLINK, 0o777, 0, target, epoch))
        elif stat.S_ISREG(st.st_mode):
            inode = (st.st_dev, st.st_ino)
            first = inodes.get(inode) if st.st_nlink > 1 else None
            if first is not None:  # the first path in sorted order is the file
                entries.append(ManifestEntry(rel, FileType.HARDLINK, mode, target=first))
                put(member_header(rel, FileType.HARDLINK, mode, 0, first, epoch))
                continue
            if st.st_nlink > 1:
                inodes[inode] = rel
            size = st.st_size
            put(member_header(rel, FileType.FILE, mode, size, "", epoch))
            digest = hashlib.sha256()
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                left = size
                while True:
                    if pos == _CHUNK:
                        write(compressor.compress(view))
                        pos = 0
                    # One byte more than is left: a file that grew shows without an extra
                    # read per file, and a short read of a regular file is its end.
                    want = min(left + 1, _CHUNK - pos)
                    got = os.readv(fd, [view[pos : pos + want]])
                    if got > left:
                        raise PackageError(full, "file grew while being packed")
                    digest.update(view[pos : pos + got])
                    pos += got
                    left -= got
                    if got < want:
                        break
                if left:
                    raise PackageError(full, "file shrank while being packed")
            finally:
                os.close(fd)
            put(_ZERO_VIEW[: -size % BLOCK])
            entries.append(ManifestEntry(rel, FileType.FILE, mode, size, digest.hexdigest()))
        else:
            kind = "FIFO" if stat.S_ISFIFO(st.st_mode) else "socket"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                kind = "device node"
            raise PackageError(full, f"a package may not contain a {kind}")
    put(bytes(2 * BLOCK))  # the end marker
    write(compressor.compress(view[:pos]))
    write(compressor.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH))
    return entries


def member_header(
    name: str, kind: FileType, mode: int, size: int, target: str, epoch: int
) -> bytes:
    """A normalised ustar header (uid/gid 0, owner root, mtime ``epoch``), preceded by a pax
    header when the name, target or size does not fit in its field."""
    raw_name = name.encode()
    raw_target = target.encode()
    if len(raw_name) <= 100 and len(raw_target) <= 100 and size < MAX_OCTAL:
        return _ustar(raw_name, _TYPEFLAGS[kind], mode, size, raw_target, epoch)
    records = b""
    if len(raw_target) > 100:
        records += _pax_record(b"linkpath", raw_target)
    if len(raw_name) > 100:
        records += _pax_record(b"path", raw_name)
    if size >= MAX_OCTAL:
        records += _pax_record(b"size", b"%d" % size)
        size = 0
    head = _ustar(raw_name[:100], _TYPEFLAGS[kind], mode, size, raw_target[:100], epoch)
    if not records:
        return head
    pax = _ustar(_PAX_NAME, b"x", 0o644, len(records), b"", epoch)
    return pax + records + bytes(-len(records) % BLOCK) + head


def _ustar(name: bytes, typeflag: bytes, mode: int, size: int, link: bytes, epoch: int) -> bytes:
    block = USTAR_HEADER.pack(
        name,
        b"%07o\0" % mode,
        b"0000000\0",
        b"0000000\0",
        b"%011o\0" % size,
        b"%011o\0" % epoch,
        b"        ",
        typeflag,
        link,
        b"ustar\0",
        b"00",
        _OWNER,
        _OWNER,
        b"",
        b"",
        b"",
        b"",
    )
    return block[:148] + b"%06o\0 " % _byte_sum(block) + block[156:]


def _byte_sum(block: bytes | memoryview) -> int:
    """The sum of a header's bytes, its checksum. Adler-32's low half is 1 + that sum
    modulo 65521; a 256-byte half sums to at most 65280, so two halves give it exactly, in
    C, where ``sum()`` would loop in Python over every byte (docs/benchmarks.md)."""
    return (zlib.adler32(block[:256]) & 0xFFFF) + (zlib.adler32(block[256:512]) & 0xFFFF) - 2


def _pax_record(key: bytes, value: bytes) -> bytes:
    """``"<len> key=value\\n"``, where len counts the whole record, its own digits included."""
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while length != len(body) + len(str(length)):
        length = len(body) + len(str(length))
    return b"%d" % length + body


# --- reading -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TarHeader:
    """A member header, pax records applied and its type one a package may hold."""

    path: str
    type: FileType
    mode: int
    size: int
    target: str
    mtime: int


class HashingReader:
    """A compressed file read through, its bytes counted and hashed as zstd reads them."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.size = 0
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = os.read(self.fd, size if size >= 0 else _READ_SIZE)
        self.digest.update(data)
        self.size += len(data)
        return data


class TarStream:
    """The decompressed tar stream of a file, handed out as views of reused buffers.

    With ``threaded``, a thread decompresses up to 4 MiB ahead while the caller parses,
    hashes and writes (zstd releases the GIL): that overlap is most of what keeps
    verified unpacking near ``zstd -dc | tar -x``, which also runs on two cores. Without
    it (``read_portinfo``), little is decompressed beyond what is asked for.

    ``limit`` is the zstd bomb guard: no byte past it is ever handed out (asking for one
    raises UnsafeArchive), and decompression stops soon after it. Only a checked manifest
    may move it (``set_limit``). Where the error comes depends on the stream alone, not on
    how far ahead the thread got. ``member`` names the member being read, for errors. A
    view is valid until the next call; ``close()`` stops the thread and must come before
    the file is closed.
    """

    def __init__(self, fd: int, label: str, *, threaded: bool = False) -> None:
        self.source = HashingReader(fd)
        decompressor = zstandard.ZstdDecompressor(max_window_size=_MAX_WINDOW)
        self._reader = decompressor.stream_reader(
            self.source,  # type: ignore[arg-type]  # anything with read() will do
            read_size=_READ_SIZE,
            read_across_frames=True,
            closefd=False,
        )
        self.label = label
        self.member = PORTINFO
        # Room for the largest manifest, however far ahead the thread is by then.
        self.limit = MAX_PORTINFO_SIZE + (_AHEAD + 2) * _BUFFER
        self.produced = 0  # decompressed bytes, counted by whoever decompresses
        self._chunk = memoryview(b"")  # the current chunk; the caller is at _pos in it
        self._pos = 0
        self._before = 0  # bytes of the chunks before the current one
        self._capped = False  # the current chunk was cut at the limit
        self._own = bytearray(0 if threaded else _BUFFER)  # the one buffer when not threaded
        self._thread: threading.Thread | None = None
        if threaded:
            self._free: queue.SimpleQueue[bytearray | None] = queue.SimpleQueue()
            self._ready: queue.SimpleQueue[tuple[bytearray, int] | BaseException | None] = (
                queue.SimpleQueue()
            )
            self._held: bytearray | None = None
            self._stopping = False
            for _ in range(_AHEAD):
                self._free.put(bytearray(_BUFFER))
            self._thread = threading.Thread(target=self._produce, name="unzstd", daemon=True)
            self._thread.start()

    @property
    def consumed(self) -> int:
        """Decompressed bytes handed out so far."""
        return self._before + self._pos

    def set_limit(self, limit: int) -> None:
        """Move the bomb guard; raises UnsafeArchive if more was handed out already."""
        self.limit = limit
        self._cap()

    def close(self) -> None:
        """Stop the decompressing thread, if any; idempotent."""
        if self._thread is not None:
            self._stopping = True
            self._free.put(None)
            self._thread.join()
            self._thread = None

    def _bomb(self) -> UnsafeArchive:
        return UnsafeArchive(
            self.label,
            self.member,
            f"decompresses to more than the {self.limit} bytes its manifest accounts for",
        )

    def _cap(self) -> None:
        room = self.limit - self._before
        if len(self._chunk) > room:
            if self._pos > room:
                raise self._bomb()
            self._chunk = self._chunk[: max(room, 0)]
            self._capped = True

    def _decompress(self, buffer: bytearray) -> int:
        """Fill ``buffer`` as far as the stream goes; raises PackageError for bad zstd data."""
        view = memoryview(buffer)
        size = 0
        try:
            while size < len(buffer):
                got = self._reader.readinto(view[size:])
                if not got:
                    break
                size += got
        except zstandard.ZstdError as exc:
            raise PackageError(self.label, f"corrupt zstd data: {exc}") from None
        self.produced += size
        return size

    def _produce(self) -> None:
        try:
            while not self._stopping:
                buffer = self._free.get()
                if buffer is None or self._stopping:
                    return
                size = self._decompress(buffer)
                if size:
                    self._ready.put((buffer, size))
                if size < len(buffer) or self.produced > self.limit:
                    self._ready.put(None)  # the end, or past the limit: nothing more
                    return
        except BaseException as exc:  # handed to the caller, who raises it
            self._ready.put(exc)

    def _next(self) -> bool:
        """Move to the next chunk; False at the end of the stream."""
        if self._capped:
            raise self._bomb()
        self._before += len(self._chunk)
        self._pos = 0
        self._chunk = memoryview(b"")
        if self._thread is None:
            size = self._decompress(self._own)
            self._chunk = memoryview(self._own)[:size]
        else:
            if self._held is not None:
                self._free.put(self._held)  # the caller is done with its views by now
                self._held = None
            item = self._ready.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                self._ready.put(None)  # stay at the end
                if self.produced > self.limit:
                    raise self._bomb()
                return False
            self._held, size = item
            self._chunk = memoryview(self._held)[:size]
        self._cap()
        return len(self._chunk) > 0 or self._capped

    def _truncated(self) -> PackageError:
        return PackageError(self.label, f"archive is truncated (in '{self.member}')")

    def take(self, size: int) -> memoryview:
        """Exactly ``size`` bytes."""
        end = self._pos + size
        if end <= len(self._chunk):
            self._pos = end
            return self._chunk[end - size : end]
        gathered = bytearray()
        while len(gathered) < size:
            gathered += self.some(size - len(gathered))
        return memoryview(gathered)

    def some(self, most: int) -> memoryview:
        """Between 1 and ``most`` bytes: what is at hand, decompressing more if nothing is."""
        while self._pos == len(self._chunk):
            if not self._next():
                raise self._truncated()
        start = self._pos
        self._pos = min(start + most, len(self._chunk))
        return self._chunk[start : self._pos]

    def read(self, size: int) -> bytes:
        """``size`` bytes as one object (for the manifest and pax records)."""
        return bytes(self.take(size))

    def skip(self, size: int) -> None:
        while size:
            size -= len(self.some(size))

    def expect_zeros_to_eof(self) -> None:
        """After the end marker only zero padding may follow (up to ``limit``)."""
        while self._pos < len(self._chunk) or self._next():
            view = self.some(len(self._chunk))
            if view != _ZEROS[: len(view)]:
                raise UnsafeArchive(self.label, self.member, "data after the end of the archive")


def read_first(stream: TarStream) -> bytes:
    """The content of the first member, which must be a plain ``.PORTINFO`` file."""
    name, _, size_field, _, typeflag, _, prefix = _fields(stream.take(BLOCK), stream)
    size = _octal(size_field, stream)
    if _cstring(name) != PORTINFO.encode() or typeflag != b"0" or _cstring(prefix):
        raise PackageError(stream.label, f"first member is not {PORTINFO}")
    if size > MAX_PORTINFO_SIZE:
        raise UnsafeArchive(stream.label, PORTINFO, f"{size} bytes is more than a manifest may be")
    data = stream.read(size)
    stream.skip(-size % BLOCK)
    return data


def read_header(stream: TarStream) -> TarHeader | None:
    """The next member's header; None at the end marker (two zero blocks).

    Raises UnsafeArchive naming the member for a refused type (device, FIFO, anything but
    file/dir/symlink/hardlink). The path is as stored (a directory's trailing slash cut):
    the caller compares it with checked manifest paths.
    """
    label = stream.label
    block = stream.take(BLOCK)
    if block == _ZERO_BLOCK:
        if stream.take(BLOCK) != _ZERO_BLOCK:
            raise PackageError(label, f"lone zero block (after '{stream.member}')")
        return None
    name, mode, size_field, mtime, typeflag, link, prefix = _fields(block, stream)
    if typeflag == b"x":
        pax_size = _octal(size_field, stream)
        if pax_size > _MAX_PAX:
            raise UnsafeArchive(
                label, stream.member, f"followed by a pax header of {pax_size} bytes"
            )
        pax = _pax_records(stream.read(pax_size), stream)
        stream.skip(-pax_size % BLOCK)
        name, mode, size_field, mtime, typeflag, link, prefix = _fields(stream.take(BLOCK), stream)
    else:
        pax = {}
    raw = pax.get(b"path") or _cstring(name)
    if b"path" not in pax and prefix[:1] not in (b"", b"\0"):
        raw = _cstring(prefix) + b"/" + raw
    path = _text(raw, stream)
    kind = _KINDS.get(typeflag)
    if kind is None:
        raise UnsafeArchive(label, path, _REFUSED.get(typeflag, f"unsupported type {typeflag!r}"))
    if kind is FileType.DIR and path.endswith("/"):
        path = path[:-1]
    for key, value in pax.items():
        # xattrs (file capabilities!), owners and times are never ours to restore
        if key not in (b"path", b"linkpath", b"size"):
            raise UnsafeArchive(
                label, path, f"unsupported pax record {key.decode(errors='replace')!r}"
            )
        if key == b"size" and not value.isdigit():
            raise UnsafeArchive(label, path, f"bad pax size {value!r}")
    size = int(pax[b"size"]) if b"size" in pax else _octal(size_field, stream)
    target = _text(pax.get(b"linkpath") or _cstring(link), stream)
    return TarHeader(path, kind, _octal(mode, stream), size, target, _octal(mtime, stream))


def match_header(header: TarHeader, expected: ManifestEntry, label: str) -> None:
    """Refuse a member header that is not exactly its manifest entry (path already equal)."""
    path = expected.path
    kind, mode, size, target = header.type, header.mode, header.size, header.target
    if kind is not expected.type:
        raise UnsafeArchive(label, path, f"is a {kind} but the manifest says {expected.type}")
    if mode != expected.mode:
        if mode & 0o6000 and not expected.mode & 0o6000:
            raise UnsafeArchive(label, path, "setuid/setgid bits not declared in the manifest")
        raise UnsafeArchive(label, path, f"mode {mode:o} is not the manifest's {expected.mode:o}")
    if size != expected.size:
        raise UnsafeArchive(label, path, f"size {size} is not the manifest's {expected.size}")
    if target != (expected.target or ""):
        raise UnsafeArchive(label, path, f"link to '{target}' is not the manifest's")


def allowance(entries: Sequence[ManifestEntry]) -> int:
    """The most bytes the members of a manifest may decompress to, headers included.

    Generous about headers (any writer's pax records, record padding), exact about data:
    a stream that outgrows this is not the archive its manifest describes.
    """
    total = 22 * BLOCK  # end marker, then padding to a 10 KiB tar record at most
    for entry in entries:
        extra = len(entry.path.encode()) + len((entry.target or "").encode())
        total += 3 * BLOCK + extra + -extra % BLOCK + entry.size + -entry.size % BLOCK
    return total


# What a reader needs of a header: name mode size mtime chksum typeflag linkname magic+version
# prefix; uid, gid, uname, gname and device numbers are never used, so never unpacked.
_READ_HEADER = struct.Struct("100s8s16x12s12s8sc100s8s80x155s12x")


def _fields(block: memoryview, stream: TarStream) -> tuple[bytes, ...]:
    """name mode size mtime typeflag linkname prefix of a header, magic and checksum checked."""
    name, mode, size, mtime, checksum, typeflag, link, magic, prefix = _READ_HEADER.unpack_from(
        block
    )
    if magic != b"ustar\x0000":
        raise PackageError(stream.label, f"not a POSIX ustar header (after '{stream.member}')")
    # The checksum is the byte sum of the header with its own field read as eight spaces.
    if _octal(checksum, stream) != _byte_sum(block) - sum(checksum) + 8 * 32:
        raise PackageError(stream.label, f"bad header checksum (after '{stream.member}')")
    return name, mode, size, mtime, typeflag, link, prefix


def _cstring(field: bytes) -> bytes:
    return field.partition(b"\0")[0]


def _octal(field: bytes, stream: TarStream) -> int:
    digits = field.strip(b" \0")
    try:
        if digits.isdigit():  # excludes the signs, "0o" and "_" that int() would take
            return int(digits, 8)
        if not digits:
            return 0
    except ValueError:
        pass
    raise PackageError(stream.label, f"bad number {field!r} (after '{stream.member}')")


def _text(raw: bytes, stream: TarStream) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise UnsafeArchive(stream.label, repr(raw), "name is not UTF-8") from None


def _pax_records(data: bytes, stream: TarStream) -> dict[bytes, bytes]:
    """Parse ``"<len> key=value\\n"`` records (the caller says which keys it allows)."""
    records: dict[bytes, bytes] = {}
    while data:
        digits, space, _ = data.partition(b" ")
        if not space or not digits.isdigit() or not len(digits) < int(digits) <= len(data):
            raise UnsafeArchive(stream.label, stream.member, "followed by a malformed pax header")
        record, data = data[: int(digits)], data[int(digits) :]
        key, equals, value = record[len(digits) + 1 :].partition(b"=")
        if not equals or not value.endswith(b"\n") or key in records:
            raise UnsafeArchive(stream.label, stream.member, "followed by a malformed pax header")
        records[key] = value[:-1]
    return records


# --- identity --------------------------------------------------------------------------


CONTENT_FORMAT = 1
"""Version of the encoding ``content_id`` digests; bumped on any change."""


def content_id(files: Iterable[ManifestEntry]) -> str:
    """A package's content id: sha256 of its file manifest (paths, types, modes, sizes,
    content hashes, link targets) in order, and of nothing else. Two builds that install
    the same files have the same content id whatever their metadata (build key, version)."""
    rows = [
        [entry.path, str(entry.type), entry.mode, entry.size, entry.sha256 or entry.target or ""]
        for entry in files
    ]
    payload = msgpack.packb(["portsd-content", CONTENT_FORMAT, rows])
    return hashlib.sha256(payload).hexdigest()
