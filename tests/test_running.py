"""`portsd serve` as people run it: twice on one state, on a port already taken, with the
hook of a repository whose daemon moved or died."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.daemon_harness import RunningDaemon, free_port, portsd
from tests.fixtures import git

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


class Decoy:
    """Whatever else listens on a port: records each request it gets."""

    def __init__(self, port: int = 0) -> None:
        self.seen: list[str] = []
        seen = self.seen

        class Record(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                seen.append(self.path)
                self.send_response(202)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Record)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def push_commit(tree: Path, bare: Path, message: str) -> str:
    """Commit to ``tree`` and push it to ``bare``; returns what the hook said."""
    git(tree, "commit", "-q", "--allow-empty", "-m", message)
    pushed = subprocess.run(
        ["git", "-C", str(tree), "push", str(bare), "HEAD:main"],
        capture_output=True,
        text=True,
        check=True,
    )
    return pushed.stderr


def test_the_hook_notifies_the_daemon_where_it_listens_and_nobody_else(tmp_path: Path) -> None:
    configured = Decoy()  # what `portsd init --port` wrote down; the daemon serves elsewhere
    tree = tmp_path / "tree"
    git(tmp_path, "init", "-q", "-b", "main", str(tree))
    bare = tmp_path / "build.git"
    portsd("init", bare, "--port", str(configured.port))
    daemon = RunningDaemon(bare, tmp_path / "daemon.log").start()
    try:
        assert "portsd: build host notified" in push_commit(tree, bare, "one")
        daemon.kill()
        gone = Decoy(daemon.port)  # someone else now has the dead daemon's port
        said = push_commit(tree, bare, "two")
        assert "no daemon is running" in said
        assert (configured.seen, gone.seen) == ([], [])
        gone.close()
    finally:
        daemon.stop()
        configured.close()
