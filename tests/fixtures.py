"""A small real ports tree of C software, written by the tests.

    libbase ─┬─ libmid ── libtop ── toptool     a chain of depth four
             ├─ liba ─┐
             ├─ libb ─┴─ diamond                a diamond
             └─ confapp                         an autotools-style ./configure
    hello                                       a patch applied to an upstream tarball

Upstream sources are tarballs served over HTTP by the tests (``SOURCES`` below, built
byte-for-byte reproducibly so their sha256 is stable); libmid ships its source files in
the port directory instead. Every library is static and has a pkg-config file, so the
programs are self-contained and run from any root.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import subprocess
import tarfile
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict, Unpack

import msgpack

LIB_MAKEFILE = """\
PREFIX ?= /usr
CFLAGS ?= -O2
all: lib{name}.a
lib{name}.a: {name}.o
\tar rcs $@ $^
{name}.o: {name}.c {name}.h
\t$(CC) $(CFLAGS) {deps_cflags} -c {name}.c
install: all
\tinstall -Dm644 {name}.h $(DESTDIR)$(PREFIX)/include/{name}.h
\tinstall -Dm644 lib{name}.a $(DESTDIR)$(PREFIX)/lib/lib{name}.a
\tinstall -Dm644 {name}.pc $(DESTDIR)$(PREFIX)/lib/pkgconfig/{name}.pc
check: all
\ttest -s lib{name}.a
"""

PROGRAM_MAKEFILE = """\
PREFIX ?= /usr
all: {name}
{name}: {name}.c
\t$(CC) -O2 -o $@ {name}.c {deps_flags}
install: all
\tinstall -Dm755 {name} $(DESTDIR)$(PREFIX)/bin/{name}
"""


def library_files(name: str, value: int, uses: tuple[str, ...]) -> dict[str, str]:
    """A static library ``lib<name>`` whose ``<name>_value()`` adds its dependencies' values."""
    includes = "".join(f"#include <{dep}.h>\n" for dep in uses)
    total = " + ".join([str(value), *(f"{dep}_value()" for dep in uses)])
    requires = " ".join(uses)
    return {
        f"{name}.h": f"#pragma once\nint {name}_value(void);\n",
        f"{name}.c": (
            f'{includes}#include "{name}.h"\nint {name}_value(void) {{ return {total}; }}\n'
        ),
        f"{name}.pc": textwrap.dedent(
            f"""\
            prefix=/usr
            libdir=${{prefix}}/lib
            includedir=${{prefix}}/include
            Name: {name}
            Description: test library {name}
            Version: 1.0
            Requires: {requires}
            Cflags: -I${{includedir}}
            Libs: -L${{libdir}} -l{name}
            """
        ),
        "Makefile": LIB_MAKEFILE.format(
            name=name, deps_cflags=f"$$(pkg-config --cflags {requires})" if uses else ""
        ),
    }


def program_files(name: str, uses: tuple[str, ...], greeting: str = "") -> dict[str, str]:
    includes = "".join(f"#include <{dep}.h>\n" for dep in uses)
    values = "".join(f' printf("{dep}=%d\\n", {dep}_value());' for dep in uses)
    return {
        f"{name}.c": (
            f"#include <stdio.h>\n{includes}"
            f'int main(void) {{ puts("{greeting or name}");{values} return 0; }}\n'
        ),
        "Makefile": PROGRAM_MAKEFILE.format(
            name=name,
            deps_flags=f"$$(pkg-config --cflags --libs --static {' '.join(uses)})" if uses else "",
        ),
    }


