"""A package's facts: the one check every record of them gets, and their encoding."""

from __future__ import annotations

from typing import Any

import pytest

from portsd.core.metadata import InvalidField, MetaLayout, PackageMeta
from portsd.core.recipe import parse_recipe

KEY = "ab" * 32


def meta(**changes: Any) -> PackageMeta:
    facts: dict[str, Any] = {
        "name": "zlib",
        "version": "1:1.3.1",
        "release": 2,
        "arch": "x86_64",
        "build_key": KEY,
        "depends": ("musl>=1.2",),
        "provides": ("libz=1.3.1",),
    }
    return PackageMeta(**{**facts, **changes})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "Zlib", "invalid value 'Zlib'"),
        ("version", "1.3-2", "invalid value '1.3-2'"),  # the release is separate
        ("release", True, "expected an integer, got bool"),
        ("release", -1, "out of range: -1"),
        ("arch", "X86", "invalid value 'X86'"),
        ("build_key", "AB" * 32, "invalid value"),
        ("summary", None, "expected a string, got nothing"),
        ("depends", ["musl"], "expected a list of strings, got list"),
        ("provides", ("sh >= 1",), "invalid item 'sh >= 1'"),
        ("conflicts", ("ok", 3), "invalid item 3"),
        ("installed_size", 1 << 63, "out of range"),
        ("sonames", ["libz.so.1"], "expected a list of strings, got list"),
        ("sonames", ("usr/lib/libz.so.1",), "invalid soname"),
        ("sonames", ("libz.so.1", "libc.so.6"), "not sorted and distinct"),
    ],
)
def test_every_field_is_checked_on_construction(field: str, value: object, message: str) -> None:
    with pytest.raises(InvalidField, match=message) as error:
        meta(**{field: value})
    assert error.value.field == field


def test_what_a_recipe_builds() -> None:
    recipe = parse_recipe(
        'name = "zlib"\nversion = "1:1.3.1"\nrelease = 2\nsummary = "s"\nlicense = "Zlib"\n'
        'depends = ["musl>=1.2"]\nbuild-depends = ["make"]\nprovides = ["libz=1.3.1"]\n',
        "ports/zlib/port.toml",
        "zlib",
    )
    built = PackageMeta.of(recipe, KEY, "x86_64")
    assert built == meta(summary="s", license="Zlib")  # build-depends are not the package's
    assert built.full_version == "1:1.3.1-2"
    assert built.filename == f"zlib-1:1.3.1-2-x86_64-{KEY[:12]}.pkg.tar.zst"


LAYOUT = MetaLayout(
    (
        "name",
        "version",
        "key",
        "own",
        "release",
        "arch",
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


def test_a_layout_writes_in_its_order_and_reads_back() -> None:
    value = meta()
    raw = LAYOUT.encode(value, ("mine",))
    assert list(raw) == list(LAYOUT.keys) and raw["key"] == KEY and raw["own"] == "mine"
    assert LAYOUT.decode({**raw, "depends": list(value.depends)}) == value


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda raw: raw.pop("key"), "key: missing"),
        (lambda raw: raw.update(key="short"), "key: invalid value 'short'"),
        (lambda raw: raw.update(depends="musl"), "depends: expected a list of strings, got str"),
    ],
)
def test_a_layout_names_its_own_keys_in_errors(change: Any, message: str) -> None:
    raw = LAYOUT.encode(meta(), ("mine",))
    change(raw)
    with pytest.raises(InvalidField, match=f"^{message}"):
        LAYOUT.decode(raw)
