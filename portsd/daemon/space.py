"""Free space where the daemon writes: a full disk must fail builds clearly, not forever.

A build that fails because the disk is full says nothing about its port: it is recorded
as interrupted (not a remembered failure) and planned again once space returns.
"""

from __future__ import annotations

import os
from pathlib import Path

MIN_FREE = 16 << 20  # bytes: below this a build (and sqlite's journal) is bound to fail


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s file system."""
    found = os.statvfs(path)
    return found.f_bavail * found.f_frsize


def disk_full(*paths: Path) -> str | None:
    """Why one of ``paths`` is too full to build on (one line), or None."""
    for path in paths:
        try:
            free = free_bytes(path)
        except OSError:
            continue  # not there (yet): nothing to say about its disk
        if free < MIN_FREE:
            return f"the disk of {path} is full ({free >> 10} KiB free)"
    return None
