"""A package's own facts: one record, one check and one encoding wherever they are carried.

``PackageMeta`` is what a package says about itself, from its recipe and its build key.
Records that say more embed it: a package's manifest (``.PORTINFO``,
``portsd.pkg.package.PortInfo``) adds its files; an index entry (``portsd.core.index``)
adds the file that holds it; the installed-package database (``portsd.client.db``) adds
when, why and from where it was installed. The resolvers read it alone.

A ``PackageMeta`` is checked when it is made, so one that exists is well formed: names,
versions and dependency strings as recipes write them, a lower-case architecture (it is a
directory name too), a build key of 64 hex digits, integers that fit in 63 bits. Failures
raise ``InvalidField`` naming the field; whoever decodes bytes turns that into its own
error with the file's name.

On disk the facts are msgpack maps laid out by a ``MetaLayout``: the same keys in the
package manifest and the index, except that the index calls the build key ``key``, each
format in its own key order. Both are contracts whose bytes are signed and hashed, so
their layouts are fixed (and pinned by tests).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import msgpack

from portsd.core.linkage import SONAME_PATTERN
from portsd.core.recipe import DEPENDENCY_PATTERN, NAME_PATTERN, Recipe
from portsd.core.version import VERSION_PATTERN, full_version

PACKAGE_SUFFIX = ".pkg.tar.zst"
ARCH_PATTERN = re.compile(r"[a-z0-9][a-z0-9_]*")
"""An architecture name (``x86_64``, ``aarch64``, ``any``): also a directory name."""
HEX64 = re.compile(r"[0-9a-f]{64}")
"""A sha256 in hex: a build key, a file's digest."""
INT_MAX = (1 << 63) - 1
"""The largest integer a record holds (msgpack and sqlite both keep it exactly)."""


class InvalidField(ValueError):
    """A field holds a value no record may contain; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True, slots=True)
class PackageMeta:
    """What a package says about itself: checked on construction (``check_meta``).

    ``depends``, ``provides`` and ``conflicts`` are dependency strings as recipes write
    them (``zlib>=1.3``, ``sh=1.0``); ``installed_size`` is the sum of the sizes of the
    package's regular files and ``sonames`` the sorted sonames of its public shared
    libraries (``portsd.core.linkage.provided_sonames``), both unknown (0, none) until it
    is built.
    """

    name: str
    version: str
    release: int
    arch: str
    build_key: str
    summary: str = ""
    license: str = ""
    depends: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()
    conflicts: tuple[str, ...] = ()
    installed_size: int = 0
    sonames: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_meta(self)

    @classmethod
    def of(cls, recipe: Recipe, build_key: str, arch: str) -> PackageMeta:
        """What building ``recipe`` for ``arch`` with ``build_key`` makes (size unknown)."""
        return cls(
            name=recipe.name,
            version=recipe.version,
            release=recipe.release,
            arch=arch,
            build_key=build_key,
            summary=recipe.summary,
            license=recipe.license,
            depends=tuple(str(dep) for dep in recipe.depends),
            provides=tuple(str(entry) for entry in recipe.provides),
            conflicts=tuple(str(entry) for entry in recipe.conflicts),
        )

    @property
    def full_version(self) -> str:
        """``version-release``, what dependency constraints compare against."""
        return full_version(self.version, self.release)

    @property
    def filename(self) -> str:
        """``<name>-<version>-<release>-<arch>-<key12>.pkg.tar.zst``: a rebuild gets a new name."""
        return (
            f"{self.name}-{self.version}-{self.release}-{self.arch}-{self.build_key[:12]}"
            f"{PACKAGE_SUFFIX}"
        )


FACTS = tuple(spec.name for spec in fields(PackageMeta))
"""The fields of ``PackageMeta``, in order."""
LIST_FACTS = frozenset({"depends", "provides", "conflicts", "sonames"})


# -- the check -------------------------------------------------------------------------------


def check_meta(meta: PackageMeta) -> None:
    """Raise ``InvalidField`` for the first field of ``meta`` that is not well formed."""
    check_str("name", meta.name, NAME_PATTERN)
    check_str("version", meta.version, VERSION_PATTERN)
    check_int("release", meta.release)
    check_str("arch", meta.arch, ARCH_PATTERN)
    check_str("build_key", meta.build_key, HEX64)
    check_str("summary", meta.summary)
    check_str("license", meta.license)
    check_dependencies("depends", meta.depends)
    check_dependencies("provides", meta.provides)
    check_dependencies("conflicts", meta.conflicts)
    check_int("installed_size", meta.installed_size)
    check_sonames("sonames", meta.sonames)


def check_int(field: str, value: object) -> None:
    """A non-negative integer that fits in 63 bits (a bool is not an integer here)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidField(field, f"expected an integer, got {kind(value)}")
    if not 0 <= value <= INT_MAX:
        raise InvalidField(field, f"out of range: {value}")


