"""`ports build` end to end: real git, real downloads, real sandboxed gcc builds, signed repo.

Every test here builds the C ports of tests/fixtures.py for real.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from portsd.build.seed import Seed
from portsd.pkg.package import extract_package
from portsd.pkg.repo import Repository
from portsd.pkg.sign import PublicKey
from tests.conftest import SourceServer
from tests.daemon_harness import command_environment
from tests.fixtures import commit_all, recipe
from tests.rangeserver import Served, range_server

pytestmark = pytest.mark.slow

ARCH = platform.machine()
ALL = {"libbase", "libmid", "libtop", "toptool", "liba", "libb", "diamond", "hello", "confapp"}


def ports(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "portsd.cli.ports", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=command_environment(),
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"ports {args} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def build(
    tree: Path, state: Path, *names: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return ports("build", "--tree", tree, "--state", state, "-j", "2", *names, check=check)


def repository(state: Path) -> Repository:
    return Repository.reader(state / "repo", ARCH, [PublicKey.load(state / "keys" / "portsd.pub")])


def published(state: Path) -> dict[str, str]:
    """Port name -> build key of every package in the signed index."""
    return {entry.meta.name: entry.meta.build_key for entry in repository(state).index()}


def rebuilt(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in after if before.get(name) != after[name]}


def run_installed(state: Path, name: str, tmp_path: Path) -> str:
    repo = repository(state)
    entry = repo.index().entry(name)
    assert entry is not None
    root = tmp_path / f"root-{name}"
    extract_package(repo.package_path(entry), root, expected_sha256=entry.sha256)
    return subprocess.run(
        [root / "usr" / "bin" / name], capture_output=True, text=True, check=True
    ).stdout


def test_builds_the_whole_tree_and_the_programs_work(
    ports_tree: Path, tmp_path: Path, source_server: SourceServer
) -> None:
    state = tmp_path / "state"
    result = build(ports_tree, state)
    assert "2 to build, at most 7 more after them, 0 up to date" in result.stdout
    assert set(published(state)) == ALL
    assert run_installed(state, "toptool", tmp_path) == "toptool\ntop=1101\n"  # depth-4 chain
    assert run_installed(state, "diamond", tmp_path) == "diamond\na=11\nb=21\n"
    assert run_installed(state, "hello", tmp_path) == "hello, ports\n"  # the patch applied
    assert run_installed(state, "confapp", tmp_path) == "confapp answer=42 base=1\n"
    assert repository(state).check() == ()
    assert sorted(source_server.requests) == sorted(source_server.files)  # each fetched once

    again = build(ports_tree, state)
    assert "0 to build, 9 up to date" in again.stdout
    assert sorted(source_server.requests) == sorted(source_server.files)  # nothing refetched


def test_stock_minisign_verifies_index_and_packages(ports_tree: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    build(ports_tree, state, "hello")
    repo = repository(state)
    entry = repo.index().entry("hello")
    assert entry is not None
    pub = state / "keys" / "portsd.pub"
    for path in (repo.index_path, repo.package_path(entry)):
        verified = subprocess.run(
            ["minisign", "-V", "-p", pub, "-m", path], capture_output=True, text=True
        )
        assert verified.returncode == 0, verified.stderr
    tampered = tmp_path / "tampered.pkg.tar.zst"
    tampered.write_bytes(repo.package_path(entry).read_bytes() + b"x")
    signature = Path(f"{repo.package_path(entry)}.minisig")
    refused = subprocess.run(
        ["minisign", "-V", "-p", pub, "-m", tampered, "-x", signature], capture_output=True
    )
    assert refused.returncode != 0


def test_rebuilds_exactly_what_a_change_reaches(ports_tree: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    build(ports_tree, state)
    # a release bump rebuilds the port, identical: nothing it reaches is rebuilt (cut off)
    for port, reaches in [("toptool", 0), ("libmid", 2), ("libbase", len(ALL) - 2)]:
        before = published(state)
        recipe = ports_tree / "ports" / port / "port.toml"
        recipe.write_text(recipe.read_text().replace("release = 1", "release = 2"))
        commit_all(ports_tree, f"{port}: release 2")
        result = build(ports_tree, state)
        assert rebuilt(before, published(state)) == {port}, result.stdout
        more = f", at most {reaches} more after them" if reaches else ""
        assert f"1 to build{more}, {len(ALL) - 1 - reaches} up to date" in result.stdout
        assert ("cut off (rebuilt identical below them)" in result.stdout) == bool(reaches)
    # a real change rebuilds exactly what it reaches
    before = published(state)
    source = ports_tree / "ports" / "libmid" / "mid.c"
    source.write_text(source.read_text().replace("1000", "1001"))
    commit_all(ports_tree, "libmid: a new value")
    result = build(ports_tree, state)
    assert rebuilt(before, published(state)) == {"libmid", "libtop", "toptool"}, result.stdout


def test_same_commit_gives_byte_identical_packages(ports_tree: Path, tmp_path: Path) -> None:
    digests = []
    for attempt in ("first", "second"):
        state = tmp_path / attempt
        build(ports_tree, state, "toptool", "confapp")
        repo = repository(state)
        digests.append(
            {
                entry.file: hashlib.sha256(repo.package_path(entry).read_bytes()).hexdigest()
                for entry in repo.index()
            }
        )
    assert digests[0] == digests[1] and len(digests[0]) == 5


def test_a_failure_skips_its_dependents_and_nothing_else(ports_tree: Path, tmp_path: Path) -> None:
    makefile_breaker = '\n[build]\nstyle = "make"\nbuild = "make && false"\n'
    recipe = ports_tree / "ports" / "liba" / "port.toml"
    recipe.write_text(recipe.read_text().split("\n[build]")[0] + makefile_breaker)
    commit_all(ports_tree, "break liba")
    state = tmp_path / "state"
    result = build(ports_tree, state, check=False)
    assert result.returncode == 1
    assert "liba: build failed (exit 1); log: " in result.stdout
    assert "not built diamond: its key needs the package of liba, which failed" in result.stdout
    assert set(published(state)) == ALL - {"liba", "diamond"}
    log = next((state / "logs" / "liba").glob("*.log"))
    assert "==> build" in log.read_text()
    assert repository(state).check() == ()


def test_a_broken_recipe_blocks_only_itself_and_its_dependents(
    ports_tree: Path, tmp_path: Path
) -> None:
    recipe = ports_tree / "ports" / "libtop" / "port.toml"
    recipe.write_text(recipe.read_text().replace("license =", "licence ="))
    commit_all(ports_tree, "typo")
    state = tmp_path / "state"
    result = build(ports_tree, state, check=False)
    assert result.returncode == 1
    assert "ports/libtop/port.toml:5: unknown key 'licence'" in result.stdout
    assert "toptool: dependency libtop cannot be built" in result.stdout
    assert set(published(state)) == ALL - {"libtop", "toptool"}


def test_a_checksum_mismatch_names_the_file_and_keeps_nothing(
    ports_tree: Path, tmp_path: Path, source_server: SourceServer
) -> None:
    source_server.files["hello-1.0.tar.gz"] += b"tampered"
    state = tmp_path / "state"
    result = build(ports_tree, state, "hello", check=False)
    assert result.returncode == 1
    assert "hello: sha256 mismatch for hello-1.0.tar.gz: expected " in result.stdout
    assert list((state / "distfiles" / "by-sha256").iterdir()) == []
    assert published(state) == {}
    assert list((state / "repo" / ARCH / "packages").iterdir()) == []


def test_lint_lists_every_problem(ports_tree: Path) -> None:
    (ports_tree / "ports" / "hello" / "port.toml").write_text('name = "hello"\nversion = \n')
    for port, old, new in [
        ("libb", 'depends = ["libbase"]', 'depends = ["libbase"]\nfoo = 1'),
        ("liba", 'depends = ["libbase"]', 'depends = ["libbase", "nope>=2"]'),
    ]:
        recipe = ports_tree / "ports" / port / "port.toml"
        recipe.write_text(recipe.read_text().replace(old, new))
    result = ports("lint", "--tree", ports_tree, check=False)
    assert result.returncode == 1
    assert "ports/hello/port.toml:2: invalid TOML" in result.stdout
    assert "ports/libb/port.toml:7: unknown key 'foo'" in result.stdout
    assert "liba: depends 'nope>=2' is not provided by any port" in result.stdout
    assert "9 ports checked: 3 problem(s) in 3 port(s)" in result.stdout


def test_why_traces_a_change_through_the_graph(ports_tree: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    build(ports_tree, state, "toptool")
    (ports_tree / "ports" / "libmid" / "mid.c").write_text(
        '#include <base.h>\n#include "mid.h"\nint mid_value(void) { return 2000 + base_value(); }\n'
    )
    commit = commit_all(ports_tree, "libmid: now 2000")
    result = ports("why", "libmid", "--tree", ports_tree, "--state", state)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("libmid must be rebuilt: key ")
    assert "  ports/libmid changed since" in lines[1]
    assert lines[2] == f"    {commit[:10]} libmid: now 2000 (ports/libmid/mid.c)"
    assert lines[3].startswith("  built on the seed ")
    # what it reaches waits for its package: its key contains libmid's content
    result = ports("why", "toptool", "--tree", ports_tree, "--state", state)
    assert result.stdout.splitlines()[0] == (
        "toptool is pending: its key needs the package of libmid, "
        "and it is rebuilt only if that comes out different"
    )


def test_graph_shows_both_directions(ports_tree: Path, seed: Seed, tmp_path: Path) -> None:
    result = ports("graph", "liba", "--tree", ports_tree, "--state", tmp_path)
    assert "libbase (depends)" in result.stdout
    assert f"toolchain: the seed {seed.content_id[:12]}" in result.stdout
    assert "needed by (1): diamond (depends)" in result.stdout
    dot = ports("graph", "libbase", "--dot", "--tree", ports_tree).stdout
    assert '"libmid" -> "libbase";' in dot and dot.startswith("digraph")


GREETING = b"hello from the mirror\n"


def mirror_tree(root: Path) -> Path:
    """A plain-directory tree: ``greet`` takes its one source from mirror://upstream/ and
    packages it with the build's $JOBS; ``sleepy`` takes 30 s to build."""
    files = {
        "greet": recipe(
            "greet",
            style="custom",
            source_url="mirror://upstream/greet/greet.txt",
            source_sha=hashlib.sha256(GREETING).hexdigest(),
            extra_build='package = """\n'
            'install -Dm644 "$SRCDIR/greet.txt" "$DESTDIR/usr/share/greet/greet.txt"\n'
            'echo "$JOBS" > "$DESTDIR/usr/share/greet/jobs"\n"""',
        ),
        "sleepy": recipe("sleepy", style="custom", extra_build='build = "sleep 30"'),
    }
    for name, text in files.items():
        (root / "ports" / name).mkdir(parents=True)
        (root / "ports" / name / "port.toml").write_text(text)
    return root


