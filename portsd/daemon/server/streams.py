"""Long-lived API responses: a build's log followed while it runs, and the event stream.

Both end by themselves: a followed log when its build is no longer queued or running (after
sending what was written until then), the event stream when its subscriber falls behind.
Both also end when the client goes away (noticed within ``CHECK`` seconds, not only at the
next write, so an idle stream never outlives its reader) and when the server shuts down
(``Streams.close``, an ``on_shutdown`` handler: aiohttp would otherwise wait for them).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from aiohttp import web

from portsd.daemon.engine import Engine
from portsd.daemon.server.metrics import Counters

FOLLOW_POLL = 0.25
"""Seconds between looks at a followed log that has not grown (and at its build's row)."""
HEARTBEAT = 15.0
"""Seconds between comments on an idle event stream, so proxies keep it open."""
CHECK = 1.0
"""Seconds between checks that the reader of an idle event stream is still there."""
RETRY_MS = 2000
"""How long an EventSource waits before reconnecting (sent as ``retry:``)."""

_CHUNK = 64 * 1024
TEXT_HEADERS = {
    "Content-Type": "text/plain; charset=utf-8",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}
EVENT_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",  # a reverse proxy must not hold events back
}


class Streams:
    """The open streams of one application: counts them, and ends them all at shutdown."""

    def __init__(self, counters: Counters) -> None:
        self._counters = counters
        self._wakers: set[Callable[[], None]] = set()
        self.closing = False

    @contextmanager
    def opened(self, wake: Callable[[], None]) -> Iterator[None]:
        """Register a stream for its lifetime; ``wake`` makes it look at ``closing`` now."""
        self._wakers.add(wake)
        self._counters.streams += 1
        try:
            yield
        finally:
            self._wakers.discard(wake)
            self._counters.streams -= 1

    async def close(self, _app: web.Application) -> None:
        self.closing = True
        for wake in list(self._wakers):
            wake()


def gone(request: web.Request) -> bool:
    """Whether the client of ``request`` has closed its connection."""
    transport = request.transport
    return transport is None or transport.is_closing()


def read_from(path: Path, offset: int) -> bytes:
    """Up to 64 KiB of ``path`` from ``offset`` (blocking); nothing if it does not exist."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError):
        return b""
    try:
        return os.pread(fd, _CHUNK, offset)
    finally:
        os.close(fd)


async def send_log(
    request: web.Request,
    response: web.StreamResponse,
    streams: Streams,
    engine: Engine,
    build: int,
    path: Path | None,
    locate: Callable[[str | None], Path | None],
    *,
    follow: bool,
) -> None:
    """Write the log of ``build`` (at ``path``) to the prepared ``response``; with
    ``follow``, keep sending what is appended until the build's row is no longer active,
    then what is left.

    ``locate`` maps the row's ``log`` field to the file (None: not known yet, or refused),
    for a build that had no log yet. Returns when done, on shutdown, or when the client
    leaves.
    """
    poke = asyncio.Event()
    offset = 0
    with streams.opened(poke.set):
        while not streams.closing:
            if path is not None:
                chunk = await asyncio.to_thread(read_from, path, offset)
                if chunk:
                    await response.write(chunk)
                    offset += len(chunk)
                    continue
            if not follow:
                return
            row = await asyncio.to_thread(engine.state.build, build)
            if path is None and row is not None:
                path = locate(row.log)
            if row is None or not row.state.active:
                follow = False  # one last read for what was written before it ended
                continue
            if gone(request):
                return
            try:
                async with asyncio.timeout(FOLLOW_POLL):
                    await poke.wait()
            except TimeoutError:
                pass


async def send_events(
    request: web.Request, response: web.StreamResponse, streams: Streams, engine: Engine
) -> None:
    """Write the engine's events to the prepared ``response`` as server-sent events."""
    loop = asyncio.get_running_loop()
    async with engine.events.subscribe() as queue:
        with streams.opened(lambda: queue.put_nowait(None)):
            # the first bytes also tell the client the stream is open: subscribed from here
            await response.write(f"retry: {RETRY_MS}\n\n".encode())
            ping = loop.time() + HEARTBEAT
            while not streams.closing:
                try:
                    async with asyncio.timeout(max(0.0, min(CHECK, ping - loop.time()))):
                        event = await queue.get()
                except TimeoutError:
                    if gone(request):
                        return
                    if loop.time() >= ping:
                        await response.write(b": ping\n\n")
                        ping = loop.time() + HEARTBEAT
                    continue
                if event is None:
                    return  # fell behind, or shutdown: the client reconnects and re-reads
                await response.write(event.sse())
