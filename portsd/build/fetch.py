"""Source fetching: a content-addressed distfiles cache, then mirrors, then the origin.

Layout under ``distfiles`` (all on one filesystem, so a rename is atomic):

    by-sha256/<hex>      verified files, named by their sha256; written once, by rename
    partial/<hex>.part   the bytes of an interrupted download, resumed with an HTTP Range
    partial/<hex>.json   where those bytes came from (url, strong validator) for If-Range
    locks/<hex>.lock     flock held by whoever is fetching <hex> (any thread or process)

A url source is looked for in the cache, then on each mirror in order (``<mirror>/<filename>``,
a local directory or an http(s) base URL), then at its own url. Bytes are hashed as they
stream; bytes with the wrong sha256 never reach the cache, are deleted from ``partial/``, and
the next location is tried. The cache is trusted: only verified files are renamed into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self
from urllib.parse import quote, unquote, urlsplit

import aiohttp

from portsd.core.recipe import Source
from portsd.errors import ChecksumMismatch, ConfigError, FetchError
from portsd.fsio import feed_file, fsync_dir

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_NET_CHUNK = 256 * 1024
_DISK_CHUNK = 1024 * 1024
_HTTP_SCHEMES = ("http", "https")


class FetchReporter(Protocol):
    """Progress hooks, called on the event loop's thread; each does nothing unless overridden.

    Subclass it and override what you need (the CLI draws progress bars). For one source:
    ``started`` and ``advanced`` per location tried, ``failed`` when a location did not yield
    the file (the next one is tried, or ``fetch`` raises), ``finished`` once on success (with
    ``location`` ``"cache"`` and no ``started`` on a cache hit).
    """

    def started(
        self, port: str, filename: str, total_bytes: int | None, location: str, resumed_from: int
    ) -> None:
        """Bytes start flowing from ``location``; the first ``resumed_from`` are already here."""
        return None

    def advanced(self, port: str, filename: str, nbytes: int) -> None:
        """``nbytes`` more bytes of ``filename`` arrived."""
        return None

    def finished(self, port: str, filename: str, location: str, path: Path) -> None:
        """``filename`` is verified and at ``path`` in the cache."""
        return None

    def failed(self, port: str, filename: str, location: str, reason: str) -> None:
        """``location`` did not yield ``filename``; ``reason`` is one readable phrase."""
        return None


class NullReporter(FetchReporter):
    """Reports nothing: the default."""


class LocationKind(StrEnum):
    """Where a file can come from besides the cache."""

    DIRECTORY = "directory"
    HTTP = "http"


@dataclass(frozen=True, slots=True)
class Mirror:
    """A place holding distfiles by file name: a local directory or an http(s) base URL."""

    kind: LocationKind
    base: str

    @classmethod
    def parse(cls, text: str) -> Mirror:
        """``https://host/path``, ``file:///dir`` or a plain directory path; else ConfigError."""
        parts = urlsplit(text)
        if parts.scheme in _HTTP_SCHEMES and parts.netloc:
            return cls(LocationKind.HTTP, text.rstrip("/"))
        if parts.scheme == "file":
            return cls(LocationKind.DIRECTORY, unquote(parts.path))
        if parts.scheme == "" and text:
            return cls(LocationKind.DIRECTORY, text)
        raise ConfigError(f"mirror '{text}' is neither an http(s) URL nor a directory")

    def locate(self, filename: str) -> Location:
        if self.kind is LocationKind.HTTP:
            return Location(LocationKind.HTTP, f"{self.base}/{quote(filename)}")
        return Location(LocationKind.DIRECTORY, str(Path(self.base) / filename))


@dataclass(frozen=True, slots=True)
class Location:
    """One place to try for one file: a local file path or a URL."""

    kind: LocationKind
    address: str

    def __str__(self) -> str:
        return self.address


@dataclass(frozen=True, slots=True)
class Attempt:
    """What happened at one location; ``actual`` is set when bytes arrived with the wrong hash."""

    location: str
    outcome: str
    actual: str | None = None


