"""Running the daemon for real, as an operator sees it: `portsd status`, the daemon's log,
a full disk, retention, key rotation. Real daemons, real `git push`, real builds."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from portsd.core.index import decode_index
from portsd.daemon.service import RETRY_EVERY
from portsd.errors import BadSignature
from portsd.pkg.repo import Repository
from portsd.pkg.sign import PublicKey
from tests.daemon_harness import RunningDaemon, command_environment
from tests.fixtures import commit_all, git
from tests.test_daemon import assert_consistent, edit, head, keys_at, push, slow_down

pytestmark = pytest.mark.slow

ARCH = platform.machine()


@pytest.fixture
def daemon(tmp_path: Path, bare: Path) -> Iterator[RunningDaemon]:
    running = RunningDaemon(bare, tmp_path / "daemon.log").start()
    yield running
    running.stop()


def run_portsd(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """`portsd ARGS`, whatever its exit status."""
    return subprocess.run(
        [sys.executable, "-m", "portsd.cli.daemon", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env=command_environment(),
    )


def break_port(tree: Path, port: str) -> str:
    recipe = tree / "ports" / port / "port.toml"
    recipe.write_text(
        recipe.read_text().split("\n[build]")[0] + '\n[build]\nstyle = "make"\nbuild = "false"\n'
    )
    return commit_all(tree, f"{port}: broken")


def test_status_says_whether_it_runs_what_fails_and_exits_accordingly(
    tmp_path: Path, bare: Path, ports_tree: Path
) -> None:
    stopped = run_portsd("status", "--repo", bare)
    assert stopped.returncode == 3
    assert "not running" in stopped.stdout and str(bare / "portsd") in stopped.stdout
    assert json.loads(run_portsd("status", "--repo", bare, "--json").stdout)["running"] is False

    daemon = RunningDaemon(bare, tmp_path / "daemon.log").start()
    try:
        broken = break_port(ports_tree, "liba")
        push(ports_tree)
        daemon.wait_idle(broken)
        said = run_portsd("status", "--repo", bare)
        assert said.returncode == 1, said.stdout + said.stderr
        assert daemon.process is not None
        assert f"running: pid {daemon.process.pid}, {daemon.url}/" in said.stdout
        assert "ports 9: 7 published, 1 failed, 1 skipped, 0 blocked; 0 queued, 0 running" in (
            said.stdout
        )
        failed = re.search(r"^  liba: (.*)$", said.stdout, re.M)
        assert failed is not None and "liba:" not in failed.group(1)
        assert failed.group(1).startswith("build failed (exit 1) (log: ")
        assert f"(log: {daemon.url}/api/v1/builds/" in said.stdout and str(bare) not in failed[0]
        assert f"retry: portsd rebuild --repo {bare} liba" in said.stdout
        assert "  diamond: dependency liba failed" in said.stdout

        data = json.loads(run_portsd("status", "--repo", bare, "--json").stdout)
        assert data["running"] and data["failing"] and data["pid"] == daemon.process.pid
        assert [p["port"] for p in data["problems"]["failed"]] == ["liba"]
        assert data["problems"]["failed"][0]["newly"] is True
        assert [p["port"] for p in data["problems"]["skipped"]] == ["diamond"]

        slow = slow_down(ports_tree, "hello", "sleep 4", "hello: slow")
        push(ports_tree)
        daemon.wait_for(
            lambda: any(b["port"] == "hello" and b["state"] == "running" for b in daemon.builds()),
            timeout=60,
            what="hello to be building",
        )
        busy = run_portsd("status", "--repo", bare).stdout
        assert re.search(r"^ETA: about (\d+\.\d\d|\d+\.\d|\d+) s$", busy, re.M), (
            busy
        )  # not 21.11521
        assert "building hello" in busy
        daemon.wait_idle(slow)

        git(ports_tree, "revert", "--no-edit", broken)
        push(ports_tree)
        daemon.wait_idle(head(ports_tree))
        fixed = run_portsd("status", "--repo", bare, "--json")
        assert fixed.returncode == 0
        problems = json.loads(fixed.stdout)["problems"]
        assert problems["failed"] == [] and problems["skipped"] == []
        assert "liba" in {build["port"] for build in problems["fixed"]}
    finally:
        daemon.stop()
    assert run_portsd("status", "--repo", bare).returncode == 3


def test_the_log_has_one_line_per_build_outcome_and_no_access_lines(
    daemon: RunningDaemon, ports_tree: Path
) -> None:
    broken = break_port(ports_tree, "liba")
    push(ports_tree)
    daemon.wait_idle(broken)
    failed = next(b for b in daemon.builds(port="liba") if b["state"] == "failed")
    lines = daemon.log.read_text().splitlines()

    def about(build: str) -> list[str]:
        return [line.split(" ", 3)[-1] for line in lines if f"build #{build} " in line]

    hello = next(b for b in daemon.builds(port="hello") if b["state"] == "built")
    said = about(str(hello["id"]))
    assert said[0] == f"build #{hello['id']} started: hello (key {hello['key'][:12]})"
    assert said[1].startswith(f"build #{hello['id']} published: hello-")
    assert re.fullmatch(rf"build #{hello['id']} built: hello \S+ in \d+\.\d\d s", said[2])
    assert len(said) == 3
    (failure,) = [line for line in about(str(failed["id"])) if " failed: " in line]
    assert re.match(
        rf"build #{failed['id']} failed: liba \S+: build failed \(exit 1\) \(after ", failure
    )
    assert failure.endswith(f"log: {daemon.url}/api/v1/builds/{failed['id']}/log")
    # diamond is no build: its key waits for liba's package (early cutoff), so the journal
    # has no line for it; `portsd status` lists it as skipped
    assert not any("diamond" in line for line in lines if "build #" in line)
    assert not [line for line in lines if '"GET /' in line]  # polled often: DEBUG only
    assert "Traceback" not in daemon.log.read_text()


@contextmanager
def small_filesystem(directory: Path, megabytes: int) -> Iterator[Path]:
    """``directory`` (its files kept) on a tmpfs of ``megabytes``: a disk that fills."""
    aside = directory.with_name(directory.name + ".aside")
    directory.rename(aside)
    directory.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m,mode=0700", "tmpfs", str(directory)],
        check=True,
    )
    try:
        shutil.copytree(aside, directory, dirs_exist_ok=True, symlinks=True)
        yield directory
    finally:
        subprocess.run(["umount", "--lazy", str(directory)], check=True)


def fill(directory: Path) -> Path:
    """Take every free byte of ``directory``'s file system (bounded by its size)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):  # then the last partial blocks
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError as error:
                assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_full_disk_fails_builds_clearly_and_leaves_nothing_running(
    tmp_path: Path, bare: Path, ports_tree: Path
) -> None:
    """What was seen: a traceback, and builds "running" for ever, even once rebuilt."""
    with small_filesystem(bare / "portsd", 48) as state:
        daemon = RunningDaemon(bare, tmp_path / "daemon.log").start()
        try:
            push(ports_tree)
            daemon.wait_idle(head(ports_tree))
            served = daemon.raw(f"/repo/{ARCH}/index.msgpack.zst")
            full = slow_down(ports_tree, "libbase", "sleep 2", "libbase: built on a full disk")
            push(ports_tree)
            daemon.wait_for(
                lambda: any(b["state"] == "running" for b in daemon.builds(port="libbase")),
                timeout=60,
                what="libbase to be building",
            )
            filler = fill(state)  # the disk fills up under the build
            daemon.wait_for(
                lambda: (
                    (s := daemon.get("/api/v1/status")) and not s["running"] and not s["queued"]
                ),
                timeout=120,
                what="the builds on the full disk to end",
            )
            assert daemon.raw(f"/repo/{ARCH}/index.msgpack.zst") == served  # still served
            time.sleep(2 * RETRY_EVERY)  # retries wait for room: none is made meanwhile
            log = daemon.log.read_text()
            assert "Traceback" not in log
            assert re.search(r"build #\d+ interrupted: libbase \S+: the disk of \S+ is full", log)
            assert f"the disk of {state}" in log

            filler.unlink()  # room again: what was interrupted is built, nothing left running
            daemon.wait_idle(full, timeout=120)
            daemon.wait_for(
                lambda: not [b for b in daemon.builds() if b["state"] in ("running", "queued")],
                timeout=30,
                what="every build to be recorded",
            )
            libbase = daemon.builds(port="libbase")
            assert (
                libbase[0]["state"] == "built"
                and libbase[0]["key"] == keys_at(ports_tree, full, bare / "portsd")["libbase"]
            )
            assert "interrupted" in {b["state"] for b in libbase}
            assert "failed" not in {b["state"] for b in daemon.builds()}  # nothing remembered
            assert "Traceback" not in daemon.log.read_text()
        finally:
            daemon.stop()


