"""A state directory belongs to one tree: what was seen was `ports build --state S` from
another checkout unpublishing a live daemon's whole LAN repository."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon_harness import RunningDaemon, command_environment, free_port, portsd
from tests.fixtures import commit_all, git
from tests.test_build import ALL, published
from tests.test_daemon import head, push

pytestmark = pytest.mark.slow


def ports(*args: str | Path, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "portsd.cli.ports", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=command_environment(str(home) if home else None),
    )


def other_tree(ports_tree: Path, root: Path) -> Path:
    """A second checkout: another tree holding only `hello`."""
    shutil.copytree(ports_tree / "ports" / "hello", root / "ports" / "hello")
    git(root, "init", "-q", "-b", "main")
    commit_all(root, "another tree")
    return root


def test_a_state_refuses_a_daemon_it_is_busy_with_and_another_tree(
    tmp_path: Path, ports_tree: Path
) -> None:
    bare = tmp_path / "build.git"
    portsd("init", bare)
    git(ports_tree, "remote", "add", "build", str(bare))
    state = bare / "portsd"
    other = other_tree(ports_tree, tmp_path / "other")
    daemon = RunningDaemon(bare, tmp_path / "daemon.log").start()
    try:
        push(ports_tree)
        daemon.wait_idle(head(ports_tree))
        assert set(published(state)) == ALL
        assert daemon.process is not None
        busy = ports("build", "--tree", other, "--state", state)
        assert busy.returncode == 1
        assert f"{state} is in use by portsd pid {daemon.process.pid} ({daemon.url})" in (
            busy.stderr
        )
        forced = ports("build", "--tree", other, "--state", state, "--force")
        assert forced.returncode == 1 and "is in use by portsd pid" in forced.stderr
        assert set(published(state)) == ALL  # the LAN repository untouched
    finally:
        daemon.stop()

    refused = ports("build", "--tree", other, "--state", state)
    assert refused.returncode == 1
    assert f"{state} belongs to the tree {bare}, not {other}" in refused.stderr
    assert "--force" in refused.stderr and "Traceback" not in refused.stderr
    assert set(published(state)) == ALL

    adopted = ports("build", "--tree", other, "--state", state, "--force")
    assert adopted.returncode == 0, adopted.stderr
    assert set(published(state)) == {"hello"}  # adopting is what --force asked for
    # ... and now the daemon of the old tree refuses the state in its turn
    serve = subprocess.run(
        [sys.executable, "-m", "portsd.cli.daemon", "serve", "--repo", str(bare)]
        + ["--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env=command_environment(),
    )
    assert serve.returncode == 1
    assert f"belongs to the tree {other}, not {bare}" in serve.stderr


def test_the_default_state_is_each_trees_own(tmp_path: Path, ports_tree: Path) -> None:
    home = tmp_path / "home"
    other = other_tree(ports_tree, tmp_path / "other")
    for tree in (ports_tree, other):
        built = ports("build", "hello", "--tree", tree, home=home)
        assert built.returncode == 0, built.stderr
    states = sorted((home / ".local" / "share" / "portsd").iterdir())
    assert len(states) == 2
    assert {(s / "tree").read_text().strip() for s in states} == {str(ports_tree), str(other)}
    assert all(set(published(s)) == {"hello"} for s in states)
