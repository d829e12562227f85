"""`portsd serve` end to end: real `git push` to a bare repository, with and without the
hook, real sandboxed builds, the signed index served over HTTP, and real SIGKILLs."""

from __future__ import annotations

import contextlib
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from portsd.build.seed import Seed, find_seed
from portsd.core.evaluate import Evaluation
from portsd.core.index import decode_index
from portsd.daemon.stagetimes import (
    TimedBuild,
    fixed_point,
    identical,
    latest_content,
    step_seconds,
    summarise,
)
from portsd.pkg.repo import Repository, StoredContents
from portsd.pkg.sign import PublicKey, verify
from portsd.tree.loader import TreeLoader
from tests.browser import chromium, mark, same_page, text, until
from tests.conftest import SourceServer
from tests.daemon_harness import RunningDaemon, portsd
from tests.fixtures import commit_all, git
from tests.processes import processes_with, wait_until_gone
from tests.test_toolchain import TINYCC

pytestmark = pytest.mark.slow

ARCH = platform.machine()
ALL = {"libbase", "libmid", "libtop", "toptool", "liba", "libb", "diamond", "hello", "confapp"}


@pytest.fixture
def daemon(tmp_path: Path, bare: Path) -> Iterator[RunningDaemon]:
    running = RunningDaemon(bare, tmp_path / "daemon.log").start()
    yield running
    running.stop()


