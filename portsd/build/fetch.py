"""Source fetching: a content-addressed distfiles cache, then mirrors, then the origin.

Layout under ``distfiles`` (all on one filesystem, so a rename is atomic):

    by-sha256/<hex>           verified files, named by their sha256; written once, by rename
    partial/<hex>.part        the bytes of an interrupted download, resumed with an HTTP Range
    partial/<hex>.part.json   where those bytes came from (url, strong validator) for If-Range
    locks/<hex>.lock          flock held by whoever is fetching <hex> (any thread or process)

A url source is looked for in the cache, then on each content mirror (``<base>/<sha256>``:
a daemon's distfiles, which feed cluster workers), then on each mirror in order
(``<mirror>/<filename>``, a local directory or an http(s) base URL), then at its own url;
a ``mirror://NAME/PATH`` url stands for each place configured for mirror NAME, in order
(``<place>/<PATH>``).
``portsd.transfer`` moves the bytes (resumed, bounded, hashed as they stream); bytes with the
wrong sha256 never reach the cache, are deleted from ``partial/``, and the next location is
tried. The cache is trusted: only verified files are renamed into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import fcntl
import functools
import os
import re
import threading
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self
from urllib.parse import quote, unquote, urlsplit

import aiohttp

from portsd import transfer
from portsd.core.recipe import Source, mirror_of
from portsd.errors import ChecksumMismatch, ConfigError, FetchCancelled, FetchError

_SHA256 = re.compile(r"[0-9a-f]{64}")


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
    """A place holding distfiles by file name (or, for a named mirror, by path): a local
    directory or an http(s) base URL."""

    kind: LocationKind
    base: str

    @classmethod
    def parse(cls, text: str) -> Mirror:
        """``https://host/path``, ``file:///dir`` or a plain directory path; else ConfigError."""
        parts = urlsplit(text)
        if parts.scheme in transfer.HTTP_SCHEMES and parts.netloc:
            return cls(LocationKind.HTTP, text.rstrip("/"))
        if parts.scheme == "file":
            return cls(LocationKind.DIRECTORY, unquote(parts.path))
        if parts.scheme == "" and text:
            return cls(LocationKind.DIRECTORY, text)
        raise ConfigError(f"mirror '{text}' is neither an http(s) URL nor a directory")

    def locate(self, path: str) -> Location:
        """Where this mirror holds ``path`` (a file name, or a relative path)."""
        if self.kind is LocationKind.HTTP:
            return Location(LocationKind.HTTP, f"{self.base}/{quote(path)}")
        return Location(LocationKind.DIRECTORY, str(Path(self.base) / path))


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