def test_source_and_build_settings_are_flags(tmp_path: Path) -> None:
    """--named-mirror, --mirror, --distfiles, --make-jobs and --timeout through the real CLI."""
    tree = mirror_tree(tmp_path / "tree")
    state = tmp_path / "state"
    with range_server() as server:
        server.files["up/greet/greet.txt"] = Served(GREETING)
        result = ports("build", "--tree", tree, "--state", state, "greet", check=False)
        assert result.returncode == 1
        assert (
            "greet: cannot fetch greet.txt: unknown mirror 'upstream' in "
            "mirror://upstream/greet/greet.txt (configure [sources] mirror.upstream)"
        ) in result.stdout
        assert server.seen == []

        distfiles = tmp_path / "distfiles"
        flags: list[str | Path] = [
            "--named-mirror",
            f"upstream={server.url('up')}",
            "--distfiles",
            distfiles,
        ]
        ports("build", "--tree", tree, "--state", state, *flags, "--make-jobs", "3", "greet")
        assert server.paths() == ["up/greet/greet.txt"]
        assert (distfiles / "by-sha256" / hashlib.sha256(GREETING).hexdigest()).exists()
        assert list((state / "distfiles" / "by-sha256").iterdir()) == []
        root = tmp_path / "root"
        entry = repository(state).index().entry("greet")
        assert entry is not None
        extract_package(repository(state).package_path(entry), root)
        assert (root / "usr/share/greet/greet.txt").read_bytes() == GREETING
        assert (root / "usr/share/greet/jobs").read_text() == "3\n"

        # a distfiles mirror has every file by name, whatever mirror the recipe names
        local = tmp_path / "local-mirror"
        local.mkdir()
        (local / "greet.txt").write_bytes(GREETING)
        other = tmp_path / "state2"
        flags = ["--mirror", local, "--distfiles", tmp_path / "distfiles2"]
        ports("build", "--tree", tree, "--state", other, *flags, "greet")
        assert server.paths() == ["up/greet/greet.txt"]  # not asked again
        assert set(published(other)) == {"greet"}

    result = ports(
        "build", "--tree", tree, "--state", state, "--timeout", "1", "sleepy", check=False
    )
    assert result.returncode == 1
    assert "sleepy: build failed (timed out after 1 s)" in result.stdout
