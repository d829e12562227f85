"""The HTTP surface under test: a real signed repository with real packages, a real sqlite
state, a small real engine, and the real application on a loopback port.

``TinyEngine`` is a complete implementation of ``portsd.daemon.engine.Engine`` without a
build engine: it reports what the database says and records what it was asked to do.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict

from portsd.config import Config
from portsd.core.index import IndexEntry
from portsd.core.metadata import PackageMeta
from portsd.daemon.engine import EngineStatus, PlanGraph, Running
from portsd.daemon.events import EventBus
from portsd.daemon.problems import Problems
from portsd.daemon.server.app import create_app, create_runner
from portsd.daemon.state import BuildState, State
from portsd.pkg.archive import content_id
from portsd.pkg.package import create_package
from portsd.pkg.repo import Repository
from portsd.pkg.sign import SecretKey

ARCH = "x86_64"
EPOCH = 1_700_000_000
TOKEN = "s3cret-hook-token-0123456789"
CANARY = b"CANARY-outside-the-repository-9f2c"


class TinyEngine:
    """The Engine protocol over a database and a repository, with no builds of its own."""

    def __init__(self, config: Config, state: State, repo: Repository, events: EventBus) -> None:
        self.config = config
        self.state = state
        self.repo = repo
        self.events = events
        self.triggers: list[str] = []
        self.rebuilds: list[list[str]] = []
        self.ports = frozenset({"zlib", "hello", "big"})

    def trigger(self, source: str) -> None:
        self.triggers.append(source)

    def rebuild(self, names: Sequence[str]) -> list[str]:
        self.rebuilds.append(list(names))
        known = [name for name in names if name in self.ports]
        self.state.forget_failures(known)
        return known

    def status(self) -> EngineStatus:
        counts = self.state.counts()
        latest = self.state.latest_evaluation()
        running = self.state.builds(states=[BuildState.RUNNING])
        return EngineStatus(
            branch="main",
            head=latest.revision if latest else None,
            evaluated=latest.revision if latest else None,
            evaluation=latest.id if latest else None,
            evaluating=False,
            queued=counts[BuildState.QUEUED],
            running=tuple(Running(row, "build") for row in running),
            eta=None,
        )

    def plan_graph(self) -> PlanGraph:
        return PlanGraph(revision=None)

    def problems(self) -> Problems:
        return Problems(ports=0, published=0)


class BrokenEngine(TinyEngine):
    """An engine whose status fails with details that must never reach a client."""

    def status(self) -> EngineStatus:
        raise RuntimeError(f"database password is {CANARY.decode()}")


@dataclass
class World:
    """Everything on disk a server needs; ``packages`` by name."""

    root: Path
    config: Config
    state: State
    repo: Repository
    packages: dict[str, IndexEntry] = field(default_factory=dict)

    def package_path(self, name: str) -> Path:
        return self.repo.package_path(self.packages[name])


def make_world(tmp_path: Path, *, big: int = 0) -> World:
    """A repository with ``zlib`` and ``hello`` (and ``big``, ``big`` random bytes, if > 0)."""
    config = Config(state_dir=tmp_path / "state")
    config.state_dir.mkdir(parents=True)
    config.token_file.write_text(TOKEN + "\n")
    config.token_file.chmod(0o600)
    (tmp_path / "canary").write_bytes(CANARY)
    key = SecretKey.generate()
    repo = Repository(config.repo, ARCH, key)
    world = World(tmp_path, config, State(config.database), repo)
    contents = {
        "zlib": {"usr/lib/libz.a": os.urandom(20_000), "usr/include/zlib.h": b"int z;\n"},
        "hello": {"usr/bin/hello": b"#!/bin/sh\necho hello\n" * 50},
    }
    if big:
        contents["big"] = {"usr/share/big/blob": os.urandom(big)}
    for name, files in contents.items():
        destdir = tmp_path / "destdir" / name
        for relative, data in files.items():
            path = destdir / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        meta = PackageMeta(
            name, "1.0", 1, ARCH, hashlib.sha256(name.encode()).hexdigest(), summary=name
        )
        built = create_package(destdir, meta, tmp_path / "out", epoch=EPOCH)
        world.packages[name] = repo.publish(
            built.path, built.info.meta, content=content_id(built.info.files), commit="c0ffee"
        )
    return world


@dataclass
class Server:
    url: str
    port: int
    app: web.Application
    engine: TinyEngine
    session: aiohttp.ClientSession
    runner: web.AppRunner

    async def get(self, path: str, **kwargs: Any) -> tuple[int, CIMultiDict[str], bytes]:
        """Status, headers (case-insensitive) and body of ``GET path``."""
        async with self.session.get(self.url + path, **kwargs) as response:
            return response.status, response.headers.copy(), await response.read()

    async def raw(self, request: bytes) -> tuple[int, bytes]:
        """Send ``request`` as is (no URL normalisation); the status and everything after it."""
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            writer.write(request)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.") else 0
        return status, data


def tls_context(directory: Path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context


@asynccontextmanager
async def serving(
    world: World,
    engine_class: type[TinyEngine] = TinyEngine,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Server]:
    engine = engine_class(
        world.config, world.state, world.repo, EventBus(asyncio.get_running_loop())
    )
    app = create_app(world.config, engine)
    runner = create_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    # the test certificate is self-signed: no verification
    session = aiohttp.ClientSession(
        auto_decompress=False, connector=aiohttp.TCPConnector(ssl=False)
    )
    scheme = "https" if tls is not None else "http"
    try:
        yield Server(f"{scheme}://127.0.0.1:{port}", port, app, engine, session, runner)
    finally:
        await session.close()
        await runner.cleanup()


def run(
    world: World,
    scenario: Callable[[Server], Awaitable[None]],
    engine_class: type[TinyEngine] = TinyEngine,
    timeout: float = 60.0,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Serve ``world`` on loopback and run ``scenario`` against it (bounded in time)."""

    async def main() -> None:
        async with serving(world, engine_class, tls) as server:
            await asyncio.wait_for(scenario(server), timeout)

    asyncio.run(main())
