"""A package says what it needs: every soname its ELF files need comes from itself, its
runtime closure or the seed's C runtime. The rule on values (portsd.core.linkage), then
real builds with `ports build`: gcc in the sandbox, a real shared library."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from portsd.build.needs import check_needs, seed_sonames
from portsd.build.seed import Seed
from portsd.core.linkage import ElfLinkage, Miss, misses, provided_sonames
from portsd.core.recipe import parse_recipe
from portsd.errors import UnmetNeed
from tests.fixtures import commit_all, git
from tests.test_build import build, repository


def elf(*needed: str, soname: str | None = None, interpreter: str | None = None) -> ElfLinkage:
    return ElfLinkage("EM_X86_64", 64, interpreter, needed, soname)


LOADER = "/lib64/ld-linux-x86-64.so.2"


def test_needs_met_by_the_package_the_closure_or_nobody() -> None:
    files = {
        "usr/bin/app": elf("libc.so.6", "libown.so.1", "libz.so.1", interpreter=LOADER),
        "usr/bin/tool": elf("libGL.so.1", "libc.so.6", interpreter="/lib/ld-musl.so.1"),
        # a private library of the package, reached through a RUNPATH: its own SONAME counts
        "usr/lib/app/libown.so.1": elf("libc.so.6", soname="libown.so.1"),
    }
    assert misses(files, {"libc.so.6"}, {LOADER}) == (
        Miss("usr/bin/app", "libz.so.1"),
        Miss("usr/bin/tool", "/lib/ld-musl.so.1", interpreter=True),
        Miss("usr/bin/tool", "libGL.so.1"),
    )
    assert misses(files, {"libc.so.6", "libz.so.1"}, {LOADER}, ["libGL.so.1"]) == (
        Miss("usr/bin/tool", "/lib/ld-musl.so.1", interpreter=True),
    )
    allowed = ["libGL.so.1", "/lib/ld-musl.so.1"]
    assert misses(files, {"libc.so.6", "libz.so.1"}, {LOADER}, allowed) == ()


def test_a_package_provides_the_sonames_the_loader_finds() -> None:
    files = {
        "usr/lib/libz.so.1.3": elf("libc.so.6", soname="libz.so.1"),
        "lib/libacl.so.1": elf(soname="libacl.so.1"),  # /lib is /usr/lib
        "usr/lib/x86_64-linux-gnu/libm.so.6": elf(soname="libm.so.6"),
        "usr/lib/app/libown.so.1": elf(soname="libown.so.1"),  # private
        "usr/lib/libc.so": elf(),  # no SONAME (musl's): the linker records the file name
        "usr/lib/helper": elf(),  # a program, not a library
        "usr/bin/app": elf("libz.so.1"),
    }
    assert provided_sonames(files) == ("libacl.so.1", "libc.so", "libm.so.6", "libz.so.1")


def test_the_seed_provides_the_c_runtime_and_nothing_private(seed: Seed) -> None:
    provided = seed_sonames(seed.root)
    assert {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "libstdc++.so.6"} <= provided
    assert "ld-linux-x86-64.so.2" in provided
    # the seed's programs' own libraries stay out of sight
    assert not {"libz.so.1", "libzstd.so.1", "libgmp.so.10"} & provided


MINIMAL = 'name = "cat"\nversion = "1"\nsummary = "s"\nlicense = "MIT"\n'


def test_with_no_seed_beneath_its_c_runtime_provides_nothing(seed: Seed, tmp_path: Path) -> None:
    """A stage of a self-contained toolchain has no seed in its roots: a program linked
    against the seed's libc is then a miss, as it would be where the package is installed."""
    destdir = tmp_path / "pkg"
    (destdir / "usr" / "bin").mkdir(parents=True)
    shutil.copyfile(seed.root / "usr" / "bin" / "cat", destdir / "usr" / "bin" / "cat")
    recipe = parse_recipe(MINIMAL, "ports/cat/port.toml", "cat")
    log = tmp_path / "log"
    assert check_needs(recipe, destdir, log, seed_root=seed.root, closure=[]) == ()
    with pytest.raises(UnmetNeed) as raised:
        check_needs(recipe, destdir, log, seed_root=None, closure=[])
    assert str(raised.value).startswith(
        "cat: usr/bin/cat needs /lib64/ld-linux-x86-64.so.2, which neither cat nor its runtime"
    )
    assert "needs soname libc.so.6, unprovided" in log.read_text()


