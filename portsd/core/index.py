"""The repository index: what a repository serves, as a value, and its byte encoding.

Pure: values in, values out. No files, no clock (callers pass ``now`` in unix seconds).

On the wire an index is a zstd frame (with checksum) holding one msgpack map::

    {format, arch, serial, generated, expires, commit, packages: [entry, ...]}

and each entry a map ``{name, version, release, arch, key, file, size, sha256, summary,
license, depends, provides, conflicts, installed_size}``. Maps are written with their keys
in that fixed order and packages sorted by name, so equal indexes encode to equal bytes.
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

from portsd.core.recipe import NAME_PATTERN
from portsd.core.version import VERSION_PATTERN
from portsd.errors import IndexExpired, RepoError, RollbackDetected

FORMAT = 1
"""The index format this module writes and reads; bumped on an incompatible change."""

MAX_INDEX_BYTES = 256 << 20
"""Refuse to inflate an index past this: a tiny hostile frame must not exhaust memory."""

_ZSTD_LEVEL = 3  # rewritten per publish; the bulk is hex digests, which no level shrinks
_HEX64 = re.compile(r"[0-9a-f]{64}")
ARCH_PATTERN = re.compile(r"[a-z0-9][a-z0-9_]*")
"""An architecture name (``x86_64``, ``aarch64``, ``any``): also a directory name."""

_TOKEN = re.compile(r"\S+")
_INT_MAX = (1 << 63) - 1
_CHUNK = 1 << 16


class _Invalid(ValueError):
    """A field holds a value no index may contain; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


