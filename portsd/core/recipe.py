"""Recipes: ``ports/<name>/port.toml`` parsed and validated into frozen values.

``parse_recipe`` is pure: it takes the file's bytes, the path to name in messages, the
port's directory name and (optionally) the files beside port.toml, and either returns a
``Recipe`` or raises one ``RecipeError`` listing every problem it found, each with the file
and, where it can be located, the line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import rtoml

from portsd.core.linkage import SONAME_PATTERN
from portsd.core.version import VERSION_PATTERN, ConstraintOp, full_version, satisfies
from portsd.errors import FileProblem, RecipeError

NAME_PATTERN = re.compile(r"[a-z0-9@_+][a-z0-9@._+-]*")
NAME_RULE = "lowercase letters, digits and @ . _ + -, not starting with . or -"
DEPENDENCY_PATTERN = re.compile(
    r"([a-z0-9@_+][a-z0-9@._+-]*)(?:(<=|>=|=|<|>)((?:[0-9]+:)?[A-Za-z0-9._+-]+))?"
)
_SHA256 = re.compile(r"[0-9a-f]{64}")
PORTS_ROOT = "ports"
"""The directory of a tree holding the port directories (``path`` sources stay outside it)."""
_URL = re.compile(r"https?://[^/\s]+/\S*[^/\s]$")
_MIRROR_URL = re.compile(r"mirror://([A-Za-z0-9][A-Za-z0-9_.-]*)/([^\s\x00]+)")
_INTERPRETER = re.compile(r"(?:/[A-Za-z0-9_+@.-]+)+")
_TOML_POSITION = re.compile(r" at line (\d+) column \d+$")


class DepKind(StrEnum):
    """Which list of a recipe a dependency comes from; the value is the recipe key."""

    RUNTIME = "depends"
    BUILD = "build-depends"
    CHECK = "check-depends"
    BOOTSTRAP = "bootstrap-depends"  # only for builds on the seed (docs/toolchain.md)


class BuildStyle(StrEnum):
    """A build system whose usual steps a recipe need not spell out."""

    AUTOTOOLS = "autotools"
    CMAKE = "cmake"
    MESON = "meson"
    MAKE = "make"
    CUSTOM = "custom"


class BuildStep(StrEnum):
    """The steps of a build, in the order they run."""

    PREPARE = "prepare"
    BUILD = "build"
    CHECK = "check"
    PACKAGE = "package"


@dataclass(frozen=True, slots=True)
class Dependency:
    """A name, optionally constrained: ``zlib``, ``zlib>=1.2.13``, ``sh=1.0``."""

    name: str
    op: ConstraintOp | None = None
    version: str | None = None

    @classmethod
    def parse(cls, text: str) -> Dependency:
        """Parse ``name[op version]``; raises ``ValueError`` naming what is wrong."""
        match = DEPENDENCY_PATTERN.fullmatch(text)
        if match is None:
            raise ValueError(
                f"invalid dependency '{text}' (expected name[op version], op: = < <= > >=)"
            )
        name, op, version = match.groups()
        return cls(name, ConstraintOp(op), version) if op else cls(name)

    def accepts(self, version: str) -> bool:
        """Whether a full version (``version-release``) satisfies this dependency."""
        return self.op is None or satisfies(version, self.op, self.version or "")

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.version}" if self.op else self.name


@dataclass(frozen=True, slots=True)
class Source:
    """Where a build input comes from; exactly one of ``url``, ``file`` and ``path`` is set.

    ``url`` (with ``sha256``): a downloaded archive or file, at an http(s) URL or at
    ``mirror://NAME/PATH`` (see ``mirror_of``). ``file``: a file of the port
    directory. ``path``: a file or directory of the ports tree's own repository, relative
    to its root and outside ports/ (the tree packaging its own software). ``filename`` is
    the name the input gets in $SRCDIR.
    """

    filename: str
    url: str | None = None
    file: str | None = None
    sha256: str | None = None
    path: str | None = None

    @property
    def is_patch(self) -> bool:
        return self.file is not None and self.filename.endswith(".patch")


@dataclass(frozen=True, slots=True)
class BuildSpec:
    """The ``[build]`` table: a style, its arguments and any steps the recipe overrides.

    ``allow_missing_sonames`` are sonames (or interpreter paths) the package's files may
    need although neither it nor its runtime dependencies provide them (``libGL.so.1``,
    which the system installing it supplies): see ``portsd.core.linkage``.
    """

    style: BuildStyle = BuildStyle.CUSTOM
    configure_args: tuple[str, ...] = ()
    dir: str | None = None
    prepare: str | None = None
    build: str | None = None
    check: str | None = None
    package: str | None = None
    allow_missing_sonames: tuple[str, ...] = ()

    def script(self, step: BuildStep) -> str | None:
        """The recipe's own script for ``step``, or None to use the style's default."""
        return getattr(self, step.value)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Recipe:
    """One port, validated. Tuples keep the recipe's order; nothing here touches the disk."""

    name: str
    version: str
    release: int
    summary: str
    license: str
    homepage: str | None = None
    arch: tuple[str, ...] = ("any",)
    depends: tuple[Dependency, ...] = ()
    build_depends: tuple[Dependency, ...] = ()
    check_depends: tuple[Dependency, ...] = ()
    provides: tuple[Dependency, ...] = ()
    conflicts: tuple[Dependency, ...] = ()
    sources: tuple[Source, ...] = ()
    build: BuildSpec = BuildSpec()
    bootstrap_depends: tuple[Dependency, ...] = ()

    @property
    def full_version(self) -> str:
        return full_version(self.version, self.release)

    @property
    def source_paths(self) -> tuple[str, ...]:
        """The repository paths of the ``path`` sources, in recipe order."""
        return tuple(source.path for source in self.sources if source.path is not None)

    def dependencies(self) -> Iterator[tuple[DepKind, Dependency]]:
        """Everything the build root needs, tagged with the list it came from (the
        bootstrap dependencies too: which builds get them is the toolchain's business)."""
        for kind, deps in (
            (DepKind.RUNTIME, self.depends),
            (DepKind.BUILD, self.build_depends),
            (DepKind.CHECK, self.check_depends),
            (DepKind.BOOTSTRAP, self.bootstrap_depends),
        ):
            for dep in deps:
                yield kind, dep

    def supports(self, arch: str) -> bool:
        return "any" in self.arch or arch in self.arch


