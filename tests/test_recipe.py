"""Recipe parsing: the whole format, and an exact message for every way it can be wrong."""

from __future__ import annotations

import pytest

from portsd.core.recipe import (
    BuildStep,
    BuildStyle,
    Dependency,
    Recipe,
    Source,
    mirror_of,
    parse_recipe,
    source_line,
)
from portsd.core.version import ConstraintOp
from portsd.errors import RecipeError

PATH = "ports/zlib/port.toml"
SHA = "9a93b2b7dfdac77ceba5a558a580e74667dd6fede4585b91eefb60f03b72df23"

FULL = f"""\
name = "zlib"
version = "1.3.1"
release = 2
summary = "Lossless data-compression library"
homepage = "https://zlib.net/"
license = "Zlib"
arch = ["x86_64", "aarch64"]

depends = ["musl"]
build-depends = ["make>=4.0"]
check-depends = ["diffutils"]
provides = ["libz=1.3.1"]
conflicts = ["zlib-ng<2"]

[[source]]
url = "https://zlib.net/fossils/zlib-1.3.1.tar.gz"
sha256 = "{SHA}"
[[source]]
file = "0001-fix.patch"
[[source]]
url = "https://example.org/download?id=7/data.bin"
sha256 = "{SHA.replace("9", "8")}"
filename = "extra-data.bin"

[build]
style = "autotools"
configure-args = ["--enable-static"]
dir = "zlib-1.3.1"
prepare = "sed -i s/a/b/ Makefile.in"
package = 'make DESTDIR="$DESTDIR" install'
"""

MINIMAL = 'name = "zlib"\nversion = "1.0"\nsummary = "s"\nlicense = "MIT"\n'


def test_full_recipe() -> None:
    recipe = parse_recipe(FULL, PATH, "zlib", files=["port.toml", "0001-fix.patch"])
    assert recipe.name == "zlib" and recipe.full_version == "1.3.1-2"
    assert recipe.arch == ("x86_64", "aarch64")
    assert recipe.depends == (Dependency("musl"),)
    assert recipe.build_depends == (Dependency("make", ConstraintOp.GE, "4.0"),)
    assert recipe.provides == (Dependency("libz", ConstraintOp.EQ, "1.3.1"),)
    assert recipe.conflicts == (Dependency("zlib-ng", ConstraintOp.LT, "2"),)
    assert recipe.sources == (
        Source("zlib-1.3.1.tar.gz", url="https://zlib.net/fossils/zlib-1.3.1.tar.gz", sha256=SHA),
        Source("0001-fix.patch", file="0001-fix.patch"),
        Source(
            "extra-data.bin",
            url="https://example.org/download?id=7/data.bin",
            sha256=SHA.replace("9", "8"),
        ),
    )
    assert recipe.sources[1].is_patch and not recipe.sources[0].is_patch
    assert recipe.build.style is BuildStyle.AUTOTOOLS
    assert recipe.build.configure_args == ("--enable-static",)
    assert recipe.build.script(BuildStep.PREPARE) == "sed -i s/a/b/ Makefile.in"
    assert recipe.build.script(BuildStep.BUILD) is None  # the style's default applies
    assert [str(dep) for _, dep in recipe.dependencies()] == ["musl", "make>=4.0", "diffutils"]
    assert recipe.supports("x86_64") and not recipe.supports("riscv64")


def test_allowed_missing_sonames_and_interpreters() -> None:
    text = MINIMAL + '[build]\nallow-missing-sonames = ["libGL.so.1", "/lib/ld-musl.so.1"]\n'
    recipe = parse_recipe(text, PATH, "zlib")
    assert recipe.build.allow_missing_sonames == ("libGL.so.1", "/lib/ld-musl.so.1")
    assert parse_recipe(MINIMAL, PATH, "zlib").build.allow_missing_sonames == ()


def test_minimal_recipe_defaults() -> None:
    recipe = parse_recipe(MINIMAL.encode(), PATH, "zlib")
    assert recipe == Recipe(name="zlib", version="1.0", release=1, summary="s", license="MIT")
    assert recipe.supports("anything")
    assert recipe.build.style is BuildStyle.CUSTOM


