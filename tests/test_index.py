"""The index value and its encoding: round trips, strict decoding, freshness."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from portsd.core.index import (
    FORMAT,
    Index,
    IndexEntry,
    check_fresh,
    decode_entry,
    decode_index,
    encode_entry,
    encode_index,
    entry_from_map,
    successor,
    with_entry,
    without,
)
from portsd.core.metadata import PackageMeta
from portsd.errors import IndexExpired, RepoError, RollbackDetected
from tests.fixtures import Repeated, pack_repeating

KEY = "ab" * 32
SHA = "cd" * 32
CONTENT = "ce" * 32


def entry(name: str = "zlib", file: str | None = None, **changes: Any) -> IndexEntry:
    facts: dict[str, Any] = {
        "name": name,
        "version": "1.3.1",
        "release": 1,
        "arch": "x86_64",
        "build_key": KEY,
        "summary": "Lossless data-compression library",
        "license": "Zlib",
        "depends": ("musl",),
        "provides": ("libz.so.1",),
        "conflicts": (),
        "installed_size": 4096,
    }
    facts.update(changes)
    meta = PackageMeta(**facts)
    return IndexEntry(meta, file or meta.filename, 1234, SHA, CONTENT)


def index(*entries: IndexEntry, serial: int = 7) -> Index:
    return Index(FORMAT, "x86_64", serial, 1_700_000_000, 1_700_604_800, "deadbeef", entries)


# -- strategies ----------------------------------------------------------------------------

hexes = st.binary(min_size=32, max_size=32).map(bytes.hex)
_LOWER = "abcdefghijklmnopqrstuvwxyz0123456789"


def word(first: str, rest: str, max_size: int) -> st.SearchStrategy[str]:
    return st.builds(str.__add__, st.sampled_from(first), st.text(rest, max_size=max_size))


names = word(_LOWER + "@_+", _LOWER + "@._+-", 15)
versions = st.builds(
    str.__add__,
    st.sampled_from(["", "1:", "20:"]),
    word(_LOWER + "ABC", _LOWER + "ABC._+", 10),
)
tokens = st.builds(
    str.__add__,
    names,
    st.sampled_from(["", "=", "<", "<=", ">", ">="]).flatmap(
        lambda op: st.just("") if not op else versions.map(lambda v: op + v)
    ),
)
files = word(_LOWER + "_+@:-", _LOWER + "._+@:-", 40)
sizes = st.integers(min_value=0, max_value=(1 << 63) - 1)
metas = st.builds(
    PackageMeta,
    name=names,
    version=versions,
    release=st.integers(min_value=0, max_value=1000),
    arch=st.sampled_from(["x86_64", "any"]),
    build_key=hexes,
    summary=st.text(max_size=40),
    license=st.text(max_size=10),
    depends=st.lists(tokens, max_size=4).map(tuple),
    provides=st.lists(tokens, max_size=3).map(tuple),
    conflicts=st.lists(tokens, max_size=2).map(tuple),
    installed_size=sizes,
    sonames=st.lists(word(_LOWER + "_", _LOWER + "._-", 20), max_size=3).map(
        lambda items: tuple(sorted(set(items)))
    ),
)
entries = st.builds(IndexEntry, meta=metas, file=files, size=sizes, sha256=hexes, content=hexes)
indexes = st.builds(
    Index,
    format=st.just(FORMAT),
    arch=st.just("x86_64"),
    serial=sizes,
    generated=sizes,
    expires=sizes,
    commit=st.none() | st.binary(min_size=20, max_size=20).map(bytes.hex),
    packages=st.lists(entries, max_size=8, unique_by=lambda e: e.meta.name).map(
        lambda items: tuple(sorted(items, key=lambda e: e.meta.name))
    ),
)


def raw_map(value: Index) -> dict[str, Any]:
    decoded = msgpack.unpackb(zstandard.ZstdDecompressor().decompress(encode_index(value)))
    assert isinstance(decoded, dict)
    return decoded


def pack(raw: object) -> bytes:
    return zstandard.ZstdCompressor().compress(msgpack.packb(raw))


# -- round trips ---------------------------------------------------------------------------


@given(indexes)
@settings(max_examples=200)
def test_round_trip(value: Index) -> None:
    data = encode_index(value)
    assert decode_index(data, "idx") == value
    assert encode_index(decode_index(data, "idx")) == data


@given(entries)
def test_entry_round_trip(value: IndexEntry) -> None:
    assert decode_entry(encode_entry(value), "rec") == value


@given(st.lists(entries, max_size=10, unique_by=lambda e: e.meta.name))
def test_equal_indexes_encode_equal_bytes_whatever_the_insertion_order(
    items: list[IndexEntry],
) -> None:
    forward = index()
    backward = index()
    for item in items:
        forward = with_entry(forward, item)
    for item in reversed(items):
        backward = with_entry(backward, item)
    assert encode_index(forward) == encode_index(backward)
    assert forward.names() == tuple(sorted(item.meta.name for item in items))


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_arbitrary_bytes_raise_only_repo_error(data: bytes) -> None:
    for blob in (data, zstandard.ZstdCompressor().compress(data)):
        try:
            decode_index(blob, "idx")
        except RepoError as error:
            assert "idx" in str(error)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)


@given(indexes, st.sampled_from(sorted(raw_map(index(entry())).keys())), msgpack_values)
@settings(max_examples=300)
def test_any_wrong_top_level_field_is_refused_or_harmless(
    value: Index, field: str, replacement: object
) -> None:
    raw = raw_map(value)
    raw[field] = replacement
    try:
        decoded = decode_index(pack(raw), "idx")
    except RepoError as error:
        assert f"'{field}" in str(error)
    else:  # only a value that is itself valid may pass, and it is kept as it was
        assert raw_map(decoded)[field] == replacement


@given(
    entries,
    st.sampled_from(sorted(raw_map(index(entry()))["packages"][0])),
    msgpack_values | st.lists(st.text("aZ1. <>=-", max_size=4), max_size=3) | st.text(max_size=70),
)
@settings(max_examples=500)
def test_the_fast_reader_accepts_exactly_what_the_records_accept(
    value: IndexEntry, field: str, replacement: object
) -> None:
    raw = msgpack.unpackb(encode_entry(value), use_list=False)
    raw[field] = msgpack.unpackb(msgpack.packb(replacement), use_list=False)
    try:
        slow: IndexEntry | None = entry_from_map(raw)  # the constructors: the one check
    except ValueError:
        slow = None
    try:
        fast: IndexEntry | None = decode_entry(msgpack.packb(raw), "rec")
    except RepoError:
        fast = None
    assert fast == slow


# -- strict decoding -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("format",), 1, "unsupported index format 1"),
        (("format",), "1", "expected an integer"),
        (("arch",), "../x", "invalid value"),
        (("serial",), -1, "out of range"),
        (("serial",), True, "expected an integer"),
        (("generated",), 1.5, "expected an integer"),
        (("expires",), None, "expected an integer"),
        (("commit",), 5, "expected a string"),
        (("packages",), {}, "expected a list"),
        (("packages", 0), "zlib", "expected a map"),
        (("packages", 0, "name"), "Zlib", "invalid value 'Zlib'"),
        (("packages", 0, "version"), "1.0-2", "invalid value"),
        (("packages", 0, "release"), -2, "out of range"),
        (("packages", 0, "key"), "AB" * 32, "invalid value"),
        (("packages", 0, "sha256"), "cd" * 31, "invalid value"),
        (("packages", 0, "file"), "../../etc/passwd", "not a plain file name"),
        (("packages", 0, "file"), ".hidden", "not a plain file name"),
        (("packages", 0, "size"), 1 << 63, "out of range"),
        (("packages", 0, "depends"), "musl", "expected a list"),
        (("packages", 0, "depends"), ["musl", 3], "invalid item 3"),
        (("packages", 0, "provides"), ["two words"], "invalid item"),
        (("packages", 0, "sonames"), "libz.so.1", "expected a list"),
        (("packages", 0, "sonames"), ["usr/lib/libz.so.1"], "invalid soname"),
        (("packages", 0, "sonames"), ["libz.so.1", "libz.so.1"], "not sorted and distinct"),
        (("packages", 0, "summary"), b"bytes", "expected a string"),
        (("packages", 0, "arch"), "aarch64", "'aarch64' in an index for x86_64"),
        (("packages", 1, "name"), "zlib", "out of order or repeated"),
        (("packages", 1, "name"), "a", "out of order or repeated"),
    ],
)
def test_bad_fields_are_named(path: tuple[str | int, ...], value: object, message: str) -> None:
    raw = raw_map(index(entry("zlib"), entry("zstd")))
    target: Any = raw
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    with pytest.raises(RepoError, match=message) as info:
        decode_index(pack(raw), "repo/x86_64/index.msgpack.zst")
    text = str(info.value)
    assert text.startswith("repo/x86_64/index.msgpack.zst: bad index field")
    if len(path) > 1 and isinstance(path[1], int):
        assert f"packages[{path[1]}]" in text


@pytest.mark.parametrize("field", ["serial", "packages", "arch"])
def test_missing_top_level_field(field: str) -> None:
    raw = raw_map(index(entry()))
    del raw[field]
    with pytest.raises(RepoError, match=f"'{field}': missing"):
        decode_index(pack(raw), "idx")


def test_missing_entry_field_names_the_package() -> None:
    raw = raw_map(index(entry("zlib")))
    del raw["packages"][0]["sha256"]
    with pytest.raises(RepoError, match=r"'packages\[0\]\(zlib\)\.sha256': missing"):
        decode_index(pack(raw), "idx")


def test_a_key_twice_anywhere_is_refused_naming_it() -> None:
    raw = raw_map(index(entry("zlib")))
    twice = Repeated(raw["packages"][0], again=(("sha256", "0" * 64),))
    with pytest.raises(RepoError, match="duplicate key 'sha256'"):
        decode_index(pack_repeating_zstd({**raw, "packages": [twice]}), "idx")
    with pytest.raises(RepoError, match="duplicate key 'serial'"):
        decode_index(pack_repeating_zstd(Repeated(raw, again=(("serial", 8),))), "idx")
    with pytest.raises(RepoError, match="duplicate key 'name'"):
        decode_entry(pack_repeating(Repeated(raw["packages"][0], again=(("name", "x"),))), "e")


def pack_repeating_zstd(raw: object) -> bytes:
    return zstandard.ZstdCompressor().compress(pack_repeating(raw))


def test_unknown_fields_are_ignored() -> None:
    value = index(entry("zlib"), entry("zstd"))
    raw = raw_map(value)
    raw["mirrors"] = ["http://example"]
    raw["packages"][1]["abi"] = {"sonames": ["libzstd.so.1"]}
    assert decode_index(pack(raw), "idx") == value


def test_not_a_map_or_not_zstd() -> None:
    with pytest.raises(RepoError, match="not a map"):
        decode_index(pack([1, 2]), "idx")
    with pytest.raises(RepoError, match="not valid zstd"):
        decode_index(b"\x28\xb5\x2f\xfd" + b"\xff" * 20, "idx")
    with pytest.raises(RepoError, match="not valid msgpack"):
        decode_index(zstandard.ZstdCompressor().compress(b"\xc1"), "idx")


def test_decompression_bomb_is_refused_early() -> None:
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(10 << 20))
    assert len(bomb) < 10_000
    with pytest.raises(RepoError, match="inflates past 1048576 bytes"):
        decode_index(bomb, "idx", max_bytes=1 << 20)


def test_entry_record_errors_name_the_record() -> None:
    with pytest.raises(RepoError, match="keys/abc: bad entry field 'size'"):
        decode_entry(
            msgpack.packb({**raw_map(index(entry()))["packages"][0], "size": "1"}), "keys/abc"
        )


# -- values and helpers --------------------------------------------------------------------


def test_index_invariants_hold_on_construction() -> None:
    with pytest.raises(ValueError, match="out of order"):
        index(entry("zstd"), entry("zlib"))
    with pytest.raises(ValueError, match="out of order or repeated"):
        index(entry("zlib"), entry("zlib"))
    with pytest.raises(ValueError, match="depends"):
        entry(depends=["musl"])  # a list is not a tuple: records are immutable all the way
    with pytest.raises(ValueError, match="depends: invalid item 'musl >= 1'"):
        entry(depends=("musl >= 1",))
    with pytest.raises(ValueError, match="file"):
        entry(file="packages/zlib.pkg.tar.zst")


def test_with_entry_replaces_same_name_and_keeps_order() -> None:
    base = index(entry("a"), entry("m"), entry("z"))
    newer = entry("m", version="2.0", build_key="ef" * 32)
    updated = with_entry(base, newer)
    assert updated.names() == ("a", "m", "z")
    assert updated.entry("m") == newer
    assert with_entry(updated, entry("n")).names() == ("a", "m", "n", "z")
    assert with_entry(base, entry("0")).names() == ("0", "a", "m", "z")
    assert updated.serial == base.serial  # helpers change packages only


def test_without_and_lookups() -> None:
    base = index(entry("a"), entry("m", build_key="ef" * 32), entry("z"))
    assert without(base, {"m", "absent"}).names() == ("a", "z")
    assert base.entry("m") is not None and base.entry("n") is None
    assert "z" in base and "q" not in base and len(base) == 3
    found = base.by_key("ef" * 32)
    assert found is not None and found.meta.name == "m"
    assert base.by_key("00" * 32) is None


def test_successor_bumps_serial_and_dates() -> None:
    base = index(entry(), serial=41)
    after = successor(base, now=2_000, expires_in=600, commit="c0ffee")
    assert (after.serial, after.generated, after.expires, after.commit) == (
        42,
        2_000,
        2_600,
        "c0ffee",
    )
    assert after.packages == base.packages
    assert Index.empty("x86_64", now=5, expires_in=10) == Index(FORMAT, "x86_64", 1, 5, 15, None)


def test_package_filename_carries_key_prefix() -> None:
    meta = PackageMeta("zlib", "1:1.3.1", 2, "x86_64", KEY)
    assert meta.filename == f"zlib-1:1.3.1-2-x86_64-{KEY[:12]}.pkg.tar.zst"
    with pytest.raises(ValueError, match="build_key"):
        PackageMeta("zlib", "1.0", 1, "x86_64", "short")


def test_the_bytes_of_an_entry_and_an_index_are_pinned() -> None:
    """The index's layout is a contract (signed, cached, read by older clients): these
    digests change only with ``FORMAT``."""
    meta = PackageMeta(
        "zlib",
        "1.3.1",
        2,
        "x86_64",
        KEY,
        "Compression",
        "Zlib",
        ("musl>=1.2",),
        ("libz=1.3.1",),
        ("zlib-ng",),
        5,
        ("libz.so.1",),
    )
    value = IndexEntry(meta, meta.filename, 1234, SHA, CONTENT)
    assert FORMAT == 3
    assert hashlib.sha256(encode_entry(value)).hexdigest() == (
        "e8be8bc7934bf48d3b623019546880eb3d48dd22021f7ecb1233dfa0daf1a43d"
    )
    payload = zstandard.ZstdDecompressor().decompress(encode_index(index(value)))
    assert hashlib.sha256(payload).hexdigest() == (
        "63b2d00badab57e50421bd4a5781787bc2211779bf2fb4fb73bb6f85a73168bb"
    )


# -- freshness -----------------------------------------------------------------------------


def test_fresh_index_passes() -> None:
    value = index(serial=10)
    check_fresh(value, last_serial=None, now=value.generated, label="lan")
    check_fresh(value, last_serial=10, now=value.expires - 1, label="lan")
    check_fresh(value, last_serial=3, now=value.generated, label="lan")


def test_rollback_is_detected() -> None:
    with pytest.raises(RollbackDetected, match="lan: index serial 9 is lower than 10"):
        check_fresh(index(serial=9), last_serial=10, now=1_700_000_000, label="lan")


def test_expired_index_is_refused() -> None:
    value = index()
    with pytest.raises(IndexExpired, match=r"lan: index serial 7 expired at 1700604800 \(0s ago\)"):
        check_fresh(value, last_serial=None, now=value.expires, label="lan")


def test_dataclasses_are_frozen_and_slotted() -> None:
    for cls in (Index, IndexEntry, PackageMeta):
        params = vars(cls)["__dataclass_params__"]
        assert params.frozen and "__slots__" in vars(cls)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry().file = "x"  # type: ignore[misc]