_DEP_LISTS = ("depends", "build-depends", "check-depends", "bootstrap-depends", "conflicts")
_TOP_KEYS = frozenset(
    {
        "name",
        "version",
        "release",
        "summary",
        "homepage",
        "license",
        "arch",
        "provides",
        "source",
        "build",
    }
    | set(_DEP_LISTS)
)
_SOURCE_KEYS = frozenset({"url", "file", "path", "sha256", "filename"})
_BUILD_KEYS = frozenset(
    {"style", "configure-args", "dir", "allow-missing-sonames", *(step.value for step in BuildStep)}
)
_STYLES = {style.value: style for style in BuildStyle}


Where = tuple[str, int] | None
"""A table and which occurrence of it (1-based, for ``[[source]]``); None is the top level."""


def _statements(text: str) -> list[tuple[int, str]]:
    """The lines (0-based number, text) where a TOML statement begins: a table header or a
    ``key = value``. Lines inside a multi-line string or array are left out, so a script's
    ``[ -d out ] || mkdir out`` or ``dir=out`` passes for neither. ``text`` is valid TOML."""
    found: list[tuple[int, str]] = []
    depth = 0  # brackets and braces open in a value
    quote = ""  # the delimiter of a multi-line string still open
    for number, line in enumerate(text.splitlines()):
        if not quote and not depth:
            found.append((number, line))
            if line.lstrip().startswith("["):
                continue  # a header closes on its own line
        at = 0
        while 0 <= at < len(line):  # -1: a string goes on past this line
            if quote:
                at = _string_end(line, at, quote)
                quote = quote if at < 0 else ""
            elif line[at] == "#":
                break
            elif line.startswith(('"""', "'''"), at):
                quote = line[at : at + 3]
                at += 3
            elif line[at] in "\"'":
                at = _string_end(line, at + 1, line[at])
            else:
                depth += (line[at] in "[{") - (line[at] in "]}")
                at += 1
    return found


