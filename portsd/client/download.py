"""Downloading package files from LAN caches: in parallel, resumable, verified before use.

Each ``Download`` is tried at its URLs in order. Its bytes go to files beside ``dest``::

    <dest>.part        the bytes so far; resumed with an HTTP Range by the next attempt or run
    <dest>.part.json   the URL they came from and its strong validator, sent as If-Range, so
                       a file that changed on the server restarts instead of being spliced

and ``dest`` appears only by a rename of a part file that has exactly ``size`` bytes with
``sha256`` and, when a signature URL is given, a ``.minisig`` that verifies with a trusted
key and names the file. So a ``dest`` that exists is a verified file, and a run after a
failure skips what is already complete and resumes what is not.

Every failure fails closed: a cache that sends more than ``size`` bytes is cut off at the
first byte too many and its bytes are deleted; bytes with the wrong sha256 or a bad
signature are deleted and the next URL is tried; a connection that drops or stalls mid-body
keeps its bytes and is resumed (a few times, then the next URL). The module prints nothing:
a ``DownloadReporter`` sees the progress.

The HTTP helpers ``get_bytes`` and ``answer`` are shared with ``portsd.client.remote``:
both bound the wait for a server's response headers by ``answer_within`` seconds, so an
unreachable or silent cache costs about that long.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiohttp

from portsd.build.fetch import (
    Mismatch,
    Unavailable,
    body_range,
    describe_failure,
    strong_validator,
)
from portsd.errors import BadSignature, ConfigError, DownloadError
from portsd.fsio import feed_file, file_sha256, fsync_dir
from portsd.pkg.sign import PublicKey, verify_file

STALL_TIMEOUT = 30.0
"""Seconds without a byte before a transfer is abandoned (resumed, or the next URL tried)."""

MAX_SIGNATURE_BYTES = 16 * 1024
"""A ``.minisig`` is four short lines (the trusted comment is at most 8 KiB)."""

MAX_REDIRECTS = 3

_RESUMES = 2  # resumptions of one URL after a drop mid-body, before the next URL is tried
_NET_CHUNK = 256 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEADERS = {"Accept-Encoding": "identity"}  # a package's bytes, never a re-encoding of them


@dataclass(frozen=True, slots=True)
class Download:
    """One file to obtain: from the first of ``urls`` that gives it intact, into ``dest``.

    ``signature_urls``, when set, is parallel to ``urls``: the ``.minisig`` of the file at
    each URL, which must verify with a trusted key (used when ``size`` and ``sha256`` come
    from an unsigned source, such as a cache's answer to a build-key query).
    """

    label: str
    urls: tuple[str, ...]
    size: int
    sha256: str
    dest: Path
    signature_urls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError(f"{self.label}: a download needs at least one URL")
        if self.signature_urls and len(self.signature_urls) != len(self.urls):
            raise ValueError(f"{self.label}: signature_urls must be parallel to urls")
        if not _SHA256.fullmatch(self.sha256):
            raise ValueError(f"{self.label}: sha256 must be 64 lowercase hex digits")
        if self.size < 0:
            raise ValueError(f"{self.label}: negative size")

    @property
    def part(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part")

    @property
    def sidecar(self) -> Path:
        return self.dest.with_name(self.dest.name + ".part.json")


class DownloadReporter(Protocol):
    """Progress of ``download_all``, called on the event loop's thread; keep them quick.

    ``started`` comes each time bytes begin to flow from a URL (again after a resume, a
    restart or a switch to the next URL), with the bytes already here: a progress bar
    restarts at ``offset``. ``offset == download.size`` means the file was already complete
    and nothing is fetched. ``advanced`` reports new bytes; ``finished`` comes once, when
    ``dest`` is in place and verified.
    """

    def started(self, download: Download, offset: int) -> None: ...

    def advanced(self, download: Download, nbytes: int) -> None: ...

    def finished(self, download: Download) -> None: ...


class _Silent:
    def started(self, download: Download, offset: int) -> None:
        return None

    def advanced(self, download: Download, nbytes: int) -> None:
        return None

    def finished(self, download: Download) -> None:
        return None


class NoAnswer(Unavailable):
    """The server did not answer at all: not reachable, or no response headers in time."""


# -- plain HTTP, bounded ----------------------------------------------------------------------


async def answer(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    answer_within: float,
    stall: float = STALL_TIMEOUT,
) -> aiohttp.ClientResponse:
    """The response to ``GET url``, whose headers must arrive within ``answer_within`` s.

    Its body is then read with at most ``stall`` seconds between bytes. The caller
    releases the response (``async with``). Raises ``NoAnswer`` saying why there is none.
    """
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=answer_within, sock_read=stall)
    try:
        async with asyncio.timeout(answer_within):
            return await session.get(
                url,
                headers={**_HEADERS, **(headers or {})},
                timeout=timeout,
                max_redirects=MAX_REDIRECTS + 1,  # aiohttp counts the last answer too
            )
    except TimeoutError:
        raise NoAnswer(f"no answer within {answer_within:g} s") from None
    except aiohttp.ClientError as error:
        raise NoAnswer(_describe(error, 0, answer_within, stall)) from error


async def get_bytes(
    session: aiohttp.ClientSession,
    url: str,
    *,
    limit: int,
    answer_within: float,
    stall: float = STALL_TIMEOUT,
) -> bytes:
    """The body of a 200 answer to ``GET url``, at most ``limit`` bytes; else ``Unavailable``."""
    response = await answer(session, url, answer_within=answer_within, stall=stall)
    async with response:
        if response.status != 200:
            raise Unavailable(f"HTTP {response.status} {response.reason or ''}".rstrip())
        length = response.content_length
        if length is not None and length > limit:
            raise Unavailable(f"{length} bytes, more than the limit of {limit}")
        body = bytearray()
        try:
            async for chunk in response.content.iter_chunked(_NET_CHUNK):
                body += chunk
                if len(body) > limit:
                    raise Unavailable(f"more than the limit of {limit} bytes")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise Unavailable(_describe(error, len(body), answer_within, stall), True) from error
    return bytes(body)


def _describe(error: BaseException, received: int, answer_within: float, stall: float) -> str:
    return describe_failure(
        error,
        received,
        connect_timeout=answer_within,
        read_timeout=stall,
        max_redirects=MAX_REDIRECTS,
    )


# -- downloads --------------------------------------------------------------------------------


async def download_all(
    session: aiohttp.ClientSession,
    downloads: Sequence[Download],
    keys: Sequence[PublicKey],
    *,
    jobs: int = 4,
    deadline: float = 600.0,
    answer_within: float = 1.0,
    reporter: DownloadReporter | None = None,
    stall: float = STALL_TIMEOUT,
) -> None:
    """Put every download's verified file at its ``dest``, at most ``jobs`` at a time.

    Returns when all are in place. Otherwise raises ``DownloadError`` for the first that
    failed (naming each URL tried and why) after cancelling the rest, or, when ``deadline``
    seconds pass first, for the first unfinished one. Files already in place stay (they are
    verified); part files stay for the next run to resume. ``ConfigError`` when signatures
    are to be checked and ``keys`` is empty.
    """
    if jobs < 1:
        raise ValueError("jobs must be at least 1")
    if not keys and any(download.signature_urls for download in downloads):
        raise ConfigError("no trusted signing keys: package signatures cannot be verified")
    dests = [download.dest for download in downloads]
    if len(set(dests)) != len(dests):
        raise ValueError("two downloads into one file")
    if not downloads:
        return
    runner = _Runner(
        session, tuple(keys), reporter or _Silent(), asyncio.Semaphore(jobs), answer_within, stall
    )
    states = [_Job(download) for download in downloads]
    tasks = [asyncio.create_task(runner.run(state)) for state in states]
    timed_out = False
    try:
        async with asyncio.timeout(deadline):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except TimeoutError:
        timed_out = True
    finally:
        for task in tasks:
            task.cancel()  # the rest of a failed batch, or everything at the deadline
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if task.done() and not task.cancelled() and (error := task.exception()) is not None:
            raise error
    if timed_out:
        unfinished = [state for state in states if not state.done]
        if unfinished:
            raise unfinished[0].overdue(deadline, unfinished[1:])


@dataclass(eq=False, slots=True)
class _Job:
    """What one download has been through so far, for the error that may end it."""

    download: Download
    attempts: list[tuple[str, str]] = field(default_factory=list)
    current: str | None = None  # the URL bytes are coming from
    position: int = 0  # bytes of the file in the part file
    done: bool = False

    def failed(self) -> DownloadError:
        return DownloadError(self.download.label, self.attempts)

    def overdue(self, deadline: float, others: Sequence[_Job]) -> DownloadError:
        attempts = list(self.attempts)
        if self.current is not None:
            attempts.append(
                (self.current, f"stopped after {self.position} of {self.download.size} bytes")
            )
        error = DownloadError(
            self.download.label, attempts, f"not finished within the deadline of {deadline:g} s"
        )
        if others:
            error.hint = "also unfinished: " + ", ".join(job.download.label for job in others)
        return error


class _Failed(Exception):
    """This URL did not give the file; ``reason`` is one readable phrase."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class _Runner:
    session: aiohttp.ClientSession
    keys: tuple[PublicKey, ...]
    reporter: DownloadReporter
    slots: asyncio.Semaphore
    answer_within: float
    stall: float

    async def run(self, job: _Job) -> None:
        download = job.download
        async with self.slots:
            try:
                if await asyncio.to_thread(_complete, download):
                    self.reporter.started(download, download.size)
                else:
                    await self._obtain(job)
            except OSError as error:
                # our own disk failed: no other URL can help
                where = error.filename or download.dest
                problem = f"{where}: {error.strerror or error}"
                raise DownloadError(download.label, job.attempts, problem) from error
        job.done = True
        self.reporter.finished(download)

    async def _obtain(self, job: _Job) -> None:
        download = job.download
        download.dest.parent.mkdir(parents=True, exist_ok=True)
        for position, url in enumerate(download.urls):
            signature_url = download.signature_urls[position] if download.signature_urls else None
            try:
                await self._from(job, url, signature_url)
                return
            except _Failed as failure:
                job.attempts.append((url, failure.reason))
                job.current = None
        raise job.failed()

    async def _from(self, job: _Job, url: str, signature_url: str | None) -> None:
        """The file from ``url``, resumed after drops, verified and renamed into place."""
        download = job.download
        signature = None
        if signature_url is not None:
            # first: a missing signature must not cost the whole download
            try:
                raw = await get_bytes(
                    self.session,
                    signature_url,
                    limit=MAX_SIGNATURE_BYTES,
                    answer_within=self.answer_within,
                    stall=self.stall,
                )
            except Unavailable as failure:
                raise _Failed(f"signature {signature_url}: {failure.reason}") from None
            signature = raw.decode("utf-8", errors="replace")
        resumes, fresh_start_used = _RESUMES, False
        while True:
            try:
                await self._transfer(job, url)
                break
            except Mismatch as mismatch:
                # a kept prefix may be what is wrong: the part is gone, one try from zero
                if not mismatch.resumed or fresh_start_used:
                    raise _Failed(f"sha256 mismatch: got {mismatch.actual[:12]}…") from None
                fresh_start_used = True
            except Unavailable as failure:
                if not failure.mid_body or resumes == 0:
                    raise _Failed(failure.reason) from None
                resumes -= 1
        if signature is not None:
            try:
                await asyncio.to_thread(_check_signature, download.part, signature, self.keys, url)
            except BadSignature as error:
                _discard(download)
                raise _Failed(f"signature {signature_url}: {error.message}") from None
        await asyncio.to_thread(_commit, download)

    async def _transfer(self, job: _Job, url: str) -> None:
        """One GET of ``url`` into the part file, resuming it; returns once it is complete
        and has the right sha256 (fsynced). ``Unavailable`` or ``Mismatch`` otherwise."""
        download = job.download
        part = download.part
        offset = _size(part)
        if offset > download.size:
            _discard(download)
            offset = 0
        prefix = hashlib.sha256()
        headers: dict[str, str] = {}
        if offset:
            # hashed before asking: once a body arrives it is read without delay
            await asyncio.to_thread(feed_file, prefix, part, offset)
            if offset == download.size:
                if prefix.hexdigest() == download.sha256:
                    return  # an earlier run stopped between the last byte and the rename
                _discard(download)
                raise Mismatch(prefix.hexdigest(), resumed=True)
            headers["Range"] = f"bytes={offset}-"
            validator = _validator_for(download, url)
            if validator is not None:
                headers["If-Range"] = validator
        job.current, job.position = url, offset
        response = await answer(
            self.session,
            url,
            headers=headers,
            answer_within=self.answer_within,
            stall=self.stall,
        )
        async with response:
            if response.status == 416 and offset:
                # the server's file is shorter than our bytes: another file, start over
                _discard(download)
                raise Mismatch(prefix.hexdigest(), resumed=True)
            start, total = body_range(response, offset)
            if total is not None and total != download.size:
                raise Unavailable(f"the file has {total} bytes, not the {download.size} expected")
            await self._receive(job, url, response, prefix if start else hashlib.sha256(), start)

    async def _receive(
        self,
        job: _Job,
        url: str,
        response: aiohttp.ClientResponse,
        hasher: hashlib._Hash,
        start: int,
    ) -> None:
        """Write the body after the first ``start`` bytes of the part file, then check it."""
        download = job.download
        _record(download, url, strong_validator(response))
        self.reporter.started(download, start)
        job.position = start
        too_big = False
        fd = os.open(download.part, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.seek(start)
            out.truncate()
            try:
                async for chunk in response.content.iter_chunked(_NET_CHUNK):
                    if job.position + len(chunk) > download.size:
                        too_big = True  # not one byte past the size: a cache cannot fill a disk
                        break
                    hasher.update(chunk)
                    out.write(chunk)
                    job.position += len(chunk)
                    self.reporter.advanced(download, len(chunk))
            except (aiohttp.ClientError, TimeoutError) as error:
                received = job.position - start
                reason = _describe(error, received, self.answer_within, self.stall)
                raise Unavailable(reason, mid_body=True) from error
            finally:
                out.flush()
            actual = hasher.hexdigest()
            complete = not too_big and job.position == download.size
            if complete and actual == download.sha256:
                await asyncio.to_thread(os.fsync, out.fileno())
        if too_big:
            _discard(download)
            raise Unavailable(f"sent more than the {download.size} bytes expected")
        if not complete:
            raise Unavailable(f"connection closed after {job.position - start} bytes", True)
        if actual != download.sha256:
            _discard(download)
            raise Mismatch(actual, resumed=start > 0)


# -- the files beside dest ---------------------------------------------------------------------


def _complete(download: Download) -> bool:
    """Whether ``dest`` already holds the file (an earlier run finished it)."""
    try:
        if download.dest.stat().st_size != download.size:
            return False
    except FileNotFoundError:
        return False
    return file_sha256(download.dest) == download.sha256


def _check_signature(part: Path, signature: str, keys: Sequence[PublicKey], url: str) -> None:
    """The signature verifies over the file and its trusted comment names the file at ``url``:
    a validly signed package cannot be served under another package's name."""
    comment = verify_file(part, signature, keys)
    signed = None
    for item in comment.split("\t"):
        label, _, value = item.partition(":")
        if label == "file":
            signed = value
    name = unquote(urlsplit(url).path.rpartition("/")[2])
    if signed != name:
        what = f"'{signed}'" if signed is not None else "no file"
        raise BadSignature(str(part), f"the signature names {what}, not '{name}'")


def _commit(download: Download) -> None:
    os.replace(download.part, download.dest)
    fsync_dir(download.dest.parent)
    download.sidecar.unlink(missing_ok=True)


def _discard(download: Download) -> None:
    download.part.unlink(missing_ok=True)
    download.sidecar.unlink(missing_ok=True)


def _record(download: Download, url: str, validator: str | None) -> None:
    """Remember where the part's bytes come from, so a resume can send If-Range."""
    if validator is None:
        download.sidecar.unlink(missing_ok=True)
        return
    temp = download.sidecar.with_name(download.sidecar.name + ".tmp")
    temp.write_text(json.dumps({"url": url, "validator": validator}))
    os.replace(temp, download.sidecar)


def _validator_for(download: Download, url: str) -> str | None:
    """The recorded validator if the part's bytes came from ``url``; else a plain Range (the
    final sha256 check still guards a prefix from elsewhere)."""
    try:
        recorded = json.loads(download.sidecar.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or recorded.get("url") != url:
        return None
    validator = recorded.get("validator")
    return validator if isinstance(validator, str) else None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
