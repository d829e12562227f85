"""The repository index: what a repository serves, as a value, and its byte encoding.

Pure: values in, values out. No files, no clock (callers pass ``now`` in unix seconds).

On the wire an index is a zstd frame (with checksum) holding one msgpack map::

    {format, arch, serial, generated, expires, commit, packages: [entry, ...]}

and each entry a map ``{name, version, release, arch, key, file, size, sha256, content,
summary, license, depends, provides, conflicts, installed_size, sonames}``: the package's
facts (``portsd.core.metadata``, the build key under ``key``), the file holding it, and
its content id (``content``: the digest of its file manifest, what its dependents' keys
contain, so a client computes keys from a ports checkout and an index). Maps are
written with their keys in that fixed order and packages sorted by name, so equal indexes
encode to equal bytes. The same map is an entry's record in a repository's key store and
the substituter's JSON answer.
Readers ignore keys they do not know (a newer writer may add some) and reject anything
else that is not exactly right, naming the field.

``serial`` grows by one with every index a repository writes, including a re-signing with
a new expiry, so one serial always means one set of bytes; ``check_fresh`` is the client's
guard against being served an older (rollback) or stale (freeze) index.
"""

from __future__ import annotations

import bisect
import operator
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass, replace
from typing import Any, cast

import msgpack
import zstandard

from portsd.core.linkage import SONAME_PATTERN
from portsd.core.metadata import ARCH_PATTERN as ARCH_PATTERN  # the repository's too
from portsd.core.metadata import (
    HEX64,
    INT_MAX,
    InvalidField,
    MetaLayout,
    PackageMeta,
    check_int,
    check_str,
    is_dependency,
    kind,
    unpack,
)
from portsd.core.recipe import NAME_PATTERN
from portsd.core.version import VERSION_PATTERN
from portsd.errors import IndexExpired, RepoError, RollbackDetected

FORMAT = 3
"""The index format this module writes and reads; bumped on an incompatible change
(2: ``sonames``; 3: ``content``)."""

MAX_INDEX_BYTES = 256 << 20
"""Refuse to inflate an index past this: a tiny hostile frame must not exhaust memory."""

_ZSTD_LEVEL = 3  # rewritten per publish; the bulk is hex digests, which no level shrinks
_CHUNK = 1 << 16


def _check_file(field: str, value: object) -> None:
    check_str(field, value)
    assert isinstance(value, str)
    # a bare, visible file name: clients join it to a URL or a directory
    if not value or value.startswith(".") or "/" in value or "\0" in value or len(value) > 255:
        raise InvalidField(field, f"not a plain file name: {value!r}")


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One package of an index: its facts, the file holding it (in ``packages/``) and
    its content id (``portsd.pkg.archive.content_id`` of its files)."""

    meta: PackageMeta
    file: str
    size: int
    sha256: str
    content: str

    def __post_init__(self) -> None:
        if not isinstance(self.meta, PackageMeta):
            raise InvalidField("meta", f"expected package metadata, got {kind(self.meta)}")
        _check_file("file", self.file)
        check_int("size", self.size)
        check_str("sha256", self.sha256, HEX64)
        check_str("content", self.content, HEX64)


ENTRY_LAYOUT = MetaLayout(
    (
        "name",
        "version",
        "release",
        "arch",
        "key",
        "file",
        "size",
        "sha256",
        "content",
        "summary",
        "license",
        "depends",
        "provides",
        "conflicts",
        "installed_size",
        "sonames",
    ),
    build_key="key",
)
"""An entry's map: the package's facts, the build key as ``key``, and the file."""


@dataclass(frozen=True, slots=True)
class Index:
    """A repository's catalogue at one serial; ``packages`` sorted by name, names unique."""

    format: int
    arch: str
    serial: int
    generated: int
    expires: int
    commit: str | None
    packages: tuple[IndexEntry, ...] = ()

    def __post_init__(self) -> None:
        check_int("format", self.format)
        check_str("arch", self.arch, ARCH_PATTERN)
        check_int("serial", self.serial)
        check_int("generated", self.generated)
        check_int("expires", self.expires)
        if self.commit is not None:
            check_str("commit", self.commit)
        if not isinstance(self.packages, tuple):
            raise InvalidField("packages", f"expected a tuple, got {kind(self.packages)}")
        previous = ""
        arches = (self.arch, "any")
        for position, entry in enumerate(self.packages):
            # this loop runs once per entry of every index read: its words only on failure
            if not isinstance(entry, IndexEntry):
                raise InvalidField(f"packages[{position}]", f"expected an entry, got {kind(entry)}")
            meta = entry.meta
            if meta.name <= previous:
                raise InvalidField(
                    f"packages[{position}].name", f"'{meta.name}' is out of order or repeated"
                )
            if meta.arch not in arches:
                raise InvalidField(
                    f"packages[{position}].arch",
                    f"'{meta.arch}' in an index for {self.arch} (top-level 'arch')",
                )
            previous = meta.name

    @classmethod
    def empty(cls, arch: str, *, now: int, expires_in: int, commit: str | None = None) -> Index:
        """The first index of a new repository (serial 1, no packages)."""
        return cls(FORMAT, arch, 1, now, now + expires_in, commit)

    def __iter__(self) -> Iterator[IndexEntry]:
        return iter(self.packages)

    def __len__(self) -> int:
        return len(self.packages)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.entry(name) is not None

    def names(self) -> tuple[str, ...]:
        return tuple(entry.meta.name for entry in self.packages)

    def entry(self, name: str) -> IndexEntry | None:
        """The entry named ``name`` (binary search), or None."""
        position = bisect.bisect_left(self.packages, name, key=lambda entry: entry.meta.name)
        if position < len(self.packages) and self.packages[position].meta.name == name:
            return self.packages[position]
        return None

    def by_key(self, key: str) -> IndexEntry | None:
        """The entry built with build key ``key``, or None."""
        return next((entry for entry in self.packages if entry.meta.build_key == key), None)


