"""Repository files over HTTP: ``GET`` and ``HEAD /repo/<arch>/<name>``.

What is reachable is decided on the request's text before any file system call. ``<arch>``
is an architecture name (``portsd.core.index.ARCH_PATTERN``) and ``<name>`` is
``index.msgpack.zst``, ``index.msgpack.zst.minisig`` or ``packages/<file>``, where ``<file>``
is one path component of ``[A-Za-z0-9._+-]`` that does not start with a dot. Anything else
is a 404: ``..``, separators in any encoding, backslashes, NUL, absolute paths and the
private parts of a repository (``keys/``, ``.tmp/``, ``.lock``) never reach the file system.
What passes is opened one component at a time from a descriptor of the root, each with
``O_NOFOLLOW``, so a symlink inside the repository (which never makes one) is a 404 wherever
it points; only regular files are sent.

HTTP: one byte range per request (206; 416 when unsatisfiable; several ranges are answered
with the whole file, as RFC 9110 allows), a strong ETag from the file's identity (inode,
size, mtime in ns), If-None-Match (304), If-Range (anything but the current ETag gets the
whole file), HEAD. There is no Last-Modified: the index is replaced more than once a second
during a rebuild, and a one-second date validator would then answer 304 for a new index.
Packages never change under their name, so they are cacheable forever; the index and its
signature must be revalidated.

The hot path, the one a LAN of clients hammers, stays on the event loop and off aiohttp's
slower paths: the repository's directories stay open (the repository creates them once and
never replaces them), and so do the files served last with their headers, so a request for
a popular file costs one ``lstat`` (does the name still lead to that inode?) where nginx's
``open_file_cache`` would; aiohttp writes the headers, and the body goes from the page
cache to the socket with sendfile(2), corked together with the headers (TCP_CORK, nginx's
``tcp_nopush``), straight from the handler while the socket takes it, without a turn of the
event loop. asyncio's ``loop.sendfile`` pauses reading, waits a turn for an empty buffer and
another after each chunk; ``web.FileResponse`` adds two hops to a worker thread (stat and
open, then close) and reads If-Range as a date only, so it serves the range asked for under
a stale ETag: a resumed download would splice two versions of a file.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from aiohttp import web

from portsd.core.index import ARCH_PATTERN
from portsd.daemon.server.metrics import Counters
from portsd.pkg.repo import INDEX_NAME, SIG_SUFFIX

log = logging.getLogger(__name__)

PACKAGES = "packages"
SEND_TIMEOUT = 60.0
"""Seconds a client may leave the socket full before its download is dropped."""

_FILE = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]{0,254}")
_TOP = frozenset({INDEX_NAME, INDEX_NAME + SIG_SUFFIX})
_RANGE = re.compile(r"bytes[ \t]*=[ \t]*(\d{0,19})[ \t]*-[ \t]*(\d{0,19})[ \t]*", re.IGNORECASE)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted in the repository must not block the event loop
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_BUSY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
_COPY_CHUNK = 256 * 1024
_CACHED = 4096  # checked names
_OPEN = 64  # files kept open

_K = TypeVar("_K")
_V = TypeVar("_V")

_IMMUTABLE = "public, max-age=31536000, immutable"
_REVALIDATE = "no-cache"


@dataclass(frozen=True, slots=True)
class Target:
    """A servable file: ``directory`` (``<arch>`` or ``<arch>/packages``) and ``name``."""

    arch: str
    packages: bool
    name: str

    @property
    def directory(self) -> str:
        return f"{self.arch}/{PACKAGES}" if self.packages else self.arch


def locate(arch: str, name: str) -> Target | None:
    """The file ``/repo/<arch>/<name>`` names, or None if it is not one a client may read."""
    if not ARCH_PATTERN.fullmatch(arch):
        return None
    if name in _TOP:
        return Target(arch, False, name)
    directory, _, file = name.partition("/")
    if directory == PACKAGES and _FILE.fullmatch(file):
        return Target(arch, True, file)
    return None


@dataclass(frozen=True, slots=True)
class Reply:
    """What to answer for a file of ``size`` bytes: a status and the bytes to send."""

    status: int
    start: int = 0
    length: int = 0


class Unsatisfiable(Exception):
    """The Range header selects no byte of the file."""


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """``(start, length)`` of a single ``bytes=`` range of a file of ``size`` bytes.

    None when the header is to be ignored (another unit, several ranges, bad syntax):
    RFC 9110 lets a server answer those with the whole file. Raises Unsatisfiable when the
    range starts at or past the end, or is an empty suffix.
    """
    match = _RANGE.fullmatch(value.strip())
    if match is None:
        return None
    first, last = match.group(1), match.group(2)
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable(value)
        return (max(0, size - suffix), min(suffix, size))
    start = int(first)
    if last and int(last) < start:
        return None
    if start >= size:
        raise Unsatisfiable(value)
    end = min(int(last), size - 1) if last else size - 1
    return (start, end - start + 1)


def plan_reply(method: str, headers: Mapping[str, str], size: int, etag: str) -> Reply:
    """Apply the conditional and range headers a client sent to a file (RFC 9110 §13, §14)."""
    none_match = headers.get("If-None-Match")
    if none_match is not None and _any_matches(none_match, etag):
        return Reply(304)
    whole = Reply(200, 0, size)
    spec = headers.get("Range")
    if spec is None or method != "GET":  # ranges are defined for GET only
        return whole
    if_range = headers.get("If-Range")
    if if_range is not None and if_range.strip() != etag:  # strong comparison; a date never
        return whole
    try:
        selected = parse_range(spec, size)
    except Unsatisfiable:
        return Reply(416)
    if selected is None:
        return whole
    return Reply(206, *selected)


def _any_matches(header: str, etag: str) -> bool:
    """Weak comparison against a list of entity tags, or ``*``."""
    for tag in header.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def etag_of(st: os.stat_result) -> str:
    """A strong validator: a replaced or rewritten file gets another."""
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


def _content_type(target: Target) -> str:
    if target.name.endswith(SIG_SUFFIX):
        return "text/plain; charset=utf-8"
    if target.name.endswith(".zst"):
        return "application/zstd"
    return "application/octet-stream"


@dataclass(frozen=True, slots=True)
class FileHeaders:
    """The headers of one version of one file (they depend on nothing else)."""

    etag: str
    validators: Mapping[str, str]  # of a 304
    file: Mapping[str, str]  # of a 200 or 206

    @classmethod
    def of(cls, target: Target, st: os.stat_result) -> FileHeaders:
        etag = etag_of(st)
        # packages never change under their name; the index is replaced under its own
        validators = {
            "ETag": etag,
            "Cache-Control": _IMMUTABLE if target.packages else _REVALIDATE,
        }
        file = {
            "Content-Type": _content_type(target),
            "Accept-Ranges": "bytes",
            **validators,
        }
        return cls(etag, MappingProxyType(validators), MappingProxyType(file))


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> None:
    """Add to a bounded cache: past ``_CACHED`` entries it starts over (the hot ones come
    back at once; a scan of many names cannot make it grow)."""
    if len(cache) >= _CACHED:
        cache.clear()
    cache[key] = value


class _Open:
    """One version of a file, kept open for the requests that serve it.

    Requests share the descriptor (sendfile and pread take explicit offsets); ``users``
    counts them, and a file dropped from the cache is closed when the last one is done.
    """

    __slots__ = ("fd", "identity", "size", "headers", "users", "evicted")

    def __init__(self, fd: int, st: os.stat_result, headers: FileHeaders) -> None:
        self.fd = fd
        self.identity = _identity(st)
        self.size = st.st_size
        self.headers = headers
        self.users = 0
        self.evicted = False


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class RepoFiles:
    """Serves the public files of the repositories under ``root`` (``<root>/<arch>/``).

    Keeps descriptors open: of the directories it has served from, and of the ``_OPEN``
    files served last, so a request for a popular file costs one ``lstat`` (is the name
    still that file?) instead of open, fstat and close. ``close`` them at cleanup.
    Single-threaded: used on the event loop only.
    """

    def __init__(self, root: Path, counters: Counters) -> None:
        self.root = root
        self._counters = counters
        self._dirs: dict[str, int] = {}  # "" (the root), "<arch>", "<arch>/packages" -> fd
        self._targets: dict[tuple[str, str], Target] = {}  # names already checked
        self._open: dict[Target, _Open] = {}  # oldest first

    def close(self) -> None:
        for target in list(self._open):
            self._evict(target)
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()

    async def on_cleanup(self, _app: web.Application) -> None:
        self.close()

    # -- the route -----------------------------------------------------------------------

    async def get(self, request: web.Request) -> web.StreamResponse:
        """``GET|HEAD /repo/{arch}/{name:.+}``."""
        match = request.match_info
        asked = (match["arch"], match["name"])
        target = self._targets.get(asked)
        if target is None:
            target = locate(*asked)
            if target is None:
                return _not_found()
            _remember(self._targets, asked, target)
        try:
            file = self._acquire(target)
        except OSError as error:
            if error.errno in _BUSY:
                log.warning("cannot open %s/%s: %s", target.directory, target.name, error)
                return web.Response(status=503, text="busy, retry\n", headers={"Retry-After": "1"})
            return _not_found()
        try:
            return await self._reply(request, file)
        finally:
            self._release(file)

    async def _reply(self, request: web.Request, file: _Open) -> web.StreamResponse:
        headers, size, fd = file.headers, file.size, file.fd
        reply = plan_reply(request.method, request.headers, size, headers.etag)
        if reply.status == 304:
            return web.Response(status=304, headers=headers.validators)
        if reply.status == 416:
            return web.Response(
                status=416, headers={"Content-Range": f"bytes */{size}", "ETag": headers.etag}
            )
        response = web.StreamResponse(status=reply.status, headers=headers.file)
        if reply.status == 206:
            end = reply.start + reply.length - 1
            response.headers["Content-Range"] = f"bytes {reply.start}-{end}/{size}"
        response.content_length = reply.length
        transport = request.transport
        if request.method == "HEAD" or reply.length == 0 or transport is None:
            return response  # aiohttp sends the headers alone
        raw = transport.get_extra_info("socket")
        try:
            if raw is None or transport.get_extra_info("ssl_object") is not None:
                await response.prepare(request)
                await self._copy(response, fd, reply.start, reply.length)
            else:
                _cork(raw, True)
                try:
                    await response.prepare(request)
                    await self._sendfile(transport, raw.fileno(), fd, reply.start, reply.length)
                finally:
                    if not transport.is_closing():
                        _cork(raw, False)  # sends what the cork held back
            await response.write_eof()
        except ConnectionError:
            # the client left or stopped reading, or the file shrank: a response cut short
            # ends its connection, so the client cannot take what follows for the rest
            transport.abort()
        return response

    # -- the body ------------------------------------------------------------------------

    async def _sendfile(
        self, transport: asyncio.Transport, sock: int, fd: int, offset: int, count: int
    ) -> None:
        """Send ``count`` bytes of ``fd`` from ``offset`` on the connection's socket ``sock``.

        Writes to the socket beside its transport, which is safe while the transport's own
        buffer is empty (nothing of ours can be reordered) and the handler writes nothing
        else, as here. First with no await, while the socket takes the bytes (a small file
        usually goes in one call); then through a duplicate of the descriptor, which stays
        valid however the transport closes its own, waiting for room between calls.
        """
        end = offset + count
        if transport.get_write_buffer_size() == 0:
            offset = self._push(sock, fd, offset, end)
            if offset == end:
                return
        loop = asyncio.get_running_loop()
        out = os.dup(sock)
        try:
            while transport.get_write_buffer_size():  # the headers are still queued
                await _writable(loop, out)
                await asyncio.sleep(0)  # the transport writes them on this wake too
                if transport.is_closing():
                    raise ConnectionResetError("the client went away")
            while offset < end:
                await _writable(loop, out)
                offset = self._push(out, fd, offset, end)
        finally:
            os.close(out)

    def _push(self, sock: int, fd: int, offset: int, end: int) -> int:
        """sendfile(2) until done or the socket is full; the new offset."""
        start = offset
        try:
            while offset < end:
                sent = os.sendfile(sock, fd, offset, end - offset)
                if sent == 0:  # the file is shorter than its fstat said
                    raise ConnectionAbortedError("the file shrank while it was sent")
                offset += sent
        except BlockingIOError:
            pass
        finally:
            self._counters.repo_bytes += offset - start
        return offset

    async def _copy(self, response: web.StreamResponse, fd: int, offset: int, count: int) -> None:
        """The body through the transport (TLS, or no socket to sendfile to)."""
        end = offset + count
        while offset < end:
            chunk = await asyncio.to_thread(os.pread, fd, min(_COPY_CHUNK, end - offset), offset)
            if not chunk:
                raise ConnectionAbortedError("the file shrank while it was sent")
            await response.write(chunk)
            offset += len(chunk)
            self._counters.repo_bytes += len(chunk)

    # -- the file system -----------------------------------------------------------------

    def _acquire(self, target: Target) -> _Open:
        """The open file ``target`` names now (counted as used until ``_release``).

        OSError if it is missing or is not a regular file reached without a symlink.
        """
        try:
            directory = self._directory(target)
            st = os.stat(target.name, dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            # a directory replaced under a cached descriptor: look it up once more
            if not self._forget(target):
                raise
            directory = self._directory(target)
            st = os.stat(target.name, dir_fd=directory, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(errno.ENOENT, "not a regular file", target.name)
        file = self._open.get(target)
        if file is None or file.identity != _identity(st):
            if file is not None:
                self._evict(target)  # replaced since: a new version
            file = self._load(target, directory)
        file.users += 1
        return file

    def _load(self, target: Target, directory: int) -> _Open:
        fd = os.open(target.name, _FILE_FLAGS, dir_fd=directory)
        try:
            st = os.fstat(fd)  # what is served is what was opened, whatever the name is now
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(errno.ENOENT, "not a regular file", target.name)
        except BaseException:
            os.close(fd)
            raise
        file = _Open(fd, st, FileHeaders.of(target, st))
        if len(self._open) >= _OPEN:
            self._evict(next(iter(self._open)))
        self._open[target] = file
        return file

    def _release(self, file: _Open) -> None:
        file.users -= 1
        if file.evicted and file.users == 0:
            os.close(file.fd)

    def _evict(self, target: Target) -> None:
        file = self._open.pop(target)
        file.evicted = True
        if file.users == 0:
            os.close(file.fd)

    def _directory(self, target: Target) -> int:
        root = self._dirs.get("")
        if root is None:
            root = self._dirs[""] = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        arch = self._dirs.get(target.arch)
        if arch is None:
            arch = self._dirs[target.arch] = os.open(target.arch, _DIR_FLAGS, dir_fd=root)
        if not target.packages:
            return arch
        packages = self._dirs.get(target.directory)
        if packages is None:
            packages = os.open(PACKAGES, _DIR_FLAGS, dir_fd=arch)
            self._dirs[target.directory] = packages
        return packages

    def _forget(self, target: Target) -> bool:
        """Close the cached descriptors on ``target``'s path; whether there were any."""
        # dict.fromkeys: a top-level file's directory is its arch's, one descriptor, not two
        keys = [k for k in dict.fromkeys(("", target.arch, target.directory)) if k in self._dirs]
        for key in keys:
            os.close(self._dirs.pop(key))
        return bool(keys)


def _not_found() -> web.Response:
    return web.Response(status=404, text="not found\n")


def _cork(sock: Any, on: bool) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, int(on))
    except OSError:
        pass  # not TCP (a unix socket), or already closed: nothing to hold back


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    """Wait until socket ``fd`` can take more bytes; ConnectionResetError after SEND_TIMEOUT."""
    ready = loop.create_future()
    loop.add_writer(fd, _wake, ready)
    try:
        async with asyncio.timeout(SEND_TIMEOUT):
            await ready
    except TimeoutError:
        raise ConnectionResetError("the client stopped reading") from None
    finally:
        loop.remove_writer(fd)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
