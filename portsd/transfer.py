"""Resumable, verified HTTP transfer of files: the one implementation behind the build's
distfiles (``portsd.build.fetch``) and the client's packages (``portsd.client.download``).

It lives on the ground floor, beside ``fsio`` and ``errors``, because the builder and the
client both use it and neither may reach into the other's layer. It knows bytes, URLs and
part files; what a file is for (a source of a port, a signed package) and where it ends up
stay with the callers. What it promises:

* **Resumable.** The bytes so far are in ``Target.part``, and where they came from (the
  URL and its strong validator) in ``<part>.json``. The next attempt, in this run or a
  later one, asks for the rest with ``Range`` and sends the validator as ``If-Range``, so
  a file that changed on the server starts again from zero instead of being spliced.
* **Bounded in size.** A file of known size is cut off at the first byte too many, and a
  declared length other than the size is refused before any byte; a file of unknown size
  stops at ``Target.max_bytes``. Either way its bytes are deleted.
* **Verified.** Bytes are hashed as they arrive. A transfer returns only once the part
  holds the whole file with the right sha256, fsynced; wrong bytes are deleted. The caller
  renames the part into place (``Target.commit``), so a final name only ever holds
  verified bytes.
* **Bounded in time.** ``Limits``: a connect timeout, a stall timeout (seconds without a
  byte, headers or body), and optionally a bound on the wait for response headers. A
  server that answered and then dropped or stalled mid-body is alive: it is resumed a few
  times before the location is given up. ``run_all`` runs many transfers at once, at most
  ``jobs`` at a time, within an overall ``deadline``, and stops them all when another
  thread sets a ``threading.Event`` (a cancelled build).

A location that does not give the file raises ``Unavailable`` (``NoAnswer`` when no
response came at all) or ``Mismatch``, each with a readable ``reason``. They are not
PortsdErrors: callers turn them into their own errors, naming the file and every location
tried. Progress goes to a ``Progress`` whose hooks are called on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import re
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

import aiohttp

from portsd.fsio import feed_file, fsync_dir

STALL_TIMEOUT = 30.0
"""Seconds without a byte before a transfer is abandoned (resumed, or the next location)."""

HTTP_SCHEMES = ("http", "https")

_NET_CHUNK = 256 * 1024
_DISK_CHUNK = 1024 * 1024
_STOP_POLL = 0.05  # seconds between looks at a stop event: how promptly a cancel is seen
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
# A file's bytes, never a re-encoding of them: a .tar.gz served with Content-Encoding: gzip
# must keep its bytes (and auto_decompress is off for every request).
_HEADERS = {"Accept-Encoding": "identity", "User-Agent": "portsd"}

T = TypeVar("T")


class Failed(Exception):
    """A location did not give the file; ``reason`` is one readable phrase."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unavailable(Failed):
    """No file from this location; ``mid_body`` if it failed after a 2xx answer began
    (the server is alive, so the transfer is worth resuming)."""

    def __init__(self, reason: str, mid_body: bool = False) -> None:
        super().__init__(reason)
        self.mid_body = mid_body


class NoAnswer(Unavailable):
    """The server did not answer at all: not reachable, or no response headers in time."""


class Mismatch(Failed):
    """The bytes from this location hash to ``actual``; ``resumed`` if a kept prefix was
    part of them (the prefix may be what is wrong)."""

    def __init__(self, actual: str, resumed: bool) -> None:
        super().__init__(f"sha256 mismatch: got {actual[:12]}…")
        self.actual = actual
        self.resumed = resumed


class Overdue(Exception):
    """``run_all``'s outcome for a call still unfinished at the deadline."""


class Stopped(Exception):
    """``run_all``'s outcome for a call still unfinished when the stop event was set."""


@dataclass(frozen=True, slots=True)
class Limits:
    """How long and how far one location is tried.

    ``connect`` bounds the TCP (and TLS) connect, ``stall`` every wait for data, headers
    included; ``answer``, when set, bounds the wait for the response headers from the start
    (a LAN cache that is silent for a second is skipped). ``redirects`` are followed at
    most; a transfer that drops or stalls mid-body is resumed ``resumes`` more times.
    """

    connect: float = 10.0
    stall: float = STALL_TIMEOUT
    answer: float | None = None
    redirects: int = 10
    resumes: int = 2


