"""portsd.build.builder: real builds of tiny C projects with gcc and make in the real sandbox."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import pytest
import zstandard

from portsd.build import seed, styles
from portsd.build.builder import (
    BuildRequest,
    build_port,
    compose_root,
    first_archive,
    is_archive,
    prepare_script,
)
from portsd.core.recipe import BuildStep, BuildStyle, Recipe, parse_recipe
from portsd.errors import BuildError, ConfigError, FetchError, FileConflict
from portsd.pkg.package import extract_package
from portsd.pkg.repo import Repository
from portsd.pkg.sign import PublicKey
from tests.daemon_harness import command_environment
from tests.fixtures import commit_all, git
from tests.processes import marker, processes_with

# -- helpers -------------------------------------------------------------------------------


def tarball(path: Path, files: Mapping[str, str | bytes], mode: int = 0o644) -> Path:
    """Write a tar archive of ``files`` (member name -> content), compressed by suffix."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, content in sorted(files.items()):
            data = content.encode() if isinstance(content, str) else content
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o755 if name.endswith(("configure", ".sh")) else mode
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    name = path.name
    if name.endswith((".tar.gz", ".tgz")):
        data = subprocess.run(["gzip", "-c"], input=data, capture_output=True, check=True).stdout
    elif name.endswith(".tar.xz"):
        data = subprocess.run(["xz", "-c"], input=data, capture_output=True, check=True).stdout
    elif name.endswith(".tar.zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Port:
    """A port directory plus the fetched sources of its url sources."""

    def __init__(self, base: Path, name: str = "demo") -> None:
        self.name = name
        self.dir = base / "ports" / name
        self.dir.mkdir(parents=True)
        self.downloads = base / "downloads"
        self.downloads.mkdir(exist_ok=True)
        self.sources: dict[str, Path] = {}
        self.source_tables: list[str] = []

    def archive(self, filename: str, files: Mapping[str, str | bytes]) -> Port:
        path = tarball(self.downloads / filename, files)
        return self.url_file(filename, path)

    def url_file(self, filename: str, path: Path) -> Port:
        self.sources[filename] = path
        self.source_tables.append(
            f'[[source]]\nurl = "https://example.org/{filename}"\nsha256 = "{sha256(path)}"\n'
        )
        return self

    def file(self, name: str, content: str) -> Port:
        (self.dir / name).parent.mkdir(parents=True, exist_ok=True)
        (self.dir / name).write_text(content)
        self.source_tables.append(f'[[source]]\nfile = "{name}"\n')
        return self

    def path(self, path: str, exported: Path) -> Port:
        """A ``path`` source, already exported (as ``Tree.export_paths`` does) to ``exported``."""
        self.sources[path.rsplit("/", 1)[-1]] = exported
        self.source_tables.append(f'[[source]]\npath = "{path}"\n')
        return self

    def recipe(self, build: str, extra: str = "") -> Recipe:
        text = (
            f'name = "{self.name}"\nversion = "1.0"\nsummary = "test"\nlicense = "MIT"\n'
            f"{extra}\n" + "\n".join(self.source_tables) + f"\n[build]\n{build}\n"
        )
        (self.dir / "port.toml").write_text(text)
        files = [str(p.relative_to(self.dir)) for p in self.dir.rglob("*") if p.is_file()]
        return parse_recipe(text, str(self.dir / "port.toml"), self.name, files)


def request(tmp_path: Path, port: Port, recipe: Recipe, **changes: object) -> BuildRequest:
    values: dict[str, object] = {
        "recipe": recipe,
        "key": "0" * 64,
        "port_dir": port.dir,
        "sources": port.sources,
        "workdir": tmp_path / "work",
        "log": tmp_path / "logs" / "build.log",
        "arch": "x86_64",
        "toolchain": Path(os.environ["PORTSD_SEED"]) / "root",
        "jobs": 2,
        "timeout": 120.0,
        "source_date_epoch": 1_700_000_000,
    }
    values.update(changes)
    return BuildRequest(**values)  # type: ignore[arg-type]


def toml_string(script: str) -> str:
    return "'''\n" + script + "'''"


def custom(script: str, step: str = "build") -> str:
    return f'style = "custom"\n{step} = {toml_string(script)}'


# -- a library dependency, built on the host, laid out as an installed package ------------

LIB_HEADER = "int portsdtest_answer(void);\n"
LIB_SOURCE = "int portsdtest_answer(void) { return 42; }\n"
LIB_PC = """prefix=/usr
libdir=${prefix}/lib
includedir=${prefix}/include

Name: portsdtest
Description: test library
Version: 1.0
Libs: -L${libdir} -lportsdtest
Cflags: -I${includedir}
"""

CONFIGURE = r"""#!/bin/sh
# A hand-written configure in autoconf's manner: pkg-config, then a link test.
prefix=/usr/local
for arg; do case $arg in --prefix=*) prefix=${arg#--prefix=};; esac; done
echo "checking for portsdtest... "
if ! pkg-config --exists portsdtest; then
    echo "configure: error: portsdtest not found"; exit 1
fi
CFLAGS=$(pkg-config --cflags portsdtest)
LIBS=$(pkg-config --libs portsdtest)
cat > conftest.c <<EOF
#include <portsdtest.h>
#include <portsdconf.h>
int main(void) { return portsdtest_answer() == CONF_ANSWER ? 0 : 1; }
EOF
cc $CFLAGS -o conftest conftest.c $LIBS || { echo "configure: error: cannot link"; exit 1; }
./conftest || { echo "configure: error: cannot run"; exit 1; }
printf 'PREFIX = %s\nCFLAGS = %s\nLIBS = %s\n' "$prefix" "$CFLAGS" "$LIBS" > config.mk
echo "configure: ok, prefix $prefix"
"""

APP_MAKEFILE = """include config.mk
app: app.c
\t$(CC) $(CFLAGS) -o app app.c $(LIBS)
check: app
\t./app > check.out
\ttest "$$(cat check.out)" = 42
install: app
\tinstall -D -m 755 app $(DESTDIR)$(PREFIX)/bin/app
"""

APP_SOURCE = """#include <stdio.h>
#include <portsdtest.h>
#include <portsdconf.h>
int main(void) { printf("%d\\n", portsdtest_answer() + CONF_ANSWER - CONF_ANSWER); return 0; }
"""


@pytest.fixture(scope="module")
def library_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libportsdtest as an extracted package: usr/include, usr/lib, usr/lib/pkgconfig."""
    root = tmp_path_factory.mktemp("dep") / "portsdtest"
    (root / "usr" / "include").mkdir(parents=True)
    (root / "usr" / "lib" / "pkgconfig").mkdir(parents=True)
    (root / "usr" / "include" / "portsdtest.h").write_text(LIB_HEADER)
    (root / "usr" / "lib" / "pkgconfig" / "portsdtest.pc").write_text(LIB_PC)
    source = root.parent / "lib.c"
    source.write_text(LIB_SOURCE)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-Wl,-soname,libportsdtest.so.1", "-o"]
        + [str(root / "usr/lib/libportsdtest.so.1"), str(source)],
        check=True,
    )
    (root / "usr" / "lib" / "libportsdtest.so").symlink_to("libportsdtest.so.1")
    return root


@pytest.fixture(scope="module")
def header_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A header-only dependency, so that a build root composes two packages."""
    root = tmp_path_factory.mktemp("dep") / "portsdconf"
    (root / "usr" / "include").mkdir(parents=True)
    (root / "usr" / "include" / "portsdconf.h").write_text("#define CONF_ANSWER 42\n")
    return root


def app_port(tmp_path: Path) -> tuple[Port, Recipe]:
    port = Port(tmp_path, "app")
    port.archive(
        "app-1.0.tar.gz",
        {
            "app-1.0/configure": CONFIGURE,
            "app-1.0/Makefile": APP_MAKEFILE,
            "app-1.0/app.c": APP_SOURCE,
        },
    )
    return port, port.recipe('style = "autotools"', 'depends = ["portsdtest", "portsdconf"]')


# -- pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filename", "archive"),
    [
        ("a-1.tar.gz", True),
        ("a-1.tgz", True),
        ("a-1.tar.xz", True),
        ("a-1.tar.bz2", True),
        ("a-1.tar.zst", True),
        ("a-1.tar", True),
        ("a-1.zip", False),
        ("fix.patch", False),
        ("a.gz", False),
    ],
)
def test_is_archive(filename: str, archive: bool) -> None:
    assert is_archive(filename) is archive