def download_all(daemon: RunningDaemon, grace: float, until: float) -> list[str]:
    """A client, again and again until ``until``: fetch the index, then every package it
    lists, checking each sha256. Returns the packages that failed within ``grace`` seconds
    of their index being fetched (none may: a recent serial's packages stay)."""
    failures = []
    while time.monotonic() < until:
        fetched = time.monotonic()
        status, data = daemon.raw(f"/repo/{ARCH}/index.msgpack.zst")
        assert status == 200
        for entry in decode_index(data, "index"):
            status, body = daemon.raw(f"/repo/{ARCH}/packages/{entry.file}")
            ok = status == 200 and hashlib.sha256(body).hexdigest() == entry.sha256
            if not ok and time.monotonic() - fetched < grace:
                failures.append(f"{entry.file}: HTTP {status}")
    return failures


def test_prune_keeps_the_index_recent_serials_and_the_newest_few_under_downloads(
    daemon: RunningDaemon, bare: Path, ports_tree: Path
) -> None:
    push(ports_tree)
    daemon.wait_idle(head(ports_tree))
    hellos = []
    for n in range(4):  # four more builds of hello: four old packages
        commit = edit(ports_tree, "hello", f"hello: build {n}")
        push(ports_tree)
        daemon.wait_idle(commit)
        hellos.append(keys_at(ports_tree, commit, bare / "portsd")["hello"])
    packages = bare / "portsd" / "repo" / ARCH / "packages"
    stored = sorted(p.name for p in packages.glob("hello-*.pkg.tar.zst"))
    assert len(stored) == 5

    planned = run_portsd("prune", "--repo", bare, "--dry-run", "--json", "--keep", "1")
    assert planned.returncode == 0, planned.stderr
    assert json.loads(planned.stdout)["removed"] == []  # left the index a moment ago: kept
    grace = 4.0
    time.sleep(grace)
    prune = ("prune", "--repo", bare, "--keep", "1", "--keep-unlisted-minutes", str(grace / 60))
    planned = run_portsd(*prune, "--dry-run", "--json")
    would = {item["file"] for item in json.loads(planned.stdout)["removed"]}
    assert len(would) == 3 and all(f.startswith("hello-") for f in would)
    assert {p.name for p in packages.glob("hello-*.pkg.tar.zst")} == set(stored)  # dry

    # Now under downloads, while pushes replace hello and prune runs again and again.
    until = time.monotonic() + 12
    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(download_all, daemon, grace, until) for _ in range(4)]
        n = 4
        while time.monotonic() < until - 2:
            commit = edit(ports_tree, "hello", f"hello: build {n}")
            push(ports_tree)
            daemon.wait_idle(commit)
            n += 1
            assert run_portsd(*prune).returncode == 0
        failures = [failure for client in clients for failure in client.result()]
    assert failures == []
    time.sleep(grace)
    said = run_portsd(*prune)
    assert said.returncode == 0 and "removed" in said.stdout
    left = sorted(p.name for p in packages.glob("hello-*.pkg.tar.zst"))
    assert len(left) == 2  # the published one and the newest other
    assert_consistent(bare)  # every package the index lists is whole
    assert hellos[-1] not in {k.name for k in (bare / "portsd" / "repo" / ARCH / "keys").iterdir()}