@dataclass(frozen=True, slots=True)
class Target:
    """A file on its way: bytes with ``sha256`` (exactly ``size`` of them, when known; else
    at most ``max_bytes``, when set), gathered in ``part``."""

    sha256: str
    part: Path
    size: int | None = None
    max_bytes: int | None = None

    def __post_init__(self) -> None:
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        if self.size is not None and self.size < 0:
            raise ValueError("negative size")

    @property
    def sidecar(self) -> Path:
        """Where the part's bytes came from: the URL and its validator, for If-Range."""
        return self.part.with_name(self.part.name + ".json")

    def kept(self) -> int:
        """How many bytes the part holds so far."""
        try:
            return self.part.stat().st_size
        except FileNotFoundError:
            return 0

    def commit(self, dest: Path) -> Path:
        """Rename the verified (fsynced) part to ``dest``, durably; returns ``dest``."""
        os.replace(self.part, dest)
        fsync_dir(dest.parent)
        self.sidecar.unlink(missing_ok=True)
        return dest

    def discard(self) -> None:
        """Forget the bytes so far (they are wrong, or too many)."""
        self.part.unlink(missing_ok=True)
        self.sidecar.unlink(missing_ok=True)

    def _record(self, url: str, validator: str | None) -> None:
        if validator is None:
            self.sidecar.unlink(missing_ok=True)
            return
        temp = self.sidecar.with_name(self.sidecar.name + ".tmp")
        temp.write_text(json.dumps({"url": url, "validator": validator}))
        os.replace(temp, self.sidecar)

    def _validator_for(self, url: str) -> str | None:
        """The recorded validator if the part's bytes came from ``url``; else None, and a
        plain Range is sent (the final sha256 check still guards a prefix from elsewhere)."""
        try:
            recorded = json.loads(self.sidecar.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(recorded, dict) or recorded.get("url") != url:
            return None
        validator = recorded.get("validator")
        return validator if isinstance(validator, str) else None

    def _check_total(self, total: int | None) -> None:
        """Refuse a file whose full size, known before any byte, is not what is wanted."""
        if total is None:
            return
        if self.size is not None and total != self.size:
            raise Unavailable(f"the file has {total} bytes, not the {self.size} expected")
        if self.max_bytes is not None and total > self.max_bytes:
            raise Unavailable(f"{total} bytes, more than the limit of {self.max_bytes}")


class Progress(Protocol):
    """Where one transfer's progress goes, on the event loop's thread; keep it quick.

    ``started`` each time bytes begin to flow from a location (again after a resume, a
    restart or a switch), with the bytes already here (``offset``) and the file's full
    size when known. ``advanced`` reports new bytes.
    """

    def started(self, location: str, offset: int, total: int | None) -> None: ...

    def advanced(self, nbytes: int) -> None: ...


class Silent:
    """A Progress that reports nothing."""

    def started(self, location: str, offset: int, total: int | None) -> None:
        return None

    def advanced(self, nbytes: int) -> None:
        return None


# -- plain HTTP, bounded ----------------------------------------------------------------------


async def answer(
    session: aiohttp.ClientSession,
    url: str,
    limits: Limits,
    headers: dict[str, str] | None = None,
) -> aiohttp.ClientResponse:
    """The response to ``GET url`` (redirects followed), within ``limits``.

    The caller releases it (``async with``). Raises ``NoAnswer`` saying why there is none.
    """
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=limits.connect, sock_read=limits.stall)
    request = session.get(
        url,
        headers={**_HEADERS, **(headers or {})},
        timeout=timeout,
        max_redirects=limits.redirects + 1,  # aiohttp counts the last answer too
        auto_decompress=False,
    )
    try:
        if limits.answer is None:
            return await request
        async with asyncio.timeout(limits.answer):
            return await request
    except aiohttp.ClientError as error:
        raise NoAnswer(describe_failure(error, 0, limits)) from error
    except TimeoutError:
        raise NoAnswer(f"no answer within {limits.answer:g} s") from None


async def get_bytes(session: aiohttp.ClientSession, url: str, limit: int, limits: Limits) -> bytes:
    """The body of a 200 answer to ``GET url``, at most ``limit`` bytes; else ``Unavailable``."""
    response = await answer(session, url, limits)
    async with response:
        if response.status != 200:
            raise Unavailable(_status(response))
        length = response.content_length
        if length is not None and length > limit:
            raise Unavailable(f"{length} bytes, more than the limit of {limit}")
        body = bytearray()
        async with contextlib.aclosing(_body(response, limits)) as chunks:
            async for chunk in chunks:
                body += chunk
                if len(body) > limit:
                    raise Unavailable(f"more than the limit of {limit} bytes")
    return bytes(body)


# -- one file ---------------------------------------------------------------------------------


