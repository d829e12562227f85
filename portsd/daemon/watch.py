"""Noticing pushes that bypass the hook: a watchdog observer on the repository's refs.

A push updates ``refs/heads/<branch>`` (a lock file renamed into place) or, after
``git pack-refs``, ``packed-refs``; either wakes the daemon. ``objects/`` is never
watched: a push writes thousands of files there. watchdog calls back on its own thread,
so the callback must be thread-safe (the daemon's hands the event to its loop).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer


class _RefsHandler(FileSystemEventHandler):
    def __init__(self, gitdir: Path, callback: Callable[[str], None]) -> None:
        self._refs = str(gitdir / "refs") + "/"
        self._packed = str(gitdir / "packed-refs")
        self._callback = callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return
        for raw in (event.src_path, getattr(event, "dest_path", "")):
            path = raw.decode() if isinstance(raw, bytes) else raw
            if path.endswith(".lock") or not path:
                continue
            if path.startswith(self._refs) or path == self._packed:
                self._callback(path)
                return


class RefWatcher:
    """Calls ``callback(path)`` (on watchdog's thread) whenever a ref may have moved."""

    def __init__(self, gitdir: Path, callback: Callable[[str], None]) -> None:
        self._observer = Observer()
        handler = _RefsHandler(gitdir, callback)
        (gitdir / "refs").mkdir(exist_ok=True)
        self._observer.schedule(handler, str(gitdir / "refs"), recursive=True)
        self._observer.schedule(handler, str(gitdir), recursive=False)  # packed-refs

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
