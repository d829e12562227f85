"""Shared fixtures: a real HTTP server for upstream sources and a real git ports tree."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from portsd.build.seed import Seed, ensure_seed
from tests.daemon_harness import portsd
from tests.fixtures import commit_all, git, write_tree


@pytest.fixture(scope="session", autouse=True)
def seed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seed]:
    """The bootstrap seed, made from this host once per test run and shared (PORTSD_SEED)
    by every state directory the tests make, daemons and CLIs in subprocesses included.
    xdist's workers share the base directory's parent, and ``ensure_seed`` locks."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if base.name.startswith("popen-gw") else base
    directory = shared / "seed"
    made = ensure_seed(directory, shared / "seed-work", "x86_64", lambda line: None)
    previous = os.environ.get("PORTSD_SEED")
    os.environ["PORTSD_SEED"] = str(directory)
    yield made
    if previous is None:
        del os.environ["PORTSD_SEED"]
    else:
        os.environ["PORTSD_SEED"] = previous


@dataclass
class SourceServer:
    """Upstream tarballs over HTTP on 127.0.0.1; ``requests`` lists the paths asked for."""

    url: str
    files: dict[str, bytes]
    requests: list[str] = field(default_factory=list)


@contextmanager
def serving(app: web.Application, **runner_options: Any) -> Iterator[str]:
    """Run ``app`` on 127.0.0.1 (an ephemeral port) on a thread of its own; yields its URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, **runner_options)

    async def start() -> str:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


@contextmanager
def serving_files() -> Iterator[SourceServer]:
    """A SourceServer: fill ``files`` (name -> bytes) after it starts."""
    server = SourceServer(url="", files={})

    async def serve(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        server.requests.append(name)
        if name not in server.files:
            raise web.HTTPNotFound()
        return web.Response(body=server.files[name])

    app = web.Application()
    app.router.add_get("/{name}", serve)
    with serving(app) as url:
        server.url = url
        yield server


@pytest.fixture
def source_server() -> Iterator[SourceServer]:
    with serving_files() as server:
        yield server


@pytest.fixture
def ports_tree(tmp_path: Path, source_server: SourceServer) -> Path:
    """The fixture tree of tests/fixtures.py, committed to a fresh git repository."""
    root = tmp_path / "tree"
    source_server.files.update(write_tree(root, source_server.url))
    git(root, "init", "-q", "-b", "main")
    commit_all(root, "the test ports tree")
    return root


@pytest.fixture
def bare(tmp_path: Path, ports_tree: Path) -> Path:
    """A repository made by `portsd init`, the fixture tree's remote `build`."""
    repo = tmp_path / "build.git"
    portsd("init", repo)
    git(ports_tree, "remote", "add", "build", str(repo))
    return repo


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that completes the TCP handshake (kernel backlog) and never says anything."""
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A port bound but not listening (so nobody else gets it): connecting is refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()