class Unavailable(Exception):
    """This location did not give us the file; ``mid_body`` if it failed after a 2xx answer."""

    def __init__(self, reason: str, mid_body: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.mid_body = mid_body


class Mismatch(Exception):
    """The bytes from this location hash to ``actual``; ``resumed`` if a kept prefix was used."""

    def __init__(self, actual: str, resumed: bool) -> None:
        super().__init__(actual)
        self.actual = actual
        self.resumed = resumed


class Fetcher:
    """Obtains url sources into the distfiles cache and returns their verified paths.

    Use it as an async context manager: one aiohttp session serves every fetch while it is
    open. ``connect_timeout`` bounds each TCP connect and ``read_timeout`` each wait for data
    (so a stalled server fails in about that long); ``max_bytes`` caps a file's size;
    ``max_concurrent`` bounds simultaneous downloads across every caller of this Fetcher; a
    server that answers 2xx and then drops or stalls mid-body is resumed (Range) up to
    ``resume_retries`` more times before the next location is tried.
    """

    def __init__(
        self,
        distfiles: Path,
        mirrors: Sequence[str | os.PathLike[str]] = (),
        *,
        connect_timeout: float = 10.0,
        read_timeout: float = 30.0,
        max_bytes: int | None = None,
        max_redirects: int = 10,
        max_concurrent: int = 4,
        resume_retries: int = 2,
        reporter: FetchReporter | None = None,
    ) -> None:
        self.distfiles = Path(distfiles)
        self.mirrors = tuple(Mirror.parse(os.fspath(m)) for m in mirrors)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.max_concurrent = max_concurrent
        self.resume_retries = resume_retries
        self.reporter: FetchReporter = reporter if reporter is not None else NullReporter()
        self._session: aiohttp.ClientSession | None = None
        # Created per open: asyncio primitives must not outlive the loop that used them.
        self._locks: dict[str, asyncio.Lock] = {}
        self._slots = asyncio.Semaphore(max_concurrent)

    async def __aenter__(self) -> Self:
        if self._session is not None:
            raise RuntimeError("Fetcher is already open")
        for sub in ("by-sha256", "partial", "locks"):
            (self.distfiles / sub).mkdir(parents=True, exist_ok=True)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.connect_timeout, sock_read=self.read_timeout
        )
        # auto_decompress off: a .tar.gz served with Content-Encoding: gzip must keep its bytes.
        self._session = aiohttp.ClientSession(
            timeout=timeout,
            auto_decompress=False,
            headers={"Accept-Encoding": "identity", "User-Agent": "portsd"},
        )
        self._locks = {}
        self._slots = asyncio.Semaphore(self.max_concurrent)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def cached(self, sha256: str) -> Path | None:
        """The cached file with this sha256, or None (a malformed hash is never cached)."""
        if not _SHA256.fullmatch(sha256):
            return None
        path = self.distfiles / "by-sha256" / sha256
        return path if path.is_file() else None

    async def fetch(self, port: str, source: Source) -> Path:
        """The cache path of ``source``'s verified file, fetching it first if needed.

        Raises ChecksumMismatch when some location gave bytes with another sha256 and none
        gave the right ones, else FetchError listing every location tried and its outcome.
        """
        if self._session is None:
            raise RuntimeError("Fetcher.fetch outside 'async with Fetcher(...)'")
        expected = _check_source(port, source)
        if (path := self.cached(expected)) is not None:
            self.reporter.finished(port, source.filename, "cache", path)
            return path
        async with self._exclusive(expected):
            # Whoever held the lock before us may have fetched it.
            if (path := self.cached(expected)) is not None:
                self.reporter.finished(port, source.filename, "cache", path)
                return path
            async with self._slots:
                return await self._fetch_locked(port, source, expected)

    async def fetch_all(self, port: str, sources: Iterable[Source]) -> dict[str, Path]:
        """Fetch every url source concurrently; ``filename -> cache path``.

        ``file`` sources live in the port directory and are skipped. Every download runs to
        its end (so the cache fills as far as it can); then the first failure in recipe order
        is raised.
        """
        wanted = [source for source in sources if source.url is not None]
        results = await asyncio.gather(
            *(self.fetch(port, source) for source in wanted), return_exceptions=True
        )
        paths: dict[str, Path] = {}
        for source, result in zip(wanted, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            paths[source.filename] = result
        return paths

    def fetch_sync(self, port: str, sources: Iterable[Source]) -> dict[str, Path]:
        """``fetch_all`` for code without an event loop: runs one on the calling thread.

        Uses a session of its own, so several threads may call it on one Fetcher at once.
        Must not be called from inside a running event loop.
        """
        replica = Fetcher(
            self.distfiles,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_bytes=self.max_bytes,
            max_redirects=self.max_redirects,
            max_concurrent=self.max_concurrent,
            resume_retries=self.resume_retries,
            reporter=self.reporter,
        )
        replica.mirrors = self.mirrors

        async def run() -> dict[str, Path]:
            async with replica:
                return await replica.fetch_all(port, sources)

        return asyncio.run(run())

    # -- one file, under its lock ------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _exclusive(self, sha256: str) -> AsyncIterator[None]:
        """Hold ``sha256`` against other tasks (asyncio.Lock) and other processes (flock).

        The flock is polled rather than waited for in a thread, so cancelling a waiter
        never leaves a thread that later takes the lock and keeps it.
        """
        lock = self._locks.setdefault(sha256, asyncio.Lock())
        async with lock:
            fd = os.open(
                self.distfiles / "locks" / f"{sha256}.lock",
                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                0o644,
            )
            try:
                delay = 0.005
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 0.2)
                yield
            finally:
                os.close(fd)  # releases the flock

    async def _fetch_locked(self, port: str, source: Source, expected: str) -> Path:
        attempts: list[Attempt] = []
        for location in self._locations(source):
            try:
                path = await self._try(port, source, expected, location)
            except Unavailable as failure:
                attempts.append(Attempt(str(location), failure.reason))
            except Mismatch as mismatch:
                outcome = f"sha256 mismatch: got {mismatch.actual[:12]}…"
                attempts.append(Attempt(str(location), outcome, mismatch.actual))
            except OSError as error:
                # Our own disk (partial/, cache) failed: no other location can help.
                raise FetchError(
                    port, source.filename, f"{self.distfiles}: {error.strerror or error}"
                ) from error
            else:
                self.reporter.finished(port, source.filename, str(location), path)
                return path
            self.reporter.failed(port, source.filename, str(location), attempts[-1].outcome)
        raise _failure(port, source.filename, expected, attempts)

    def _locations(self, source: Source) -> list[Location]:
        locations = [mirror.locate(source.filename) for mirror in self.mirrors]
        assert source.url is not None  # _check_source
        locations.append(Location(LocationKind.HTTP, source.url))
        return locations

    async def _try(self, port: str, source: Source, expected: str, location: Location) -> Path:
        if location.kind is LocationKind.DIRECTORY:
            return await self._copy(port, source, expected, Path(location.address))
        scheme = urlsplit(location.address).scheme
        if scheme not in _HTTP_SCHEMES:
            raise Unavailable(f"unsupported url scheme '{scheme}'")
        retries, fresh_start_used = self.resume_retries, False
        while True:
            try:
                return await self._download(port, source, expected, location.address)
            except Mismatch as mismatch:
                # A kept prefix may be what is wrong (stale, or from elsewhere): the partial
                # file is gone now, and the location gets one try from zero before blame.
                if not mismatch.resumed or fresh_start_used:
                    raise
                fresh_start_used = True
            except Unavailable as failure:
                # A server that answered 2xx and then dropped or stalled is alive: resume it.
                if not failure.mid_body or retries == 0:
                    raise
                retries -= 1

    async def _copy(self, port: str, source: Source, expected: str, path: Path) -> Path:
        """Copy from a directory mirror, hashing on the way; never resumes (it is local)."""
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise Unavailable("not found") from None
        except OSError as error:
            raise Unavailable(error.strerror or str(error)) from error
        with handle:
            size = os.fstat(handle.fileno()).st_size

            async def chunks() -> AsyncIterator[bytes]:
                while True:
                    try:
                        chunk = await asyncio.to_thread(handle.read, _DISK_CHUNK)
                    except OSError as error:
                        raise Unavailable(f"read error: {error.strerror}") from error
                    if not chunk:
                        return
                    yield chunk

            return await self._receive(
                port,
                source,
                expected,
                str(path),
                chunks(),
                hashlib.sha256(),
                start=0,
                total=size,
                validator=None,
            )

    async def _download(self, port: str, source: Source, expected: str, url: str) -> Path:
        """One HTTP GET of ``url``, resuming the partial file when there is one."""
        assert self._session is not None, "Fetcher used outside 'async with'"
        part = self._partial(expected)
        offset = _size(part)
        headers: dict[str, str] = {}
        prefix = hashlib.sha256()
        if offset:
            headers["Range"] = f"bytes={offset}-"
            validator = self._validator_for(expected, url)
            if validator is not None:
                headers["If-Range"] = validator
            # Hashed before asking: once a body arrives it must be read without delay, or
            # aiohttp drops buffered bytes when the connection then breaks.
            await asyncio.to_thread(feed_file, prefix, part, offset)
        received, mid_body = 0, False
        try:
            # aiohttp counts the answers that redirect, the last included: one more than
            # the redirects it follows.
            async with self._session.get(
                url, headers=headers, max_redirects=self.max_redirects + 1
            ) as response:
                if response.status == 416 and offset:
                    # Nothing past our bytes: they may be the whole file already.
                    if prefix.hexdigest() != expected:
                        self._discard(expected)
                        raise Mismatch(prefix.hexdigest(), resumed=True)
                    return await asyncio.to_thread(self._commit, expected)
                start, total = body_range(response, offset)
                mid_body = True

                async def chunks() -> AsyncIterator[bytes]:
                    nonlocal received
                    async for chunk in response.content.iter_chunked(_NET_CHUNK):
                        received += len(chunk)
                        yield chunk

                return await self._receive(
                    port,
                    source,
                    expected,
                    url,
                    chunks(),
                    prefix if start else hashlib.sha256(),
                    start=start,
                    total=total,
                    validator=strong_validator(response),
                )
        except (aiohttp.ClientError, TimeoutError) as error:
            raise Unavailable(self._describe(error, received), mid_body) from error

    async def _receive(
        self,
        port: str,
        source: Source,
        expected: str,
        location: str,
        chunks: AsyncIterator[bytes],
        hasher: hashlib._Hash,
        *,
        start: int,
        total: int | None,
        validator: str | None,
    ) -> Path:
        """Write ``chunks`` after the first ``start`` bytes of the partial file, then verify.

        ``hasher`` has already seen those ``start`` bytes. On success the file is fsynced and
        renamed into the cache. On a mismatch (or when it grows past ``max_bytes``) the partial
        file goes; on any other failure it stays, for the next attempt to resume.
        """
        if self.max_bytes is not None and total is not None and total > self.max_bytes:
            raise Unavailable(f"{total} bytes, more than the limit of {self.max_bytes}")
        part = self._partial(expected)
        self._record(expected, location, validator)
        self.reporter.started(port, source.filename, total, location, start)
        size = start
        too_big = False
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.seek(start)
            out.truncate()
            async for chunk in chunks:
                size += len(chunk)
                if self.max_bytes is not None and size > self.max_bytes:
                    too_big = True
                    break
                hasher.update(chunk)
                out.write(chunk)
                self.reporter.advanced(port, source.filename, len(chunk))
            out.flush()
            actual = hasher.hexdigest()
            if not too_big and actual == expected:
                await asyncio.to_thread(os.fsync, out.fileno())
        if too_big:
            self._discard(expected)
            raise Unavailable(f"more than the limit of {self.max_bytes} bytes")
        if actual != expected:
            self._discard(expected)
            raise Mismatch(actual, resumed=start > 0)
        return await asyncio.to_thread(self._commit, expected)

    # -- the files under distfiles ------------------------------------------------------------

    def _partial(self, sha256: str) -> Path:
        return self.distfiles / "partial" / f"{sha256}.part"

    def _sidecar(self, sha256: str) -> Path:
        return self.distfiles / "partial" / f"{sha256}.json"

    def _commit(self, sha256: str) -> Path:
        """Move the verified partial file into the cache (already fsynced), durably."""
        target = self.distfiles / "by-sha256" / sha256
        os.replace(self._partial(sha256), target)
        fsync_dir(target.parent)
        self._sidecar(sha256).unlink(missing_ok=True)
        return target

    def _discard(self, sha256: str) -> None:
        self._partial(sha256).unlink(missing_ok=True)
        self._sidecar(sha256).unlink(missing_ok=True)

    def _record(self, sha256: str, url: str, validator: str | None) -> None:
        """Remember where the partial bytes come from, so a resume can send If-Range."""
        sidecar = self._sidecar(sha256)
        if validator is None:
            sidecar.unlink(missing_ok=True)
            return
        temp = sidecar.with_suffix(".json.tmp")
        temp.write_text(json.dumps({"url": url, "validator": validator}))
        os.replace(temp, sidecar)

    def _validator_for(self, sha256: str, url: str) -> str | None:
        """The recorded validator if the partial bytes came from ``url`` (else plain Range:
        the final hash check still guards a prefix from elsewhere)."""
        try:
            recorded = json.loads(self._sidecar(sha256).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(recorded, dict) or recorded.get("url") != url:
            return None
        validator = recorded.get("validator")
        return validator if isinstance(validator, str) else None

    def _describe(self, error: BaseException, received: int) -> str:
        return describe_failure(
            error,
            received,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            max_redirects=self.max_redirects,
        )


def _check_source(port: str, source: Source) -> str:
    """The source's sha256, once it is known to be a url source we can safely fetch."""
    if source.url is None:
        raise FetchError(port, source.filename, "not a url source (files come from the port)")
    if source.sha256 is None or not _SHA256.fullmatch(source.sha256):
        raise FetchError(port, source.filename, "no valid sha256 (64 lowercase hex digits)")
    if "/" in source.filename or source.filename in ("", ".", ".."):
        raise FetchError(port, source.filename, "file name must be a plain name")
    return source.sha256


def _failure(port: str, filename: str, expected: str, attempts: Sequence[Attempt]) -> FetchError:
    """ChecksumMismatch if any location served wrong bytes, else FetchError with the story."""
    story = "; ".join(f"{a.location} ({a.outcome})" for a in attempts)
    wrong = [a.actual for a in attempts if a.actual is not None]
    if wrong:
        mismatch = ChecksumMismatch(port, filename, expected, wrong[-1])
        mismatch.hint = f"tried {story}"
        return mismatch
    return FetchError(port, filename, f"tried {story}")


def describe_failure(
    error: BaseException,
    received: int,
    *,
    connect_timeout: float,
    read_timeout: float,
    max_redirects: int,
) -> str:
    """One readable phrase for a failed HTTP exchange that had received ``received`` bytes."""
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return f"connect timed out after {connect_timeout:g} s"
    if isinstance(error, TimeoutError):
        after = f" after {received} bytes" if received else ""
        return f"timed out{after}: no data for {read_timeout:g} s"
    if isinstance(error, aiohttp.TooManyRedirects):
        return f"more than {max_redirects} redirects"
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve host {error.host}"
    if isinstance(error, aiohttp.ClientConnectorCertificateError):
        return f"TLS certificate rejected: {error.certificate_error}"
    if isinstance(error, aiohttp.ClientConnectorError):
        if error.os_error.errno == errno.ECONNREFUSED:
            return "connection refused"
        return f"cannot connect: {error.os_error.strerror or error.os_error}"
    if isinstance(error, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return f"connection closed after {received} bytes"
    if isinstance(error, aiohttp.InvalidURL):
        return "invalid url"
    return str(error) or type(error).__name__


def body_range(response: aiohttp.ClientResponse, offset: int) -> tuple[int, int | None]:
    """Where the body starts in the file and the file's full size, or Unavailable."""
    if response.status == 200:
        return 0, response.content_length
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
        if match is None or int(match[1]) != offset:
            raise Unavailable(f"bad Content-Range for bytes={offset}-")
        return offset, None if match[3] == "*" else int(match[3])
    raise Unavailable(f"HTTP {response.status} {response.reason or ''}".rstrip())


def strong_validator(response: aiohttp.ClientResponse) -> str | None:
    """A validator If-Range may carry: a strong ETag, else Last-Modified (RFC 9110 13.1.5)."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
