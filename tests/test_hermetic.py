"""Hermetic builds: the seed is deterministic and in every key, and a build sees only
packages: an undeclared library of the host is not found, a declared one is the one that
links and loads. The host has zlib1g-dev (tools/bootstrap installs it) so this means
something."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from portsd.build import seed as seed_module
from portsd.build.builder import BuildRequest, build_port
from portsd.build.identity import fingerprint
from portsd.build.seed import PRIVATE_LIBDIR, Seed, make_seed
from portsd.core.graph import Graph
from portsd.core.keys import KeySet
from portsd.errors import BuildError
from portsd.pkg.elf import read_linkage
from tests.test_builder import Port, request
from tests.test_graph import port as recipe_of

HOST_ZLIB = Path("/usr/include/zlib.h")

FAKE_ZLIB_H = "const char *zlibVersion(void);\n"
FAKE_ZLIB_C = 'const char *zlibVersion(void) { return "portsd-zlib"; }\n'

APP_C = """#include <stdio.h>
#include <zlib.h>
int main(void) { puts(zlibVersion()); return 0; }
"""
APP_MAKEFILE = """app: app.c
\tcc -o app app.c -lz
check: app
\t./app > out
\ttest "$$(cat out)" = portsd-zlib
\t/lib64/ld-linux-x86-64.so.2 --list ./app | grep 'libz.so.1 =>' > loaded
install: app
\tinstall -D -m 755 app $(DESTDIR)/usr/bin/app
\tinstall -D -m 644 loaded $(DESTDIR)/usr/share/app/loaded
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def zlib_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A port's zlib, as an extracted package: its own zlib.h and libz.so.1."""
    root = tmp_path_factory.mktemp("dep") / "zlib"
    (root / "usr" / "include").mkdir(parents=True)
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "usr" / "include" / "zlib.h").write_text(FAKE_ZLIB_H)
    source = root.parent / "z.c"
    source.write_text(FAKE_ZLIB_C)
    subprocess.run(
        ["gcc", "-shared", "-fPIC", "-Wl,-soname,libz.so.1", "-o"]
        + [str(root / "usr/lib/libz.so.1"), str(source)],
        check=True,
    )
    (root / "usr" / "lib" / "libz.so").symlink_to("libz.so.1")
    return root


def zlib_user(tmp_path: Path, declared: bool) -> tuple[Port, BuildRequest]:
    port = Port(tmp_path, "app")
    port.archive("app-1.0.tar.gz", {"app-1.0/Makefile": APP_MAKEFILE, "app-1.0/app.c": APP_C})
    depends = 'depends = ["zlib"]' if declared else ""
    return port, request(tmp_path, port, port.recipe('style = "make"', depends))


def test_the_host_has_zlib_headers_so_these_tests_mean_something() -> None:
    assert HOST_ZLIB.is_file(), "tools/bootstrap installs zlib1g-dev"


@pytest.mark.slow
def test_an_undeclared_library_of_the_host_is_not_found(tmp_path: Path) -> None:
    _, req = zlib_user(tmp_path, declared=False)
    with pytest.raises(BuildError) as caught:
        build_port(req)
    assert caught.value.step == "build"
    assert "zlib.h: No such file or directory" in req.log.read_text()


@pytest.mark.slow
def test_a_declared_library_is_the_one_that_links_and_loads(
    tmp_path: Path, zlib_root: Path
) -> None:
    port, req = zlib_user(tmp_path, declared=True)
    result = build_port(replace(req, dependency_roots=(zlib_root,)))
    log = req.log.read_text()
    assert "==> check: ok" in log
    loaded = (result.destdir / "usr/share/app/loaded").read_text()
    # the port's (/lib is usr/lib), not the host's multiarch one nor the seed's private one
    assert "libz.so.1 => /lib/libz.so.1 " in loaded, loaded
    linkage = read_linkage(result.destdir / "usr/bin/app")
    assert linkage is not None and "libz.so.1" in linkage.needed


def test_the_seed_has_no_compression_library_in_sight(seed: Seed) -> None:
    usr = seed.root / "usr"
    for header in ("zlib.h", "bzlib.h", "lzma.h", "zstd.h"):
        assert not (usr / "include" / header).exists(), header
    public = [usr / "lib", usr / "lib/x86_64-linux-gnu"]
    for directory in public:
        names = os.listdir(directory)
        for lib in ("libz.", "libbz2.", "liblzma.", "libzstd."):
            assert not [n for n in names if n.startswith(lib)], (directory, lib)
    private = set(os.listdir(seed.root / PRIVATE_LIBDIR))
    assert {"libz.so.1", "libzstd.so.1", "libgmp.so.10"} <= private
    cc1 = next((usr / "lib/gcc/x86_64-linux-gnu").glob("*/cc1"))
    linkage = read_linkage(cc1)
    assert linkage is not None and linkage.runpath == ("/" + PRIVATE_LIBDIR,)


def test_the_seed_says_what_it_is_made_of(seed: Seed) -> None:
    packages = {line.split()[1] for line in seed.manifest.splitlines() if line.startswith("pack")}
    assert packages == {*seed_module.PROGRAM_PACKAGES, *seed_module.RUNTIME_PACKAGES}
    assert (seed.root / seed_module.MANIFEST).read_text() == seed.manifest


@pytest.mark.slow
def test_the_seed_is_deterministic(seed: Seed, tmp_path: Path) -> None:
    again = make_seed(tmp_path / "out", tmp_path, arch="x86_64", epoch=315532800)
    assert again.content_id == seed.content_id
    assert sha256(again.path) == sha256(seed.path)  # byte for byte


def test_different_seeds_give_different_keys_everywhere() -> None:
    ports = {r.name: r for r in (recipe_of("libc"), recipe_of("zlib", depends=("libc",)))}
    graph = Graph.build(ports, "x86_64")
    ids = {name: f"tree-{name}" for name in ports}
    # the same package of libc on both: the seed alone tells zlib's keys apart
    libc = {"a" * 64: "c" * 64, "b" * 64: "c" * 64}
    contents = {KeySet.compute(graph, ids, seed, {}).keys["libc"]: "c" * 64 for seed in libc}
    one = KeySet.compute(graph, ids, "a" * 64, contents)
    other = KeySet.compute(graph, ids, "b" * 64, contents)
    assert set(one.keys) == set(other.keys) == {"libc", "zlib"}
    assert all(one.keys[name] != other.keys[name] for name in ports)
    assert KeySet.compute(graph, ids, "a" * 64, contents).keys == one.keys


def test_a_seed_made_of_fewer_packages_is_another_seed(tmp_path: Path) -> None:
    packages = seed_module.host_packages(["dash", "libc6"])
    full = seed_module.plan_seed(packages)
    fewer = seed_module.plan_seed(packages[:1])
    assert set(fewer.files) != set(full.files)
    assert "usr/lib/x86_64-linux-gnu/libc.so.6" in full.files  # libc6 listed: public
    assert "usr/lib/portsd-seed/libc.so.6" in fewer.files  # only needed: private
    assert seed_module.manifest_text(packages, full) != seed_module.manifest_text(
        packages[:1], fewer
    )


def test_ports_seed_shows_the_seed_as_json(seed: Seed, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "portsd.cli.ports", "seed", "--json", "--state", str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    shown = json.loads(result.stdout)
    assert shown["content_id"] == seed.content_id
    assert {p["name"] for p in shown["packages"]} >= {"gcc-12", "make", "libc6"}
    assert shown["builder"]["fingerprint"] == fingerprint().digest
