"""The base system of this repository's ports/ (docs/distro.md): every recipe lints, the
base set is all there and its toolchain declaration closes inside it, and a real slice of
stage 1 (musl, linux-headers, busybox and a static hello, built from Debian's source
archive by tools/distfiles) installs into an empty root that runs under bwrap with no
host file. The slice is built from a copy of its ports with no toolchain.toml: the
tree's own declares the base's toolchain, whose stage 1 (gcc) takes hours."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

from portsd.core.graph import Graph
from portsd.core.toolchain import compute_stages
from portsd.tree.gitrepo import DirSnapshot
from portsd.tree.loader import TreeLoader
from tests.conftest import serving
from tests.daemon_harness import command_environment

ROOT = Path(__file__).resolve().parent.parent
ARCH = "x86_64_musl"
BASE = {
    "linux-headers", "musl", "binutils", "gmp", "mpfr", "mpc", "gcc", "make", "busybox",
    "bash", "m4", "perl", "autoconf", "automake", "libtool", "pkgconf", "zlib", "ncurses",
    "vim", "patch", "baselayout",
    "cross-gcc",  # stage 1's cross toolchain: builds gcc on the seed
}  # fmt: skip
SLICE = ("musl", "linux-headers", "busybox", "hello", "baselayout")
MIRROR = Path(os.environ.get("PORTSD_DISTFILES_MIRROR", "~/.cache/portsd/distfiles"))


def ports(*args: str | Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "portsd.cli.ports", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=1200,
        env=command_environment(),
    )
    assert result.returncode == 0, f"ports {args}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.mark.parametrize("arch", ["x86_64", ARCH])
def test_the_whole_tree_lints(arch: str) -> None:
    assert "no problems" in ports("lint", "--tree", ROOT, "--arch", arch).stdout


def test_the_base_is_present_and_its_toolchain_closes_inside_it() -> None:
    tree = TreeLoader(None).load(DirSnapshot(ROOT))
    graph = Graph.build(tree.recipes(), ARCH)
    assert BASE <= set(graph.names())
    for name in sorted(BASE):
        assert graph.problem(name) is None, (name, graph.problem(name))
        assert graph.supported(name), name
        outside = set(graph.build_root(name)) - BASE
        assert not outside, f"{name} builds on {sorted(outside)}, outside the base"
    declared = tree.toolchain()
    assert declared is not None and declared.arch == (ARCH,) and declared.self_contained
    toolchain = set(declared.ports)
    assert toolchain <= BASE
    assert graph.dependency_closure(toolchain) <= BASE  # stage 1's bootstrap-depends too
    assert {"musl", "binutils", "gcc", "make", "busybox"} <= toolchain


def test_the_base_is_not_built_for_the_host_architecture() -> None:
    """`make run` builds for this machine's architecture: the base's ports are for
    x86_64_musl only, so the quick first run neither bootstraps nor wants distfiles."""
    tree = TreeLoader(None).load(DirSnapshot(ROOT))
    graph = Graph.build(tree.recipes(), "x86_64")
    assert [n for n in sorted(BASE - {"baselayout"}) if graph.supported(n)] == []
    assert graph.supported("baselayout") and graph.supported("portsd")
    # nor does the base's toolchain apply: every x86_64 build stands on the seed
    stages = compute_stages(graph, tree.inputs(), "5" * 64, tree.toolchain(), {})
    assert stages.converged and stages.spec is None and stages.current.keys.toolchain == "5" * 64
    assert "portsd" in stages.current.keys.keys


@pytest.fixture(scope="module")
def slice_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The slice built for real in stage 1 and installed into an empty root."""
    mirror = MIRROR.expanduser()
    fetched = subprocess.run(
        [sys.executable, ROOT / "tools/distfiles", "--json", "--mirror", mirror, *SLICE[:3]],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    report = json.loads(fetched.stdout)
    unreachable = [f for f in report["failures"] if f.startswith("apt-get update")]
    if unreachable:
        pytest.skip(f"DEBIAN SOURCE ARCHIVE UNREACHABLE, stage-1 slice not built: {unreachable}")
    assert report["ok"], report["failures"]
    tree = tmp_path_factory.mktemp("distro-tree")  # the slice's ports, no toolchain.toml
    for name in SLICE:
        shutil.copytree(ROOT / "ports" / name, tree / "ports" / name)
    state = tmp_path_factory.mktemp("distro-state")
    ports("build", *SLICE, "--tree", tree, "--arch", ARCH, "--mirror", mirror, "--state", state)
    root = tmp_path_factory.mktemp("distro-root")
    app = web.Application()
    app.router.add_static("/repo", state / "repo")  # a binary cache: the signed repository
    with serving(app) as cache:
        key = state / "keys" / "portsd.pub"
        ports("install", "--root", root, "--arch", ARCH, "--cache", cache, "--key", key, *SLICE)
    return root


def in_root(root: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """``command`` in ``root`` as /, under bwrap: nothing of the host is mounted."""
    return subprocess.run(
        ["bwrap", "--bind", str(root), "/", "--proc", "/proc", "--dev", "/dev", "--unshare-all"]
        + ["--clearenv", "--setenv", "PATH", "/usr/bin:/usr/sbin", "--", *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_stage_one_slice_runs_in_an_empty_root(slice_root: Path) -> None:
    script = 'echo "$((6 * 7))"; ls /usr/bin | grep -qx ls && echo has-ls; cat /etc/os-release'
    shell = in_root(slice_root, "/bin/sh", "-c", script)
    assert shell.returncode == 0, shell.stderr
    lines = shell.stdout.splitlines()
    assert lines[:2] == ["42", "has-ls"]
    assert any(line.startswith("NAME=") for line in lines)
    hello = in_root(slice_root, "/usr/bin/hello")
    assert (hello.returncode, hello.stdout) == (0, "hello from portsd\n"), hello.stderr
    # Nothing but the packages is there: no loader, no shared C library of the host.
    assert not (slice_root / "usr/lib/x86_64-linux-gnu").exists()
    assert not (slice_root / "lib64").exists()


@pytest.mark.slow
def test_stage_one_programs_are_static_musl(slice_root: Path) -> None:
    for program in ("usr/bin/busybox", "usr/bin/hello"):
        headers = subprocess.run(
            ["readelf", "-lW", slice_root / program], capture_output=True, text=True, check=True
        ).stdout
        assert "Requesting program interpreter" not in headers, program
        assert "DYNAMIC" not in headers, program