# -- real builds ---------------------------------------------------------------------------

LIBGREET = """\
name = "libgreet"
version = "1.0"
summary = "a shared library"
license = "MIT"
[[source]]
file = "greet.c"
[build]
build = "cc -shared -fPIC -Wl,-soname,libgreet.so.1 -o libgreet.so.1 greet.c"
package = '''
echo 'int greet(void);' > greet.h
install -D -m 644 greet.h "$DESTDIR/usr/include/greet.h"
install -D -m 755 libgreet.so.1 "$DESTDIR/usr/lib/libgreet.so.1"
ln -s libgreet.so.1 "$DESTDIR/usr/lib/libgreet.so"
'''
"""

APP = """\
name = "app"
version = "1.0"
summary = "a program using libgreet"
license = "MIT"
{dependency} = ["libgreet"]
[[source]]
file = "app.c"
[build]
build = "cc -o app app.c -lgreet"
package = 'install -D -m 755 app "$DESTDIR/usr/bin/app"'
{allow}
"""


def write_app(tree: Path, dependency: str, allow: str = "") -> None:
    (tree / "ports" / "app" / "port.toml").write_text(
        APP.format(dependency=dependency, allow=allow)
    )
    commit_all(tree, f"app: {dependency} {allow}")


@pytest.mark.slow
def test_a_library_of_a_build_dependency_fails_the_check_unless_declared_or_allowed(
    tmp_path: Path,
) -> None:
    tree, state = tmp_path / "tree", tmp_path / "state"
    for port, files in {
        "libgreet": {"port.toml": LIBGREET, "greet.c": "int greet(void) { return 7; }\n"},
        "app": {"app.c": "#include <greet.h>\nint main(void) { return greet() - 7; }\n"},
    }.items():
        (tree / "ports" / port).mkdir(parents=True)
        for name, text in files.items():
            (tree / "ports" / port / name).write_text(text)
    git(tree.parent, "init", "-q", "-b", "main", str(tree))
    write_app(tree, "build-depends")

    failed = build(tree, state, check=False)
    assert failed.returncode != 0
    line = (
        "app: usr/bin/app needs libgreet.so.1, which neither app nor its runtime"
        " dependencies provide"
    )
    assert line in failed.stdout + failed.stderr, failed.stdout + failed.stderr
    index = repository(state).index()
    assert "app" not in index
    libgreet = index.entry("libgreet")
    assert libgreet is not None and libgreet.meta.sonames == ("libgreet.so.1",)

    write_app(tree, "depends")
    build(tree, state)
    app = repository(state).index().entry("app")
    assert app is not None and app.meta.sonames == () and app.meta.depends == ("libgreet",)

    write_app(tree, "build-depends", 'allow-missing-sonames = ["libgreet.so.1"]')
    build(tree, state)
    app = repository(state).index().entry("app")
    assert app is not None and app.meta.depends == ()


@pytest.mark.slow
def test_a_library_without_soname_provides_its_file_name(tmp_path: Path) -> None:
    """musl's libc.so has no SONAME: a program linked with it needs ``libc.so``, the file
    name, and the package that holds the file provides exactly that."""
    tree, state = tmp_path / "tree", tmp_path / "state"
    noso = LIBGREET.replace("-Wl,-soname,libgreet.so.1 ", "").replace(
        'install -D -m 755 libgreet.so.1 "$DESTDIR/usr/lib/libgreet.so.1"\n'
        'ln -s libgreet.so.1 "$DESTDIR/usr/lib/libgreet.so"',
        'install -D -m 755 libgreet.so.1 "$DESTDIR/usr/lib/libgreet.so"',
    )
    assert "soname" not in noso and "ln -s" not in noso
    for port, files in {
        "libgreet": {"port.toml": noso, "greet.c": "int greet(void) { return 7; }\n"},
        "app": {"app.c": "#include <greet.h>\nint main(void) { return greet() - 7; }\n"},
    }.items():
        (tree / "ports" / port).mkdir(parents=True)
        for name, text in files.items():
            (tree / "ports" / port / name).write_text(text)
    git(tree.parent, "init", "-q", "-b", "main", str(tree))
    write_app(tree, "depends")
    build(tree, state)
    index = repository(state).index()
    libgreet, app = index.entry("libgreet"), index.entry("app")
    assert libgreet is not None and libgreet.meta.sonames == ("libgreet.so",)
    assert app is not None and app.meta.depends == ("libgreet",)