def problems(text: str, files: list[str] | None = None) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(text, PATH, "zlib", files=files)
    assert caught.value.port == "zlib"
    return [str(problem) for problem in caught.value.problems]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (MINIMAL + "dependz = []\n", f"{PATH}:5: unknown key 'dependz'"),
        (
            MINIMAL + "x = 1\n[build]\nstyle = 'make'\nstile = 'x'\n",
            f"{PATH}:8: unknown key 'stile' in [build]",
        ),
        (
            'name = "zlib"\nversion = "1"\nlicense = "MIT"\n',
            f"{PATH}: missing required field 'summary'",
        ),
        (
            MINIMAL.replace('"zlib"', '"zlib2"'),
            f"{PATH}:1: name 'zlib2' does not match its directory 'zlib'",
        ),
        (
            MINIMAL + '[[source]]\nurl = "https://zlib.net/zlib-1.3.tar.gz"\n',
            f"{PATH}:6: source #1: url source 'https://zlib.net/zlib-1.3.tar.gz' has no sha256",
        ),
        (
            MINIMAL + 'depends = ["zlib >= 1"]\n',
            f"{PATH}:5: depends: invalid dependency 'zlib >= 1' "
            "(expected name[op version], op: = < <= > >=)",
        ),
        (
            MINIMAL + 'build-depends = ["make=>4"]\n',
            f"{PATH}:5: build-depends: invalid dependency 'make=>4' "
            "(expected name[op version], op: = < <= > >=)",
        ),
        (MINIMAL + 'depends = ["a", "a>1"]\n', f"{PATH}:5: depends: 'a' is listed twice"),
        (
            MINIMAL + '[build]\nallow-missing-sonames = ["libGL.so.1", "lib/x.so", "a b"]\n',
            f"{PATH}:6: allow-missing-sonames: 'lib/x.so' is neither a soname (libGL.so.1) nor"
            " an interpreter's absolute path",
        ),
        (
            MINIMAL + "[build]\nallow-missing-sonames = 'libGL.so.1'\n",
            f"{PATH}:6: 'allow-missing-sonames' must be a list of strings",
        ),
        (MINIMAL + 'depends = "musl"\n', f"{PATH}:5: 'depends' must be a list of strings"),
        (MINIMAL + "release = 0\n", f"{PATH}:5: 'release' must be a positive integer"),
        (MINIMAL + "homepage = 3\n", f"{PATH}:5: 'homepage' must be a string, not an integer"),
        (
            MINIMAL.replace('"1.0"', '"1.0-2"'),
            f"{PATH}:2: invalid version '1.0-2' "
            "(letters, digits, . _ + only; the release is separate)",
        ),
        (MINIMAL + 'provides = ["sh>=1"]\n', f"{PATH}:5: provides entry 'sh>=1' may only use '='"),
        (
            MINIMAL + '[[source]]\nurl = "https://x.org/a.tgz"\nsha256 = "abc"\n',
            f"{PATH}:7: source #1: sha256 must be 64 lowercase hex digits",
        ),
        (
            MINIMAL + '[[source]]\nurl = "ftp://x.org/a.tgz"\nsha256 = "' + SHA + '"\n',
            f"{PATH}:6: source #1: url 'ftp://x.org/a.tgz' is not an http(s) URL of a file",
        ),
        (
            MINIMAL + "[[source]]\nsha256 = '" + SHA + "'\n",
            f"{PATH}:5: source #1: give exactly one of 'url', 'file' or 'path'",
        ),
        (
            MINIMAL + '[[source]]\nfile = "../secret"\n',
            f"{PATH}:6: source #1: file '../secret' must be a relative path inside the port",
        ),
        (
            MINIMAL + '[build]\nstyle = "scons"\n',
            f"{PATH}:6: unknown build style 'scons' "
            "(expected autotools | cmake | meson | make | custom)",
        ),
        (
            MINIMAL + '[build]\ndir = "/abs"\n',
            f"{PATH}:6: build dir '/abs' must be a relative path inside the sources",
        ),
        (MINIMAL + "build = 1\n", f"{PATH}:5: 'build' must be a table ([build])"),
        (
            MINIMAL + '[[source]]\nfile = "a/x.patch"\n[[source]]\nfile = "b/x.patch"\n',
            f"{PATH}:7: two sources are both named 'x.patch' (set 'filename' on one)",
        ),
    ],
)
def test_each_problem_names_file_and_line(text: str, expected: str) -> None:
    assert expected in problems(text)


def test_path_sources_name_repository_paths_outside_ports() -> None:
    text = MINIMAL + (
        '[[source]]\npath = "portsd"\n'
        '[[source]]\npath = "hooks/post-receive"\n'
        '[[source]]\npath = "docs/README.md"\nfilename = "docs.md"\n'
        '[[source]]\nfile = "0001-fix.patch"\n'
    )
    recipe = parse_recipe(text, PATH, "zlib", files=["port.toml", "0001-fix.patch"])
    assert recipe.sources[:3] == (
        Source("portsd", path="portsd"),
        Source("post-receive", path="hooks/post-receive"),
        Source("docs.md", path="docs/README.md"),
    )
    assert recipe.source_paths == ("portsd", "hooks/post-receive", "docs/README.md")
    assert not recipe.sources[0].is_patch
    assert parse_recipe(MINIMAL, PATH, "zlib").source_paths == ()


