"""Durable file writes: what survives a crash or a kill -9 at any instant.

A new name is durable once the file's data and its directory entry are both on disk:
write to a temporary name in the same directory, fsync the file, rename (or link) it into
place, fsync the directory. Everything that must never be seen half-written goes through
here.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (new names, renames) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes, mode: int = 0o644, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` with exactly ``mode`` (whatever the umask) and fsync it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, overwrite: bool = True) -> None:
    """Replace (or, without ``overwrite``, create) ``path`` so readers see old or new, whole.

    Without ``overwrite`` the file is linked into place, which raises FileExistsError
    instead of replacing a file that appeared meanwhile. Raises OSError on failure and
    leaves no temporary file behind.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        write_synced(temporary, data, mode, exclusive=True)
        if overwrite:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_dir(path.parent)