class Fetcher:
    """Obtains url sources into the distfiles cache and returns their verified paths.

    Use it as an async context manager: one aiohttp session serves every fetch while it is
    open. ``by_sha256`` hold files by sha256 and are tried first, then ``mirrors``, which
    hold files by name;
    ``named_mirrors`` are where ``mirror://NAME/PATH`` urls point (NAME -> places, each a
    directory or an http(s) base URL). ``connect_timeout`` bounds each TCP connect and
    ``read_timeout`` each wait for data (so a stalled server fails in about that long);
    ``max_bytes`` caps a file's size; ``max_concurrent`` bounds simultaneous downloads
    across every caller of this Fetcher; a server that answers 2xx and then drops or stalls
    mid-body is resumed (Range) up to ``resume_retries`` more times before the next location
    is tried.
    """

    def __init__(
        self,
        distfiles: Path,
        mirrors: Sequence[str | os.PathLike[str]] = (),
        *,
        named_mirrors: Mapping[str, Sequence[str]] | None = None,
        by_sha256: Sequence[str] = (),
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
        self.named_mirrors = {
            name: tuple(Mirror.parse(place) for place in places)
            for name, places in (named_mirrors or {}).items()
        }
        self.by_sha256 = tuple(Mirror.parse(base) for base in by_sha256)
        self.limits = transfer.Limits(
            connect=connect_timeout,
            stall=read_timeout,
            redirects=max_redirects,
            resumes=resume_retries,
        )
        self.max_bytes = max_bytes
        self.max_concurrent = max_concurrent
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
        self._session = aiohttp.ClientSession()
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

    async def fetch_all(
        self, port: str, sources: Iterable[Source], cancel: threading.Event | None = None
    ) -> dict[str, Path]:
        """Fetch every url source concurrently; ``filename -> cache path``.

        ``file`` sources live in the port directory and are skipped. Every download runs to
        its end (so the cache fills as far as it can); then the first failure in recipe order
        is raised. Setting ``cancel`` (from any thread: the build was cancelled) stops them
        all within a fraction of a second with ``FetchCancelled``; what arrived stays in
        ``partial/`` for the next fetch to resume.
        """
        wanted = [source for source in sources if source.url is not None]
        outcomes = await transfer.run_all(
            [functools.partial(self.fetch, port, source) for source in wanted], stop=cancel
        )
        stopped = [
            s for s, o in zip(wanted, outcomes, strict=True) if isinstance(o, transfer.Stopped)
        ]
        if stopped:
            raise FetchCancelled(port, stopped[0].filename)
        paths: dict[str, Path] = {}
        for source, outcome in zip(wanted, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                raise outcome
            paths[source.filename] = outcome
        return paths

    def fetch_sync(
        self, port: str, sources: Iterable[Source], cancel: threading.Event | None = None
    ) -> dict[str, Path]:
        """``fetch_all`` for code without an event loop: runs one on the calling thread.

        Uses a session of its own, so several threads may call it on one Fetcher at once.
        Must not be called from inside a running event loop.
        """
        replica = copy.copy(self)
        replica._session = None

        async def run() -> dict[str, Path]:
            async with replica:
                return await replica.fetch_all(port, sources, cancel)

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
        assert self._session is not None, "Fetcher used outside 'async with'"
        target = transfer.Target(
            expected, self.distfiles / "partial" / f"{expected}.part", max_bytes=self.max_bytes
        )
        progress = _Progress(self.reporter, port, source.filename)
        attempts: list[Attempt] = []
        for location in self._locations(source):
            try:
                if location.kind is LocationKind.DIRECTORY:
                    await transfer.copy(Path(location.address), target, progress)
                else:
                    await transfer.transfer(
                        self._session, location.address, target, self.limits, progress
                    )
                path = await asyncio.to_thread(
                    target.commit, self.distfiles / "by-sha256" / expected
                )
            except transfer.Failed as failure:
                actual = failure.actual if isinstance(failure, transfer.Mismatch) else None
                attempts.append(Attempt(str(location), failure.reason, actual))
            except OSError as error:
                # Our own disk (partial/, cache) failed: no other location can help.
                raise FetchError(
                    port, source.filename, f"{self.distfiles}: {error.strerror or error}"
                ) from error
            else:
                self.reporter.finished(port, source.filename, str(location), path)
                return path
            self.reporter.failed(port, source.filename, str(location), attempts[-1].outcome)
        raise _failure(port, source.filename, expected, attempts, self._unknown_mirror(source))

    def _locations(self, source: Source) -> list[Location]:
        """The content mirrors, the distfiles mirrors by file name, then the url's own
        places."""
        assert source.url is not None and source.sha256 is not None  # _check_source
        locations = [mirror.locate(source.sha256) for mirror in self.by_sha256]
        locations += [mirror.locate(source.filename) for mirror in self.mirrors]
        named = mirror_of(source.url)
        if named is None:
            locations.append(Location(LocationKind.HTTP, source.url))
        else:
            name, path = named
            locations += [place.locate(path) for place in self.named_mirrors.get(name, ())]
        return locations

    def _unknown_mirror(self, source: Source) -> str | None:
        """The problem with a ``mirror://NAME/...`` url whose NAME is not configured. Not
        raised up front: the distfiles mirrors, tried first, may hold the file anyway."""
        named = mirror_of(source.url or "")
        if named is None or named[0] in self.named_mirrors:
            return None
        return (
            f"unknown mirror '{named[0]}' in {source.url} (configure [sources] mirror.{named[0]})"
        )


@dataclass(frozen=True, slots=True)
class _Progress:
    """One source's transfer progress, told to the fetcher's reporter."""

    reporter: FetchReporter
    port: str
    filename: str

    def started(self, location: str, offset: int, total: int | None) -> None:
        self.reporter.started(self.port, self.filename, total, location, offset)

    def advanced(self, nbytes: int) -> None:
        self.reporter.advanced(self.port, self.filename, nbytes)


def _check_source(port: str, source: Source) -> str:
    """The source's sha256, once it is known to be a url source we can safely fetch."""
    if source.url is None:
        raise FetchError(port, source.filename, "not a url source (files come from the port)")
    if source.sha256 is None or not _SHA256.fullmatch(source.sha256):
        raise FetchError(port, source.filename, "no valid sha256 (64 lowercase hex digits)")
    if "/" in source.filename or source.filename in ("", ".", ".."):
        raise FetchError(port, source.filename, "file name must be a plain name")
    return source.sha256


def _failure(
    port: str,
    filename: str,
    expected: str,
    attempts: Sequence[Attempt],
    unknown_mirror: str | None,
) -> FetchError:
    """FetchError naming an unknown mirror first, else ChecksumMismatch if any location
    served wrong bytes, else FetchError; each with the story of every location tried."""
    story = "; ".join(f"{a.location} ({a.outcome})" for a in attempts)
    if unknown_mirror is not None:
        return FetchError(port, filename, unknown_mirror + (f"; tried {story}" if story else ""))
    wrong = [a.actual for a in attempts if a.actual is not None]
    if wrong:
        mismatch = ChecksumMismatch(port, filename, expected, wrong[-1])
        mismatch.hint = f"tried {story}"
        return mismatch
    return FetchError(port, filename, f"tried {story}")