def _check_int(field: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(field, f"expected an integer, got {_kind(value)}")
    if not 0 <= value <= _INT_MAX:
        raise _Invalid(field, f"out of range: {value}")


def _check_str(field: str, value: object, pattern: re.Pattern[str] | None = None) -> None:
    if not isinstance(value, str):
        raise _Invalid(field, f"expected a string, got {_kind(value)}")
    if pattern is not None and not pattern.fullmatch(value):
        raise _Invalid(field, f"invalid value {value!r}")


def _check_names(field: str, value: object) -> None:
    if not isinstance(value, tuple):
        raise _Invalid(field, f"expected a list of strings, got {_kind(value)}")
    for item in value:
        if not isinstance(item, str) or not _TOKEN.fullmatch(item):
            raise _Invalid(field, f"invalid item {item!r}")


def _check_file(field: str, value: object) -> None:
    _check_str(field, value)
    assert isinstance(value, str)
    # a bare, visible file name: clients join it to a URL or a directory
    if not value or value.startswith(".") or "/" in value or "\0" in value or len(value) > 255:
        raise _Invalid(field, f"not a plain file name: {value!r}")


def _check_meta(meta: PackageMeta | IndexEntry) -> None:
    _check_str("name", meta.name, NAME_PATTERN)
    _check_str("version", meta.version, VERSION_PATTERN)
    _check_int("release", meta.release)
    _check_str("arch", meta.arch, ARCH_PATTERN)
    _check_str("key", meta.key, _HEX64)
    _check_str("summary", meta.summary)
    _check_str("license", meta.license)
    _check_names("depends", meta.depends)
    _check_names("provides", meta.provides)
    _check_names("conflicts", meta.conflicts)
    _check_int("installed_size", meta.installed_size)


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


@dataclass(frozen=True, slots=True)
class PackageMeta:
    """What a package says about itself; with its file's name, size and hash, an entry."""

    name: str
    version: str
    release: int
    arch: str
    key: str
    summary: str = ""
    license: str = ""
    depends: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    installed_size: int = 0

    def __post_init__(self) -> None:
        _check_meta(self)

    @property
    def filename(self) -> str:
        """``<name>-<version>-<release>-<arch>-<key12>.pkg.tar.zst``: a rebuild gets a new name."""
        return f"{self.name}-{self.version}-{self.release}-{self.arch}-{self.key[:12]}.pkg.tar.zst"


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One package of an index: its metadata and the file holding it (in ``packages/``)."""

    name: str
    version: str
    release: int
    arch: str
    key: str
    file: str
    size: int
    sha256: str
    summary: str = ""
    license: str = ""
    depends: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    installed_size: int = 0

    def __post_init__(self) -> None:
        _check_meta(self)
        _check_file("file", self.file)
        _check_int("size", self.size)
        _check_str("sha256", self.sha256, _HEX64)

    @classmethod
    def of(cls, meta: PackageMeta, file: str, size: int, sha256: str) -> IndexEntry:
        """The entry for ``meta`` stored as ``file`` (``size`` bytes, ``sha256``)."""
        return cls(
            name=meta.name,
            version=meta.version,
            release=meta.release,
            arch=meta.arch,
            key=meta.key,
            file=file,
            size=size,
            sha256=sha256,
            summary=meta.summary,
            license=meta.license,
            depends=meta.depends,
            provides=meta.provides,
            conflicts=meta.conflicts,
            installed_size=meta.installed_size,
        )

    @property
    def meta(self) -> PackageMeta:
        return PackageMeta(
            name=self.name,
            version=self.version,
            release=self.release,
            arch=self.arch,
            key=self.key,
            summary=self.summary,
            license=self.license,
            depends=self.depends,
            provides=self.provides,
            conflicts=self.conflicts,
            installed_size=self.installed_size,
        )


_ENTRY_FIELDS = (
    "name",
    "version",
    "release",
    "arch",
    "key",
    "file",
    "size",
    "sha256",
    "summary",
    "license",
    "depends",
    "provides",
    "conflicts",
    "installed_size",
)
_LIST_FIELDS = frozenset({"depends", "provides", "conflicts"})


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
        _check_int("format", self.format)
        _check_str("arch", self.arch, ARCH_PATTERN)
        _check_int("serial", self.serial)
        _check_int("generated", self.generated)
        _check_int("expires", self.expires)
        if self.commit is not None:
            _check_str("commit", self.commit)
        if not isinstance(self.packages, tuple):
            raise _Invalid("packages", f"expected a tuple, got {_kind(self.packages)}")
        previous = ""
        arches = (self.arch, "any")
        for position, entry in enumerate(self.packages):
            # this loop runs once per entry of every index read: its words only on failure
            if not isinstance(entry, IndexEntry):
                raise _Invalid(f"packages[{position}]", f"expected an entry, got {_kind(entry)}")
            if entry.name <= previous:
                raise _Invalid(
                    f"packages[{position}].name", f"'{entry.name}' is out of order or repeated"
                )
            if entry.arch not in arches:
                raise _Invalid(
                    f"packages[{position}].arch",
                    f"'{entry.arch}' in an index for {self.arch} (top-level 'arch')",
                )
            previous = entry.name

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
        return tuple(entry.name for entry in self.packages)

    def entry(self, name: str) -> IndexEntry | None:
        """The entry named ``name`` (binary search), or None."""
        position = bisect.bisect_left(self.packages, name, key=lambda entry: entry.name)
        if position < len(self.packages) and self.packages[position].name == name:
            return self.packages[position]
        return None

    def by_key(self, key: str) -> IndexEntry | None:
        """The entry built with build key ``key``, or None."""
        return next((entry for entry in self.packages if entry.key == key), None)


def with_entry(index: Index, entry: IndexEntry) -> Index:
    """``index`` with ``entry`` added, replacing any entry of the same name."""
    names = [existing.name for existing in index.packages]
    position = bisect.bisect_left(names, entry.name)
    end = position + 1 if position < len(names) and names[position] == entry.name else position
    packages = (*index.packages[:position], entry, *index.packages[end:])
    return replace(index, packages=packages)


def without(index: Index, names: Collection[str]) -> Index:
    """``index`` without the entries named in ``names`` (names it lacks are ignored)."""
    return replace(index, packages=tuple(e for e in index.packages if e.name not in names))


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


_entry_values = operator.attrgetter(*_ENTRY_FIELDS)


def _entry_map(entry: IndexEntry) -> dict[str, Any]:
    # msgpack packs tuples as arrays: no conversion needed (the index is re-encoded per publish)
    return dict(zip(_ENTRY_FIELDS, _entry_values(entry), strict=True))


def _index_map(index: Index) -> dict[str, Any]:
    return {
        "format": index.format,
        "arch": index.arch,
        "serial": index.serial,
        "generated": index.generated,
        "expires": index.expires,
        "commit": index.commit,
        "packages": [_entry_map(entry) for entry in index.packages],
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
        raise RepoError(label, f"index is not a map but {_kind(raw)}")
    try:
        index_format = _field(raw, "format", "")
        _check_int("format", index_format)
        if index_format != FORMAT:
            raise _Invalid("format", f"unsupported index format {index_format} (reads {FORMAT})")
        packages = _field(raw, "packages", "")
        if not isinstance(packages, tuple):
            raise _Invalid("packages", f"expected a list, got {_kind(packages)}")
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
    except _Invalid as error:
        raise RepoError(label, f"bad index field '{error.field}': {error.message}") from None


def encode_entry(entry: IndexEntry) -> bytes:
    """One entry alone, as msgpack (the repository's record of every package it built)."""
    return msgpack.packb(_entry_map(entry))


def decode_entry(data: bytes, label: str) -> IndexEntry:
    """Parse ``encode_entry``'s bytes; ``RepoError`` names ``label`` and the bad field."""
    try:
        return _EntryReader().read(_unpack(data, label), None)
    except _Invalid as error:
        raise RepoError(label, f"bad entry field '{error.field}': {error.message}") from None


_entry_items = operator.itemgetter(*_ENTRY_FIELDS)


class _Unfrozen:
    """``IndexEntry``'s very layout, writable: filled, then made an ``IndexEntry`` by
    assigning ``__class__`` (which Python allows between equal slot layouts). Four times
    cheaper than setting a frozen instance's fourteen slots one call at a time."""

    __slots__ = IndexEntry.__slots__


_STRINGS_OK = re.compile(
    f"(?:{NAME_PATTERN.pattern})\0(?:{VERSION_PATTERN.pattern})\0"
    f"(?:{_HEX64.pattern})\0(?:{_HEX64.pattern})\0"
    r"[^./\0][^/\0]{0,254}"  # _check_file: not empty or hidden, no '/' or NUL, <= 255
).fullmatch
"""name, version, key, sha256 and file joined by NULs, which none of them may hold: one
match instead of five (a call costs more than the characters it reads)."""
_token_ok = _TOKEN.fullmatch
_arch_ok = ARCH_PATTERN.fullmatch


class _EntryReader:
    """Makes ``IndexEntry``s from unpacked maps, for one index.

    The fast path checks every field as ``IndexEntry.__post_init__`` does, inline, then
    fills the slots directly: about four times cheaper than the constructor. An entry it
    does not accept goes through the constructor, which names the bad field. Tokens and
    arches already accepted are remembered for the index being read: a few hundred names
    (``musl``, ``sh``) recur thousands of times.
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
        """Whether ``IndexEntry(*values)`` would accept them (False: it may or may not)."""
        (name, version, release, arch, key, file, size, sha256, summary, license_) = values[:10]
        depends, provides, conflicts, installed_size = values[10:]
        return (
            type(name) is str
            and type(version) is str
            and type(key) is str
            and type(sha256) is str
            and type(file) is str
            and _STRINGS_OK(f"{name}\0{version}\0{key}\0{sha256}\0{file}") is not None
            and type(release) is int
            and 0 <= release <= _INT_MAX
            and type(size) is int
            and 0 <= size <= _INT_MAX
            and type(installed_size) is int
            and 0 <= installed_size <= _INT_MAX
            and type(summary) is str
            and type(license_) is str
            and type(arch) is str
            and (arch in self.arches or self.new_arch(arch))
            and self.tokens_ok(depends)
            and self.tokens_ok(provides)
            and self.tokens_ok(conflicts)
        )

    def new_arch(self, arch: str) -> bool:
        if _arch_ok(arch) is None:
            return False
        self.arches.add(arch)
        return True

    def tokens_ok(self, items: object) -> bool:
        if type(items) is not tuple:
            return False
        tokens = self.tokens
        for item in items:
            if type(item) is not str:
                return False
            if item not in tokens:
                if _token_ok(item) is None:
                    return False
                tokens.add(item)
        return True


def _trusted_entry(values: tuple[Any, ...]) -> IndexEntry:
    """The entry of ``values`` (in ``_ENTRY_FIELDS`` order), already checked."""
    entry: Any = _Unfrozen()
    (
        entry.name,
        entry.version,
        entry.release,
        entry.arch,
        entry.key,
        entry.file,
        entry.size,
        entry.sha256,
        entry.summary,
        entry.license,
        entry.depends,
        entry.provides,
        entry.conflicts,
        entry.installed_size,
    ) = values
    entry.__class__ = IndexEntry
    return cast(IndexEntry, entry)


def _entry_from_map(raw: object, where: str) -> IndexEntry:
    """The slow path: an entry through its constructor, or the first bad field, named."""
    if not isinstance(raw, dict):
        raise _Invalid(where or "entry", f"expected a map, got {_kind(raw)}")
    prefix = f"{where}." if where else ""
    name = raw.get("name")
    if isinstance(name, str) and where:
        prefix = f"{where}({name})."
    values: dict[str, Any] = {}
    for field in _ENTRY_FIELDS:
        value = _field(raw, field, prefix)
        if field in _LIST_FIELDS and not isinstance(value, tuple):
            raise _Invalid(prefix + field, f"expected a list of strings, got {_kind(value)}")
        values[field] = value
    try:
        return IndexEntry(**values)
    except _Invalid as error:
        raise _Invalid(prefix + error.field, error.message) from None


def _field(raw: dict[str, Any], name: str, prefix: str) -> Any:
    if name not in raw:
        raise _Invalid(prefix + name, "missing")
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
        return msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=False)
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        raise RepoError(label, f"not valid msgpack: {error}") from None