CONFIGURE = """\
#!/bin/sh
# A hand-written autotools-style configure: accepts --prefix, probes the compiler and
# pkg-config, and writes config.mk, failing loudly when libbase is absent.
prefix=/usr/local
for arg; do
    case $arg in
        --prefix=*) prefix=${arg#--prefix=} ;;
        --with-answer=*) answer=${arg#--with-answer=} ;;
        *) echo "configure: unknown option $arg" >&2; exit 1 ;;
    esac
done
echo "checking for a C compiler... ${CC:-cc}"
printf 'int main(void){return 0;}\\n' > conftest.c
${CC:-cc} -o conftest conftest.c || { echo "configure: error: no working C compiler" >&2; exit 1; }
echo "checking for libbase... "
pkg-config --exists base || { echo "configure: error: libbase not found" >&2; exit 1; }
cat > config.mk <<EOF
PREFIX = $prefix
ANSWER = ${answer:-0}
BASE_CFLAGS = $(pkg-config --cflags base)
BASE_LIBS = $(pkg-config --libs base)
EOF
echo "config.status: creating config.mk"
"""

CONFAPP_MAKEFILE = """\
include config.mk
all: confapp
confapp: confapp.c
\t$(CC) -O2 -DANSWER=$(ANSWER) $(BASE_CFLAGS) -o $@ confapp.c $(BASE_LIBS)
install: all
\tinstall -Dm755 confapp $(DESTDIR)$(PREFIX)/bin/confapp
"""

CONFAPP_C = """\
#include <stdio.h>
#include <base.h>
int main(void) { printf("confapp answer=%d base=%d\\n", ANSWER, base_value()); return 0; }
"""

HELLO_C = '#include <stdio.h>\nint main(void) { puts("hello, world"); return 0; }\n'
HELLO_PATCH = """\
--- a/hello.c
+++ b/hello.c
@@ -1,2 +1,2 @@
 #include <stdio.h>
-int main(void) { puts("hello, world"); return 0; }
+int main(void) { puts("hello, ports"); return 0; }
"""


def tarball(top: str, files: Mapping[str, str], executable: tuple[str, ...] = ()) -> bytes:
    """A .tar.gz whose bytes depend only on its contents."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, text in sorted(files.items()):
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{path}")
            info.size, info.mtime = len(data), 1_700_000_000
            info.mode = 0o755 if path in executable else 0o644
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def upstream_sources() -> dict[str, bytes]:
    """File name -> bytes of every upstream tarball the tree's recipes download."""
    return {
        "libbase-1.0.tar.gz": tarball("libbase-1.0", library_files("base", 1, ())),
        "libtop-1.0.tar.gz": tarball("libtop-1.0", library_files("top", 100, ("mid",))),
        "liba-1.0.tar.gz": tarball("liba-1.0", library_files("a", 10, ("base",))),
        "libb-1.0.tar.gz": tarball("libb-1.0", library_files("b", 20, ("base",))),
        "toptool-1.0.tar.gz": tarball("toptool-1.0", program_files("toptool", ("top",))),
        "diamond-1.0.tar.gz": tarball("diamond-1.0", program_files("diamond", ("a", "b"))),
        "hello-1.0.tar.gz": tarball(
            "hello-1.0", {**program_files("hello", ()), "hello.c": HELLO_C}
        ),
        "confapp-2.1.tar.gz": tarball(
            "confapp-2.1",
            {"configure": CONFIGURE, "Makefile": CONFAPP_MAKEFILE, "confapp.c": CONFAPP_C},
            executable=("configure",),
        ),
    }


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RecipeOptions(TypedDict, total=False):
    """The keyword arguments of ``recipe`` besides the source."""

    version: str
    depends: tuple[str, ...]
    style: str
    files: tuple[str, ...]
    extra_build: str


def recipe(
    name: str,
    *,
    version: str = "1.0",
    depends: tuple[str, ...] = (),
    style: str = "make",
    source_url: str | None = None,
    source_sha: str | None = None,
    files: tuple[str, ...] = (),
    extra_build: str = "",
) -> str:
    lines = [
        f'name = "{name}"',
        f'version = "{version}"',
        "release = 1",
        f'summary = "The {name} test port"',
        'license = "MIT"',
        f"depends = [{', '.join(repr(d).replace(chr(39), chr(34)) for d in depends)}]",
    ]
    if source_url:
        lines += ["", "[[source]]", f'url = "{source_url}"', f'sha256 = "{source_sha}"']
    for file in files:
        lines += ["", "[[source]]", f'file = "{file}"']
    lines += ["", "[build]", f'style = "{style}"']
    if extra_build:
        lines.append(extra_build)
    return "\n".join(lines) + "\n"