def test_prepare_script_order_and_quoting(tmp_path: Path) -> None:
    port = Port(tmp_path)
    port.archive("a-1.tar.gz", {"a-1/x": "x"}).archive("b$2.tar.xz", {"b/y": "y"})
    port.url_file("notes.txt", tarball(tmp_path / "n.tar", {"n": "n"}))
    port.file("0001-first.patch", "").file("files/extra.conf", "c").file("0002-second.patch", "")
    recipe = port.recipe('style = "custom"\nprepare = "echo mine"')
    script = prepare_script(recipe, "/build/src/a-1", skip="a-1.tar.gz")
    assert script.splitlines() == [
        "tar -xf /build/sources/'b$2.tar.xz' -C \"$SRCDIR\"",
        'cp -- /build/sources/notes.txt "$SRCDIR"/notes.txt',
        'cp -- /build/port/files/extra.conf "$SRCDIR"/extra.conf',
        "cd -- /build/src/a-1",
        "patch -p1 -i /build/port/0001-first.patch",
        "patch -p1 -i /build/port/0002-second.patch",
        "echo mine",
    ]
    assert first_archive(recipe) == "a-1.tar.gz"


def test_prepare_copies_path_sources_without_following_links(tmp_path: Path) -> None:
    port = Port(tmp_path).path("portsd", tmp_path / "x").path("hooks/post-receive", tmp_path / "y")
    port.file("0001-fix.patch", "")
    script = prepare_script(port.recipe('style = "custom"'), "/build/src")
    assert script.splitlines() == [
        'cp -R -P -- /build/sources/portsd "$SRCDIR"/portsd',
        'cp -R -P -- /build/sources/post-receive "$SRCDIR"/post-receive',
        "cd -- /build/src",
        "patch -p1 -i /build/port/0001-fix.patch",
    ]


def test_style_defaults() -> None:
    assert styles.default_script(BuildStyle.AUTOTOOLS, BuildStep.BUILD, ["--with-x=a b"]) == (
        "./configure --prefix=/usr '--with-x=a b'\nmake"
    )
    assert styles.default_script(BuildStyle.AUTOTOOLS, BuildStep.PACKAGE) == (
        'make DESTDIR="$DESTDIR" install'
    )
    assert "make check" in (styles.default_script(BuildStyle.AUTOTOOLS, BuildStep.CHECK) or "")
    assert styles.default_script(BuildStyle.MAKE, BuildStep.PACKAGE) == (
        'make DESTDIR="$DESTDIR" PREFIX=/usr install'
    )
    assert "-DCMAKE_INSTALL_PREFIX=/usr" in (
        styles.default_script(BuildStyle.CMAKE, BuildStep.BUILD) or ""
    )
    assert "--destdir" in (styles.default_script(BuildStyle.MESON, BuildStep.PACKAGE) or "")
    for step in BuildStep:
        assert styles.default_script(BuildStyle.CUSTOM, step) is None
        assert styles.default_script(BuildStyle.MAKE, BuildStep.PREPARE) is None


