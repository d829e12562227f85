"""Downloading package files from LAN caches: in parallel, resumable, verified before use.

Each ``Download`` is tried at its URLs in order. ``portsd.transfer`` moves its bytes into
``<dest>.part`` (resumed with Range and If-Range by the next attempt or run, cut off at
``size``, hashed as they arrive), and ``dest`` appears only by a rename of a part file that
has exactly ``size`` bytes with ``sha256`` and, when a signature URL is given, a
``.minisig`` that verifies with a trusted key and names the file. So a ``dest`` that
exists is a verified file, and a run after a failure skips what is already complete and
resumes what is not.

Every failure fails closed: a cache that sends more than ``size`` bytes is cut off at the
first byte too many and its bytes are deleted; bytes with the wrong sha256 or a bad
signature are deleted and the next URL is tried; a connection that drops or stalls mid-body
keeps its bytes and is resumed (a few times, then the next URL). The module prints nothing:
a ``DownloadReporter`` sees the progress.

A LAN cache is judged by ``lan_limits``: one that gives no response headers within
``answer_within`` seconds costs about that long, here and in ``portsd.client.remote``.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

import aiohttp

from portsd import transfer
from portsd.errors import BadSignature, ConfigError, DownloadError
from portsd.fsio import file_sha256
from portsd.pkg.sign import PublicKey, verify_file

MAX_SIGNATURE_BYTES = 16 * 1024
"""A ``.minisig`` is four short lines (the trusted comment is at most 8 KiB)."""

MAX_REDIRECTS = 3


def lan_limits(answer_within: float, stall: float = transfer.STALL_TIMEOUT) -> transfer.Limits:
    """How long a LAN cache may take: headers within ``answer_within`` s, no stall longer
    than ``stall`` s."""
    return transfer.Limits(
        connect=answer_within, answer=answer_within, stall=stall, redirects=MAX_REDIRECTS
    )


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

    target: transfer.Target = field(init=False, repr=False, compare=False)
    """The part file beside ``dest`` that gathers the bytes."""

    def __post_init__(self) -> None:
        if not self.urls:
            raise ValueError(f"{self.label}: a download needs at least one URL")
        if self.signature_urls and len(self.signature_urls) != len(self.urls):
            raise ValueError(f"{self.label}: signature_urls must be parallel to urls")
        part = self.dest.with_name(self.dest.name + ".part")
        try:
            object.__setattr__(self, "target", transfer.Target(self.sha256, part, self.size))
        except ValueError as error:
            raise ValueError(f"{self.label}: {error}") from None


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


async def download_all(
    session: aiohttp.ClientSession,
    downloads: Sequence[Download],
    keys: Sequence[PublicKey],
    *,
    jobs: int = 4,
    deadline: float = 600.0,
    answer_within: float = 1.0,
    reporter: DownloadReporter | None = None,
    stall: float = transfer.STALL_TIMEOUT,
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
    runner = _Runner(session, tuple(keys), lan_limits(answer_within, stall))
    states = [_Job(download, reporter or _Silent()) for download in downloads]
    outcomes = await transfer.run_all(
        [functools.partial(runner.run, state) for state in states],
        jobs=jobs,
        deadline=deadline,
        fail_fast=True,
    )
    overdue: list[_Job] = []
    for state, outcome in zip(states, outcomes, strict=True):
        if isinstance(outcome, transfer.Overdue):
            overdue.append(state)
        elif isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
            raise outcome  # the first failure; the rest were cancelled because of it
    if overdue:
        raise overdue[0].overdue(deadline, overdue[1:])


@dataclass(eq=False, slots=True)
class _Job:
    """What one download has been through so far, for the error that may end it; also the
    progress of its current transfer."""

    download: Download
    reporter: DownloadReporter
    attempts: list[tuple[str, str]] = field(default_factory=list)
    current: str | None = None  # the URL bytes are coming from
    position: int = 0  # bytes of the file in the part file

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

    # transfer.Progress
    def started(self, location: str, offset: int, total: int | None) -> None:
        self.position = offset
        self.reporter.started(self.download, offset)

    def advanced(self, nbytes: int) -> None:
        self.position += nbytes
        self.reporter.advanced(self.download, nbytes)


@dataclass(frozen=True, slots=True)
class _Runner:
    session: aiohttp.ClientSession
    keys: tuple[PublicKey, ...]
    limits: transfer.Limits

    async def run(self, job: _Job) -> None:
        download = job.download
        try:
            if await asyncio.to_thread(_complete, download):
                job.reporter.started(download, download.size)
            else:
                await self._obtain(job)
        except OSError as error:
            # our own disk failed: no other URL can help
            where = error.filename or download.dest
            problem = f"{where}: {error.strerror or error}"
            raise DownloadError(download.label, job.attempts, problem) from error
        job.reporter.finished(download)

    async def _obtain(self, job: _Job) -> None:
        download = job.download
        download.dest.parent.mkdir(parents=True, exist_ok=True)
        for position, url in enumerate(download.urls):
            signature_url = download.signature_urls[position] if download.signature_urls else None
            try:
                await self._from(job, url, signature_url)
                return
            except transfer.Failed as failure:
                job.attempts.append((url, failure.reason))
                job.current = None
        raise job.failed()

    async def _from(self, job: _Job, url: str, signature_url: str | None) -> None:
        """The file from ``url``, verified and renamed into place; ``transfer.Failed`` if not."""
        download, target = job.download, job.download.target
        signature = None
        if signature_url is not None:
            # first: a missing signature must not cost the whole download
            try:
                raw = await transfer.get_bytes(
                    self.session, signature_url, MAX_SIGNATURE_BYTES, self.limits
                )
            except transfer.Unavailable as failure:
                raise transfer.Failed(f"signature {signature_url}: {failure.reason}") from None
            signature = raw.decode("utf-8", errors="replace")
        job.current, job.position = url, target.kept()
        await transfer.transfer(self.session, url, target, self.limits, job)
        if signature is not None:
            try:
                await asyncio.to_thread(_check_signature, target.part, signature, self.keys, url)
            except BadSignature as error:
                target.discard()
                raise transfer.Failed(f"signature {signature_url}: {error.message}") from None
        await asyncio.to_thread(target.commit, download.dest)


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
