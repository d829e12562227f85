"""One daemon per state directory, and where it listens: ``<state>/daemon.lock``.

``portsd serve`` holds ``flock(2)`` on the file for its whole life and writes its pid and
URL into it. The kernel drops the lock with the holder's last descriptor, on a clean exit
as on ``kill -9``, so a stale file never blocks a start. Readers (``portsd status``, the
post-receive hook) trust the URL only while the file is locked: a file nobody holds
describes a daemon that is gone, and its old port may belong to anyone now.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

from portsd.config import Config
from portsd.errors import StateInUse

LOCK_NAME = "daemon.lock"
_WAIT = 0.5  # seconds: a reader (the hook) holds a shared lock for an instant; outwait it
_POLL = 0.05


@dataclass(frozen=True, slots=True)
class Holder:
    """What the daemon holding the lock wrote: its pid and the URL it serves."""

    pid: int | None
    url: str


class InstanceLock:
    """The held lock of a state directory; ``release()`` (or exiting) gives it up."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, state_dir: Path, url: str) -> InstanceLock:
        """Lock ``state_dir`` for this process, serving ``url``; StateInUse at once (after
        at most _WAIT seconds) if another daemon holds it, naming its pid and URL."""
        path = state_dir / LOCK_NAME
        # close-on-exec: builds started by the daemon must not keep its lock alive
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            deadline = time.monotonic() + _WAIT
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = _parse(os.pread(fd, 4096, 0))
                        raise StateInUse(str(state_dir), holder.pid, holder.url) from None
                    time.sleep(_POLL)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n{url}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        """Clear the URL and unlock; idempotent."""
        if self._fd >= 0:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)  # the only descriptor: closing it releases the flock
            self._fd = -1


def local_url(config: Config) -> str:
    """Where a daemon with ``config`` can be reached from this host."""
    host = config.listen
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    return f"http://{host}:{config.port}"


def running_daemon(state_dir: Path) -> Holder | None:
    """The daemon serving ``state_dir`` now, or None if no process holds its lock."""
    try:
        fd = os.open(state_dir / LOCK_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _parse(os.pread(fd, 4096, 0))
            return holder if holder.url else None
        return None  # we got the lock, so nobody holds it: the text is stale
    finally:
        os.close(fd)


def _parse(data: bytes) -> Holder:
    first, _, rest = data.decode(errors="replace").partition("\n")
    return Holder(int(first) if first.strip().isdigit() else None, rest.strip())