def test_recipe_scripts_override_style_defaults(tmp_path: Path) -> None:
    recipe = Port(tmp_path).recipe('style = "make"\ncheck = ""\nbuild = "make all"')
    assert styles.script(recipe.build, BuildStep.BUILD) == "make all"
    assert styles.script(recipe.build, BuildStep.CHECK) == ""  # an empty script disables the step
    assert styles.script(recipe.build, BuildStep.PACKAGE) == styles.default_script(
        BuildStyle.MAKE, BuildStep.PACKAGE
    )


MAKEFILES_WITH_CHECK = [
    "check:\n\ttrue\n",
    "all check: x\n",
    "check test:: x\n",
    "check : all\n",
    "# automake\ncheck: check-am\n",
]
MAKEFILES_WITHOUT_CHECK = [
    "all:\n\ttrue\n",
    "check = yes\n",
    "check := yes\n",
    "#check:\n",
    "checks:\n",
]


def check_step_output(directory: Path, style: BuildStyle = BuildStyle.AUTOTOOLS) -> str:
    """What the style's check step prints in ``directory``, ``make check`` replaced by an
    echo (with the make style's arguments, whatever comes before ``check``)."""
    script = styles.default_script(style, BuildStep.CHECK) or ""
    script = script.replace("make check", "echo would-check")
    script = script.replace("make PREFIX=/usr check", "echo would-check")
    result = subprocess.run(
        ["sh", "-eu", "-c", script], cwd=directory, capture_output=True, text=True, check=True
    )
    return result.stdout


@pytest.mark.parametrize("makefile", MAKEFILES_WITH_CHECK + MAKEFILES_WITHOUT_CHECK)
def test_check_target_detection(makefile: str, tmp_path: Path) -> None:
    (tmp_path / "Makefile").write_text(makefile)
    output = check_step_output(tmp_path)
    assert (output == "would-check\n") is (makefile in MAKEFILES_WITH_CHECK)


GNULIB_GNUMAKEFILE = """\
# gnulib's top/GNUmakefile, cut down: no check rule of its own, the Makefile's included
_gl-Makefile := $(wildcard [M]akefile)
ifneq ($(_gl-Makefile),)
include Makefile
else
.DEFAULT_GOAL := abort-due-to-no-makefile
$(MAKECMDGOALS): abort-due-to-no-makefile
abort-due-to-no-makefile:
\t@echo There seems to be no Makefile in this directory. 1>&2; exit 1
endif
"""
RECURSIVE_CHECK = """\
check: check-recursive
check-recursive:
\t$(MAKE) -C sub check
"""


@pytest.mark.parametrize("style", [BuildStyle.AUTOTOOLS, BuildStyle.MAKE])
def test_check_target_included_by_a_gnulib_gnumakefile_is_found(
    style: BuildStyle, tmp_path: Path
) -> None:
    (tmp_path / "GNUmakefile").write_text(GNULIB_GNUMAKEFILE)
    (tmp_path / "Makefile").write_text(RECURSIVE_CHECK)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "Makefile").write_text("$(shell touch read)\ncheck:\n\ttouch built\n")
    assert check_step_output(tmp_path, style) == "would-check\n"
    # asking make ran no sub-make, let alone a recipe
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["Makefile"]


@pytest.mark.parametrize("style", [BuildStyle.AUTOTOOLS, BuildStyle.MAKE])
def test_no_makefile_or_one_without_check_skips_the_step(style: BuildStyle, tmp_path: Path) -> None:
    assert check_step_output(tmp_path, style) == "no check target: skipping checks\n"
    (tmp_path / "GNUmakefile").write_text(GNULIB_GNUMAKEFILE)
    (tmp_path / "Makefile").write_text("all:\n\ttrue\ninstall:\n\ttrue\n")
    assert check_step_output(tmp_path, style) == "no check target: skipping checks\n"


def test_compose_root_merges_and_links(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "usr" / "include").mkdir(parents=True)
    (a / "usr" / "include" / "a.h").write_text("a")
    (a / "usr" / "lib").mkdir()
    (a / "usr" / "lib" / "liba.so.1").write_text("elf")
    (a / "usr" / "lib" / "liba.so").symlink_to("liba.so.1")
    (b / "usr" / "include" / "b").mkdir(parents=True)
    (b / "usr" / "include" / "b" / "b.h").write_text("b")
    (b / "lib").mkdir()
    (b / "lib" / "libb.a").write_text("ar")  # a top-level lib/ lands in usr/lib
    (b / "etc").mkdir()
    (b / "etc" / "b.conf").write_text("not in a build root")
    root = compose_root([a, b], tmp_path / "root")
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
    assert files == [
        "usr/include/a.h",
        "usr/include/b/b.h",
        "usr/lib/liba.so",
        "usr/lib/liba.so.1",
        "usr/lib/libb.a",
    ]
    assert (root / "usr/lib/liba.so").readlink() == Path("liba.so.1")
    assert (root / "usr/include/a.h").stat().st_ino == (a / "usr/include/a.h").stat().st_ino