def write_tree(root: Path, base_url: str) -> dict[str, bytes]:
    """Write ``root/ports/...``; returns the upstream tarballs to serve at ``base_url``."""
    sources = upstream_sources()

    def url_recipe(name: str, tar: str, **options: Unpack[RecipeOptions]) -> str:
        return recipe(
            name, source_url=f"{base_url}/{tar}", source_sha=sha256(sources[tar]), **options
        )

    ports: dict[str, dict[str, str]] = {
        "libbase": {"port.toml": url_recipe("libbase", "libbase-1.0.tar.gz")},
        "libmid": {
            "port.toml": recipe(
                "libmid", depends=("libbase",), files=("mid.c", "mid.h", "mid.pc", "Makefile")
            ),
            **{k: v for k, v in library_files("mid", 1000, ("base",)).items()},
        },
        "libtop": {"port.toml": url_recipe("libtop", "libtop-1.0.tar.gz", depends=("libmid",))},
        "toptool": {"port.toml": url_recipe("toptool", "toptool-1.0.tar.gz", depends=("libtop",))},
        "liba": {"port.toml": url_recipe("liba", "liba-1.0.tar.gz", depends=("libbase",))},
        "libb": {"port.toml": url_recipe("libb", "libb-1.0.tar.gz", depends=("libbase",))},
        "diamond": {
            "port.toml": url_recipe("diamond", "diamond-1.0.tar.gz", depends=("liba", "libb"))
        },
        "hello": {
            "port.toml": url_recipe("hello", "hello-1.0.tar.gz", files=("0001-greeting.patch",)),
            "0001-greeting.patch": HELLO_PATCH,
        },
        "confapp": {
            "port.toml": url_recipe(
                "confapp",
                "confapp-2.1.tar.gz",
                version="2.1",
                depends=("libbase",),
                style="autotools",
                extra_build='configure-args = ["--with-answer=42"]',
            )
        },
    }
    for name, files in ports.items():
        for path, text in files.items():
            target = root / "ports" / name / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
    return sources


def git(cwd: Path, *args: str) -> str:
    """Run git for a test; fails the test with git's own message."""
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
        env={
            "GIT_AUTHOR_NAME": "Test",
            "GIT_AUTHOR_EMAIL": "test@example.invalid",
            "GIT_COMMITTER_NAME": "Test",
            "GIT_COMMITTER_EMAIL": "test@example.invalid",
            "GIT_CONFIG_NOSYSTEM": "1",
            "HOME": str(cwd),
            "PATH": "/usr/bin:/bin",
        },
    )
    if result.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {result.stderr}")
    return result.stdout.strip()


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


class Repeated(dict[str, object]):
    """A map that ``pack_repeating`` packs with ``again``'s pairs after its own."""

    def __init__(self, pairs: Mapping[str, object], again: tuple[tuple[str, object], ...]) -> None:
        super().__init__(pairs)
        self.again = again


def pack_repeating(value: object) -> bytes:
    """msgpack of ``value`` in which a Repeated map holds a key twice: bytes no packer makes."""
    if isinstance(value, dict):
        pairs = [*value.items(), *getattr(value, "again", ())]
        head = bytes([0x80 | len(pairs)]) if len(pairs) < 16 else b"\xde" + len(pairs).to_bytes(2)
        return head + b"".join(pack_repeating(k) + pack_repeating(v) for k, v in pairs)
    if isinstance(value, list | tuple):
        head = bytes([0x90 | len(value)]) if len(value) < 16 else b"\xdc" + len(value).to_bytes(2)
        return head + b"".join(pack_repeating(item) for item in value)
    packed: bytes = msgpack.packb(value)
    return packed