def check_str(field: str, value: object, pattern: re.Pattern[str] | None = None) -> None:
    """A string, matching ``pattern`` in full when one is given."""
    if not isinstance(value, str):
        raise InvalidField(field, f"expected a string, got {kind(value)}")
    if pattern is not None and not pattern.fullmatch(value):
        raise InvalidField(field, f"invalid value {value!r}")


def check_dependencies(field: str, value: object) -> None:
    """A tuple of dependency strings (``name[op version]``)."""
    if not isinstance(value, tuple):
        raise InvalidField(field, f"expected a list of strings, got {kind(value)}")
    for item in value:
        if not is_dependency(item):
            raise InvalidField(field, f"invalid item {item!r}")


def check_sonames(field: str, value: object) -> None:
    """A sorted tuple of distinct sonames (plain file names)."""
    if not isinstance(value, tuple):
        raise InvalidField(field, f"expected a list of strings, got {kind(value)}")
    for item in value:
        if not isinstance(item, str) or SONAME_PATTERN.fullmatch(item) is None:
            raise InvalidField(field, f"invalid soname {item!r}")
    if list(value) != sorted(set(value)):
        raise InvalidField(field, "not sorted and distinct")


def is_dependency(item: object) -> bool:
    """Whether ``item`` is a dependency string as a recipe would write it."""
    return isinstance(item, str) and DEPENDENCY_PATTERN.fullmatch(item) is not None


def kind(value: object) -> str:
    """The type of ``value``, for messages."""
    return "nothing" if value is None else type(value).__name__


# -- the encoding ----------------------------------------------------------------------------


class MetaLayout:
    """How one format writes a package's facts into a map.

    ``keys`` are the format's keys in the order it writes them, its own keys (the
    container's fields) among the facts; ``build_key`` is its key for the build key.
    """

    __slots__ = ("keys", "own", "_wire", "_facts", "_order")

    def __init__(self, keys: Sequence[str], build_key: str) -> None:
        self.keys = tuple(keys)
        self._wire = {fact: build_key if fact == "build_key" else fact for fact in FACTS}
        missing = set(self._wire.values()) - set(self.keys)
        assert not missing, f"a layout without {sorted(missing)}"
        self.own = tuple(key for key in self.keys if key not in self._wire.values())
        """The container's keys, in order."""
        # encode() lines up the facts, then the container's values, and picks them in
        # the format's order: two C calls per map (an index encodes thousands of them)
        position = {self._wire[fact]: n for n, fact in enumerate(FACTS)}
        position.update({key: len(FACTS) + n for n, key in enumerate(self.own)})
        self._facts = operator.attrgetter(*FACTS)
        self._order = operator.itemgetter(*(position[key] for key in self.keys))

    def encode(self, meta: PackageMeta, own: Sequence[object]) -> dict[str, object]:
        """``meta`` and the container's ``own`` values (in ``self.own``'s order) as one
        map, in the format's order. Lists stay tuples: msgpack packs both as arrays."""
        return dict(zip(self.keys, self._order(self._facts(meta) + tuple(own)), strict=True))

    def decode(self, raw: Mapping[str, Any]) -> PackageMeta:
        """The facts of ``raw`` (keys beyond them are the caller's business); raises
        ``InvalidField`` naming the format's key."""
        values: dict[str, Any] = {}
        for fact, key in self._wire.items():
            if key not in raw:
                raise InvalidField(key, "missing")
            value = raw[key]
            if fact in LIST_FACTS:
                if not isinstance(value, list | tuple):
                    raise InvalidField(key, f"expected a list of strings, got {kind(value)}")
                value = tuple(value)
            values[fact] = value
        try:
            return PackageMeta(**values)
        except InvalidField as error:
            raise InvalidField(self._wire[error.field], error.message) from None


def unpack(data: bytes, *, use_list: bool = True) -> Any:
    """Decode msgpack from outside (a manifest, an index), refusing a map with a key twice
    (ValueError naming it): msgpack would keep the last copy, so a file entry saying mode
    644 and then 4755 would install a setuid file that a reader of the first saw as 644."""
    return msgpack.unpackb(
        data, raw=False, strict_map_key=True, use_list=use_list, object_pairs_hook=_unique_keys
    )


def _unique_keys(pairs: Sequence[tuple[Any, Any]]) -> dict[Any, Any]:
    result: dict[Any, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result