def test_compose_root_copies_across_file_systems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on a file system other than tmp_path's")
    other = shm / f"portsd-test-{os.getpid()}-{marker()}"
    try:
        (other / "usr" / "lib").mkdir(parents=True)
        (other / "usr" / "lib" / "libx.so.1").write_bytes(b"\x7fELF")
        (other / "usr" / "lib" / "libx.so").symlink_to("libx.so.1")
        root = compose_root([other], tmp_path / "root")
        copied = root / "usr" / "lib" / "libx.so.1"
        assert copied.read_bytes() == b"\x7fELF" and copied.stat().st_dev != shm.stat().st_dev
        assert (root / "usr" / "lib" / "libx.so").readlink() == Path("libx.so.1")
    finally:
        shutil.rmtree(other, ignore_errors=True)


@pytest.mark.parametrize(
    ("a_path", "b_path", "conflict"),
    [
        ("usr/include/x.h", "usr/include/x.h", "usr/include/x.h"),
        ("usr/lib/libx.a", "lib/libx.a", "usr/lib/libx.a"),
        ("usr/share/x/file", "usr/share/x", "usr/share/x"),  # a directory against a file
        ("usr/share/x", "usr/share/x/file", "usr/share/x"),
    ],
)
def test_compose_root_conflicts_name_both(
    a_path: str, b_path: str, conflict: str, tmp_path: Path
) -> None:
    for root, path in ((tmp_path / "pkg-a", a_path), (tmp_path / "pkg-b", b_path)):
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text("x")
    with pytest.raises(FileConflict) as caught:
        compose_root([tmp_path / "pkg-a", tmp_path / "pkg-b"], tmp_path / "root")
    assert caught.value.path == conflict
    assert {caught.value.package, caught.value.owner} == {
        str(tmp_path / "pkg-a"),
        str(tmp_path / "pkg-b"),
    }
    assert str(tmp_path / "pkg-a") in str(caught.value) and str(tmp_path / "pkg-b") in str(
        caught.value
    )


def test_missing_fetched_source_is_a_fetch_error(tmp_path: Path) -> None:
    port = Port(tmp_path).archive("a-1.tar.gz", {"a-1/x": "x"})
    recipe = port.recipe('style = "make"')
    with pytest.raises(FetchError, match="a-1.tar.gz"):
        build_port(request(tmp_path, port, recipe, sources={}))


def test_unexported_path_source_is_a_fetch_error(tmp_path: Path) -> None:
    port = Port(tmp_path).path("tools/gen", tmp_path / "gen")
    with pytest.raises(FetchError, match="gen: path 'tools/gen' was not exported"):
        build_port(request(tmp_path, port, port.recipe(custom("true")), sources={}))


def test_path_sources_reach_srcdir_as_writable_copies_of_read_only_inputs(
    tmp_path: Path,
) -> None:
    exported = tmp_path / "exported"
    package = exported / "app"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("VERSION = 1\n")
    (package / "sub" / "run.sh").write_text("#!/bin/sh\necho run\n")
    (package / "sub" / "run.sh").chmod(0o755)
    os.symlink("../__init__.py", package / "sub" / "link")
    (exported / "README.md").write_text("read me\n")
    port = (
        Port(tmp_path, "selfpkg").path("src/app", package).path("README.md", exported / "README.md")
    )
    script = (
        "for p in /build/sources/app/__init__.py /build/sources/README.md; do\n"
        '  if ( echo x >> "$p" ) 2>/dev/null; then echo "WROTE $p"; else echo "denied $p"; fi\n'
        "done > $DESTDIR/report\n"
        "echo 'VERSION = 2' > app/__init__.py\n"  # the copy in SRCDIR is the build's own
        "test -x app/sub/run.sh && test -L app/sub/link\n"
        'cp -R -P app README.md "$DESTDIR"/\n'
    )
    result = build_port(request(tmp_path, port, port.recipe(custom(script, "package"))))
    assert (result.destdir / "report").read_text().splitlines() == [
        "denied /build/sources/app/__init__.py",
        "denied /build/sources/README.md",
    ]
    assert (result.destdir / "app" / "__init__.py").read_text() == "VERSION = 2\n"
    assert (result.destdir / "README.md").read_text() == "read me\n"
    assert os.readlink(result.destdir / "app" / "sub" / "link") == "../__init__.py"
    assert (package / "__init__.py").read_text() == "VERSION = 1\n"  # the input is untouched


def test_hidden_path_inside_a_visible_one_is_refused(tmp_path: Path) -> None:
    port = Port(tmp_path)
    recipe = port.recipe(custom("true"))
    key = port.dir / "secret.key"
    key.write_text("secret")
    with pytest.raises(ConfigError, match="secret.key"):
        build_port(request(tmp_path, port, recipe, hidden=(key,)))


def test_dependency_root_holding_a_hidden_path_is_refused(tmp_path: Path) -> None:
    port = Port(tmp_path)
    state = tmp_path / "state"
    (state / "usr").mkdir(parents=True)
    (state / "key").write_text("secret")
    for roots in ((state,), (state, tmp_path / "ports")):  # as it is, and composed
        req = request(tmp_path, port, port.recipe(custom("true")), dependency_roots=roots)
        with pytest.raises(ConfigError, match="would expose"):
            build_port(replace(req, hidden=(state / "key",)))
    assert not (tmp_path / "work" / "deps").exists()


# -- real builds (no compiler) -------------------------------------------------------------


