"""LAN binary caches as a client sees them: their verified indexes and the substituter query.

A cache is a portsd daemon's base URL. ``open_caches`` reads each one's
``/repo/<arch>/index.msgpack.zst`` and its ``.minisig`` and keeps the caches whose index
passes every check, in the configured order:

* the signature verifies with one of the trusted keys (a key we do not trust is refused);
* the index decodes within ``portsd.core.index.MAX_INDEX_BYTES`` and is for our architecture;
* it is fresh: its serial is not lower than the highest already seen for its signing key
  (recorded in a ``SerialBook``, and counting the other caches read in the same call), and
  it has not expired.

A cache that fails any check is not used at all, and its problem is kept as one line; a
cache that gives no response headers within ``answer_within`` seconds is skipped, and the
caches are read concurrently, so a dead one costs about that long once. Signed indexes
bind every package's size and sha256, so packages named by ``Caches`` need no more trust.

``ask_for_key`` asks the caches' ``/api/v1/keys/<key>`` for a package built with a key
that no index lists (an old build, after a revert). That answer is not signed: its
``Substitute`` carries the package's ``.minisig`` URL, and the download must verify it
(``portsd.client.download`` does, and checks that the signature names the file).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote, unquote, urljoin, urlsplit

import aiohttp

from portsd.client.download import MAX_SIGNATURE_BYTES, lan_limits
from portsd.client.settings import INDEX_TIMEOUT
from portsd.core.index import (
    MAX_INDEX_BYTES,
    Index,
    IndexEntry,
    check_fresh,
    decode_index,
    entry_from_map,
)
from portsd.errors import BadSignature, ConfigError, RepoError
from portsd.gcpause import paused_gc
from portsd.pkg.repo import INDEX_NAME, SIG_SUFFIX
from portsd.pkg.sign import PublicKey, verify
from portsd.transfer import NoAnswer, Unavailable, get_bytes

SLOWER_GRACE = 2.0
"""Seconds the other caches get, beyond twice the time of the first index read."""

MAX_ANSWER_BYTES = 64 * 1024
"""Bytes of a substituter answer: one entry in JSON is well under a kilobyte."""

_KEY = re.compile(r"[0-9a-f]{64}")
_SCHEMES = ("http", "https")


class SerialBook(Protocol):
    """The client's memory of index serials, by signing key (``PackageDb`` is one), and of
    the sha256 of the index last accepted at the highest serial."""

    def last_serial(self, key_id: str) -> int | None: ...

    def record_serial(self, key_id: str, serial: int) -> int: ...

    def serial_digest(self, key_id: str, serial: int) -> str | None: ...

    def record_digest(self, key_id: str, serial: int, sha256: str) -> None: ...


@dataclass(frozen=True, slots=True)
class Substitute:
    """A package some cache offers for a build key.

    ``signature_url`` is None when ``entry`` came from a verified index (its size and
    sha256 are signed); otherwise the file's ``.minisig``, which must verify before use.
    """

    cache: str
    entry: IndexEntry
    url: str
    signature_url: str | None


@dataclass(frozen=True, slots=True)
class Cache:
    """A cache whose index passed every check; ``signer`` is the trusted key that signed it."""

    url: str
    arch: str
    index: Index
    signer: PublicKey

    @property
    def index_url(self) -> str:
        return _index_url(self.url, self.arch)

    def package_url(self, entry: IndexEntry) -> str:
        return f"{self.url}/repo/{self.arch}/packages/{quote(entry.file)}"


@dataclass(frozen=True, slots=True)
class Caches:
    """The usable caches in the configured order, and why each other one is not used.

    ``problems`` pairs a cache's URL with one readable line that does not repeat it
    (``no answer within 1 s``, ``index serial 3 is lower than 5, already seen``).
    """

    usable: tuple[Cache, ...] = ()
    problems: tuple[tuple[str, str], ...] = ()
    _names: dict[str, tuple[Cache, IndexEntry]] = field(init=False, repr=False, compare=False)
    _keys: dict[str, tuple[Cache, IndexEntry]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # built once: resolution asks for thousands of names and keys
        names: dict[str, tuple[Cache, IndexEntry]] = {}
        keys: dict[str, tuple[Cache, IndexEntry]] = {}
        for cache in self.usable:
            for entry in cache.index:
                names.setdefault(entry.meta.name, (cache, entry))
                keys.setdefault(entry.meta.build_key, (cache, entry))
        object.__setattr__(self, "_names", names)
        object.__setattr__(self, "_keys", keys)

    def entries(self) -> list[IndexEntry]:
        """Every package name once, sorted by name; of a name, the first cache's entry."""
        return [self._names[name][1] for name in sorted(self._names)]

    def entry(self, name: str) -> tuple[Cache, IndexEntry] | None:
        """The first cache that lists ``name``, and its entry."""
        return self._names.get(name)

    def get(self, key: str, /) -> str | None:
        """The content id of the package of ``key`` a verified index lists (a
        ``portsd.core.keys.Contents``: what a checkout's keys are computed from)."""
        found = self._keys.get(key)
        return found[1].content if found is not None else None

    def by_key(self, key: str) -> Substitute | None:
        """A package built with ``key`` from a verified index (first cache first), or None."""
        found = self._keys.get(key)
        if found is None:
            return None
        cache, entry = found
        return Substitute(cache.url, entry, cache.package_url(entry), None)