def with_entry(index: Index, entry: IndexEntry) -> Index:
    """``index`` with ``entry`` added, replacing any entry of the same name."""
    names = [existing.meta.name for existing in index.packages]
    position = bisect.bisect_left(names, entry.meta.name)
    end = position + 1 if position < len(names) and names[position] == entry.meta.name else position
    packages = (*index.packages[:position], entry, *index.packages[end:])
    return replace(index, packages=packages)


def without(index: Index, names: Collection[str]) -> Index:
    """``index`` without the entries named in ``names`` (names it lacks are ignored)."""
    return replace(index, packages=tuple(e for e in index.packages if e.meta.name not in names))


def successor(index: Index, *, now: int, expires_in: int, commit: str | None) -> Index:
    """The next index to publish after ``index``: serial + 1, generated now."""
    return replace(
        index,
        format=FORMAT,
        serial=index.serial + 1,
        generated=now,
        expires=now + expires_in,
        commit=commit,
    )


def check_fresh(index: Index, *, last_serial: int | None, now: int, label: str) -> None:
    """Refuse an index older than one already seen, or past its expiry (both fail closed).

    The same serial again is fine: a repository never signs two indexes with one serial.
    """
    if last_serial is not None and index.serial < last_serial:
        raise RollbackDetected(
            label, f"index serial {index.serial} is lower than {last_serial}, already seen"
        )
    if now >= index.expires:
        raise IndexExpired(
            label,
            f"index serial {index.serial} expired at {index.expires} ({now - index.expires}s ago)",
        )


# -- encoding ------------------------------------------------------------------------------


def entry_map(entry: IndexEntry) -> dict[str, Any]:
    """``entry`` as the map an index holds (tuples for lists: msgpack and json take both)."""
    return ENTRY_LAYOUT.encode(entry.meta, (entry.file, entry.size, entry.sha256, entry.content))


def entry_from_map(raw: object) -> IndexEntry:
    """The entry of a map written by ``entry_map`` (lists may be lists or tuples); raises
    ``InvalidField`` naming the first bad field."""
    return _entry_from_map(raw, "")


def _index_map(index: Index) -> dict[str, Any]:
    return {
        "format": index.format,
        "arch": index.arch,
        "serial": index.serial,
        "generated": index.generated,
        "expires": index.expires,
        "commit": index.commit,
        "packages": [entry_map(entry) for entry in index.packages],
    }