def test_failing_step_names_port_step_status_and_log(tmp_path: Path) -> None:
    port = Port(tmp_path, "broken")
    recipe = port.recipe(custom("echo about to fail\nexit 3\necho never"))
    lines: list[str] = []
    req = request(tmp_path, port, recipe, on_line=lines.append)
    with pytest.raises(BuildError) as caught:
        build_port(req)
    error = caught.value
    assert (error.port, error.step, error.status, error.log) == (
        "broken",
        "build",
        "exit 3",
        str(req.log),
    )
    assert str(error) == f"broken: build failed (exit 3); log: {req.log}"
    log = req.log.read_text()
    assert "==> build (in /build/src)" in log and "about to fail\n" in log
    assert "never" not in log.splitlines() and "==> build: failed (exit 3)" in log
    assert "about to fail" in lines  # the callback saw the same output live


def test_undefined_variable_fails_the_step(tmp_path: Path) -> None:
    port = Port(tmp_path)
    recipe = port.recipe(custom('echo "$NOT_SET"', step="package"))
    with pytest.raises(BuildError) as caught:
        build_port(request(tmp_path, port, recipe))
    assert caught.value.step == "package" and caught.value.status == "exit 2"


def test_environment_is_exactly_the_documented_one(tmp_path: Path) -> None:
    port = Port(tmp_path, "envport")
    recipe = port.recipe(
        custom('env | sort > "$DESTDIR/env"; id -u > "$DESTDIR/uid"; umask > "$DESTDIR/umask"')
    )
    result = build_port(request(tmp_path, port, recipe, jobs=3))
    env = dict(line.split("=", 1) for line in (result.destdir / "env").read_text().splitlines())
    assert env == {
        "SRCDIR": "/build/src",
        "DESTDIR": "/build/pkg",
        "PREFIX": "/usr",
        "JOBS": "3",
        "MAKEFLAGS": "-j3",
        "SOURCE_DATE_EPOCH": "1700000000",
        "CARCH": "x86_64",
        "HOME": "/build/home",
        "PORTNAME": "envport",
        "PORTVERSION": "1.0",
        "PATH": "/usr/bin:/usr/sbin:/bin:/sbin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TZ": "UTC",
        "TMPDIR": "/tmp",
        "PWD": "/build/src",  # set by sh itself
    }
    assert (result.destdir / "uid").read_text() == "1000\n"
    assert (result.destdir / "umask").read_text() == "0022\n"
    assert result.destdir == tmp_path / "work" / "pkg" and result.log.exists()
    assert [t.step for t in result.steps] == [BuildStep.PREPARE, BuildStep.BUILD]


def test_prepare_unpacks_copies_and_patches(tmp_path: Path) -> None:
    port = Port(tmp_path, "prep")
    port.archive("prep-1.0.tar.gz", {"prep-1.0/greeting": "hello\n", "prep-1.0/sub/keep": "k\n"})
    port.archive("extra-2.tar.zst", {"extra-2/data": "zstd\n"})
    port.archive("more.tar.xz", {"more/data": "xz\n"})
    plain = tmp_path / "downloads" / "plain.txt"
    plain.write_text("plain\n")
    port.url_file("plain.txt", plain)
    port.file("files/site.conf", "conf\n")
    port.file(
        "0001-greet.patch",
        "--- a/greeting\n+++ b/greeting\n@@ -1 +1 @@\n-hello\n+hello, patched\n",
    )
    recipe = port.recipe(
        'style = "custom"\nprepare = "echo prepared >> greeting"\n'
        "package = "
        + toml_string("pwd > $DESTDIR/pwd; cp greeting $DESTDIR/; ls -A $SRCDIR > $DESTDIR/src")
    )
    result = build_port(request(tmp_path, port, recipe))
    assert result.builddir == "/build/src/prep-1.0"
    assert (result.destdir / "pwd").read_text() == "/build/src/prep-1.0\n"
    assert (result.destdir / "greeting").read_text() == "hello, patched\nprepared\n"
    assert (result.destdir / "src").read_text().split() == [
        "extra-2",
        "more",
        "plain.txt",
        "prep-1.0",
        "site.conf",
    ]
    assert (tmp_path / "work/src/extra-2/data").read_text() == "zstd\n"


def test_build_dir_from_recipe_or_srcdir(tmp_path: Path) -> None:
    port = Port(tmp_path)
    port.archive("two-tops.tar.gz", {"a/x": "x", "b/y": "y"})
    recipe = port.recipe(custom("pwd > $DESTDIR/pwd"))
    result = build_port(request(tmp_path, port, recipe))
    assert (
        result.builddir == "/build/src" and (result.destdir / "pwd").read_text() == "/build/src\n"
    )

    chosen = port.recipe('dir = "b"\n' + custom("pwd > $DESTDIR/pwd"))
    result = build_port(request(tmp_path, port, chosen))
    assert (result.destdir / "pwd").read_text() == "/build/src/b\n"


def test_a_failed_patch_fails_prepare(tmp_path: Path) -> None:
    port = Port(tmp_path)
    port.archive("p-1.tar.gz", {"p-1/f": "one\n"})
    port.file("bad.patch", "--- a/f\n+++ b/f\n@@ -1 +1 @@\n-two\n+three\n")
    with pytest.raises(BuildError) as caught:
        build_port(request(tmp_path, port, port.recipe(custom("true"))))
    assert caught.value.step == "prepare" and caught.value.status.startswith("exit ")


