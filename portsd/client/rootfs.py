"""Paths inside an installation root, reached without ever following a symlink.

Every operation on a root-relative path opens its parent directory component by component
(``openat`` with ``O_NOFOLLOW | O_DIRECTORY``) from a descriptor of the root, then acts on
the last component relative to that descriptor (``renameat``, ``linkat``, ``unlinkat``,
``mkdirat``...). A symlink anywhere on the way is an error (ELOOP or ENOTDIR), never a
detour: a link planted at ``<root>/usr`` pointing to the host's ``/usr`` cannot redirect a
write. Which symlinks an install *may* traverse (those packages own, like ``bin ->
usr/bin``) is decided by the planner, which resolves them itself, inside the root, and
hands this module canonical paths.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from portsd.errors import RootError
from portsd.fsio import file_sha256

_MAX_CACHED = 256  # open directory descriptors kept between operations
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# errnos meaning "not there, or not reachable as a plain directory path"
ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


class RootFs:
    """An open root directory and a bounded cache of descriptors of directories below it.

    Paths are root-relative, canonical (no ``.``, ``..`` or empty components), ``""`` is
    the root itself. Descriptors returned by ``dir``/``at`` stay valid until the next
    ``trim()``; callers trim between operations, never during one.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise RootError(str(root), f"cannot open the root: {exc.strerror}") from None
        self._dirs: dict[str, int] = {}
        self._syncfs: Callable[[int], int] | None = None

    def close(self) -> None:
        self.trim(0)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def full(self, path: str) -> str:
        """The path as a user would write it, for messages."""
        return f"{self.root}/{path}" if path else str(self.root)

    def error(self, path: str, exc: OSError, doing: str) -> RootError:
        return RootError(self.full(path), f"cannot {doing}: {exc.strerror or exc}")

    # -- reaching paths ------------------------------------------------------------------

    def dir(self, path: str) -> int:
        """A descriptor of directory ``path``; OSError if it is missing, not a directory,
        or reached through a symlink."""
        if not path:
            return self._fd
        fd = self._dirs.get(path)
        if fd is None:
            parent, _, name = path.rpartition("/")
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.dir(parent))
            self._dirs[path] = fd
        return fd

    def at(self, path: str) -> tuple[int, str]:
        """(descriptor of the parent directory, last component) of a non-root ``path``."""
        parent, _, name = path.rpartition("/")
        return self.dir(parent), name

    def trim(self, keep: int = _MAX_CACHED) -> None:
        """Close cached descriptors once there are more than ``keep``."""
        if len(self._dirs) > keep:
            for fd in self._dirs.values():
                os.close(fd)
            self._dirs.clear()

    def forget(self, path: str) -> None:
        """Drop cached descriptors of ``path`` and below (it was removed or replaced)."""
        prefix = path + "/"
        for key in [k for k in self._dirs if k == path or k.startswith(prefix)]:
            os.close(self._dirs.pop(key))

    def lstat(self, path: str) -> os.stat_result | None:
        """``path``'s own status, or None when it is absent or its parent is not a plain
        directory path (a symlink or a file on the way)."""
        if not path:
            return os.fstat(self._fd)
        try:
            fd, name = self.at(path)
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in ABSENT:
                return None
            raise

    def exists(self, path: str) -> bool:
        return self.lstat(path) is not None

    def readlink(self, path: str) -> str:
        fd, name = self.at(path)
        return os.readlink(name, dir_fd=fd)

    def open_file(self, path: str, flags: int, mode: int = 0o600) -> int:
        """``open`` of a regular file, refusing a symlink as the last component too."""
        fd, name = self.at(path)
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=fd)

    def sha256(self, path: str) -> str:
        """The sha256 of the regular file at ``path``."""
        fd = self.open_file(path, os.O_RDONLY)
        try:
            return file_sha256(fd)
        finally:
            os.close(fd)

    # -- changing paths ------------------------------------------------------------------

    def mkdir(self, path: str, mode: int) -> None:
        fd, name = self.at(path)
        os.mkdir(name, mode, dir_fd=fd)

    def rmdir(self, path: str) -> None:
        self.forget(path)
        fd, name = self.at(path)
        os.rmdir(name, dir_fd=fd)

    def unlink(self, path: str) -> None:
        fd, name = self.at(path)
        os.unlink(name, dir_fd=fd)

    def rename(self, source: str, dest: str) -> None:
        """Atomically move ``source`` to ``dest`` (replacing a non-directory there)."""
        self.forget(source)
        source_fd, source_name = self.at(source)
        dest_fd, dest_name = self.at(dest)
        os.rename(source_name, dest_name, src_dir_fd=source_fd, dst_dir_fd=dest_fd)

    def link(self, source: str, dest: str) -> None:
        """A new name ``dest`` for the file or symlink ``source`` (never followed)."""
        source_fd, source_name = self.at(source)
        dest_fd, dest_name = self.at(dest)
        os.link(
            source_name, dest_name, src_dir_fd=source_fd, dst_dir_fd=dest_fd, follow_symlinks=False
        )

    def makedirs(self, path: str, mode: int = 0o755) -> None:
        """Create ``path`` and missing parents as real directories; RootError if a
        component exists as anything else (a symlink included)."""
        done = ""
        for part in path.split("/"):
            done = f"{done}/{part}" if done else part
            try:
                self.dir(done)
                continue
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise RootError(
                    self.full(done), "is not a directory (a symlink or a file); refusing to use it"
                ) from exc
            try:
                self.mkdir(done, mode)
            except FileExistsError:  # raced with another creator: check it as above
                pass
            try:
                self.dir(done)
            except OSError as exc:
                raise RootError(self.full(done), "is not a directory") from exc

    def remove_tree(self, path: str) -> None:
        """Remove ``path`` and everything below it, if it exists (symlinks not followed)."""
        import shutil  # only recovery and cleanup need it

        self.forget(path)
        try:
            fd, name = self.at(path)
        except OSError as exc:
            if exc.errno in ABSENT:
                return
            raise
        try:
            shutil.rmtree(name, dir_fd=fd)
        except FileNotFoundError:
            pass

    # -- mounts and durability -----------------------------------------------------------

    def mount(self, path: str) -> int:
        """An id of the mount holding directory ``path``: renames work only within one.

        The kernel's mount id (from ``/proc/self/fdinfo``) tells bind mounts of one
        filesystem apart, which ``st_dev`` does not; ``st_dev`` is the fallback.
        """
        fd = self.dir(path)
        try:
            with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
                for line in info:
                    if line.startswith("mnt_id:"):
                        return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return os.fstat(fd).st_dev

    def sync(self, path: str) -> None:
        """Flush the whole filesystem holding directory ``path`` (syncfs(2)): one call
        makes every file written and renamed there durable, where an fsync per file
        would cost a disk flush each."""
        if self._syncfs is None:
            libc = ctypes.CDLL(None, use_errno=True)
            self._syncfs = libc.syncfs if hasattr(libc, "syncfs") else _sync_all
        if self._syncfs(self.dir(path)) != 0:
            code = ctypes.get_errno()
            raise self.error(path, OSError(code, os.strerror(code)), "sync its filesystem")


def _sync_all(_fd: int) -> int:
    os.sync()
    return 0


def kind_of(st: os.stat_result) -> str:
    """A word for what ``st`` describes, for messages and comparisons."""
    if stat.S_ISDIR(st.st_mode):
        return "directory"
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    return "special file"
