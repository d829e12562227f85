"""vercmp against pacman's own test table, plus the properties an ordering must have."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portsd.core.version import VERSION_PATTERN, ConstraintOp, satisfies, vercmp

# pacman's test/util/vercmptest.sh, verbatim.
PACMAN_TABLE = [
    ("1.5.0", "1.5.0", 0),
    ("1.5.1", "1.5.0", 1),
    ("1.5.1", "1.5", 1),
    ("1.5.0-1", "1.5.0-1", 0),
    ("1.5.0-1", "1.5.0-2", -1),
    ("1.5.0-1", "1.5.1-1", -1),
    ("1.5.0-2", "1.5.1-1", -1),
    ("1.5-1", "1.5.1-1", -1),
    ("1.5-2", "1.5.1-1", -1),
    ("1.5-2", "1.5.1-2", -1),
    ("1.5", "1.5-1", 0),
    ("1.5-1", "1.5", 0),
    ("1.1-1", "1.1", 0),
    ("1.0-1", "1.1", -1),
    ("1.1-1", "1.0", 1),
    ("1.5b-1", "1.5-1", -1),
    ("1.5b", "1.5", -1),
    ("1.5b-1", "1.5", -1),
    ("1.5b", "1.5.1", -1),
    ("1.0a", "1.0alpha", -1),
    ("1.0alpha", "1.0b", -1),
    ("1.0b", "1.0beta", -1),
    ("1.0beta", "1.0rc", -1),
    ("1.0rc", "1.0", -1),
    ("1.5.a", "1.5", 1),
    ("1.5.b", "1.5.a", 1),
    ("1.5.1", "1.5.b", 1),
    ("1.5.b-1", "1.5.b", 0),
    ("1.5-1", "1.5.b", -1),
]

MORE = [
    ("1:1.0", "2.0", 1),  # epoch wins
    ("0:1.0", "1.0", 0),
    ("2:0.1", "1:9.9", 1),
    ("1.10", "1.9", 1),  # numeric, not lexical
    ("001", "1", 0),  # leading zeros ignored
    ("1.0", "1_0", 0),  # separators only delimit
    ("1.0..1", "1.0.1", 1),  # a longer separator wins, as in libalpm
    ("1.0-10", "1.0-9", 1),
    ("a", "1", -1),
]


@pytest.mark.parametrize(("a", "b", "expected"), PACMAN_TABLE + MORE)
def test_table_and_its_mirror(a: str, b: str, expected: int) -> None:
    assert vercmp(a, b) == expected
    assert vercmp(b, a) == -expected


@pytest.mark.parametrize(
    ("candidate", "op", "wanted", "ok"),
    [
        ("1.3-1", ConstraintOp.GE, "1.2.13", True),
        ("1.2.12-1", ConstraintOp.GE, "1.2.13", False),
        (
            "1.3-2",
            ConstraintOp.EQ,
            "1.3",
            True,
        ),  # no release in the constraint: any release matches
        ("1.3-2", ConstraintOp.EQ, "1.3-1", False),
        ("1.3-1", ConstraintOp.LT, "1.3-2", True),
        ("1.3-1", ConstraintOp.LE, "1.3", True),
        ("2.0-1", ConstraintOp.GT, "1.9", True),
        ("1.9-1", ConstraintOp.GT, "1.9", False),
    ],
)
def test_satisfies(candidate: str, op: ConstraintOp, wanted: str, ok: bool) -> None:
    assert satisfies(candidate, op, wanted) is ok


segment = st.one_of(
    st.integers(0, 300).map(str), st.sampled_from(["a", "b", "alpha", "beta", "rc", "pre"])
)
versions = st.builds(
    lambda parts, seps: (
        "".join(p + s for p, s in zip(parts, seps, strict=False)).strip("._+") or "0"
    ),
    st.lists(segment, min_size=1, max_size=5),
    st.lists(st.sampled_from([".", "", "_", "+"]), min_size=5, max_size=5),
).filter(lambda v: VERSION_PATTERN.fullmatch(v) is not None)
full_versions = st.builds(
    lambda epoch, version, release: f"{epoch}{version}{release}",
    st.sampled_from(["", "1:", "2:"]),
    versions,
    st.sampled_from(["", "-1", "-2", "-10"]),
)


@given(full_versions)
def test_reflexive(a: str) -> None:
    assert vercmp(a, a) == 0


@given(full_versions, full_versions)
def test_antisymmetric(a: str, b: str) -> None:
    assert vercmp(a, b) == -vercmp(b, a)


@given(versions, versions, versions)
def test_transitive(a: str, b: str, c: str) -> None:
    if vercmp(a, b) <= 0 and vercmp(b, c) <= 0:
        assert vercmp(a, c) <= 0


@given(
    st.lists(st.integers(0, 10_000), min_size=1, max_size=6),
    st.lists(st.integers(0, 10_000), min_size=1, max_size=6),
)
def test_numeric_dotted_versions_order_like_tuples(x: list[int], y: list[int]) -> None:
    a, b = ".".join(map(str, x)), ".".join(map(str, y))
    expected = (x > y) - (x < y)
    assert vercmp(a, b) == expected