async def transfer(
    session: aiohttp.ClientSession,
    url: str,
    target: Target,
    limits: Limits,
    progress: Progress | None = None,
) -> None:
    """Gather the file at ``url`` into ``target.part``, resuming the bytes already there.

    Returns once the part holds the whole file with the right sha256, fsynced. Raises
    ``Unavailable`` or ``Mismatch`` when this URL does not give it: after ``limits.resumes``
    resumptions of a transfer that dropped mid-body, or after one fresh start when a kept
    prefix turned out wrong. The part stays on any other failure, for a later resume.
    """
    scheme = urlsplit(url).scheme
    if scheme not in HTTP_SCHEMES:
        raise Unavailable(f"unsupported url scheme '{scheme}'")
    progress = progress or Silent()
    resumes, fresh_start_used = limits.resumes, False
    while True:
        try:
            await _get(session, url, target, limits, progress)
            return
        except Mismatch as mismatch:
            # A kept prefix may be what is wrong (stale, or from elsewhere): the part is gone
            # now, and the URL gets one try from zero before it is blamed.
            if not mismatch.resumed or fresh_start_used:
                raise
            fresh_start_used = True
        except Unavailable as failure:
            if not failure.mid_body or resumes == 0:
                raise
            resumes -= 1


async def copy(path: Path, target: Target, progress: Progress | None = None) -> None:
    """Gather the local file at ``path`` into ``target.part``, verified like a download
    (never resumed: it is local). ``Unavailable`` if it cannot be read."""
    try:
        handle = path.open("rb")
    except FileNotFoundError:
        raise Unavailable("not found") from None
    except OSError as error:
        raise Unavailable(error.strerror or str(error)) from error
    with handle:
        size = os.fstat(handle.fileno()).st_size
        target._check_total(size)

        async def chunks() -> AsyncGenerator[bytes, None]:
            while True:
                try:
                    chunk = await asyncio.to_thread(handle.read, _DISK_CHUNK)
                except OSError as error:
                    raise Unavailable(f"read error: {error.strerror}") from error
                if not chunk:
                    return
                yield chunk

        target._record(str(path), None)
        await _receive(target, str(path), chunks(), hashlib.sha256(), 0, size, progress or Silent())


async def _get(
    session: aiohttp.ClientSession, url: str, target: Target, limits: Limits, progress: Progress
) -> None:
    """One GET of ``url`` into the part, resuming it; returns once it is complete."""
    part = target.part
    offset = target.kept()
    if target.size is not None and offset > target.size:
        target.discard()
        offset = 0
    prefix = hashlib.sha256()
    headers: dict[str, str] = {}
    if offset:
        # Hashed before asking: once a body arrives it must be read without delay, or
        # aiohttp drops buffered bytes when the connection then breaks.
        await asyncio.to_thread(feed_file, prefix, part, offset)
        if offset == target.size:
            # an earlier run stopped between the last byte and the rename
            await _verified_whole(target, prefix)
            return
        headers["Range"] = f"bytes={offset}-"
        validator = target._validator_for(url)
        if validator is not None:
            headers["If-Range"] = validator
    response = await answer(session, url, limits, headers)
    async with response:
        if response.status == 416 and offset:
            # Nothing past our bytes: they are the whole file, or another file's.
            await _verified_whole(target, prefix)
            return
        start, total = body_range(response, offset)
        target._check_total(total)
        target._record(url, strong_validator(response))
        hasher = prefix if start else hashlib.sha256()
        await _receive(target, url, _body(response, limits), hasher, start, total, progress)


async def _verified_whole(target: Target, prefix: hashlib._Hash) -> None:
    """The part's bytes (hashed into ``prefix``) are the file: fsync them, or discard them."""
    if prefix.hexdigest() != target.sha256:
        target.discard()
        raise Mismatch(prefix.hexdigest(), resumed=True)
    await asyncio.to_thread(_fsync_file, target.part)


