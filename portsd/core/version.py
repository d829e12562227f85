"""Version comparison with pacman's semantics (libalpm's ``alpm_pkg_vercmp``).

A full version is ``[epoch:]version[-release]``. Epochs compare first, then versions,
then releases, but releases only when both sides have one: the constraint ``zlib>=1.3``
accepts every release of 1.3.

Versions are compared segment by segment like rpm: a segment is a run of digits or a run
of letters; separators (anything else) only delimit. Digit runs compare as integers
(leading zeros ignored), letter runs compare as strings, and a digit run is newer than a
letter run. When one side runs out, a remaining letter run is *older* (1.0alpha < 1.0)
and a remaining digit run is newer (1.0 < 1.0.1). So::

    1.0a < 1.0 < 1.0.1 < 1.1 < 1.10 < 2:0.1
"""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import StrEnum


class ConstraintOp(StrEnum):
    """A version constraint's comparison operator."""

    EQ = "="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="

    def accepts(self, order: int) -> bool:
        """Whether ``vercmp(candidate, wanted) == order`` satisfies this operator."""
        match self:
            case ConstraintOp.EQ:
                return order == 0
            case ConstraintOp.LT:
                return order < 0
            case ConstraintOp.LE:
                return order <= 0
            case ConstraintOp.GT:
                return order > 0
            case ConstraintOp.GE:
                return order >= 0


def _split_evr(text: str) -> tuple[str, str, str | None]:
    epoch, colon, rest = text.partition(":")
    if not colon or not epoch.isdigit():
        epoch, rest = "0", text
    version, dash, release = rest.rpartition("-")
    if not dash:
        return epoch, rest, None
    return epoch, version, release


def _is_alnum(char: str) -> bool:
    return char.isascii() and char.isalnum()


def _is_alpha(char: str) -> bool:
    return char.isascii() and char.isalpha()


def _is_digit(char: str) -> bool:
    return char.isascii() and char.isdigit()


def _run_end(text: str, start: int, kind: Callable[[str], bool]) -> int:
    end = start
    while end < len(text) and kind(text[end]):
        end += 1
    return end


def _rpmvercmp(a: str, b: str) -> int:
    # A port of libalpm's rpmvercmp, including its rule that a longer separator wins.
    if a == b:
        return 0
    i = j = 0
    while i < len(a) and j < len(b):
        sep_a = _run_end(a, i, lambda c: not _is_alnum(c)) - i
        sep_b = _run_end(b, j, lambda c: not _is_alnum(c)) - j
        i, j = i + sep_a, j + sep_b
        if i >= len(a) or j >= len(b):
            break
        if sep_a != sep_b:
            return -1 if sep_a < sep_b else 1
        kind = _is_digit if _is_digit(a[i]) else _is_alpha
        end_a, end_b = _run_end(a, i, kind), _run_end(b, j, kind)
        if end_b == j:  # segments of different types: numeric is newer than alpha
            return 1 if kind is _is_digit else -1
        x, y = a[i:end_a], b[j:end_b]
        if kind is _is_digit:
            x, y = x.lstrip("0"), y.lstrip("0")
            if len(x) != len(y):
                return 1 if len(x) > len(y) else -1
        if x != y:
            return -1 if x < y else 1
        i, j = end_a, end_b
    rest_a, rest_b = a[i:], b[j:]
    if not rest_a and not rest_b:
        return 0
    # A remaining alpha run never beats the end of the string; a remaining number does.
    if (not rest_a and not _is_alpha(rest_b[:1])) or _is_alpha(rest_a[:1]):
        return -1
    return 1


def vercmp(a: str, b: str) -> int:
    """Compare two full versions: -1 if a is older, 0 if equal, 1 if a is newer."""
    if a == b:
        return 0
    epoch_a, version_a, release_a = _split_evr(a)
    epoch_b, version_b, release_b = _split_evr(b)
    order = _rpmvercmp(epoch_a, epoch_b)
    if order == 0:
        order = _rpmvercmp(version_a, version_b)
        if order == 0 and release_a is not None and release_b is not None:
            order = _rpmvercmp(release_a, release_b)
    return order


def satisfies(candidate: str, op: ConstraintOp, wanted: str) -> bool:
    """Whether version ``candidate`` meets the constraint ``op wanted``."""
    return op.accepts(vercmp(candidate, wanted))


def full_version(version: str, release: int) -> str:
    """The ``version-release`` string packages and constraints compare against."""
    return f"{version}-{release}"


VERSION_PATTERN = re.compile(r"(?:[0-9]+:)?[A-Za-z0-9][A-Za-z0-9._+]*")
"""A recipe's ``version``: an optional epoch and no dash (the release is separate)."""
