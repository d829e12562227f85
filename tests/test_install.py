"""`ports install` end to end: a real daemon on loopback builds the fixture tree from a real
`git push`, and the real `ports` command installs into temporary roots: from the cache,
from source when the cache is down, from package files; tampered caches fail closed; and
`kill -9` in the middle of an install is recovered by the next command."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from portsd.build.seed import find_seed
from portsd.client.transaction import Installed
from portsd.core.metadata import PackageMeta
from portsd.pkg.archive import content_id
from portsd.pkg.package import create_package
from portsd.pkg.repo import Repository
from portsd.pkg.sign import SecretKey
from tests.conftest import SourceServer, serving, serving_files
from tests.daemon_harness import RunningDaemon, portsd
from tests.fixtures import commit_all, git, write_tree

pytestmark = pytest.mark.slow

ARCH = platform.machine()
TOPTOOL = ("toptool", "libtop", "libmid", "libbase")
TOPTOOL_SAYS = "toptool\ntop=1101\n"


@dataclass
class Host:
    """The build host: the fixture tree pushed to a daemon that built all of it."""

    tree: Path
    bare: Path
    daemon: RunningDaemon
    sources: SourceServer

    @property
    def state(self) -> Path:
        return self.bare / "portsd"

    @property
    def key(self) -> Path:
        return self.state / "keys" / "portsd.pub"

    @property
    def repo(self) -> Path:
        return self.state / "repo"


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    base = tmp_path_factory.mktemp("host")
    with serving_files() as sources:
        tree = base / "tree"
        sources.files.update(write_tree(tree, sources.url))
        git(tree, "init", "-q", "-b", "main")
        commit = commit_all(tree, "the test ports tree")
        bare = base / "build.git"
        portsd("init", bare)
        git(tree, "remote", "add", "build", str(bare))
        daemon = RunningDaemon(bare, base / "daemon.log").start()
        try:
            git(tree, "push", "-q", "build", "main")
            daemon.wait_idle(commit)
            yield Host(tree, bare, daemon, sources)
        finally:
            daemon.stop()


def ports(
    *args: str | Path, check: bool = True, **environment: str
) -> subprocess.CompletedProcess[str]:
    """``ports ARGS``; ``environment`` adds to (or replaces in) the tests' own."""
    result = subprocess.run(
        [sys.executable, "-m", "portsd.cli.ports", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={k: v for k, v in os.environ.items() if k != "PORTS_CONFIG"}
        | {"COLUMNS": "200"}
        | environment,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"ports {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result


def from_cache(host: Host, url: str | None = None) -> list[str | Path]:
    return ["--cache", url or host.daemon.url, "--key", host.key]


def run_installed(root: Path, program: str) -> str:
    return subprocess.run(
        [root / "usr" / "bin" / program], capture_output=True, text=True, check=True
    ).stdout


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """Everything installed: each path outside var/ and etc/ports/ with its type, mode and
    content, and the database's packages and files (not its rollback memory, nor the
    download cache, nor the caches the root remembers)."""
    files: dict[str, tuple[object, ...]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel == "var" or rel.startswith(("var/", "etc/ports/")):
            continue  # downloads, the database, the caches and keys the root remembers
        st = path.lstat()
        if path.is_symlink():
            files[rel] = ("link", os.readlink(path))
        elif path.is_dir():
            files[rel] = ("dir", st.st_mode)
        else:
            files[rel] = ("file", st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    database = root / "var/lib/ports/installed.sqlite"
    if database.exists():
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
            for table in ("packages", "files"):
                rows = db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
                files[f"db:{table}"] = tuple(map(tuple, rows))
    return files


def installed_names(root: Path) -> set[str]:
    with Installed.open(root, readonly=True) as installed:
        return {p.meta.name for p in installed.db.packages()}


# -- from the cache ------------------------------------------------------------------------


def test_install_from_the_cache_runs_the_program(host: Host, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    result = ports("install", "toptool", "--root", root, *from_cache(host))
    assert run_installed(root, "toptool") == TOPTOOL_SAYS
    assert "building" not in result.stdout  # all four came from the cache
    with Installed.open(root, readonly=True) as installed:
        packages = {p.meta.name: p for p in installed.db.packages()}
        assert set(packages) == set(TOPTOOL)
        assert packages["toptool"].reason == "explicit"
        assert packages["libtop"].reason == "dependency"
        assert packages["toptool"].origin == host.daemon.url
        assert not installed.verify("toptool")
    served = host.daemon.get("/api/v1/status")
    assert served is not None

    listing = ports("list", "--root", root).stdout
    assert all(name in listing for name in TOPTOOL)
    assert "is owned by toptool 1.0-1" in ports("owner", "/usr/bin/toptool", "--root", root).stdout
    assert "/usr/bin/toptool" in ports("files", "toptool", "--root", root).stdout
    info = ports("info", "toptool", "--root", root, *from_cache(host)).stdout
    assert "(installed)" in info and "explicit" in info
    found = ports("search", "lib", "--root", root, *from_cache(host)).stdout
    assert "liba" in found and "available" in found and "libtop" in found
    again = ports("install", "toptool", "--root", root, *from_cache(host))
    assert "nothing to do" in again.stdout
    orphan = ports("owner", "/etc/nothing", "--root", root, check=False)
    assert orphan.returncode == 1 and "not owned by any package" in orphan.stdout

    assert "4 package(s) checked, 0 with differences" in ports("check", "--root", root).stdout
    (root / "usr/bin/toptool").write_bytes(b"#!/bin/sh\necho tampered\n")
    (root / "usr/include/top.h").unlink()
    checked = ports("check", "--root", root, check=False)
    assert checked.returncode == 1
    assert "toptool: /usr/bin/toptool: content changed" in checked.stdout
    assert "libtop: /usr/include/top.h: missing" in checked.stdout


def test_cache_down_builds_from_source_with_identical_files(
    host: Host, tmp_path: Path, silent_port: int, refusing_port: int
) -> None:
    binary = tmp_path / "binary"
    binary.mkdir()
    ports("install", "toptool", "--root", binary, *from_cache(host))

    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", str(host.tree), str(checkout))
    source = tmp_path / "source"
    source.mkdir()
    silent = f"http://127.0.0.1:{silent_port}"
    dead = f"http://127.0.0.1:{refusing_port}"
    started = time.monotonic()
    result = ports(
        "install", "toptool", "--root", source, "--tree", checkout,
        "--cache", silent, "--cache", dead, "--key", host.key,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert f"not using {silent}: " in result.stdout
    assert f"not using {dead}: " in result.stdout
    for name in TOPTOOL:
        assert f"building {name} from source" in result.stdout
    assert run_installed(source, "toptool") == TOPTOOL_SAYS
    installed_files = {k: v for k, v in snapshot(source).items() if not k.startswith("db:")}
    assert installed_files == {k: v for k, v in snapshot(binary).items() if not k.startswith("db:")}
    assert elapsed < 120  # a bound for the test, not a benchmark: a dead cache costs ~1 s


def test_a_client_without_a_seed_takes_the_daemons_and_substitutes_by_its_keys(
    host: Host, tmp_path: Path
) -> None:
    """Keys contain the seed's content id: a client with a ports checkout and no seed of
    its own takes the daemon's (signed) instead of making one from its host, so the keys
    it computes are the cache's and nothing is built here."""
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", str(host.tree), str(checkout))
    root = tmp_path / "root"
    root.mkdir()
    seed = tmp_path / "client-seed"
    result = ports(
        "install", "toptool", "--root", root, "--tree", checkout, *from_cache(host),
        PORTSD_SEED=str(seed),
    )  # fmt: skip
    daemons = find_seed(Path(os.environ["PORTSD_SEED"]))
    assert daemons is not None
    took = f"took the bootstrap seed {daemons.content_id[:12]} of {host.daemon.url}"
    assert took in result.stdout
    assert "making the bootstrap seed" not in result.stdout
    assert "from source" not in result.stdout
    for name in TOPTOOL:
        assert f"downloaded {name}" in result.stdout
    taken = find_seed(seed)
    assert taken is not None and taken.content_id == daemons.content_id
    assert taken.manifest == daemons.manifest
    assert run_installed(root, "toptool") == TOPTOOL_SAYS
    again = ports("install", "hello", "--root", root, "--tree", checkout, *from_cache(host),
                  PORTSD_SEED=str(seed))  # fmt: skip
    assert "seed" not in again.stdout  # the same seed on both sides: nothing to say


def test_a_client_keeping_another_seed_is_told_its_keys_cannot_be_the_caches(
    host: Host, tmp_path: Path
) -> None:
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", str(host.tree), str(checkout))
    other = tmp_path / "other-seed"  # a seed of other content (no toolchain: nothing builds)
    (tmp_path / "files" / "usr" / "bin").mkdir(parents=True)
    (tmp_path / "files" / "usr" / "bin" / "cc").write_text("#!/bin/sh\nexit 1\n")
    meta = PackageMeta("seed", "1", 1, ARCH, hashlib.sha256(b"other").hexdigest())
    built = create_package(tmp_path / "files", meta, other, epoch=0)
    (other / "manifest").write_text("made by the test\n")
    (other / "root").mkdir()
    root = tmp_path / "root"
    root.mkdir()
    result = ports(
        "install", "toptool", "--root", root, "--tree", checkout, "--no-build", *from_cache(host),
        PORTSD_SEED=str(other), check=False,
    )  # fmt: skip
    daemons = find_seed(Path(os.environ["PORTSD_SEED"]))
    assert daemons is not None and result.returncode == 1
    mine = content_id(built.info.files)
    told = (
        f"{host.daemon.url} builds on the seed {daemons.content_id[:12]}, this client on "
        f"{mine[:12]} ({other}): no key computed here is one of its packages"
    )
    assert told in " ".join(result.stdout.split())  # a long line: wrapped on a terminal
    # its keys are not the cache's, from the bottom of the chain up
    assert "libbase: no package for build key" in result.stderr
    assert f"{host.daemon.url}: does not have it" in result.stderr


def test_a_changed_port_is_built_and_its_dependencies_substituted(
    host: Host, tmp_path: Path
) -> None:
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", str(host.tree), str(checkout))
    (checkout / "ports" / "toptool" / "NOTES").write_text("a local change: a new build key\n")
    root = tmp_path / "root"
    root.mkdir()
    ports("install", "hello", "--root", root, *from_cache(host))
    before = snapshot(root)
    refused = ports(
        "install", "toptool", "--root", root, "--tree", checkout, "--no-build", *from_cache(host),
        check=False,
    )  # fmt: skip
    assert refused.returncode == 1
    assert "toptool: no package for build key" in refused.stderr
    assert "source builds are off" in refused.stderr
    assert snapshot(root) == before

    result = ports("install", "toptool", "--root", root, "--tree", checkout, *from_cache(host))
    assert "building toptool from source" in result.stdout
    assert "building libtop" not in result.stdout  # its key is the cache's: downloaded
    assert "downloaded libtop" in refused.stdout  # kept in the client's store since
    assert run_installed(root, "toptool") == TOPTOOL_SAYS


def test_the_build_flag_builds_what_the_cache_has(host: Host, tmp_path: Path) -> None:
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", str(host.tree), str(checkout))
    root = tmp_path / "root"
    root.mkdir()
    result = ports(
        "install", "hello", "--root", root, "--tree", checkout, "--build", *from_cache(host)
    )
    assert "building hello from source" in result.stdout
    assert "downloaded" not in result.stdout
    assert run_installed(root, "hello") == "hello, ports\n"
    with Installed.open(root, readonly=True) as installed:
        hello = installed.db.installed("hello")
        assert hello is not None and hello.origin == f"built from {checkout}"


def test_upgrade_replaces_packages_whose_build_key_changed(host: Host, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    ports("install", "toptool", "--root", root, *from_cache(host))
    with Installed.open(root, readonly=True) as installed:
        before = {p.meta.name: p.meta.build_key for p in installed.db.packages()}
    checkout = tmp_path / "checkout"
    git(tmp_path, "clone", "-q", str(host.tree), str(checkout))
    (checkout / "ports" / "libmid" / "NOTES").write_text("same version, other inputs\n")

    result = ports("upgrade", "--root", root, "--tree", checkout, *from_cache(host))
    with Installed.open(root, readonly=True) as installed:
        after = {
            p.meta.name: (p.meta.build_key, p.meta.full_version) for p in installed.db.packages()
        }
    changed = {name for name in before if after[name][0] != before[name]}
    # libmid is built here (no cache has its new key) and comes out identical, so what
    # depends on it keeps its key (early cutoff); libbase's never depended on libmid
    assert changed == {"libmid"}
    assert all(version == "1.0-1" for _, version in after.values())
    assert "(build " in result.stdout  # the same version, said to be another build
    assert run_installed(root, "toptool") == TOPTOOL_SAYS
    again = ports("upgrade", "--root", root, "--tree", checkout, *from_cache(host))
    assert "everything is up to date" in again.stdout


# -- failing closed ------------------------------------------------------------------------


@contextmanager
def copied_cache(host: Host, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A copy of the host's repository served as static files: (URL, its arch directory)."""
    repo = tmp_path / "served"
    shutil.copytree(host.repo, repo)
    app = web.Application()
    app.router.add_static("/repo/", repo)
    with serving(app) as url:
        yield url, repo / ARCH


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def package_file(arch_dir: Path, name: str) -> Path:
    (found,) = (arch_dir / "packages").glob(f"{name}-1.0-1-*.pkg.tar.zst")
    return found


def host_repository(host: Host, arch_dir: Path) -> Repository:
    """The copy, writable with the host's own signing key (to make new, validly signed indexes)."""
    secret = SecretKey.load(host.state / "keys" / "portsd.key")
    return Repository(arch_dir.parent, ARCH, secret)


INDEX = "index.msgpack.zst"


def tamper_index(host: Host, arch_dir: Path, root: Path, url: str) -> str:
    flip_byte(arch_dir / INDEX, 40)
    return "signature"


def tamper_signature(host: Host, arch_dir: Path, root: Path, url: str) -> str:
    other = SecretKey.generate()
    (arch_dir / (INDEX + ".minisig")).write_text(other.sign((arch_dir / INDEX).read_bytes(), "x"))
    return other.key_id.lower()


def tamper_package(host: Host, arch_dir: Path, root: Path, url: str) -> str:
    package = package_file(arch_dir, "libtop")
    flip_byte(package, package.stat().st_size // 2)
    return "libtop"


def roll_back(host: Host, arch_dir: Path, root: Path, url: str) -> str:
    """Serve again an index older than one the client has seen (a replay)."""
    old = {n: (arch_dir / n).read_bytes() for n in (INDEX, INDEX + ".minisig")}
    host_repository(host, arch_dir).refresh()
    ports("install", "libbase", "--root", root, *from_cache(host, url))  # sees the newer one
    for name, data in old.items():
        (arch_dir / name).write_bytes(data)
    return "serial"


def expire(host: Host, arch_dir: Path, root: Path, url: str) -> str:
    host_repository(host, arch_dir).refresh(expires_in=-60)
    return "expired"


@pytest.mark.parametrize(
    "tamper", [tamper_index, tamper_signature, tamper_package, roll_back, expire]
)
def test_tampered_caches_fail_closed_and_change_nothing(
    host: Host, tmp_path: Path, tamper: Callable[[Host, Path, Path, str], str]
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with copied_cache(host, tmp_path) as (url, arch_dir):
        ports("install", "hello", "--root", root, *from_cache(host, url))
        expected = tamper(host, arch_dir, root, url)
        before = snapshot(root)
        result = ports("install", "toptool", "--root", root, *from_cache(host, url), check=False)
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("error: ")
    assert expected in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert snapshot(root) == before
    assert "toptool" not in installed_names(root)


# -- package files, removal, the lock, crashes ---------------------------------------------


def test_install_a_package_file_checks_its_signature(host: Host, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    given = tmp_path / "given"
    given.mkdir()
    package = package_file(host.repo / ARCH, "toptool")
    copy = given / package.name
    shutil.copyfile(package, copy)

    unsigned = ports("install", copy, "--root", root, *from_cache(host), check=False)
    assert unsigned.returncode == 1
    assert f"{copy}: no signature to check" in unsigned.stderr
    other = SecretKey.generate()
    Path(f"{copy}.minisig").write_text(other.sign(copy.read_bytes(), "someone else"))
    forged = ports("install", copy, "--root", root, *from_cache(host), check=False)
    assert forged.returncode == 1 and other.key_id in forged.stderr
    assert not (root / "usr").exists()

    shutil.copyfile(f"{package}.minisig", f"{copy}.minisig")
    ports("install", copy, "--root", root, *from_cache(host))
    assert run_installed(root, "toptool") == TOPTOOL_SAYS
    assert copy.exists()  # the user's file is left alone
    with Installed.open(root, readonly=True) as installed:
        toptool = installed.db.installed("toptool")
        assert toptool is not None and toptool.origin == str(copy)


def test_remove_refuses_to_break_a_dependency(host: Host, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    ports("install", "toptool", "hello", "--root", root, *from_cache(host))
    refused = ports("remove", "libtop", "--root", root, check=False)
    assert refused.returncode == 1
    assert "toptool needs 'libtop'" in refused.stderr
    assert (root / "usr/lib/libtop.a").exists()

    ports("remove", "toptool", "libtop", "--root", root)
    assert not (root / "usr/bin/toptool").exists()
    assert not (root / "usr/lib/libtop.a").exists()
    assert run_installed(root, "hello") == "hello, ports\n"
    assert installed_names(root) == {"libmid", "libbase", "hello"}


def test_a_second_client_names_the_lock_holder(host: Host, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with Installed.open(root, command="the test holding the lock"):
        refused = ports("install", "hello", "--root", root, *from_cache(host), check=False)
        assert refused.returncode == 1
        assert f"locked by pid {os.getpid()} (the test holding the lock)" in refused.stderr
    held = threading.Event()

    def hold_for_a_second() -> None:
        with Installed.open(root):
            held.set()
            time.sleep(1.0)

    holder = threading.Thread(target=hold_for_a_second)
    holder.start()
    assert held.wait(timeout=30)
    ports("install", "hello", "--root", root, "--wait", "30", *from_cache(host))
    holder.join(timeout=30)
    assert run_installed(root, "hello") == "hello, ports\n"


def test_kill_9_during_installs_is_recovered_by_the_next_command(
    host: Host, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    command = [sys.executable, "-m", "portsd.cli.ports", "install", "diamond", "confapp"]
    command += ["--root", str(root), *map(str, from_cache(host))]
    started = time.monotonic()
    ports(*command[3:])  # a full run: fills the download store, measures the duration
    duration = time.monotonic() - started
    ports("remove", "diamond", "confapp", "liba", "libb", "libbase", "--root", root)
    clean = snapshot(root)
    for step in range(1, 9):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * step / 9)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        listing = ports("list", "--root", root).stdout  # any command recovers
        assert not (root / "var/lib/ports/journal").exists()
        names = installed_names(root)
        assert names in (set(), {"diamond", "confapp", "liba", "libb", "libbase"}), listing
        with Installed.open(root, readonly=True) as installed:
            for name in names:
                assert installed.verify(name) == [], name
        if names:
            assert run_installed(root, "diamond") == "diamond\na=11\nb=21\n"
            ports("remove", "diamond", "confapp", "liba", "libb", "libbase", "--root", root)
        assert snapshot(root) == clean