@dataclass(frozen=True, slots=True)
class _Read:
    """A cache whose index verified and decoded; freshness is judged with the others."""

    url: str
    index: Index
    signer: PublicKey
    sha256: str  # of the index file: one serial, one content


async def open_caches(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    arch: str,
    keys: Sequence[PublicKey],
    serials: SerialBook,
    *,
    now: int,
    answer_within: float = 1.0,
    read_within: float = INDEX_TIMEOUT,
) -> Caches:
    """Read and check every cache's index (concurrently); the usable ones and the problems.

    Each index (with its signature) must be read within ``read_within`` seconds, however
    steadily it trickles in; and once one cache's index is read, the others get at most
    ``SLOWER_GRACE`` seconds plus twice what that one took, so one slow cache does not
    hold up the others. Records the serial (and the index's sha256) of every index used in
    ``serials``; an index at a serial already seen must be byte-identical to the one seen
    (another is a fork signed with the same key). No usable cache is not an error here
    (the caller decides); no trusted key is a ``ConfigError``.
    """
    if not keys:
        raise ConfigError("no trusted signing keys: a cache's index cannot be verified")
    bases = _bases(urls)
    results = await _read_all(
        [_read(session, base, arch, keys, answer_within) for base in bases], read_within
    )
    # One signing key, one serial sequence: an index older than another seen now, or than
    # one recorded before, is a rollback whichever cache comes first. Expired indexes do
    # not raise the floor (they are refused anyway).
    floors: dict[str, int] = {}
    digests: dict[tuple[str, int], str] = {}  # (key id, serial) -> sha256 accepted now
    for result in results:
        if isinstance(result, _Read) and now < result.index.expires:
            key_id = result.signer.key_id
            floor = floors.get(key_id, serials.last_serial(key_id))
            floors[key_id] = max(result.index.serial, floor or 0)
    usable: list[Cache] = []
    problems: list[tuple[str, str]] = []
    for base, result in zip(bases, results, strict=True):
        if isinstance(result, str):
            problems.append((base, result))
            continue
        key_id = result.signer.key_id
        floor = floors.get(key_id, serials.last_serial(key_id))
        try:
            check_fresh(result.index, last_serial=floor, now=now, label=_index_url(base, arch))
        except RepoError as error:
            problems.append((base, error.message))
            continue
        serial = result.index.serial
        seen = digests.get((key_id, serial)) or serials.serial_digest(key_id, serial)
        if seen is not None and seen != result.sha256:
            problems.append(
                (base, f"index serial {serial} was seen before with other content (a fork)")
            )
            continue
        digests[key_id, serial] = result.sha256
        usable.append(Cache(base, arch, result.index, result.signer))
    highest: dict[str, Cache] = {}
    for cache in usable:
        key_id = cache.signer.key_id
        if key_id not in highest or cache.index.serial > highest[key_id].index.serial:
            highest[key_id] = cache
    for key_id, cache in highest.items():
        serial = serials.record_serial(key_id, cache.index.serial)
        if serial == cache.index.serial:
            serials.record_digest(key_id, serial, digests[key_id, serial])
    return Caches(tuple(usable), tuple(problems))


