"""The aiohttp application: ``create_app`` wires the routes around an engine.

The application only serves: the daemon (or a test's small engine) is started and stopped
by whoever runs it. Routes are one table (``routes``); the handlers are methods of one
object per concept (``RepoFiles``, ``Api``, ``MetricsView``), and the application keeps
those objects under the typed keys of ``appkeys`` for the other parts of the server (the
status page) to use.

Serving it: ``create_runner`` makes the ``AppRunner`` with the settings the daemon wants
(an access log that leaves successful repository downloads out, a short shutdown grace).
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from portsd.config import Config
from portsd.daemon.engine import Engine
from portsd.daemon.server import page
from portsd.daemon.server.api import Api, api_errors
from portsd.daemon.server.appkeys import CONFIG, COUNTERS, ENGINE, REPO_FILES, STREAMS
from portsd.daemon.server.files import RepoFiles
from portsd.daemon.server.metrics import Counters, MetricsView
from portsd.daemon.server.seed import SeedFiles
from portsd.daemon.server.streams import Streams
from portsd.daemon.server.uploads import Uploads

SHUTDOWN_TIMEOUT = 5.0
"""Seconds a shutdown waits for requests in flight (streams end at once by themselves)."""


def routes(
    files: RepoFiles, api: Api, metrics: MetricsView, uploads: Uploads, seed: SeedFiles
) -> list[web.RouteDef]:
    """Every route but the status page's (``GET`` routes answer ``HEAD`` too)."""
    v1 = "/api/v1"
    return [
        web.get("/repo/{arch}/{name:.+}", files.get, name="repo"),
        web.get(f"{v1}/status", api.status, name="api-status"),
        web.get(f"{v1}/problems", api.problems, name="api-problems"),
        web.get(f"{v1}/builds", api.builds, name="api-builds"),
        web.get(f"{v1}/builds/{{id}}", api.build, name="api-build"),
        web.get(f"{v1}/builds/{{id}}/log", api.build_log, name="api-build-log"),
        web.get(f"{v1}/events", api.events, name="api-events"),
        web.get(f"{v1}/keys/{{key}}", api.key, name="api-key"),
        web.post(f"{v1}/push", api.push, name="api-push"),
        web.post(f"{v1}/rebuild", api.rebuild, name="api-rebuild"),
        web.get("/metrics", metrics.get, name="metrics"),
        web.get("/distfiles/{sha256}", uploads.distfile, name="distfile"),
        web.put(f"{v1}/uploads", uploads.upload, name="api-upload"),
        web.get(f"{v1}/seed", seed.describe, name="api-seed"),
        web.get("/seed/{name}", seed.file, name="seed"),
    ]


def create_app(config: Config, engine: Engine) -> web.Application:
    """The application serving ``engine``'s repository, API, events and metrics.

    ``/repo/<arch>/`` serves the directories beside ``engine.repo.path`` (its parent is the
    root holding every architecture). Request bodies are capped at
    ``config.max_request_bytes`` (the API's own bodies far lower).
    """
    counters = Counters()
    streams = Streams(counters)
    files = RepoFiles(engine.repo.path.parent, counters)
    app = web.Application(client_max_size=config.max_request_bytes, middlewares=[api_errors])
    app[CONFIG] = config
    app[ENGINE] = engine
    app[COUNTERS] = counters
    app[REPO_FILES] = files
    app[STREAMS] = streams
    app.add_routes(
        routes(
            files,
            Api(config, engine, streams),
            MetricsView(engine, counters),
            Uploads(config),
            SeedFiles(config),
        )
    )
    app.on_response_prepare.append(counters.on_response_prepare)
    app.on_shutdown.append(streams.close)
    app.on_cleanup.append(files.on_cleanup)
    page.setup(app)
    return app


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log, at DEBUG (the journal at INFO holds one line per build, not one
    per request), without the successful repository downloads, which a LAN of clients
    makes by the thousand (their bytes are in ``/metrics``)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if response.status < 400 and request.path.startswith("/repo/"):
            return
        self.logger.debug(
            '%s "%s %s" %d %.3fs',
            request.remote,
            request.method,
            request.path_qs,
            response.status,
            time,
        )

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.DEBUG)


def create_runner(app: web.Application, *, idle_timeout: float = 15.0) -> web.AppRunner:
    """The runner for ``app`` with the daemon's settings; ``setup()`` it, then add sites.

    ``idle_timeout``: a connection that has not sent a whole request head within this many
    seconds of opening, or of its last response, is closed (aiohttp's keep-alive timer,
    which also runs before the first request): a client trickling header bytes holds a
    connection that long, no longer. A request being answered (an event stream, a log
    followed, a download) is not idle."""
    return web.AppRunner(
        app,
        access_log_class=AccessLogger,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        keepalive_timeout=idle_timeout,
    )


_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 31\r\n"
    b"Retry-After: 5\r\nConnection: close\r\n\r\ntoo many connections: try again\n"
)


class _Gate(asyncio.Protocol):
    """A new connection's first protocol: over a cap it gets a 503 and the door; under,
    it is handed to aiohttp's request handler before any byte is read."""

    def __init__(self, site: CappedSite, server: web.Server) -> None:
        self.site = site
        self.server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        host = _host_of(transport)
        handlers = self.server.connections
        same = sum(1 for h in handlers if h.transport is not None and _host_of(h.transport) == host)
        if len(handlers) >= self.site.max_connections or same >= self.site.per_address:
            self.site.refused += 1
            transport.write(_BUSY)
            transport.close()
            return
        handler = self.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)


def _host_of(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if peer else ""


class CappedSite(web.TCPSite):
    """A TCP site that serves at most ``max_connections`` connections at once, and at
    most ``per_address`` from one address; any more get a 503 and are closed at once. The
    process never runs out of descriptors (the accept loop would log a traceback per
    attempt), and one flooding address leaves room for everyone else."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        *,
        max_connections: int,
        per_address: int,
    ) -> None:
        super().__init__(runner, host, port, reuse_address=True, backlog=1024)
        self.max_connections = max_connections
        self.per_address = per_address
        self.refused = 0

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert isinstance(server, web.Server)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Gate(self, server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]
