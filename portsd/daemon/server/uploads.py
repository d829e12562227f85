"""What cluster workers use besides the repository: sources by sha256, and the upload of
the packages they build.

``GET /distfiles/<sha256>`` serves a verified file of the distfiles cache (the daemon
fetched every source of an order before handing it out). ``PUT /api/v1/uploads`` takes a
package, streamed to ``<state>/uploads/`` chunk by chunk (never whole in memory), from a
worker presenting ``Authorization: Bearer <worker token>`` (``<state>/worker-token``) and
the package's sha256 in ``X-Portsd-Sha256``; the bytes must be exactly ``Content-Length``
long with that sha256, or they are deleted. The answer names the upload; the daemon takes
it only when the worker's finished task names it, and checks every member before signing.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import re
import secrets

from aiohttp import web

from portsd.config import Config
from portsd.daemon.server.api import fail, json_response

log = logging.getLogger(__name__)

UPLOAD_LIMIT = 64 << 30  # bytes: far above any package, a bound on a runaway worker
_CHUNK = 1 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


class Uploads:
    def __init__(self, config: Config) -> None:
        self.config = config

    async def distfile(self, request: web.Request) -> web.StreamResponse:
        sha256 = request.match_info["sha256"]
        if not _SHA256.fullmatch(sha256):
            fail(404, "no such file")
        path = self.config.distfiles / "by-sha256" / sha256
        if not path.is_file():
            fail(404, "no such file")
        return web.FileResponse(path)

    async def upload(self, request: web.Request) -> web.Response:
        self._authorize(request)
        sha256 = request.headers.get("X-Portsd-Sha256", "")
        if not _SHA256.fullmatch(sha256):
            fail(400, "X-Portsd-Sha256 must be the package's sha256 (64 hex digits)")
        size = request.content_length
        if size is None or not 0 < size <= UPLOAD_LIMIT:
            fail(411 if size is None else 413, f"Content-Length must be 1..{UPLOAD_LIMIT} bytes")
        self.config.uploads.mkdir(parents=True, exist_ok=True)
        name = f"{sha256[:16]}-{secrets.token_hex(8)}"
        part = self.config.uploads / f".{name}.part"
        digest = hashlib.sha256()
        received = 0
        try:
            with part.open("wb") as file:
                async for chunk in request.content.iter_chunked(_CHUNK):
                    received += len(chunk)
                    if received > size:
                        fail(400, "more bytes than Content-Length")
                    digest.update(chunk)
                    await asyncio.to_thread(file.write, chunk)
            if received != size:
                fail(400, f"{received} of {size} bytes arrived")
            if digest.hexdigest() != sha256:
                fail(400, f"the bytes have sha256 {digest.hexdigest()}, not {sha256}")
            os.rename(part, self.config.uploads / name)
        finally:
            part.unlink(missing_ok=True)
        log.info("upload %s: %d bytes from %s", name, size, request.remote)
        return json_response({"upload": name, "size": size, "sha256": sha256}, 201)

    def _authorize(self, request: web.Request) -> None:
        """401 unless the request carries the worker token."""
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        try:
            expected = self.config.worker_token_file.read_text().strip()
        except OSError:
            expected = ""  # no cluster configured: nobody may upload
        if not (expected and given and hmac.compare_digest(given, expected)):
            fail(401, "a valid worker token is required", {"WWW-Authenticate": "Bearer"})
