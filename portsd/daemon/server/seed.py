"""The bootstrap seed the daemon's builds stand on, for clients that build from a ports
checkout: its content id is in every key, so a client computes the daemon's keys, and
builds what the cache lacks byte-identically, only on this very seed.

``GET /api/v1/seed`` describes it (content id, file, size, sha256);
``GET /seed/<file>`` serves the package and ``GET /seed/<file>.minisig`` its signature by
the repository key, whose trusted comment names the file and the content id. The client
checks size, sha256 and signature before it unpacks anything, and computes the content
id itself from what it received.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiohttp import web

from portsd.build.seed import Seed, find_seed
from portsd.config import Config
from portsd.daemon.server.api import fail, json_response
from portsd.fsio import file_sha256
from portsd.pkg.sign import SecretKey

SIGNATURE = ".minisig"


@dataclass(frozen=True, slots=True)
class _Served:
    seed: Seed
    size: int
    sha256: str
    signature: str


class SeedFiles:
    """The routes of the seed; the seed is read, hashed and signed once, when first asked."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._served: _Served | None = None
        self._lock = asyncio.Lock()

    async def _seed(self) -> _Served:
        async with self._lock:
            if self._served is None:
                self._served = await asyncio.to_thread(self._read)
            return self._served

    def _read(self) -> _Served:
        seed = find_seed(self.config.seed)
        if seed is None:
            fail(404, "this daemon has no bootstrap seed yet")
        key = SecretKey.load(self.config.secret_key)
        comment = f"timestamp:{int(time.time())}\tfile:{seed.path.name}\tseed:{seed.content_id}"
        signature = key.sign_file(seed.path, comment)
        return _Served(seed, seed.path.stat().st_size, file_sha256(seed.path), signature)

    async def describe(self, _request: web.Request) -> web.Response:
        """``GET /api/v1/seed``."""
        served = await self._seed()
        return json_response(
            {
                "content": served.seed.content_id,
                "file": served.seed.path.name,
                "size": served.size,
                "sha256": served.sha256,
            }
        )

    async def file(self, request: web.Request) -> web.StreamResponse:
        """``GET /seed/<file>`` and ``GET /seed/<file>.minisig``."""
        served = await self._seed()
        name = request.match_info["name"]
        if name == served.seed.path.name + SIGNATURE:
            return web.Response(text=served.signature, content_type="text/plain")
        if name != served.seed.path.name:
            fail(404, f"no seed file {name}; this daemon's seed is {served.seed.path.name}")
        return web.FileResponse(served.seed.path)