async def _read_all(
    reads: Sequence[Coroutine[None, None, _Read | str]], read_within: float
) -> list[_Read | str]:
    """Every read's result, or why it was cut short: the total deadline, or the grace
    after the first index read."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + read_within
    tasks = [asyncio.create_task(read) for read in reads]
    pending: set[asyncio.Task[_Read | str]] = set(tasks)
    slower = False
    while pending:
        done, pending = await asyncio.wait(
            pending, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED
        )
        if not done:
            break
        if not slower and any(isinstance(task.result(), _Read) for task in done):
            slower = True  # the others may take a little longer than this one, no more
            took = loop.time() - started
            deadline = min(deadline, loop.time() + SLOWER_GRACE + 2 * took)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    why = "index not read in time" + (
        ", while another cache answered" if slower else f" ({read_within:g} s)"
    )
    return [task.result() if task not in pending else why for task in tasks]


async def _read(
    session: aiohttp.ClientSession,
    base: str,
    arch: str,
    keys: Sequence[PublicKey],
    answer_within: float,
) -> _Read | str:
    """The cache's verified index, or the problem that rules the cache out."""
    if urlsplit(base).scheme not in _SCHEMES:
        return "not an http(s) URL"
    url = _index_url(base, arch)
    limits = lan_limits(answer_within)
    # a publish between the two requests pairs one old file with one new: ask once more
    for last_try in (False, True):
        try:
            data = await get_bytes(session, url, MAX_INDEX_BYTES, limits)
        except NoAnswer as failure:
            return failure.reason
        except Unavailable as failure:
            return f"index: {failure.reason}"
        try:
            signature = await get_bytes(session, url + SIG_SUFFIX, MAX_SIGNATURE_BYTES, limits)
        except NoAnswer as failure:
            return failure.reason
        except Unavailable as failure:
            return f"index signature: {failure.reason}"
        text = signature.decode("utf-8", errors="replace")
        try:
            index, signer = await asyncio.to_thread(_verified, data, text, keys, url, arch)
        except BadSignature as error:
            if last_try:
                return f"index signature: {error.message}"
            continue
        except RepoError as error:
            return error.message
        return _Read(base, index, signer, hashlib.sha256(data).hexdigest())
    raise AssertionError("unreachable")


def _verified(
    data: bytes, signature: str, keys: Sequence[PublicKey], label: str, arch: str
) -> tuple[Index, PublicKey]:
    """The index in ``data`` and the key that signed it; ``RepoError`` if unusable."""
    signer = None
    for key in keys:
        try:
            verify(data, signature, (key,), label)
        except BadSignature:
            continue  # another key's, or bad: asked of all keys below for the message
        signer = key
        break
    if signer is None:
        verify(data, signature, keys, label)  # raises, saying why
        raise AssertionError("a signature that verifies with all keys but none alone")
    with paused_gc():
        index = decode_index(data, label)
    if index.arch != arch:
        raise RepoError(label, f"index is for {index.arch}, not {arch}")
    return index, signer


async def ask_for_key(
    session: aiohttp.ClientSession,
    urls: Sequence[str],
    key: str,
    *,
    answer_within: float = 1.0,
) -> Substitute | None:
    """A package built with ``key`` from the first cache (in ``urls`` order) that has one.

    Asks every cache at once but prefers the earlier: a cache that answers 404, nothing
    within ``answer_within`` seconds, or anything malformed counts as not having it. The
    answer is unsigned, so the ``Substitute`` carries the ``.minisig`` URL to verify.
    """
    if not _KEY.fullmatch(key):
        raise ValueError(f"not a build key: {key!r}")
    tasks = [asyncio.create_task(_ask(session, base, key, answer_within)) for base in _bases(urls)]
    try:
        for task in tasks:
            found = await task
            if found is not None:
                return found
        return None
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _ask(
    session: aiohttp.ClientSession, base: str, key: str, answer_within: float
) -> Substitute | None:
    if urlsplit(base).scheme not in _SCHEMES:
        return None
    try:
        query = f"{base}/api/v1/keys/{key}"
        body = await get_bytes(session, query, MAX_ANSWER_BYTES, lan_limits(answer_within))
        answer = json.loads(body)
    except (Unavailable, ValueError):
        return None
    if not isinstance(answer, dict):
        return None
    entry = _entry_from_json(answer.get("package"))
    if entry is None or entry.meta.build_key != key or entry.file != entry.meta.filename:
        return None  # the file name binds name, version, release, arch and the key's prefix
    url = _resolve(base, answer.get("url"), entry.file)
    signature_url = _resolve(base, answer.get("signature"), entry.file + SIG_SUFFIX)
    if url is None or signature_url is None:
        return None
    return Substitute(base, entry, url, signature_url)


def _entry_from_json(raw: object) -> IndexEntry | None:
    try:
        return entry_from_map(raw)
    except ValueError:
        return None


def _resolve(base: str, reference: object, name: str) -> str | None:
    """``reference`` made absolute against ``base``, if it is an http(s) URL of ``name``."""
    if not isinstance(reference, str):
        return None
    url = urljoin(base + "/", reference)
    parts = urlsplit(url)
    if parts.scheme not in _SCHEMES or unquote(parts.path.rpartition("/")[2]) != name:
        return None
    return url


def _index_url(base: str, arch: str) -> str:
    return f"{base}/repo/{arch}/{INDEX_NAME}"


def _bases(urls: Sequence[str]) -> list[str]:
    """Base URLs without a trailing slash, each once, in order."""
    return list(dict.fromkeys(url.rstrip("/") for url in urls))