def install(root: Path, url: str, *keys: Path) -> subprocess.CompletedProcess[str]:
    """`ports install hello` into a fresh ``root`` from the cache at ``url``."""
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    trusted = [part for key in keys for part in ("--key", str(key))]
    return subprocess.run(
        [sys.executable, "-m", "portsd.cli.ports", "install", "hello", "--root", str(root)]
        + ["--cache", url, *trusted],
        capture_output=True,
        text=True,
        timeout=300,
        env=command_environment(),
    )


def test_key_rotation_signs_with_both_then_the_new_key_alone(
    tmp_path: Path, bare: Path, ports_tree: Path
) -> None:
    state = bare / "portsd"
    keys = state / "keys"
    old = tmp_path / "old.pub"
    shutil.copyfile(keys / "portsd.pub", old)
    repo = state / "repo" / ARCH
    daemon = RunningDaemon(bare, tmp_path / "daemon.log").start()
    try:
        push(ports_tree)
        daemon.wait_idle(head(ports_tree))
        busy = run_portsd("key", "rotate", "--repo", bare)
        assert busy.returncode == 1 and "is in use by portsd pid" in busy.stderr
    finally:
        daemon.stop()
    serials = [decode_index((repo / "index.msgpack.zst").read_bytes(), "index").serial]

    rotated = run_portsd("key", "rotate", "--repo", bare, "--json")
    assert rotated.returncode == 0, rotated.stderr
    done = json.loads(rotated.stdout)
    assert done["current"] == PublicKey.load(old).key_id and done["signed"] == 9
    new = tmp_path / "new.pub"
    shutil.copyfile(keys / "next.pub", new)
    assert PublicKey.load(new).key_id == done["next"]
    assert run_portsd("key", "rotate", "--repo", bare).returncode == 1  # one at a time

    daemon.start()  # it signs with both keys now
    try:
        commit = edit(ports_tree, "hello", "hello: built during the rotation")
        push(ports_tree)
        daemon.wait_idle(commit)
        serials.append(decode_index((repo / "index.msgpack.zst").read_bytes(), "index").serial)
        for trusted in ([old], [new]):  # either key verifies the index and every package
            reader = Repository.reader(state / "repo", ARCH, [PublicKey.load(k) for k in trusted])
            assert reader.check() == ()
        assert minisign_verifies(old, repo / "index.msgpack.zst")  # stock: the first one
        assert install(tmp_path / "root", daemon.url, old).returncode == 0
        assert install(tmp_path / "root", daemon.url, new).returncode == 0
    finally:
        daemon.stop()

    retired = run_portsd("key", "retire", "--repo", bare)
    assert retired.returncode == 0, retired.stderr
    assert f"signing with key {done['next']} alone; key {done['current']} retired" in (
        retired.stdout
    )
    assert (keys / f"retired-{done['current']}.pub").exists() and not (keys / "next.key").exists()
    serials.append(decode_index((repo / "index.msgpack.zst").read_bytes(), "index").serial)
    assert serials == sorted(set(serials))  # rollback protection carries on across the keys
    assert Repository.reader(state / "repo", ARCH, [PublicKey.load(new)]).check() == ()
    assert minisign_verifies(new, repo / "index.msgpack.zst")
    with pytest.raises(BadSignature, match="signed by unknown key"):
        Repository.reader(state / "repo", ARCH, [PublicKey.load(old)]).index()
    daemon.start()
    try:
        refused = install(tmp_path / "root", daemon.url, old)
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        assert done["next"] in refused.stderr  # names the key it does not trust
        assert install(tmp_path / "root", daemon.url, old, new).returncode == 0
    finally:
        daemon.stop()