def _string_end(line: str, at: int, quote: str) -> int:
    """Where the string closed by ``quote`` ends in ``line`` (reading from ``at``, inside
    it), or -1 if it does not end on this line. Basic strings have escapes, literal ones
    none; a multi-line string may end with up to two quotes of its own."""
    while at < len(line):
        if line[at] == "\\" and quote[0] == '"':
            at += 2
        elif line.startswith(quote, at):
            at += len(quote)
            extra = 0
            while len(quote) == 3 and extra < 2 and line.startswith(quote[0], at):
                at, extra = at + 1, extra + 1
            return at
        else:
            at += 1
    return -1


class _Checker:
    """Collects problems for one file, locating keys in the text only when something is wrong."""

    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text
        self.problems: list[FileProblem] = []

    def add(self, message: str, key: str | None = None, where: Where = None) -> None:
        """Record a problem at ``key`` in ``where`` (at the table's header if no key)."""
        line = self.line_of(key, where) if key or where else None
        self.problems.append(FileProblem(self.path, message, line))

    def line_of(self, key: str | None, where: Where) -> int | None:
        """The 1-based line of ``key`` in ``where`` (of the table's header if no key)."""
        statements = _statements(self.text)
        start = 0
        if where is not None:
            table, occurrence = where
            header = re.compile(rf"\s*\[\[?\s*{re.escape(table)}\s*\]\]?")
            headers = [n for n, line in statements if header.match(line)]
            if len(headers) < occurrence:
                return None
            if key is None:
                return headers[occurrence - 1] + 1
            start = headers[occurrence - 1] + 1
        assignment = re.compile(rf"\s*[\"']?{re.escape(key or '')}[\"']?\s*=")
        for n, line in statements:
            if n < start:
                continue
            if line.lstrip().startswith("["):
                return None  # the next table: the key is not in this one
            if assignment.match(line):
                return n + 1
        return None

    def string(self, data: Mapping[str, Any], key: str, where: Where = None) -> str | None:
        value = data.get(key)
        if value is None or isinstance(value, str):
            return value
        self.add(f"'{key}' must be a string, not {_toml_type(value)}", key, where)
        return None

    def strings(self, data: Mapping[str, Any], key: str, where: Where = None) -> list[str]:
        value = data.get(key)
        if value is None and key not in data:
            return []
        if isinstance(value, list):
            for item in value:  # a loop, not all(...): this runs for every list of a tree
                if not isinstance(item, str):
                    break
            else:
                return value
        self.add(f"'{key}' must be a list of strings", key, where)
        return []

    def unknown_keys(self, data: Mapping[str, Any], allowed: frozenset[str], where: Where) -> None:
        if data.keys() <= allowed:
            return
        for key in data:
            if key not in allowed:
                self.add(
                    f"unknown key '{key}'" + (f" in [{where[0]}]" if where else ""), key, where
                )


def _toml_type(value: object) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a float",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