def test_writes_outside_build_dir_and_destdir_fail(tmp_path: Path) -> None:
    port = Port(tmp_path, "writer")
    port.archive("w-1.tar.gz", {"w-1/file": "original\n"})
    tag = marker().replace(".", "")
    targets = [
        f"/portsd-{tag}",
        f"/usr/portsd-{tag}",
        f"/usr/bin/portsd-{tag}",
        f"/usr/local/portsd-{tag}",
        f"/etc/portsd-{tag}",
        "/etc/passwd",
        f"/build/portsd-{tag}",
        "/build/port/port.toml",
        f"/build/port/portsd-{tag}",
        "/build/sources/w-1.tar.gz",
        f"/build/sources/portsd-{tag}",
    ]
    script = (
        "for p in " + " ".join(targets) + "; do\n"
        '  if ( echo x >> "$p" ) 2>/dev/null; then echo "WROTE $p"; else echo "denied $p"; fi\n'
        "done > $DESTDIR/report\n"
        "echo x >> $SRCDIR/w-1/file\n"
        "mkdir -p /tmp/t $HOME/.cache && echo ok > /tmp/t/f && echo ok > $HOME/.cache/f\n"
    )
    port_toml = port.dir / "port.toml"
    recipe = port.recipe(custom(script))
    before = port_toml.read_text()
    try:
        result = build_port(request(tmp_path, port, recipe))
        report = (result.destdir / "report").read_text().splitlines()
        assert report == [f"denied {p}" for p in targets]
        assert (tmp_path / "work/src/w-1/file").read_text() == "original\nx\n"
    finally:
        leaked = [p for p in targets if "portsd-" in p and Path(p).exists()]
        for path in leaked:
            Path(path).unlink()
    assert leaked == []
    assert port_toml.read_text() == before
    assert sorted(os.listdir(port.dir)) == ["port.toml"]
    assert tarfile.open(port.sources["w-1.tar.gz"]).getnames() == ["w-1/file"]


def test_network_is_unreachable(tmp_path: Path) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    address = server.getsockname()
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    probe = f"exec 3<>/dev/tcp/{address[0]}/{address[1]}"
    try:
        # the probe works outside the sandbox: the refusal inside is the sandbox's doing
        subprocess.run(["bash", "-c", probe], check=True, timeout=10)
        deadline = time.monotonic() + 5
        while not accepted and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(accepted) == 1
        port = Port(tmp_path, "net")
        script = (
            f"if bash -c '{probe}' 2> $DESTDIR/error; then echo connected; else echo refused; fi"
            " > $DESTDIR/result"
        )
        result = build_port(request(tmp_path, port, port.recipe(custom(script))))
        time.sleep(0.3)
        assert (result.destdir / "result").read_text() == "refused\n"
        assert "Connection refused" in (result.destdir / "error").read_text()
        assert len(accepted) == 1
    finally:
        stop.set()
        thread.join()
        server.close()
        for connection in accepted:
            connection.close()  # type: ignore[attr-defined]


def test_hang_is_killed_at_timeout_and_nothing_survives(tmp_path: Path) -> None:
    tag = marker()
    script = (
        f"sleep {tag} &\n"  # a background child
        f"setsid sh -c 'sleep {tag} & exec sleep {tag}' &\n"  # a new session, and its child
        f"sh -c 'trap \"\" TERM HUP; sleep {tag}' &\n"
        "echo hanging\n"
        f"sleep {tag}\n"
    )
    port = Port(tmp_path, "hang")
    req = request(tmp_path, port, port.recipe(custom(script)), timeout=2.0)
    start = time.monotonic()
    # while it runs, the processes exist: the check below is able to see them
    seen: list[int] = []

    def look() -> None:
        time.sleep(1.2)
        seen.extend(processes_with(f"sleep\0{tag}"))

    watcher = threading.Thread(target=look, daemon=True)
    watcher.start()
    with pytest.raises(BuildError) as caught:
        build_port(req)
    watcher.join()
    elapsed = time.monotonic() - start
    assert (caught.value.step, caught.value.status) == ("build", "timed out after 2 s")
    assert 2.0 <= elapsed < 6.0
    assert len(seen) == 5  # the two in the new session among them
    deadline = time.monotonic() + 5
    while processes_with(tag) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processes_with(tag) == []
    assert "timed out after 2 s" in req.log.read_text()


def test_state_dir_and_signing_key_are_invisible(tmp_path: Path) -> None:
    state = tmp_path / "state"
    secret = f"portsd-signing-{marker().replace('.', '')}"
    (state / "keys").mkdir(parents=True)
    key = state / "keys" / f"{secret}.key"
    key.write_text("untrusted comment: minisign secret key\n")
    (state / "portsd.sqlite").write_text("db")
    port = Port(tmp_path, "snoop")
    script = (
        # all of the sandbox but the host's /usr (which check() keeps hidden paths out of)
        f"find / \\( -path /proc -o -path /dev -o -path /usr \\) -prune -o -name '{secret}*' "
        "-print > $DESTDIR/found 2>/dev/null || true\n"
        f"find / \\( -path /proc -o -path /dev -o -path /usr \\) -prune -o -name portsd.sqlite "
        "-print >> $DESTDIR/found 2>/dev/null || true\n"
        f"ls {state} {key} >> $DESTDIR/found 2>/dev/null || true\n"
    )
    # a realistic layout: the build's work directory inside the state directory
    req = request(
        tmp_path,
        port,
        port.recipe(custom(script)),
        workdir=state / "builds" / "1",
        log=state / "logs" / "1.log",
        hidden=(state / "keys", key, state / "portsd.sqlite"),
    )
    result = build_port(req)
    assert (result.destdir / "found").read_text() == ""


