"""Files on disk: durable writes, and the sha256 of what is written.

A new name is durable once the file's data and its directory entry are both on disk:
write to a temporary name in the same directory, fsync the file, rename (or link) it into
place, fsync the directory. Everything that must never be seen half-written goes through
here, and every file whose content is checked is hashed by ``file_sha256``. Trees are
removed by ``remove_tree``, which gets past read-only directories and raises on failure.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from pathlib import Path

_READ_CHUNK = 1 << 20


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


def file_sha256(file: Path | int) -> str:
    """The sha256 (hex) of a file: a path, or an open descriptor read from its offset on."""
    digest = hashlib.sha256()
    feed_file(digest, file)
    return digest.hexdigest()


def feed_file(digest: hashlib._Hash, file: Path | int, length: int | None = None) -> int:
    """Feed ``digest`` the bytes of ``file`` (a path, or an open descriptor read from its
    offset on): all of them, or the first ``length``. Returns how many it fed; OSError (EIO)
    if the file ends before ``length``."""
    if isinstance(file, int):
        return _feed(digest, file, length, str(file))
    fd = os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _feed(digest, fd, length, str(file))
    finally:
        os.close(fd)


def _feed(digest: hashlib._Hash, fd: int, length: int | None, name: str) -> int:
    fed = 0
    while length is None or fed < length:
        want = _READ_CHUNK if length is None else min(_READ_CHUNK, length - fed)
        chunk = os.read(fd, want)
        if not chunk:
            if length is not None:
                raise OSError(errno.EIO, f"{name} ended after {fed} of {length} bytes")
            break
        digest.update(chunk)
        fed += len(chunk)
    return fed


def remove_tree(path: Path) -> None:
    """Remove ``path`` and everything below it, if it exists; OSError if anything stays.

    Builds and packages leave read-only directories (``install -m 555``), which rmtree
    alone cannot empty: each directory is made writable first, never through a symlink.
    """
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    path.chmod(0o700)
    for directory, subdirectories, _ in os.walk(path):
        for name in subdirectories:
            child = os.path.join(directory, name)
            if not os.path.islink(child):  # a link's target is outside the tree
                os.chmod(child, 0o700)
    shutil.rmtree(path)