def parse_recipe(
    data: bytes | str, path: str, dirname: str, files: Iterable[str] | None = None
) -> Recipe:
    """Parse and validate one port.toml.

    ``path`` names the file in messages, ``dirname`` is the port directory's name (the
    recipe's ``name`` must equal it) and ``files``, when given, are the paths (relative to
    the port directory) that ``file`` sources may refer to.
    """
    if not NAME_PATTERN.fullmatch(dirname):  # the name is the directory: refuse it first
        raise RecipeError(
            dirname, [FileProblem(path, f"invalid port name '{dirname}' ({NAME_RULE})")]
        )
    try:
        text = data.decode() if isinstance(data, bytes) else data
    except UnicodeDecodeError as error:
        raise RecipeError(
            dirname, [FileProblem(path, f"not UTF-8 text ({error.reason})")]
        ) from None
    try:
        table = rtoml.loads(text)
    except rtoml.TomlParsingError as error:
        message = str(error).strip()
        position = _TOML_POSITION.search(message)
        line = int(position.group(1)) if position else None
        message = _TOML_POSITION.sub("", message)
        raise RecipeError(dirname, [FileProblem(path, f"invalid TOML: {message}", line)]) from None

    check = _Checker(path, text)
    check.unknown_keys(table, _TOP_KEYS, None)
    for key in ("name", "version", "summary", "license"):
        if key not in table:
            check.problems.append(FileProblem(path, f"missing required field '{key}'"))

    name = check.string(table, "name")
    if name is not None and name != dirname:
        check.add(f"name '{name}' does not match its directory '{dirname}'", "name")
    version = check.string(table, "version")
    if version is not None and not VERSION_PATTERN.fullmatch(version):
        check.add(
            f"invalid version '{version}' (letters, digits, . _ + only; the release is separate)",
            "version",
        )
    release = table.get("release", 1)
    if not isinstance(release, int) or isinstance(release, bool) or release < 1:
        check.add("'release' must be a positive integer", "release")
        release = 1
    summary = check.string(table, "summary")
    license_ = check.string(table, "license")
    homepage = check.string(table, "homepage")
    arch = tuple(check.strings(table, "arch")) or ("any",)

    deps = {key: _parse_dependencies(check, table, key) for key in _DEP_LISTS}
    provides = _parse_dependencies(check, table, "provides")
    for entry in provides:
        if entry.op not in (None, ConstraintOp.EQ):
            check.add(f"provides entry '{entry}' may only use '='", "provides")
    sources = _parse_sources(
        check, table.get("source", []), set(files) if files is not None else None
    )
    build = _parse_build(check, table.get("build", {}))

    if check.problems:
        raise RecipeError(
            dirname, sorted(check.problems, key=lambda p: (p.line is None, p.line or 0))
        )
    assert name is not None and version is not None and summary is not None and license_ is not None
    return Recipe(
        name=name,
        version=version,
        release=release,
        summary=summary,
        license=license_,
        homepage=homepage,
        arch=arch,
        depends=deps["depends"],
        build_depends=deps["build-depends"],
        check_depends=deps["check-depends"],
        provides=provides,
        conflicts=deps["conflicts"],
        sources=sources,
        build=build,
        bootstrap_depends=deps["bootstrap-depends"],
    )


def _parse_dependencies(
    check: _Checker, table: Mapping[str, Any], key: str
) -> tuple[Dependency, ...]:
    if key not in table:
        return ()
    parsed: list[Dependency] = []
    seen: set[str] = set()
    for text in check.strings(table, key):
        try:
            dep = Dependency.parse(text)
        except ValueError as error:
            check.add(f"{key}: {error}", key)
            continue
        if dep.name in seen:
            check.add(f"{key}: '{dep.name}' is listed twice", key)
        seen.add(dep.name)
        parsed.append(dep)
    return tuple(parsed)


def _parse_sources(check: _Checker, value: object, files: set[str] | None) -> tuple[Source, ...]:
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        check.add("'source' must be an array of tables ([[source]])", "source")
        return ()
    sources: list[Source] = []
    for number, entry in enumerate(value, start=1):
        before = len(check.problems)
        label, where = f"source #{number}", ("source", number)
        check.unknown_keys(entry, _SOURCE_KEYS, where)
        url, file = check.string(entry, "url", where), check.string(entry, "file", where)
        path = check.string(entry, "path", where)
        sha256 = check.string(entry, "sha256", where)
        filename = check.string(entry, "filename", where)
        if [url, file, path].count(None) != 2:
            check.add(f"{label}: give exactly one of 'url', 'file' or 'path'", None, where)
        if url is not None:
            if url.startswith("mirror://") and mirror_of(url) is None:
                check.add(
                    f"{label}: url '{url}' is not mirror://NAME/PATH (a relative PATH with no"
                    " '.', '..' or empty parts)",
                    "url",
                    where,
                )
            elif not url.startswith("mirror://") and not _URL.match(url):
                check.add(f"{label}: url '{url}' is not an http(s) URL of a file", "url", where)
            if sha256 is None:
                check.add(f"{label}: url source '{url}' has no sha256", "url", where)
        if sha256 is not None and not _SHA256.fullmatch(sha256):
            check.add(f"{label}: sha256 must be 64 lowercase hex digits", "sha256", where)
        if file is not None:
            parts = file.split("/")
            if file.startswith("/") or ".." in parts or "" in parts:
                check.add(
                    f"{label}: file '{file}' must be a relative path inside the port", "file", where
                )
            elif files is not None and file not in files:
                check.add(
                    f"{label}: file '{file}' does not exist in the port directory", "file", where
                )
        if path is not None:
            _check_path(check, label, path, where)
            if sha256 is not None and url is None:
                check.add(
                    f"{label}: sha256 is for url sources (a path is keyed by its git id)",
                    "sha256",
                    where,
                )
        if filename is not None and ("/" in filename or filename in ("", ".", "..")):
            check.add(
                f"{label}: filename '{filename}' must be a plain file name", "filename", where
            )
        name = filename or (url or file or path or "").rsplit("/", 1)[-1]
        if len(check.problems) == before:
            if any(source.filename == name for source in sources):
                check.add(
                    f"two sources are both named '{name}' (set 'filename' on one)", None, where
                )
            sources.append(Source(name, url=url, file=file, sha256=sha256, path=path))
    return tuple(sources)