# -- real builds with gcc and make ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("composed", [False, True], ids=["one-root", "two-roots-composed"])
def test_dependency_is_found_by_plain_configure(
    composed: bool, library_root: Path, header_root: Path, tmp_path: Path
) -> None:
    port, recipe = app_port(tmp_path)
    roots: tuple[Path, ...]
    if composed:
        roots = (library_root, header_root)
    else:
        # one root, used as the overlay layer as it is (how a cached composition is passed)
        roots = (compose_root([library_root, header_root], tmp_path / "cached"),)
    req = request(tmp_path, port, recipe, dependency_roots=roots)
    result = build_port(req)
    log = req.log.read_text()
    assert "configure: ok, prefix /usr" in log
    app = result.destdir / "usr" / "bin" / "app"
    assert app.is_file()
    # check ran the program, which loaded the dependency's shared library from /usr/lib
    assert (tmp_path / "work/src/app-1.0/check.out").read_text() == "42\n"
    needed = subprocess.run(["readelf", "-d", str(app)], capture_output=True, text=True).stdout
    assert "libportsdtest.so.1" in needed
    assert [t.step for t in result.steps] == [
        BuildStep.PREPARE,
        BuildStep.BUILD,
        BuildStep.CHECK,
        BuildStep.PACKAGE,
    ]
    assert all(t.seconds > 0 for t in result.steps)
    assert sorted(p.name for p in result.destdir.rglob("*")) == ["app", "bin", "usr"]


@pytest.mark.slow
def test_undeclared_dependency_is_not_found(header_root: Path, tmp_path: Path) -> None:
    port, recipe = app_port(tmp_path)
    # header_root is given, library_root (built and on disk) is not
    req = request(tmp_path, port, recipe, dependency_roots=(header_root,))
    with pytest.raises(BuildError) as caught:
        build_port(req)
    assert (caught.value.step, caught.value.status) == ("build", "exit 1")
    assert "configure: error: portsdtest not found" in req.log.read_text()


@pytest.mark.slow
def test_undeclared_header_is_not_found_by_the_compiler(library_root: Path, tmp_path: Path) -> None:
    port = Port(tmp_path)
    (port.dir / "t.c").write_text("#include <portsdconf.h>\nint main(void) { return 0; }\n")
    recipe = port.recipe(custom("cc -o t /build/port/t.c"))
    with pytest.raises(BuildError) as caught:
        build_port(request(tmp_path, port, recipe, dependency_roots=(library_root,)))
    assert caught.value.status == "exit 1"
    assert "portsdconf.h: No such file or directory" in Path(caught.value.log or "").read_text()


HELLO = '#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n'


@pytest.mark.slow
def test_autotools_style(tmp_path: Path) -> None:
    configure = (
        "#!/bin/sh\nprefix=/usr/local\n"
        "for arg; do case $arg in --prefix=*) prefix=${arg#--prefix=};; "
        "--enable-shout) shout=1;; esac; done\n"
        'printf "PREFIX = %s\\nSHOUT = %s\\n" "$prefix" "${shout:-0}" > config.mk\n'
    )
    makefile = (
        "include config.mk\nhello: hello.c\n\t$(CC) -DSHOUT=$(SHOUT) -o hello hello.c\n"
        "check: hello\n\t./hello > checked\n"
        "install: hello\n\tinstall -D -m 755 hello $(DESTDIR)$(PREFIX)/bin/hello\n"
    )
    port = Port(tmp_path, "hello")
    port.archive(
        "hello-1.0.tar.gz",
        {
            "hello-1.0/configure": configure,
            "hello-1.0/Makefile": makefile,
            "hello-1.0/hello.c": HELLO,
        },
    )
    recipe = port.recipe('style = "autotools"\nconfigure-args = ["--enable-shout"]')
    result = build_port(request(tmp_path, port, recipe))
    assert (result.destdir / "usr/bin/hello").is_file()
    assert (tmp_path / "work/src/hello-1.0/checked").read_text() == "hello\n"
    assert "SHOUT = 1" in (tmp_path / "work/src/hello-1.0/config.mk").read_text()


@pytest.mark.slow
def test_make_style_without_check_target(tmp_path: Path) -> None:
    makefile = (
        "PREFIX ?= /usr/local\nhello: hello.c\n\t$(CC) -o hello hello.c\n"
        "install: hello\n\tinstall -D -m 755 hello $(DESTDIR)$(PREFIX)/bin/hello\n"
    )
    port = Port(tmp_path, "hello")
    port.archive("hello-1.0.tar.gz", {"hello-1.0/Makefile": makefile, "hello-1.0/hello.c": HELLO})
    req = request(tmp_path, port, port.recipe('style = "make"'))
    result = build_port(req)
    assert (result.destdir / "usr/bin/hello").is_file()
    assert "no check target: skipping checks" in req.log.read_text()
    assert (
        subprocess.run([result.destdir / "usr/bin/hello"], capture_output=True).stdout == b"hello\n"
    )