def encode_index(index: Index) -> bytes:
    """The index file's bytes: deterministic for equal indexes."""
    payload = msgpack.packb(_index_map(index))
    compressor = zstandard.ZstdCompressor(
        level=_ZSTD_LEVEL, write_checksum=True, write_content_size=True
    )
    return compressor.compress(payload)


def decode_index(data: bytes, label: str, *, max_bytes: int = MAX_INDEX_BYTES) -> Index:
    """Parse an index file; ``RepoError`` names ``label`` and the first bad field.

    An index that inflates past ``max_bytes`` is refused before it is all in memory.
    Every field of every entry is checked exactly as constructing the records checks it.
    """
    return _index_from_map(_unpack(_decompress(data, label, max_bytes), label), label)


def _index_from_map(raw: object, label: str) -> Index:
    if not isinstance(raw, dict):
        raise RepoError(label, f"index is not a map but {kind(raw)}")
    try:
        index_format = _field(raw, "format", "")
        check_int("format", index_format)
        if index_format != FORMAT:
            raise InvalidField(
                "format", f"unsupported index format {index_format} (reads {FORMAT})"
            )
        packages = _field(raw, "packages", "")
        if not isinstance(packages, tuple):
            raise InvalidField("packages", f"expected a list, got {kind(packages)}")
        read = _EntryReader().read
        entries = tuple([read(item, n) for n, item in enumerate(packages)])
        return Index(
            format=index_format,
            arch=_field(raw, "arch", ""),
            serial=_field(raw, "serial", ""),
            generated=_field(raw, "generated", ""),
            expires=_field(raw, "expires", ""),
            commit=_field(raw, "commit", ""),
            packages=entries,
        )
    except InvalidField as error:
        raise RepoError(label, f"bad index field '{error.field}': {error.message}") from None


def encode_entry(entry: IndexEntry) -> bytes:
    """One entry alone, as msgpack (the repository's record of every package it built)."""
    return msgpack.packb(entry_map(entry))


def decode_entry(data: bytes, label: str) -> IndexEntry:
    """Parse ``encode_entry``'s bytes; ``RepoError`` names ``label`` and the bad field."""
    try:
        return _EntryReader().read(_unpack(data, label), None)
    except InvalidField as error:
        raise RepoError(label, f"bad entry field '{error.field}': {error.message}") from None


_entry_items = operator.itemgetter(*ENTRY_LAYOUT.keys)


class _UnfrozenMeta:
    """``PackageMeta``'s very layout, writable: filled, then made a ``PackageMeta`` by
    assigning ``__class__`` (which Python allows between equal slot layouts). Four times
    cheaper than setting a frozen instance's slots one call at a time."""

    __slots__ = PackageMeta.__slots__


class _UnfrozenEntry:
    """``IndexEntry``'s layout, writable, likewise."""

    __slots__ = IndexEntry.__slots__


_STRINGS_OK = re.compile(
    f"(?:{NAME_PATTERN.pattern})\0(?:{VERSION_PATTERN.pattern})\0"
    f"(?:{HEX64.pattern})\0(?:{HEX64.pattern})\0(?:{HEX64.pattern})\0"
    r"[^./\0][^/\0]{0,254}"  # _check_file: not empty or hidden, no '/' or NUL, <= 255
).fullmatch
"""name, version, key, sha256, content and file joined by NULs, which none of them may hold:
one match instead of six (a call costs more than the characters it reads)."""
_arch_ok = ARCH_PATTERN.fullmatch
_soname_ok = SONAME_PATTERN.fullmatch


