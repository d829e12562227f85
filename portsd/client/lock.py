"""The exclusive lock of an installation root: one client changes a root at a time.

The lock is ``flock(2)`` on ``<root>/var/lib/ports/lock``. The kernel drops it when its
holder's last descriptor closes, which includes a ``kill -9`` or a crash, so a stale lock
can never block anyone: there is no pid-file staleness to guess at. The holder writes its
pid and command line into the file only so that a process refused the lock can say who
holds it; nothing trusts that text.
"""

from __future__ import annotations

import fcntl
import math
import os
import time
from pathlib import Path
from types import TracebackType

from portsd.errors import RootError, RootLocked

_POLL = 0.05  # seconds between attempts while waiting for the lock
_READ_RETRIES = 5  # a new holder writes its pid right after locking: give it a moment


class RootLock:
    """An acquired lock on a root's lock file; release with ``release()`` or ``with``.

    ``acquire`` fails fast by default (``wait=0``) with RootLocked naming the holder's pid
    and command line; ``wait`` seconds > 0 polls until then (``math.inf``: until free).
    The descriptor is close-on-exec, so programs the holder runs do not inherit the lock.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(
        cls, path: Path, *, wait: float = 0.0, command: str | None = None, dir_fd: int | None = None
    ) -> RootLock:
        """Lock ``path`` (created if missing, never followed if a symlink).

        ``dir_fd``, when given, is the open directory holding ``path``'s last component, so
        the file is found without following symlinks on the way. ``command`` is written
        into the file for others to read (default: this process's command line).
        """
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path.name if dir_fd is not None else path, flags, 0o644, dir_fd=dir_fd)
        except OSError as exc:
            raise RootError(str(path), f"cannot open the lock file: {exc.strerror}") from None
        try:
            deadline = time.monotonic() + wait if math.isfinite(wait) else math.inf
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        pid, holder = _holder(fd)
                        raise RootLocked(str(path), pid, holder) from None
                    time.sleep(_POLL)
            text = (
                f"{os.getpid()}\n{command if command is not None else command_line(os.getpid())}\n"
            )
            os.ftruncate(fd, 0)
            os.pwrite(fd, text.encode(errors="replace"), 0)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        """Unlock; idempotent. The pid text stays: it is informational and rewritten."""
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def __enter__(self) -> RootLock:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _holder(fd: int) -> tuple[int | None, str | None]:
    """The pid and command line the holder wrote (its /proc entry if it wrote none)."""
    for attempt in range(_READ_RETRIES):
        data = os.pread(fd, 4096, 0).decode(errors="replace")
        first, _, rest = data.partition("\n")
        if first.strip().isdigit():
            pid = int(first)
            command = rest.strip() or command_line(pid)
            return pid, command or None
        if attempt + 1 < _READ_RETRIES:
            time.sleep(0.01)
    return None, None


def command_line(pid: int) -> str:
    """``/proc/<pid>/cmdline`` as one line, or "" when it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