@pytest.fixture(scope="module")
def cmake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The host's cmake as a dependency root, made the way the seed is (its libraries
    private): cmake is no part of the toolchain, so a port that uses it declares it."""
    root = tmp_path_factory.mktemp("cmake")
    packages = seed.host_packages(["cmake", "cmake-data"])
    model = seed.plan_seed(packages)
    for rel in [rel for rel in model.files if not rel.startswith(("usr/bin", "usr/share"))]:
        if not rel.startswith(seed.PRIVATE_LIBDIR):
            del model.files[rel]
    seed.write_seed(model, "cmake for tests\n", root)
    return root


@pytest.mark.slow
def test_cmake_style(tmp_path: Path, cmake_root: Path) -> None:
    cmakelists = (
        "cmake_minimum_required(VERSION 3.13)\nproject(hello C)\n"
        "add_library(greet STATIC greet.c)\nadd_executable(hello hello.c)\n"
        "target_link_libraries(hello greet)\nenable_testing()\n"
        "add_test(NAME runs COMMAND hello)\n"
        "include(GNUInstallDirs)\n"
        "install(TARGETS hello greet)\n"
    )
    port = Port(tmp_path, "hello")
    port.archive(
        "hello-1.0.tar.gz",
        {
            "hello-1.0/CMakeLists.txt": cmakelists,
            "hello-1.0/hello.c": HELLO,
            "hello-1.0/greet.c": "int greet(void) { return 1; }\n",
        },
    )
    req = request(tmp_path, port, port.recipe('style = "cmake"'), dependency_roots=(cmake_root,))
    result = build_port(req)
    assert (result.destdir / "usr/bin/hello").is_file()
    assert (result.destdir / "usr/lib/libgreet.a").is_file()  # not lib64, not multiarch
    assert "100% tests passed" in req.log.read_text()


@pytest.mark.slow
def test_meson_style_runs_or_fails_clearly(tmp_path: Path) -> None:
    port = Port(tmp_path, "hello")
    port.archive(
        "hello-1.0.tar.gz",
        {
            "hello-1.0/meson.build": (
                "project('hello', 'c')\nexecutable('hello', 'hello.c', install: true)\n"
            ),
            "hello-1.0/hello.c": HELLO,
        },
    )
    req = request(tmp_path, port, port.recipe('style = "meson"'))
    if Path("/usr/bin/meson").exists():
        assert (build_port(req).destdir / "usr/bin/hello").is_file()
        return
    with pytest.raises(BuildError) as caught:
        build_port(req)
    assert (caught.value.step, caught.value.status) == ("build", "exit 127 (command not found)")
    assert "meson: not found" in req.log.read_text()


@pytest.mark.slow
def test_repeated_build_starts_clean(library_root: Path, header_root: Path, tmp_path: Path) -> None:
    port, recipe = app_port(tmp_path)
    req = request(tmp_path, port, recipe, dependency_roots=(library_root, header_root))
    build_port(req)
    (tmp_path / "work/pkg/stale").write_text("left from last time")
    os.chmod(tmp_path / "work/src/app-1.0", 0o500)  # builds leave read-only directories
    result = build_port(req)
    assert not (result.destdir / "stale").exists()


# -- end to end: a port of the tree's own software (path sources) --------------------------

SELFPKG = """\
name = "selfpkg"
version = "1.0"
summary = "Packages the tree's own tool"
license = "MIT"
depends = ["libbase"]

[[source]]
path = "tools/greet"
[[source]]
path = "share/greetings"

[build]
style = "custom"
package = '''
install -Dm755 greet "$DESTDIR/usr/bin/greet"
install -d "$DESTDIR/usr/share"
cp -R greetings "$DESTDIR/usr/share/greetings"
'''
"""


@pytest.mark.slow
def test_ports_build_packages_paths_of_the_tree_and_rebuilds_when_they_change(
    ports_tree: Path, tmp_path: Path
) -> None:
    tree, state = ports_tree, tmp_path / "state"
    (tree / "tools").mkdir()
    (tree / "tools" / "greet").write_text("#!/bin/sh\necho hello from the tree\n")
    (tree / "share" / "greetings").mkdir(parents=True)
    (tree / "share" / "greetings" / "en").write_text("hello\n")
    (tree / "ports" / "selfpkg").mkdir()
    (tree / "ports" / "selfpkg" / "port.toml").write_text(SELFPKG)
    commit_all(tree, "selfpkg")

    def build(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "portsd.cli.ports", "build", "--tree", str(tree)]
            + ["--state", str(state), "-j", "2", *args],
            capture_output=True,
            text=True,
            timeout=600,
            env=command_environment(home=str(tmp_path)),
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def installed() -> tuple[Path, str, str | None]:
        repo = Repository.reader(
            state / "repo", os.uname().machine, [PublicKey.load(state / "keys" / "portsd.pub")]
        )
        index = repo.index()
        entry = index.entry("selfpkg")
        assert entry is not None
        root = tmp_path / f"root-{entry.meta.build_key[:12]}"
        extract_package(repo.package_path(entry), root, expected_sha256=entry.sha256)
        return root, entry.meta.build_key, index.commit

    # libbase, then selfpkg: its key waits for libbase's content
    assert "1 to build, at most 1 more after them" in build("selfpkg", "--rev", "HEAD")
    root, first_key, commit = installed()
    assert commit == git(tree, "rev-parse", "HEAD")
    greet = root / "usr" / "bin" / "greet"
    assert subprocess.run([greet], capture_output=True, text=True).stdout == "hello from the tree\n"
    assert (root / "usr" / "share" / "greetings" / "en").read_text() == "hello\n"

    # a file outside ports/ changes: selfpkg alone is rebuilt, from the new content
    (tree / "share" / "greetings" / "fr").write_text("bonjour\n")
    commit_all(tree, "greetings in French")
    assert "1 to build, 1 up to date" in build("selfpkg", "--rev", "HEAD")
    root, second_key, _ = installed()
    assert second_key != first_key
    assert (root / "usr" / "share" / "greetings" / "fr").read_text() == "bonjour\n"

    # the working directory: an uncommitted edit is built, and no commit claimed for it
    assert "0 to build" in build("selfpkg")
    (tree / "tools" / "greet").write_text("#!/bin/sh\necho edited\n")
    assert "1 to build" in build("selfpkg")
    root, third_key, commit = installed()
    assert third_key not in (first_key, second_key) and commit is None
    assert subprocess.run([root / "usr/bin/greet"], capture_output=True, text=True).stdout == (
        "edited\n"
    )
