"""What the application keeps, under typed keys.

``create_app`` (``portsd.daemon.server.app``) fills them; the parts of the server wired in
after it (the status page's ``setup``) and tests read them. A module of its own, so that
those parts need not import the module that imports them.
"""

from __future__ import annotations

from aiohttp import web

from portsd.config import Config
from portsd.daemon.engine import Engine
from portsd.daemon.server.files import RepoFiles
from portsd.daemon.server.metrics import Counters
from portsd.daemon.server.streams import Streams

ENGINE = web.AppKey("engine", Engine)
CONFIG = web.AppKey("config", Config)
COUNTERS = web.AppKey("counters", Counters)
REPO_FILES = web.AppKey("repo_files", RepoFiles)
STREAMS = web.AppKey("streams", Streams)