_RELATIVE = "must be a relative path inside the tree (no '.', '..', '.git' or empty parts)"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('path = "../secret"', f"{PATH}:6: source #1: path '../secret' {_RELATIVE}"),
        ('path = "/etc/passwd"', f"{PATH}:6: source #1: path '/etc/passwd' {_RELATIVE}"),
        ('path = "a/../../b"', f"{PATH}:6: source #1: path 'a/../../b' {_RELATIVE}"),
        ('path = "./portsd"', f"{PATH}:6: source #1: path './portsd' {_RELATIVE}"),
        ('path = "."', f"{PATH}:6: source #1: path '.' {_RELATIVE}"),
        ('path = "portsd/"', f"{PATH}:6: source #1: path 'portsd/' {_RELATIVE}"),
        ('path = "a//b"', f"{PATH}:6: source #1: path 'a//b' {_RELATIVE}"),
        ('path = ""', f"{PATH}:6: source #1: path '' {_RELATIVE}"),
        ('path = ".git/config"', f"{PATH}:6: source #1: path '.git/config' {_RELATIVE}"),
        (
            'path = "ports/zlib/port.toml"',
            f"{PATH}:6: source #1: path 'ports/zlib/port.toml' is under ports/"
            " (a port's own files are 'file' sources)",
        ),
        (
            'path = "ports"',
            f"{PATH}:6: source #1: path 'ports' is under ports/ (a port's own files are"
            " 'file' sources)",
        ),
        ("path = 3", f"{PATH}:6: 'path' must be a string, not an integer"),
        (
            'path = "portsd"\nfile = "fix.patch"',
            f"{PATH}:5: source #1: give exactly one of 'url', 'file' or 'path'",
        ),
        (
            f'url = "https://x.org/a.tgz"\nsha256 = "{SHA}"\npath = "a.tgz"',
            f"{PATH}:5: source #1: give exactly one of 'url', 'file' or 'path'",
        ),
        (
            f'path = "portsd"\nsha256 = "{SHA}"',
            f"{PATH}:7: source #1: sha256 is for url sources (a path is keyed by its git id)",
        ),
        (
            'path = "portsd"\n[[source]]\npath = "other/portsd"',
            f"{PATH}:7: two sources are both named 'portsd' (set 'filename' on one)",
        ),
        (
            'path = "portsd"\nfilename = "a/b"',
            f"{PATH}:7: source #1: filename 'a/b' must be a plain file name",
        ),
        ('path = "portsd"\npaths = "x"', f"{PATH}:7: unknown key 'paths' in [source]"),
    ],
)
def test_each_path_source_problem_names_file_and_line(source: str, expected: str) -> None:
    assert expected in problems(MINIMAL + "[[source]]\n" + source + "\n")


def test_source_line_locates_a_key_of_the_nth_source() -> None:
    text = MINIMAL + '[[source]]\npath = "a"\n\n[[source]]\nfilename = "x"\npath = "b"\n'
    assert source_line(text, 1, "path") == 6
    assert source_line(text, 2, "path") == 10
    assert source_line(text, 3, "path") is None


_SCRIPT_WITH_A_TEST = """\
[build]
prepare = '''
[ -d build ] || mkdir build
[[ -n "$CC" ]] && echo "$CC"
'''
dir = "/abs"
"""
_SCRIPT_WITH_AN_ASSIGNMENT = """\
[build]
build = \"\"\"
dir=out
  style = "x" make
\"\"\"
dir = "/abs"
style = "scons"
"""


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        (
            _SCRIPT_WITH_A_TEST,
            [f"{PATH}:10: build dir '/abs' must be a relative path inside the sources"],
        ),
        (
            _SCRIPT_WITH_AN_ASSIGNMENT,
            [
                f"{PATH}:10: build dir '/abs' must be a relative path inside the sources",
                f"{PATH}:11: unknown build style 'scons' "
                "(expected autotools | cmake | meson | make | custom)",
            ],
        ),
    ],
    ids=["bracket-lines", "assignment-lines"],
)
def test_lines_inside_multiline_scripts_are_not_keys_or_headers(
    script: str, expected: list[str]
) -> None:
    assert problems(MINIMAL + script) == expected