class _EntryReader:
    """Makes ``IndexEntry``s from unpacked maps, for one index.

    The fast path checks every field as constructing the records does (``check_meta``
    and ``IndexEntry.__post_init__``), inline, then fills the slots directly: about four
    times cheaper than the constructors. An entry it does not accept goes through the
    constructors, which name the bad field. Dependency strings and arches already accepted
    are remembered for the index being read: a few hundred names (``musl``, ``sh``) recur
    thousands of times.
    """

    def __init__(self) -> None:
        self.tokens: set[str] = set()
        self.arches: set[str] = set()

    def read(self, raw: object, position: int | None) -> IndexEntry:
        if type(raw) is dict:
            try:
                values = _entry_items(raw)
            except KeyError:
                pass  # the slow path says which one is missing
            else:
                if self.valid(values):
                    return _trusted_entry(values)
        return _entry_from_map(raw, "" if position is None else f"packages[{position}]")

    def valid(self, values: tuple[Any, ...]) -> bool:
        """Whether the entry of ``values`` would be accepted (False: it may or may not)."""
        (name, version, release, arch, key, file, size, sha256, content) = values[:9]
        summary, license_, depends, provides, conflicts, installed_size, sonames = values[9:]
        return (
            type(name) is str
            and type(version) is str
            and type(key) is str
            and type(sha256) is str
            and type(file) is str
            and type(content) is str
            and _STRINGS_OK(f"{name}\0{version}\0{key}\0{sha256}\0{content}\0{file}") is not None
            and type(release) is int
            and 0 <= release <= INT_MAX
            and type(size) is int
            and 0 <= size <= INT_MAX
            and type(installed_size) is int
            and 0 <= installed_size <= INT_MAX
            and type(summary) is str
            and type(license_) is str
            and type(arch) is str
            and (arch in self.arches or self.new_arch(arch))
            and self.dependencies_ok(depends)
            and self.dependencies_ok(provides)
            and self.dependencies_ok(conflicts)
            and self.sonames_ok(sonames)
        )

    def new_arch(self, arch: str) -> bool:
        if _arch_ok(arch) is None:
            return False
        self.arches.add(arch)
        return True

    def dependencies_ok(self, items: object) -> bool:
        if type(items) is not tuple:
            return False
        tokens = self.tokens
        for item in items:
            if type(item) is not str:
                return False
            if item not in tokens:
                if not is_dependency(item):
                    return False
                tokens.add(item)
        return True

    def sonames_ok(self, items: object) -> bool:
        if type(items) is not tuple:
            return False
        previous = ""
        for item in items:
            if type(item) is not str or item <= previous or _soname_ok(item) is None:
                return False
            previous = item
        return True


def _trusted_entry(values: tuple[Any, ...]) -> IndexEntry:
    """The entry of ``values`` (in ``ENTRY_LAYOUT.keys`` order), already checked."""
    meta: Any = _UnfrozenMeta()
    entry: Any = _UnfrozenEntry()
    (
        meta.name,
        meta.version,
        meta.release,
        meta.arch,
        meta.build_key,
        entry.file,
        entry.size,
        entry.sha256,
        entry.content,
        meta.summary,
        meta.license,
        meta.depends,
        meta.provides,
        meta.conflicts,
        meta.installed_size,
        meta.sonames,
    ) = values
    meta.__class__ = PackageMeta
    entry.meta = meta
    entry.__class__ = IndexEntry
    return cast(IndexEntry, entry)


def _entry_from_map(raw: object, where: str) -> IndexEntry:
    """The slow path: an entry through its constructors, or the first bad field, named."""
    if not isinstance(raw, dict):
        raise InvalidField(where or "entry", f"expected a map, got {kind(raw)}")
    prefix = f"{where}." if where else ""
    name = raw.get("name")
    if isinstance(name, str) and where:
        prefix = f"{where}({name})."
    try:
        meta = ENTRY_LAYOUT.decode(raw)
        own = {key: _field(raw, key, "") for key in ("file", "size", "sha256", "content")}
        return IndexEntry(meta, **own)
    except InvalidField as error:
        raise InvalidField(prefix + error.field, error.message) from None


def _field(raw: dict[str, Any], name: str, prefix: str) -> Any:
    if name not in raw:
        raise InvalidField(prefix + name, "missing")
    return raw[name]


def _decompress(data: bytes, label: str, max_bytes: int) -> bytes:
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        chunks: list[bytes] = []
        total = 0
        while chunk := reader.read(_CHUNK):
            total += len(chunk)
            if total > max_bytes:
                raise RepoError(label, f"index inflates past {max_bytes} bytes")
            chunks.append(chunk)
    except zstandard.ZstdError as error:
        raise RepoError(label, f"index is not valid zstd: {error}") from None
    return b"".join(chunks)


def _unpack(payload: bytes, label: str) -> Any:
    try:
        # tuples, not lists: what the records hold, so nothing is converted
        return unpack(payload, use_list=False)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise RepoError(label, f"not valid msgpack: {error}") from None
