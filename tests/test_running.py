"""`portsd serve` as people run it: twice on one state, on a port already taken, with the
hook of a repository whose daemon moved."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_harness import RunningDaemon, free_port, portsd

pytestmark = pytest.mark.slow


@pytest.fixture
def bare(tmp_path: Path) -> Path:
    repo = tmp_path / "build.git"
    portsd("init", repo)
    return repo


@pytest.fixture
def daemon(tmp_path: Path, bare: Path) -> Iterator[RunningDaemon]:
    running = RunningDaemon(bare, tmp_path / "daemon.log").start()
    yield running
    running.stop()


def serve(bare: Path, port: int) -> subprocess.CompletedProcess[str]:
    """A `portsd serve` expected to refuse: it must exit, quickly, by itself."""
    command = [sys.executable, "-m", "portsd.cli.daemon", "serve", "--repo", str(bare)]
    return subprocess.run(
        [*command, "--port", str(port)], capture_output=True, text=True, timeout=60
    )


def test_a_second_daemon_on_the_same_state_refuses_naming_the_first(
    daemon: RunningDaemon, bare: Path
) -> None:
    assert daemon.process is not None
    second = serve(bare, free_port())
    assert second.returncode != 0
    assert second.stderr.splitlines()[0] == (
        f"error: {bare / 'portsd'} is in use by portsd pid {daemon.process.pid} ({daemon.url})"
    )
    assert daemon.get("/api/v1/status") is not None  # the first goes on undisturbed


def test_the_lock_dies_with_a_killed_daemon(daemon: RunningDaemon) -> None:
    daemon.kill()
    daemon.start()  # no stale lock to remove by hand


def test_a_taken_port_is_one_line_with_the_fix(bare: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = serve(bare, port)
    assert refused.returncode != 0
    assert "Traceback" not in refused.stderr
    first, hint = refused.stderr.splitlines()
    assert first.startswith(f"error: cannot listen on 127.0.0.1 port {port}: ")
    assert "--port N" in hint and "make run PORT=N" in hint