_UNSAFE_PARTS = frozenset({"", ".", "..", ".git"})


def mirror_of(url: str) -> tuple[str, str] | None:
    """``(NAME, PATH)`` of a ``mirror://NAME/PATH`` url (Gentoo's convention: the places
    that hold mirror NAME come from the configuration), or None if ``url`` is not one.
    PATH has no ``.``, ``..`` or empty parts, so it stays inside every place it is looked
    up under."""
    match = _MIRROR_URL.fullmatch(url)
    if match is None or {"", ".", ".."} & set(match[2].split("/")):
        return None
    return match[1], match[2]


def _check_path(check: _Checker, label: str, path: str, where: Where) -> None:
    # The shape only: whether the path exists depends on the commit, not on this file, so
    # the tree checks that (portsd/tree/loader.py) and reports it against this source's line.
    parts = path.split("/")
    if path.startswith("/") or not _UNSAFE_PARTS.isdisjoint(parts) or "\0" in path:
        check.add(
            f"{label}: path '{path}' must be a relative path inside the tree"
            " (no '.', '..', '.git' or empty parts)",
            "path",
            where,
        )
    elif parts[0] == PORTS_ROOT:
        check.add(
            f"{label}: path '{path}' is under {PORTS_ROOT}/ (a port's own files are"
            " 'file' sources)",
            "path",
            where,
        )


def source_line(text: str, number: int, key: str) -> int | None:
    """The line of ``key`` in the ``number``-th (1-based) ``[[source]]`` of a recipe's text,
    for problems found outside the parser (a ``path`` missing from a commit)."""
    return _Checker("", text).line_of(key, ("source", number))


def _parse_build(check: _Checker, value: object) -> BuildSpec:
    if not isinstance(value, dict):
        check.add("'build' must be a table ([build])", "build")
        return BuildSpec()
    check.unknown_keys(value, _BUILD_KEYS, ("build", 1))
    style_text = check.string(value, "style", ("build", 1)) or BuildStyle.CUSTOM.value
    style = _STYLES.get(style_text)  # a dict lookup: calling the enum costs a microsecond
    if style is None:
        choices = " | ".join(s.value for s in BuildStyle)
        check.add(f"unknown build style '{style_text}' (expected {choices})", "style", ("build", 1))
        style = BuildStyle.CUSTOM
    directory = check.string(value, "dir", ("build", 1))
    if directory is not None and (directory.startswith("/") or ".." in directory.split("/")):
        check.add(
            f"build dir '{directory}' must be a relative path inside the sources",
            "dir",
            ("build", 1),
        )
    where = ("build", 1)
    allowed = tuple(check.strings(value, "allow-missing-sonames", where))
    for item in allowed:
        if not SONAME_PATTERN.fullmatch(item) and not _INTERPRETER.fullmatch(item):
            check.add(
                f"allow-missing-sonames: '{item}' is neither a soname (libGL.so.1) nor an"
                " interpreter's absolute path",
                "allow-missing-sonames",
                where,
            )
    return BuildSpec(
        style,
        tuple(check.strings(value, "configure-args", where)),
        directory,
        check.string(value, "prepare", where),
        check.string(value, "build", where),
        check.string(value, "check", where),
        check.string(value, "package", where),
        allowed,
    )
