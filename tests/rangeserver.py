"""A scriptable HTTP file server on 127.0.0.1 for download tests: Range and If-Range,
ETags, dropped and stalled connections, redirects, encodings, endless bodies."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from aiohttp import web

from tests.conftest import serving


@dataclass
class Served:
    """How the server answers for one path; mutable because some behaviours happen once."""

    data: bytes
    etag: str | None = '"v1"'
    ignore_range: bool = False  # answer 200 with the whole file to a Range request
    drop_after: int | None = None  # close the connection after this many body bytes ...
    drops: int = 1  # ... this many times
    stall_after: int | None = None  # send this many body bytes, then nothing for a minute
    chunk_delay: float = 0.0
    encoding: str | None = None  # a Content-Encoding to claim
    redirect: str | None = None  # 302 to this path
    endless: bool = False  # after the data, garbage without end, chunked (no length)


@dataclass(frozen=True)
class Seen:
    path: str
    range: str | None
    if_range: str | None
    status: int


@dataclass
class Server:
    files: dict[str, Served] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    port: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        spec = self.files.get(path)
        status = 404 if spec is None else 302 if spec.redirect else 200
        rng, if_range = request.headers.get("Range"), request.headers.get("If-Range")
        if spec is not None and status == 200 and rng and not spec.ignore_range:
            if not spec.endless and (if_range is None or if_range == spec.etag):
                status = 206
        self.seen.append(Seen(path, rng, if_range, status))
        if spec is None:
            raise web.HTTPNotFound()
        if spec.redirect:
            raise web.HTTPFound(spec.redirect)
        start = int(rng.removeprefix("bytes=").rstrip("-")) if status == 206 and rng else 0
        if start >= len(spec.data):
            raise web.HTTPRequestRangeNotSatisfiable()
        body = spec.data[start:]
        response = web.StreamResponse(status=status)
        if not spec.endless:
            response.content_length = len(body)
        if spec.etag:
            response.headers["ETag"] = spec.etag
        if spec.encoding:
            response.headers["Content-Encoding"] = spec.encoding
        if status == 206:
            response.headers["Content-Range"] = (
                f"bytes {start}-{len(spec.data) - 1}/{len(spec.data)}"
            )
        await response.prepare(request)
        try:
            if spec.drop_after is not None and spec.drops > 0:
                spec.drops -= 1
                await response.write(body[: spec.drop_after])
                await asyncio.sleep(0.05)  # let the client read them before the connection breaks
                assert request.transport is not None
                request.transport.close()
                return response
            if spec.stall_after is not None:
                await response.write(body[: spec.stall_after])
                await asyncio.sleep(60)  # longer than any timeout a test uses
                return response
            for at in range(0, len(body), 16384):
                await response.write(body[at : at + 16384])
                if spec.chunk_delay:
                    await asyncio.sleep(spec.chunk_delay)
            while spec.endless:  # until the client hangs up
                await response.write(b"\xff" * 65536)
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        return response


@contextmanager
def range_server() -> Iterator[Server]:
    srv = Server()
    app = web.Application()
    app.router.add_get("/{path:.+}", srv.handle)
    with serving(app, shutdown_timeout=0.1, access_log=None) as url:
        srv.port = int(url.rsplit(":", 1)[1])
        yield srv
