"""The aiohttp application: ``create_app`` wires the routes and the engine's lifetime."""

from __future__ import annotations

from aiohttp import web

from portsd.config import Config
from portsd.server.engine import Engine

ENGINE = web.AppKey("engine", Engine)
CONFIG = web.AppKey("config", Config)


def create_app(config: Config, engine: Engine) -> web.Application:
    """The application serving ``engine``'s repository, API and events."""
    app = web.Application(client_max_size=config.max_request_bytes)
    app[CONFIG] = config
    app[ENGINE] = engine
    return app
