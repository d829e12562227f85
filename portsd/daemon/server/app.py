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
from portsd.daemon.server.streams import Streams

SHUTDOWN_TIMEOUT = 5.0
"""Seconds a shutdown waits for requests in flight (streams end at once by themselves)."""


def routes(files: RepoFiles, api: Api, metrics: MetricsView) -> list[web.RouteDef]:
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
    app.add_routes(routes(files, Api(config, engine, streams), MetricsView(engine, counters)))
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


def create_runner(app: web.Application) -> web.AppRunner:
    """The runner for ``app`` with the daemon's settings; ``setup()`` it, then add sites."""
    return web.AppRunner(app, access_log_class=AccessLogger, shutdown_timeout=SHUTDOWN_TIMEOUT)
