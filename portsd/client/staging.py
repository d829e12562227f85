"""Unpacking packages into the staging directories of a transaction.

Each package is read once with ``PackageReader``, which verifies the manifest and every
member (type, mode, size, sha256, link target) and the archive's end as it streams, and
refuses hostile archives naming the member. Non-directories land in private (0700) staging
directories, one per mount the transaction touches, from where the journaled ops rename
them into place. A file gets its mode, setuid bits included, only once its content is
complete and checked. On any failure the staging directories and the journal are removed:
nothing in the root has changed yet.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from portsd.client.journal import Journal, JournalState, roll_back
from portsd.client.planner import Placement, Request, TransactionPlan
from portsd.client.progress import Phase, Progress
from portsd.client.rootfs import RootFs
from portsd.errors import PackageError, RootError
from portsd.pkg.archive import FileType
from portsd.pkg.package import PackageReader

_NS = 1_000_000_000


def stage_all(
    fs: RootFs, plan: TransactionPlan, tx: str, journal_path: Path, progress: Progress
) -> tuple[dict[str, list[int]], tuple[int, int]]:
    """Unpack every package into its staging directories; return each package's entries'
    mtimes and (entries, content bytes). On any failure nothing is left behind."""
    total_bytes = sum(
        p.entry.size for _, placements in plan.packages for p in placements if p.staged
    )
    total_files = sum(1 for _, placements in plan.packages for p in placements if p.staged)
    journal = Journal(tx, JournalState.STAGING, plan.staging, times=plan.times)
    journal.write(journal_path)
    progress.phase(Phase.STAGE, total_bytes, total_files)
    try:
        for staging in plan.staging:
            fs.mkdir(staging, 0o700)
        mtimes = {
            request.info.meta.name: _stage(fs, request, placements, progress)
            for request, placements in plan.packages
        }
        for staging in plan.staging:
            fs.sync(staging)
    except BaseException as exc:
        roll_back(fs, journal, journal_path)  # no op ran: staging and mtimes go back
        if isinstance(exc, OSError):
            raise RootError(str(fs.root), f"cannot stage the packages: {exc}") from exc
        raise
    return mtimes, (total_files, total_bytes)


def _stage(
    fs: RootFs, request: Request, placements: Sequence[Placement], progress: Progress
) -> list[int]:
    """Unpack one package's non-directories into staging; return every entry's mtime."""
    progress.package(request.info)
    mtimes: list[int] = []
    with PackageReader(request.path, expected_sha256=request.sha256) as reader:
        if reader.info != request.info:
            raise PackageError(
                str(request.path), "its manifest is not the one the transaction was checked with"
            )
        for index, member in enumerate(reader.members()):
            placement = placements[index]
            entry = member.entry
            mtimes.append(member.mtime)
            staged = placement.staged
            if staged is None:
                continue
            fs.trim()
            ns = (member.mtime * _NS, member.mtime * _NS)
            if entry.type is FileType.FILE:
                fd = fs.open_file(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    for chunk in member.chunks():
                        size = len(chunk)
                        while chunk:
                            chunk = chunk[os.write(fd, chunk) :]
                        progress.advance(size, 0)
                    # the content is complete and its sha256 checked: only now the mode,
                    # setuid bits included (the staging directory is private meanwhile)
                    os.fchmod(fd, entry.mode)
                    os.utime(fd, ns=ns)
                finally:
                    os.close(fd)
            elif entry.type is FileType.SYMLINK:
                parent, name = fs.at(staged)
                os.symlink(entry.target or "", name, dir_fd=parent)
                os.utime(name, ns=ns, dir_fd=parent, follow_symlinks=False)
            else:
                assert placement.link is not None
                if placement.link.rpartition("/")[0] == staged.rpartition("/")[0]:
                    fs.link(placement.link, staged)
                else:  # a hardlink across mounts cannot be one: a copy stands in
                    _copy(fs, placement.link, staged, entry.mode, ns)
            progress.advance(0, 1)
    return mtimes


def _copy(fs: RootFs, source: str, dest: str, mode: int, ns: tuple[int, int]) -> None:
    reader = fs.open_file(source, os.O_RDONLY)
    try:
        writer = fs.open_file(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            while data := os.read(reader, 1 << 20):
                view = memoryview(data)
                while view:
                    view = view[os.write(writer, view) :]
            os.fchmod(writer, mode)
            os.utime(writer, ns=ns)
        finally:
            os.close(writer)
    finally:
        os.close(reader)
