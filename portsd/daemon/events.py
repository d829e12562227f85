"""Events for whoever is watching: the status page, SSE clients, tests.

The daemon publishes from any thread (builds run on worker threads); subscribers are
asyncio consumers on the daemon's loop. A subscriber that falls more than ``QUEUE_LIMIT``
events behind is dropped (its stream ends) rather than letting memory grow: a browser
reconnects and re-reads the state.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

QUEUE_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Event:
    """``kind`` is evaluation | build | status | log; ``data`` is JSON-serialisable."""

    id: int
    kind: str
    data: dict[str, Any]

    def sse(self) -> bytes:
        """The event in text/event-stream framing."""
        payload = json.dumps(self.data, separators=(",", ":"))
        return f"id: {self.id}\nevent: {self.kind}\ndata: {payload}\n\n".encode()


class EventBus:
    """Fan-out of events to asyncio subscribers, fed from any thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
        self._ids = itertools.count(1)

    def publish(self, kind: str, **data: Any) -> None:
        """Send an event to every subscriber; callable from any thread."""
        event = Event(next(self._ids), kind, data)
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._deliver(event)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: Event) -> None:
        for queue in list(self._subscribers):
            if queue.qsize() >= QUEUE_LIMIT:
                self._subscribers.discard(queue)
                queue.put_nowait(None)  # ends that subscriber's stream
            else:
                queue.put_nowait(event)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Event | None]]:
        """A queue of the events published from now on; None means "you fell behind"."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)