def test_source_line_skips_tables_inside_strings_and_arrays() -> None:
    text = MINIMAL + (
        '[[source]]\nfile = "a.patch"\n'
        "[build]\n"
        'check = """\n[[source]]\npath = "not-this" \\"""\n""""\n'
        "package = '''\n[[source]] \"\npath = \"no\"'''\n"
        'configure-args = [\n  "--x", # ]\n  "[[source]]",\n]\n'
        '[[source]]\nfilename = "b"\npath = "b"\n'
    )
    assert parse_recipe(text, PATH, "zlib").sources[1].path == "b"
    assert source_line(text, 2, "path") == 21
    assert source_line(text, 3, "path") is None


def test_missing_patch_file_is_reported_when_the_file_list_is_known() -> None:
    text = MINIMAL + '[[source]]\nfile = "0001-fix.patch"\n'
    assert problems(text, files=["port.toml"]) == [
        f"{PATH}:6: source #1: file '0001-fix.patch' does not exist in the port directory"
    ]
    assert parse_recipe(text, PATH, "zlib").sources[0].is_patch  # unknown file list: not checked


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ('name = "zlib"\nversion = \n', 2, "invalid TOML"),
        ('name = "zlib"\nname = "zlib"\n', 2, "duplicate key"),
        ('name = "zlib"\ndepends = ["a",\n', 2, "invalid TOML"),
    ],
)
def test_toml_errors_carry_the_line(text: str, line: int, fragment: str) -> None:
    [message] = problems(text)
    assert message.startswith(f"{PATH}:{line}: ") and fragment in message


def test_all_problems_reported_at_once_in_line_order() -> None:
    text = 'name = "other"\nversion = "1-1"\nsummary = "s"\nlicense = "MIT"\nfoo = 1\n'
    assert problems(text) == [
        f"{PATH}:1: name 'other' does not match its directory 'zlib'",
        f"{PATH}:2: invalid version '1-1' (letters, digits, . _ + only; the release is separate)",
        f"{PATH}:5: unknown key 'foo'",
    ]


def test_not_utf8() -> None:
    assert problems(b"name = \xff".decode("latin-1").encode("latin-1"))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("zlib", Dependency("zlib")),
        ("zlib>=1.2.13", Dependency("zlib", ConstraintOp.GE, "1.2.13")),
        ("libfoo<2:1.0-3", Dependency("libfoo", ConstraintOp.LT, "2:1.0-3")),
        ("gtk+3=3.24", Dependency("gtk+3", ConstraintOp.EQ, "3.24")),
        ("py3.11-x>1", Dependency("py3.11-x", ConstraintOp.GT, "1")),
    ],
)
def test_dependency_syntax(text: str, expected: Dependency) -> None:
    assert Dependency.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    "text", ["", "Zlib", "zlib>=", ">=1", "zlib >=1", "zlib==1", "-zlib", "zlib>=1 2"]
)
def test_bad_dependency_syntax(text: str) -> None:
    with pytest.raises(ValueError, match="invalid dependency"):
        Dependency.parse(text)


def test_mirror_urls_name_a_configured_mirror_and_need_a_sha256() -> None:
    text = MINIMAL + f'[[source]]\nurl = "mirror://gnu/hello/hello-2.12.tar.gz"\nsha256 = "{SHA}"\n'
    (source,) = parse_recipe(text, PATH, "zlib").sources
    assert source == Source(
        "hello-2.12.tar.gz", url="mirror://gnu/hello/hello-2.12.tar.gz", sha256=SHA
    )
    assert mirror_of("mirror://gnu/hello/hello-2.12.tar.gz") == ("gnu", "hello/hello-2.12.tar.gz")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mirror://gnu/a.tgz", "url source 'mirror://gnu/a.tgz' has no sha256"),
        ("mirror://gnu/../a.tgz", "url 'mirror://gnu/../a.tgz' is not mirror://NAME/PATH"),
        ("mirror://gnu/a//b.tgz", "url 'mirror://gnu/a//b.tgz' is not mirror://NAME/PATH"),
        ("mirror://gnu/dir/", "url 'mirror://gnu/dir/' is not mirror://NAME/PATH"),
        ("mirror:///a.tgz", "url 'mirror:///a.tgz' is not mirror://NAME/PATH"),
    ],
)
def test_bad_mirror_urls(url: str, message: str) -> None:
    sha = "" if "no sha256" in message else f'sha256 = "{SHA}"\n'
    with pytest.raises(RecipeError) as caught:
        parse_recipe(MINIMAL + f'[[source]]\nurl = "{url}"\n{sha}', PATH, "zlib")
    assert str(caught.value).startswith(f"{PATH}:6: source #1: {message}")
