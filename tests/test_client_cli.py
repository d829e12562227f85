"""The client's command line as a user and a script meet it: a real signed repository served
over HTTP on 127.0.0.1, the real ``ports`` command in a subprocess, real roots on disk."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from portsd.core.metadata import PackageMeta
from portsd.pkg.archive import content_id
from portsd.pkg.package import create_package
from portsd.pkg.repo import Repository
from portsd.pkg.sign import PublicKey, SecretKey
from tests.conftest import SourceServer, serving

ARCH = platform.machine()
EPOCH = 1_700_000_000
HELLO = b"#!/bin/sh\necho hello\n"


@dataclass
class Cache:
    url: str
    key: Path  # the public key file
    repo: Repository
    secret: SecretKey


PACKAGES: dict[str, tuple[tuple[str, ...], dict[str, bytes]]] = {
    "libgreet": ((), {"usr/lib/libgreet.a": b"greet" * 100}),
    "hello": (("libgreet",), {"usr/bin/hello": HELLO}),
    "extra": ((), {"usr/share/extra/README": b"extra\n"}),
}


def publish(repo: Repository, base: Path, name: str, release: int = 1) -> None:
    depends, files = PACKAGES[name]
    destdir = base / "destdir" / f"{name}-{release}"
    for relative, data in files.items():
        path = destdir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(0o755 if relative.startswith("usr/bin/") else 0o644)
    key = hashlib.sha256(f"{name}-{release}".encode()).hexdigest()
    meta = PackageMeta(
        name,
        "1.0",
        release,
        ARCH,
        key,
        summary=f"the {name} package",
        license="MIT",
        depends=depends,
    )
    built = create_package(destdir, meta, base / "out", epoch=EPOCH)
    repo.publish(built.path, built.info.meta, content=content_id(built.info.files), commit="c0ffee")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cache]:
    base = tmp_path_factory.mktemp("cache")
    secret = SecretKey.generate()
    repo = Repository(base / "repo", ARCH, secret)
    for name in PACKAGES:
        publish(repo, base, name)
    key = base / "cache.pub"
    secret.public_key.save(key)
    app = web.Application()
    app.router.add_static("/repo/", base / "repo")
    with serving(app) as url:
        yield Cache(url, key, repo, secret)


def ports(*args: str | Path, user: str | None = None) -> subprocess.CompletedProcess[str]:
    """``ports ARGS`` (as ``user`` if given, via setpriv); never raises on failure."""
    command = [sys.executable, "-m", "portsd.cli.ports", *map(str, args)]
    if user is not None:
        command = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", *command]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).parent.parent,
        env={k: v for k, v in os.environ.items() if k != "PORTS_CONFIG"}
        | {"COLUMNS": "200", "HOME": "/nonexistent"},
    )


def ok(*args: str | Path) -> str:
    result = ports(*args)
    assert result.returncode == 0, f"ports {' '.join(map(str, args))}:\n{result.stderr}"
    return result.stdout


def from_cache(cache: Cache) -> list[str | Path]:
    return ["--cache", cache.url, "--key", cache.key]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


# -- 11: a root remembers its caches and keys ----------------------------------------------


def test_a_root_remembers_its_caches_and_keys(cache: Cache, root: Path) -> None:
    ok("install", "hello", "--root", root, *from_cache(cache))
    assert (root / "usr/bin/hello").read_bytes() == HELLO
    # downloading needs no bootstrap seed (making one from the host took 20 to 80 s)
    assert not (root / "var/cache/ports/seed").exists()
    assert (root / "etc/ports/caches").read_text().splitlines()[-1] == cache.url
    assert len(list((root / "etc/ports/keys").glob("*.pub"))) == 1

    searched = ok("search", "hello", "--root", root)  # no flags: the root's caches
    assert "hello" in searched and "installed" in searched
    assert "the extra package" in ok("search", "extra", "--root", root)
    assert "available" in ok("info", "extra", "--root", root)
    ok("install", "extra", "--root", root)
    assert (root / "usr/share/extra/README").exists()
    assert "up to date" in ok("upgrade", "--root", root)


def test_no_caches_configured_is_said_as_such(root: Path) -> None:
    searched = ports("search", "hello", "--root", root)
    assert searched.returncode == 1
    assert "no caches configured" in searched.stderr
    info = ports("info", "hello", "--root", root)
    assert info.returncode == 1 and "no caches are configured" in info.stderr
    upgrade = ports("upgrade", "--root", root)
    assert upgrade.returncode == 1 and "no caches configured" in upgrade.stderr


# -- 12: scripting -------------------------------------------------------------------------

BOX = set("─━│┃┏┓┗┛┡┩╇╈┼╋╍╌")


def test_queries_print_json_names_only_and_no_box_lines_when_piped(
    cache: Cache, root: Path
) -> None:
    ok("install", "hello", "--root", root, *from_cache(cache))
    listed = json.loads(ok("list", "--root", root, "--json"))
    assert {(p["name"], p["reason"]) for p in listed} == {
        ("hello", "explicit"),
        ("libgreet", "dependency"),
    }
    assert ok("list", "--root", root, "-q").splitlines() == ["hello", "libgreet"]
    table = ok("list", "--root", root)
    assert "hello" in table and not BOX & set(table)
    files = json.loads(ok("files", "hello", "--root", root, "--json"))
    assert {"path": "/usr/bin/hello", "mode": 0o755}.items() <= files[-1].items()
    assert "/usr/bin/hello" in ok("files", "hello", "--root", root, "-q").splitlines()
    owner = json.loads(ok("owner", "/usr/bin/hello", "--root", root, "--json"))
    assert owner == {"path": "/usr/bin/hello", "owners": [{"name": "hello", "version": "1.0-1"}]}
    assert ok("owner", "/usr/bin/hello", "--root", root, "-q") == "hello\n"
    assert json.loads(ok("check", "--root", root, "--json")) == {"hello": [], "libgreet": []}
    found = json.loads(ok("search", "e", "--root", root, "--json"))
    assert {(p["name"], p["status"]) for p in found} == {
        ("hello", "installed"),
        ("libgreet", "installed"),
        ("extra", "available"),
    }
    assert ok("search", "extra", "--root", root, "-q") == "extra\n"
    searched = ok("search", "e", "--root", root)
    assert "extra" in searched and not BOX & set(searched)
    info = json.loads(ok("info", "extra", "--root", root, "--json"))
    assert info["installed"] is None and info["available"]["license"] == "MIT"


def test_version_global_flags_after_the_verb_and_did_you_mean(root: Path) -> None:
    assert ok("--version").startswith("ports ")
    assert ok("list", "--root", root, "-v", "-q") == ""
    misspelt = ports("instal", "hello")
    assert misspelt.returncode == 2
    assert "did you mean install?" in misspelt.stderr


def tree_of(root: Path) -> list[str]:
    """Every path in ``root`` (but sqlite's -wal and -shm, which a reader may leave)."""
    paths = (str(p.relative_to(root)) for p in root.rglob("*"))
    return sorted(p for p in paths if not p.endswith(("-wal", "-shm")))


def test_a_dry_run_prints_the_plan_and_changes_nothing(cache: Cache, root: Path) -> None:
    planned = ok("install", "hello", "-s", "--root", root, *from_cache(cache))
    assert "libgreet" in planned and "dry run: nothing changed" in planned
    assert tree_of(root) == []
    ok("install", "hello", "--root", root, *from_cache(cache))
    before = tree_of(root), (root / "var/lib/ports/installed.sqlite").read_bytes()
    assert "would remove hello" in ok("remove", "--dry-run", "hello", "--root", root)
    refused = ports("remove", "--dry-run", "libgreet", "--root", root)
    assert refused.returncode == 1 and "hello needs 'libgreet'" in refused.stderr
    assert "nothing to do" in ok("upgrade", "-s", "--root", root)
    assert (tree_of(root), (root / "var/lib/ports/installed.sqlite").read_bytes()) == before


def complete(script: str, *words: str) -> list[str]:
    """What bash completes for the command line ``words`` (the last one being typed)."""
    line = " ".join(f"'{w}'" for w in words)
    program = f"""{script}
COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; _ports; printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    done = subprocess.run(["bash", "-c", program], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_bash_completion_is_generated_from_the_parser() -> None:
    script = ok("completion", "bash")
    assert complete(script, "ports", "inst") == ["install"]
    assert complete(script, "ports", "-v", "zzz") == []
    assert "--dry-run" in complete(script, "ports", "install", "--dr")
    assert "--json" in complete(script, "ports", "list", "--")
    assert complete(script, "ports", "search", "--cache", "") == []  # a URL: nothing to offer
    assert complete(script, "ports", "list", "--root", "tes") == ["tests"]


# -- 13: permissions -----------------------------------------------------------------------


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory of root's that others may enter (pytest's own are closed to them)."""
    path = Path(tempfile.mkdtemp(prefix="portsd-client-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_without_permission_changes_are_one_line_and_queries_work(
    cache: Cache, open_dir: Path
) -> None:
    root = open_dir / "root"
    root.mkdir()
    ok("install", "hello", "--root", root, *from_cache(cache))
    fresh = open_dir / "fresh"
    fresh.mkdir()
    for target in (root, fresh):
        key = PublicKey.load(cache.key).base64()  # nobody cannot read pytest's directories
        refused = ports(
            "install", "extra", "--root", target, "--cache", cache.url, "--key", key, user="nobody"
        )
        assert refused.returncode == 1
        assert refused.stderr.startswith(f"error: {target}"), refused.stderr
        assert refused.stderr.endswith("Permission denied\n"), refused.stderr
        assert len(refused.stderr.splitlines()) == 1
    assert list(fresh.iterdir()) == []
    for query in (
        ["list", "-q"],
        ["info", "hello"],
        ["files", "hello", "-q"],
        ["owner", "/usr/bin/hello", "-q"],
        ["check", "hello", "--json"],
        ["search", "hello", "-q"],
    ):
        result = ports(*query, "--root", root, user="nobody")
        assert result.returncode == 0, f"{query}: {result.stderr}"
        assert "hello" in result.stdout, query
    assert not (root / "usr/share/extra").exists()


# -- 14: repair and orphans ----------------------------------------------------------------


def test_a_damaged_package_is_repaired(cache: Cache, root: Path) -> None:
    ok("install", "hello", "--root", root, *from_cache(cache))
    hello = root / "usr/bin/hello"
    hello.unlink()
    damaged = ports("check", "--root", root)
    assert damaged.returncode == 1 and "/usr/bin/hello: missing" in damaged.stdout
    assert "already installed" in ok("install", "hello", "--root", root)
    assert "reinstalled hello" in ok("install", "--reinstall", "hello", "--root", root)
    assert hello.read_bytes() == HELLO and hello.stat().st_mode & 0o777 == 0o755
    hello.write_bytes(b"#!/bin/sh\necho pwned\n")
    repaired = ok("check", "--repair", "--root", root)
    assert "content changed" in repaired and "reinstalled hello" in repaired
    assert hello.read_bytes() == HELLO
    assert json.loads(ok("check", "--root", root, "--json")) == {"hello": [], "libgreet": []}


def test_autoremove_removes_dependencies_nothing_needs(cache: Cache, root: Path) -> None:
    ok("install", "hello", "extra", "--root", root, *from_cache(cache))
    assert "nothing to do" in ok("autoremove", "--root", root)
    ok("remove", "hello", "--root", root)
    assert "would remove libgreet" in ok("autoremove", "-s", "--root", root)
    assert ok("list", "-q", "--root", root).split() == ["extra", "libgreet"]
    assert "removed libgreet" in ok("autoremove", "--root", root)
    assert ok("list", "-q", "--root", root).split() == ["extra"]
    assert not (root / "usr/lib/libgreet.a").exists()


# -- 15: the smaller ones ------------------------------------------------------------------


def test_missing_key_file_and_missing_root_are_said_as_such(cache: Cache, tmp_path: Path) -> None:
    root = tmp_path / "root"
    no_key = ports("install", "hello", "--root", root, "--cache", cache.url, "--key", "/no/k.pub")
    assert no_key.returncode == 1 and "trusted key /no/k.pub: no such file" in no_key.stderr
    no_root = ports("install", "hello", "--root", root, *from_cache(cache))
    assert no_root.returncode == 1 and f"{root}: the root does not exist" in no_root.stderr
    assert "--initdb" in no_root.stderr and not root.exists()
    ok("install", "hello", "--initdb", "--root", root, *from_cache(cache))
    assert (root / "usr/bin/hello").read_bytes() == HELLO


def test_remove_says_what_went_and_hints_at_the_dependents(cache: Cache, root: Path) -> None:
    ok("install", "hello", "extra", "--root", root, *from_cache(cache))
    refused = ports("remove", "libgreet", "--root", root)
    assert refused.returncode == 1 and "hello needs 'libgreet'" in refused.stderr
    assert "hint: remove hello too, or give --force" in refused.stderr
    removed = ok("remove", "extra", "--root", root)
    assert "removed extra 1.0-1" in removed and "0 files" not in removed
    assert "1 package(s) removed, 6 B freed" in removed


def test_info_of_an_available_package_and_owner_of_a_path_into_the_root(
    cache: Cache, root: Path
) -> None:
    ok("install", "hello", "--root", root, *from_cache(cache))
    info = ok("info", "extra", "--root", root)
    assert "the extra package" in info and "MIT" in info and "6 B installed" in info
    assert ok("owner", root / "usr/bin/hello", "--root", root) == (
        "/usr/bin/hello is owned by hello 1.0-1\n"
    )


def test_a_package_file_installs_alone_and_a_refusal_leaves_a_fresh_root_empty(
    cache: Cache, root: Path, tmp_path: Path
) -> None:
    refused = ports("install", "nosuchthing", "--root", root, *from_cache(cache))
    assert refused.returncode == 1 and list(root.iterdir()) == []
    given = tmp_path / "given"
    given.mkdir()
    for name in ("libgreet", "extra"):
        (package,) = cache.repo.packages_path.glob(f"{name}-*.pkg.tar.zst")
        shutil.copyfile(package, given / package.name)
        shutil.copyfile(f"{package}.minisig", given / f"{package.name}.minisig")
    files = sorted(given.glob("*.pkg.tar.zst"))
    ok("install", *files, "--root", root, "--key", cache.key)
    assert ok("list", "-q", "--root", root).split() == ["extra", "libgreet"]


def test_lint_says_where_and_a_cycle_once(ports_tree: Path) -> None:
    mid = ports_tree / "ports" / "libmid" / "port.toml"  # libtop needs libmid: now a cycle
    mid.write_text(mid.read_text().replace('depends = ["libbase"]', 'depends = ["libtop"]'))
    liba = ports_tree / "ports" / "liba" / "port.toml"
    liba.write_text(
        liba.read_text().replace('depends = ["libbase"]', 'depends = ["libbase", "nope"]')
    )
    result = ports("lint", "--tree", ports_tree)
    assert result.returncode == 1
    cycles = [line for line in result.stdout.splitlines() if "dependency cycle" in line]
    assert len(cycles) == 1, result.stdout
    assert re.match(r"ports/(libmid|libtop)/port\.toml:\d+: dependency cycle: ", cycles[0])
    missing = "depends 'nope' is not provided by any port"
    assert re.search(rf"ports/liba/port\.toml:\d+: liba: {missing}", result.stdout)


def test_make_run_installs_no_browser() -> None:
    repository = Path(__file__).parent.parent
    run = subprocess.run(
        ["make", "-n", "-W", "pyproject.toml", "run"],
        cwd=repository,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "tools/bootstrap" in run and "PORTSD_TEST" not in run
    test = subprocess.run(
        ["make", "-n", "-W", "tools/bootstrap", "test"],
        cwd=repository,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "PORTSD_TEST=1 tools/bootstrap" in test
    bootstrap = (repository / "tools/bootstrap").read_text()
    assert bootstrap.index("chromium:chromium") > bootstrap.index('"${PORTSD_TEST:-}" == 1')


# -- 17: slow caches -----------------------------------------------------------------------


@contextmanager
def trickling(cache: Cache) -> Iterator[str]:
    """The cache's repository, but its index sent at 1 byte a second (60 at most)."""
    index = cache.repo.index_path.read_bytes()

    async def trickle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(index))})
        await response.prepare(request)
        for offset in range(min(len(index), 60)):
            if request.transport is None or request.transport.is_closing():
                break
            await response.write(index[offset : offset + 1])
            await asyncio.sleep(1)
        return response

    app = web.Application()
    app.router.add_get(f"/repo/{ARCH}/index.msgpack.zst", trickle)
    app.router.add_static("/repo/", cache.repo.path.parent)
    with serving(app) as url:
        yield url


def test_a_slow_cache_is_cut_off_and_holds_up_no_other(
    cache: Cache, root: Path, tmp_path: Path
) -> None:
    config = tmp_path / "ports.toml"
    config.write_text("index-timeout = 3\n")
    with trickling(cache) as slow:
        started = time.monotonic()
        alone = ports(
            "install",
            "hello",
            "--root",
            root,
            "--config",
            config,
            "--cache",
            slow,
            "--key",
            cache.key,
        )
        took = time.monotonic() - started
        assert alone.returncode == 1 and "index not read in time (3 s)" in alone.stderr
        assert took < 3 + 10, took
        started = time.monotonic()  # the slow one first: still the fast one is used at once
        both = ports(
            "install",
            "hello",
            "--root",
            root,
            "--cache",
            slow,
            "--cache",
            cache.url,
            "--key",
            cache.key,
        )
        took = time.monotonic() - started
    assert both.returncode == 0, both.stderr
    assert f"not using {slow}: index not read in time, while another cache" in both.stdout
    assert took < 15, took  # the default deadline alone is 20 s
    assert (root / "usr/bin/hello").read_bytes() == HELLO


# -- 18: one serial, one content -----------------------------------------------------------


def test_an_index_with_a_seen_serial_and_other_content_is_refused(
    cache: Cache, root: Path, tmp_path: Path
) -> None:
    forks = []
    for fork, name in (("a", "extra"), ("b", "hello")):
        shutil.copytree(cache.repo.path.parent, tmp_path / fork)
        repo = Repository(tmp_path / fork, ARCH, cache.secret)
        publish(repo, tmp_path / f"{fork}-build", name, release=2)
        forks.append(repo)
    assert forks[0].index().serial == forks[1].index().serial
    shutil.copytree(tmp_path / "a", tmp_path / "a-copy")
    with ExitStack() as stack:
        urls = []
        for directory in ("a", "b", "a-copy"):
            app = web.Application()
            app.router.add_static("/repo/", tmp_path / directory)
            urls.append(stack.enter_context(serving(app)))
        ok("install", "extra", "--root", root, "--cache", urls[0], "--key", cache.key)
        searched = ports("search", "hello", "--root", root, "--cache", urls[1])
        assert "(a fork)" in searched.stdout  # a query is refused it too, and records nothing
        forked = ports("install", "hello", "--root", root, "--cache", urls[1])
        assert forked.returncode == 1
        assert "was seen before with other content (a fork)" in forked.stdout + forked.stderr
        assert not (root / "usr/bin/hello").exists()
        ok("install", "hello", "--root", root, "--cache", urls[2])  # the same bytes: fine
    assert (root / "usr/bin/hello").read_bytes() == HELLO


# -- 24: ports checksum --------------------------------------------------------------------


def test_checksum_writes_the_sha256_of_each_url_source(
    ports_tree: Path, source_server: SourceServer
) -> None:
    recipe = ports_tree / "ports" / "libbase" / "port.toml"
    before = recipe.read_text()
    (tarball,) = [name for name in source_server.files if name.startswith("libbase")]
    source_server.files[tarball] += b"\0" * 512  # upstream re-rolled the tarball
    new = hashlib.sha256(source_server.files[tarball]).hexdigest()
    said = ok("checksum", "libbase", "--tree", ports_tree, "--state", ports_tree / "state")
    assert f"{new} (changed)" in said
    after = recipe.read_text()
    old = re.search(r'sha256 = "([0-9a-f]{64})"', before)
    assert old is not None and after == before.replace(old[1], new)
    recipe.write_text(after.replace(f'sha256 = "{new}"\n', ""))  # a new recipe: no sum yet
    assert f"{new} (added)" in ok("checksum", "libbase", "--tree", ports_tree)
    assert recipe.read_text() == after
    assert "libbase" not in ok("lint", "--tree", ports_tree)