def push(tree: Path) -> str:
    """`git push build main`; returns what the remote side (the hook) said."""
    result = subprocess.run(
        ["git", "-C", str(tree), "push", "build", "main"],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stderr


def head(tree: Path) -> str:
    return git(tree, "rev-parse", "HEAD")


def served_index(daemon: RunningDaemon, state: Path) -> dict[str, str]:
    """Name -> key of the index the daemon serves, its signature checked."""
    status, data = daemon.raw(f"/repo/{ARCH}/index.msgpack.zst")
    assert status == 200
    status, signature = daemon.raw(f"/repo/{ARCH}/index.msgpack.zst.minisig")
    assert status == 200
    verify(data, signature.decode(), [PublicKey.load(state / "keys" / "portsd.pub")])
    return {entry.meta.name: entry.meta.build_key for entry in decode_index(data, "served index")}


def keys_at(tree: Path, commit: str, state: Path) -> dict[str, str]:
    """The keys of ``commit`` whose dependencies' packages ``state``'s repository has."""
    loaded = TreeLoader().load_git(tree, commit)
    seed = find_seed(Path(os.environ["PORTSD_SEED"]))  # the daemons share the tests' seed
    assert seed is not None
    contents = StoredContents(Repository(state / "repo", ARCH, None))
    evaluation = Evaluation.full(loaded.listing, loaded.recipes(), ARCH, seed.content_id, contents)
    return evaluation.keys.keys


def slow_down(tree: Path, port: str, prepare: str, message: str) -> str:
    """Give ``port`` a prepare step (a slow one, so a test can catch it running)."""
    recipe = tree / "ports" / port / "port.toml"
    recipe.write_text(recipe.read_text() + f"prepare = {prepare!r}\n")
    return commit_all(tree, message)


def edit(tree: Path, port: str, message: str) -> str:
    recipe = tree / "ports" / port / "port.toml"
    recipe.write_text(recipe.read_text() + f"# {message}\n")
    return commit_all(tree, message)


def test_a_push_through_the_hook_builds_and_serves(
    daemon: RunningDaemon, bare: Path, ports_tree: Path
) -> None:
    said = push(ports_tree)
    assert "portsd: build host notified" in said  # the hook, not the watcher, told it
    daemon.wait_idle(head(ports_tree))
    assert served_index(daemon, bare / "portsd") == keys_at(
        ports_tree, head(ports_tree), bare / "portsd"
    )
    assert {b["port"] for b in daemon.builds(state="built")} == ALL


def built_since(daemon: RunningDaemon, known: set[int]) -> list[str]:
    """The ports built (state built) by builds not in ``known``, by build id."""
    return sorted(b["port"] for b in daemon.builds(state="built") if b["id"] not in known)


def test_an_identical_rebuild_is_cut_off_and_a_real_change_rebuilds_its_reverse_closure(
    daemon: RunningDaemon, bare: Path, ports_tree: Path, seed: Seed
) -> None:
    push(ports_tree)
    daemon.wait_idle(head(ports_tree))
    known = {b["id"] for b in daemon.builds()}

    recipe = ports_tree / "ports" / "libbase" / "port.toml"  # a release bump and a comment
    recipe.write_text(recipe.read_text().replace("release = 1", "release = 2") + "# again\n")
    bumped = commit_all(ports_tree, "libbase: release 2, same files")
    push(ports_tree)
    daemon.wait_idle(bumped)
    assert built_since(daemon, known) == ["libbase"]  # and nothing downstream
    status = daemon.get("/api/v1/status")
    assert status is not None
    assert status["toolchain"] == f"the seed {seed.content_id[:12]}" and status["pending"] == 0
    assert set(status["cut_off"]) == {
        "libmid",
        "libtop",
        "toptool",
        "liba",
        "libb",
        "diamond",
        "confapp",
    }
    assert served_index(daemon, bare / "portsd") == keys_at(ports_tree, bumped, bare / "portsd")
    known = {b["id"] for b in daemon.builds()}

    source = ports_tree / "ports" / "libmid" / "mid.c"  # a real change: another value
    source.write_text(source.read_text().replace("1000", "1001"))
    changed = commit_all(ports_tree, "libmid: a new value")
    push(ports_tree)
    daemon.wait_idle(changed)
    assert built_since(daemon, known) == ["libmid", "libtop", "toptool"]
    # built in a later wave, explained against the commit before, not the wave before
    libtop = next(b for b in daemon.builds(port="libtop") if b["id"] not in known)
    assert "ports/libmid changed since" in libtop["reason"], libtop["reason"]
    assert served_index(daemon, bare / "portsd") == keys_at(ports_tree, changed, bare / "portsd")


def test_a_push_without_the_hook_is_noticed_by_the_watcher(
    daemon: RunningDaemon, bare: Path, ports_tree: Path
) -> None:
    (bare / "hooks" / "post-receive").unlink()
    said = push(ports_tree)
    assert "notified" not in said
    daemon.wait_idle(head(ports_tree), timeout=180)
    assert set(served_index(daemon, bare / "portsd")) == ALL


def test_a_comment_rebuilds_its_port_and_nothing_it_reaches(
    daemon: RunningDaemon, ports_tree: Path, seed: Seed
) -> None:
    push(ports_tree)
    daemon.wait_idle(head(ports_tree))
    for port in ("toptool", "libmid", "libbase"):
        known = {b["id"] for b in daemon.builds()}
        commit = edit(ports_tree, port, f"{port}: touch")
        push(ports_tree)
        daemon.wait_idle(commit)
        status = daemon.get("/api/v1/status")
        assert status["seed"] == seed.content_id  # the toolchain every build stood on
        builds = [b for b in daemon.builds() if b["id"] not in known]
        assert [(b["port"], b["state"]) for b in builds] == [(port, "built")]
        why = builds[0]["reason"]
        assert f"ports/{port} changed since" in why and commit[:10] in why


def test_a_newer_push_supersedes_unwanted_builds(
    daemon: RunningDaemon, bare: Path, ports_tree: Path
) -> None:
    push(ports_tree)
    daemon.wait_idle(head(ports_tree))
    first = slow_down(ports_tree, "libbase", "sleep 3", "libbase: slow")
    slow = ports_tree / "ports" / "libbase" / "port.toml"
    push(ports_tree)
    daemon.wait_for(
        lambda: any(b["port"] == "libbase" and b["state"] == "running" for b in daemon.builds()),
        timeout=60,
        what="the slow libbase build to start",
    )
    slow.write_text(slow.read_text().replace("sleep 3", "sleep 1"))
    second = commit_all(ports_tree, "libbase: less slow")
    pushed_at = time.time()
    push(ports_tree)
    daemon.wait_idle(second)
    wanted = set(keys_at(ports_tree, second, bare / "portsd").values())
    first_keys = keys_at(ports_tree, first, bare / "portsd")
    superseded = [b for b in daemon.builds(port="libbase") if b["key"] == first_keys["libbase"]]
    assert [b["state"] for b in superseded] == [
        "cancelled"
    ]  # it was running: stopped, not finished
    assert superseded[0]["detail"] == "superseded by a newer commit"
    for build in daemon.builds():
        if build["key"] in first_keys.values() and build["key"] not in wanted:
            finished_late = build["state"] == "built" and build["finished"] > pushed_at + 1
            assert not finished_late, f"{build['port']} of the superseded commit ran to the end"
    assert served_index(daemon, bare / "portsd") == keys_at(ports_tree, second, bare / "portsd")


def test_kill_9_during_a_build_then_restart(
    tmp_path: Path, bare: Path, ports_tree: Path, source_server: SourceServer
) -> None:
    commit = slow_down(ports_tree, "libmid", "sleep 2", "libmid: slow")
    daemon = RunningDaemon(bare, tmp_path / "daemon.log").start()
    push(ports_tree)
    daemon.wait_for(
        lambda: any(b["port"] == "libmid" and b["state"] == "running" for b in daemon.builds()),
        timeout=60,
        what="libmid to be building",
    )
    daemon.kill()
    assert_consistent(bare)
    daemon.start()
    try:
        daemon.wait_idle(commit)
        assert served_index(daemon, bare / "portsd") == keys_at(ports_tree, commit, bare / "portsd")
        states = {b["state"] for b in daemon.builds(port="libmid")}
        assert "interrupted" in states and "built" in states
    finally:
        daemon.stop()
    assert_consistent(bare)


def test_kill_9_at_random_moments_never_corrupts_and_ends_complete(
    tmp_path: Path, bare: Path, ports_tree: Path
) -> None:
    commit = head(ports_tree)
    daemon = RunningDaemon(bare, tmp_path / "daemon.log").start()
    push(ports_tree)
    rng = random.Random(1)
    for _ in range(
        4
    ):  # builds here take ~0.2 s and publishes a few ms: some kills land mid-publish
        time.sleep(rng.uniform(0.2, 1.2))
        daemon.kill()
        assert_consistent(bare)
        daemon.start()
    try:
        daemon.wait_idle(commit)
        assert served_index(daemon, bare / "portsd") == keys_at(ports_tree, commit, bare / "portsd")
    finally:
        daemon.stop()
    assert_consistent(bare)


def test_no_build_process_survives_its_daemon_killed_mid_build(
    tmp_path: Path, bare: Path, ports_tree: Path
) -> None:
    """kill -9 of the daemon, again and again while it builds: not one process of any
    build (a reaper, bwrap, the step) outlives it. Every one of them names a path under
    the state directory on its command line (the build's work directory)."""
    state = str(bare / "portsd")
    commit = head(ports_tree)
    daemon = RunningDaemon(bare, tmp_path / "daemon.log").start()
    push(ports_tree)
    rng = random.Random(11)
    survivors: list[int] = []
    try:
        for _ in range(10):
            time.sleep(rng.uniform(0.2, 1.0))
            daemon.kill()
            survivors += wait_until_gone(state)
            daemon.start()
        daemon.wait_idle(commit)
    finally:
        daemon.stop()
        for pid in processes_with(state):
            with contextlib.suppress(ProcessLookupError):  # gone with its namespace's init
                os.kill(pid, 9)
    assert survivors == []


def assert_consistent(bare: Path) -> None:
    """The repository as a fresh reader finds it: a signed index whose every package is
    whole (size, sha256, signature); stock minisign agrees about the index."""
    state = bare / "portsd"
    public = state / "keys" / "portsd.pub"
    repo = Repository.reader(state / "repo", ARCH, [PublicKey.load(public)])
    if not repo.index_path.exists():
        return  # killed before the first publish: nothing is served yet, nothing is broken
    assert repo.check() == ()
    verified = subprocess.run(
        ["minisign", "-V", "-p", str(public), "-m", str(repo.index_path)],
        capture_output=True,
        text=True,
    )
    assert verified.returncode == 0, verified.stderr


def test_the_push_endpoint_wants_the_token(daemon: RunningDaemon, bare: Path) -> None:
    token = (bare / "portsd" / "token").read_text().strip()
    assert daemon.post("/api/v1/push", b"", {}) == 401
    assert daemon.post("/api/v1/push", b"", {"Authorization": "Bearer wrong"}) == 401
    assert daemon.post("/api/v1/push", b"", {"Authorization": f"Bearer {token}"}) == 202


def test_the_status_page_follows_a_pushed_build_live(
    daemon: RunningDaemon, ports_tree: Path, tmp_path: Path
) -> None:
    push(ports_tree)
    daemon.wait_idle(head(ports_tree))
    commit = slow_down(ports_tree, "hello", "echo preparing hello; sleep 3", "hello: take a while")
    with chromium(tmp_path / "chromium") as driver:
        driver.get(daemon.url + "/")
        until(
            driver,
            lambda: driver.execute_script("return document.body.dataset.live") == "1",
            "live",
        )
        mark(driver)
        push(ports_tree)
        until(driver, lambda: "hello" in text(driver, "#running"), "hello shown running")
        until(
            driver, lambda: "preparing hello" in text(driver, "#running pre[data-build]"), "its log"
        )
        until(driver, lambda: "Nothing is building." in text(driver, "#running"), "finished", 60)
        until(driver, lambda: "hello" in text(driver, "#builds tbody"), "in the history")
        assert commit[:10] in text(driver, "#status")
        assert same_page(driver)


def test_a_failure_is_remembered_until_its_key_changes_or_rebuild_asks(
    daemon: RunningDaemon, bare: Path, ports_tree: Path
) -> None:
    broken = ports_tree / "ports" / "liba" / "port.toml"
    broken.write_text(
        broken.read_text().split("\n[build]")[0] + '\n[build]\nstyle = "make"\nbuild = "false"\n'
    )
    commit_all(ports_tree, "liba: broken")
    push(ports_tree)
    daemon.wait_idle(head(ports_tree))
    states = {b["port"]: b["state"] for b in daemon.builds()}
    assert states["liba"] == "failed"
    assert "diamond" not in states  # its key needs liba's package: never planned
    assert daemon.get("/api/v1/status")["blocked"] == 2  # liba failed, diamond waits on it
    assert "liba" not in served_index(daemon, bare / "portsd")

    known = {b["id"] for b in daemon.builds()}
    later = edit(ports_tree, "hello", "hello: unrelated")
    push(ports_tree)
    daemon.wait_idle(later)
    latest = {b["port"]: b for b in daemon.builds() if b["id"] not in known}
    assert latest["hello"]["state"] == "built"
    assert "liba" not in latest  # not retried: same key
    assert "diamond" not in latest

    said = portsd("rebuild", "liba", "--repo", bare).stdout
    assert "will retry: liba" in said
    daemon.wait_for(
        lambda: len([b for b in daemon.builds(port="liba") if b["state"] == "failed"]) == 2,
        timeout=60,
        what="liba to be retried",
    )
    status = subprocess.run(
        [sys.executable, "-m", "portsd.cli.daemon", "status", "--repo", str(bare)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 1  # liba fails: a script sees it
    assert "branch main" in status.stdout and "  liba: " in status.stdout

    fixed = broken.read_text().replace('build = "false"\n', "")
    broken.write_text(fixed)
    repaired = commit_all(ports_tree, "liba: fixed")
    push(ports_tree)
    daemon.wait_idle(repaired)
    assert {"liba", "diamond"} <= set(served_index(daemon, bare / "portsd"))


def test_a_stored_package_removed_by_hand_is_built_again(
    daemon: RunningDaemon, bare: Path, ports_tree: Path
) -> None:
    push(ports_tree)
    first = head(ports_tree)
    daemon.wait_idle(first)
    (ports_tree / "ports" / "toptool" / "NOTES").write_text("a change, then its revert\n")
    changed = commit_all(ports_tree, "toptool: notes")
    push(ports_tree)
    daemon.wait_idle(changed)
    key = keys_at(ports_tree, first, bare / "portsd")["toptool"]
    public = PublicKey.load(bare / "portsd" / "keys" / "portsd.pub")
    repo = Repository.reader(bare / "portsd" / "repo", ARCH, [public])
    entry = repo.find_key(key)
    assert entry is not None
    repo.package_path(entry).unlink()  # an operator cleaning up by hand

    git(ports_tree, "revert", "--no-edit", "HEAD")
    reverted = head(ports_tree)
    push(ports_tree)
    daemon.wait_idle(reverted)
    assert served_index(daemon, bare / "portsd") == keys_at(ports_tree, reverted, bare / "portsd")
    built = [b for b in daemon.builds(port="toptool", state="built") if b["key"] == key]
    assert len(built) == 2  # once at first, once again after its file went
    assert_consistent(bare)


def test_a_toolchain_from_the_tree_is_built_in_stages_then_everything_on_it(
    daemon: RunningDaemon, bare: Path, ports_tree: Path
) -> None:
    (ports_tree / "ports" / "tinycc").mkdir()
    (ports_tree / "ports" / "tinycc" / "port.toml").write_text(TINYCC)
    (ports_tree / "toolchain.toml").write_text('ports = ["tinycc"]\n')
    commit = commit_all(ports_tree, "a toolchain of our own")
    push(ports_tree)
    daemon.wait_idle(commit)
    status = daemon.get("/api/v1/status")
    assert status is not None
    assert status["toolchain"] == (
        "stage 3 of tinycc (built on stage 2's packages) (its fixed point)"
    )
    stages = [b for b in daemon.builds(port="tinycc") if b["state"] == "built"]
    assert len(stages) == 3  # on the seed, on stage 1, on stage 2 (== stage 2: the fixed point)
    assert set(served_index(daemon, bare / "portsd")) == ALL | {"tinycc"}

    # what `make distro` prints: the builds per stage (the rest of the tree on the final
    # one), and stage 2 against stage 3 by the content ids of the builds' keys
    builds = daemon.builds()
    logs = {b["id"]: daemon.raw(b["log"])[1].decode().splitlines() for b in builds if b["log"]}
    summary = summarise(
        [TimedBuild.of(b, step_seconds(logs.get(b["id"], ()))) for b in builds],
        fixed_point(status["toolchain"]),
    )
    named = {s.name: s for s in summary}
    assert list(named) == ["stage 1 (on the seed)", "stage 2", "stage 3", "final"]
    assert named["stage 2"].built == named["stage 3"].built == ("tinycc",)
    assert set(named["final"].built) == ALL and named["final"].work > 0
    for build in named["final"].builds:  # the recipe's steps are part of each build's time
        assert build.steps is not None and build.seconds is not None
        assert 0 < build.steps < build.seconds
    outside = named["final"].outside_steps
    assert outside is not None and 0 < outside < 100
    contents = [
        (b["port"], b["toolchain"], daemon.get(f"/api/v1/keys/{b['key']}")["package"]["content"])
        for b in builds
        if b["state"] == "built"
    ]
    assert identical(latest_content(contents, 2), latest_content(contents, 3)) == (["tinycc"], [])
    assert latest_content(contents, 1)["tinycc"] != latest_content(contents, 2)["tinycc"]