async def _receive(
    target: Target,
    location: str,
    chunks: AsyncGenerator[bytes, None],
    hasher: hashlib._Hash,
    start: int,
    total: int | None,
    progress: Progress,
) -> None:
    """Write ``chunks`` after the first ``start`` bytes of the part (which ``hasher`` has
    seen), then check the whole. On too many or wrong bytes the part goes; on any other
    failure it stays, for the next attempt to resume."""
    bound = target.size if target.size is not None else target.max_bytes
    progress.started(location, start, total if total is not None else target.size)
    position, too_big = start, False
    fd = os.open(target.part, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as out:
        out.seek(start)
        out.truncate()
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    if bound is not None and position + len(chunk) > bound:
                        too_big = True  # not one byte past the bound: no one can fill a disk
                        break
                    hasher.update(chunk)
                    out.write(chunk)
                    position += len(chunk)
                    progress.advanced(len(chunk))
        finally:
            out.flush()
        actual = hasher.hexdigest()
        complete = not too_big and (target.size is None or position == target.size)
        if complete and actual == target.sha256:
            await asyncio.to_thread(os.fsync, out.fileno())
    if too_big:
        target.discard()
        if target.size is not None:
            raise Unavailable(f"sent more than the {target.size} bytes expected")
        raise Unavailable(f"more than the limit of {target.max_bytes} bytes")
    if not complete:
        raise Unavailable(f"connection closed after {position - start} bytes", mid_body=True)
    if actual != target.sha256:
        target.discard()
        raise Mismatch(actual, resumed=start > 0)


async def _body(response: aiohttp.ClientResponse, limits: Limits) -> AsyncGenerator[bytes, None]:
    """The response's body; a drop or a stall is ``Unavailable`` (mid-body, so resumable)."""
    received = 0
    try:
        async for chunk in response.content.iter_chunked(_NET_CHUNK):
            received += len(chunk)
            yield chunk
    except (aiohttp.ClientError, TimeoutError) as error:
        raise Unavailable(describe_failure(error, received, limits), mid_body=True) from error


# -- many at once -----------------------------------------------------------------------------


async def run_all(
    calls: Sequence[Callable[[], Awaitable[T]]],
    *,
    jobs: int | None = None,
    deadline: float | None = None,
    fail_fast: bool = False,
    stop: threading.Event | None = None,
) -> list[T | BaseException]:
    """Run every call concurrently, at most ``jobs`` at once; each one's result or error.

    With ``fail_fast`` the first failure cancels the rest (their outcome is
    ``asyncio.CancelledError``). At ``deadline`` seconds every unfinished call is cancelled
    (outcome ``Overdue``); so it is, promptly, when another thread sets ``stop`` (outcome
    ``Stopped``). What a cancelled transfer had received stays in its part file.
    """
    if jobs is not None and jobs < 1:
        raise ValueError("jobs must be at least 1")
    slots = asyncio.Semaphore(jobs) if jobs is not None else None

    async def bounded(call: Callable[[], Awaitable[T]]) -> T:
        if slots is None:
            return await call()
        async with slots:
            return await call()

    tasks = [asyncio.create_task(bounded(call)) for call in calls]
    watcher = asyncio.create_task(_until_set(stop)) if stop is not None else None
    interrupted: Exception | None = None  # the outcome of whatever is cut short
    loop = asyncio.get_running_loop()
    ends = None if deadline is None else loop.time() + deadline
    try:
        pending: set[asyncio.Task[T]] = set(tasks)
        while pending:
            waiting: set[asyncio.Task[object]] = {*pending, *([watcher] if watcher else [])}
            left = None if ends is None else max(ends - loop.time(), 0.0)
            done, _ = await asyncio.wait(waiting, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                interrupted = Overdue()
                break
            if watcher is not None and watcher in done:
                interrupted = Stopped()
                break
            pending = {task for task in pending if task not in done}
            if fail_fast and any(not t.cancelled() and t.exception() for t in done):
                break
    finally:
        for task in (*tasks, *([watcher] if watcher else [])):
            task.cancel()
        await asyncio.gather(*tasks, *([watcher] if watcher else []), return_exceptions=True)
    outcomes: list[T | BaseException] = []
    for task in tasks:
        if task.cancelled():
            outcomes.append(interrupted or asyncio.CancelledError())
        elif (error := task.exception()) is not None:
            outcomes.append(error)
        else:
            outcomes.append(task.result())
    return outcomes


async def _until_set(event: threading.Event) -> None:
    # A threading.Event has no callback: polled, never waited for in a thread, so nothing
    # is left blocked when the event is never set.
    while not event.is_set():
        await asyncio.sleep(_STOP_POLL)


# -- HTTP details -----------------------------------------------------------------------------


def describe_failure(error: BaseException, received: int, limits: Limits) -> str:
    """One readable phrase for a failed HTTP exchange that had received ``received`` bytes."""
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return f"connect timed out after {limits.connect:g} s"
    if isinstance(error, TimeoutError):
        after = f" after {received} bytes" if received else ""
        return f"timed out{after}: no data for {limits.stall:g} s"
    if isinstance(error, aiohttp.TooManyRedirects):
        return f"more than {limits.redirects} redirects"
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
    """Where the body starts in the file and the file's full size, or ``Unavailable``."""
    if response.status == 200:
        return 0, response.content_length
    if response.status == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", ""))
        if match is None or int(match[1]) != offset:
            raise Unavailable(f"bad Content-Range for bytes={offset}-")
        return offset, None if match[3] == "*" else int(match[3])
    raise Unavailable(_status(response))


def strong_validator(response: aiohttp.ClientResponse) -> str | None:
    """A validator If-Range may carry: a strong ETag, else Last-Modified (RFC 9110 13.1.5)."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def _status(response: aiohttp.ClientResponse) -> str:
    return f"HTTP {response.status} {response.reason or ''}".rstrip()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