def minisign_verifies(public: Path, path: Path) -> bool:
    checked = subprocess.run(
        ["minisign", "-V", "-p", str(public), "-m", str(path)], capture_output=True, text=True
    )
    return checked.returncode == 0


def test_slow_clients_are_cut_off_capped_and_never_flood_the_log(
    tmp_path: Path, bare: Path
) -> None:
    """What was seen: connections trickling one header byte at a time made every request
    time out, and the accept loop logged hundreds of thousands of tracebacks."""
    config = bare / "portsd" / "portsd.toml"
    config.write_text(
        config.read_text().replace(
            "[server]\n",
            "[server]\nidle-timeout = 2\nmax-connections = 300\n"
            "max-connections-per-address = 100\n",
        )
    )
    daemon = RunningDaemon(bare, tmp_path / "daemon.log").start()
    slow: list[socket.socket] = []
    try:
        for _ in range(400):  # from 127.0.0.2: another address than the good client's
            sock = socket.create_connection(
                ("127.0.0.1", daemon.port), source_address=("127.0.0.2", 0)
            )
            sock.setblocking(False)
            slow.append(sock)
        answered, cut, refused = [], 0, 0
        until = time.monotonic() + 6
        while time.monotonic() < until:
            for sock in slow:  # one header byte each, again and again
                try:
                    sock.send(b"G")
                except OSError:
                    pass
            started = time.monotonic()
            assert daemon.get("/api/v1/status") is not None  # the good client is served
            answered.append(time.monotonic() - started)
            time.sleep(0.3)
        for sock in slow:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                continue  # still open: only possible for one that was never served
            except OSError:
                data = b""
            if data.startswith(b"HTTP/1.1 503"):
                refused += 1
            else:
                cut += 1
        assert max(answered) < 1.0, answered
        assert refused >= 300  # 100 from that address at most
        assert cut == 100  # those served were closed after 2 s without a request head
        assert daemon.process is not None and daemon.process.poll() is None
    finally:
        for sock in slow:
            sock.close()
        daemon.stop()
    log = daemon.log.read_text()
    assert "Traceback" not in log and len(log.splitlines()) < 50
