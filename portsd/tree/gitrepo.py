"""The ports tree as git stores it: commits read from the object database, directories hashed.

Nothing here checks anything out or runs hooks: commits, trees and blobs are read straight
from the object database with pygit2. ``hash_directory`` computes the id git would give a
directory, so a working tree and the commit with the same content name their ports with the
same tree ids (and therefore give them the same build keys).

A ``TreeSnapshot`` is one state of a ports tree, read either way: ``GitSnapshot`` (a commit)
and ``DirSnapshot`` (a plain directory, a working tree with uncommitted edits or no git at
all) both list ``ports/<name>/`` with tree ids, read a port's files and export them, and
identify (``path_entry``) and export any other path of the tree, for ``path`` sources.

``PortsListing`` is the ``ports/`` tree object of one commit. A 30,000-port tree is a 1 MB
object, costly for libgit2 to parse into entries and more so to diff; a listing instead
keeps the raw object and where its entries end, so the listing of the next commit is
derived from the bytes that differ, most of the time going to inflating the new object
(measured against pygit2 by bench/tree.py; the numbers are in docs/benchmarks.md).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from itertools import accumulate
from pathlib import Path
from typing import Protocol

import pygit2

from portsd.errors import FileProblem, GitError, RecipeError

PORTS_DIR = "ports"
RECIPE_FILE = "port.toml"
_ENTRY = re.compile(rb"([0-7]{5,6}) ([^\0]+)\0(.{20})", re.DOTALL)
_TREE_MODE = b"40000"


class FileMode(IntEnum):
    """The modes git records for what a tree can hold (besides submodules)."""

    REGULAR = 0o100644
    EXECUTABLE = 0o100755
    SYMLINK = 0o120000
    TREE = 0o040000


_MODES = {int(mode): mode for mode in FileMode}  # a dict lookup; calling an enum is slow
_UNSAFE_NAMES = frozenset({"", ".", ".."})  # (a name from a parsed tree cannot hold a NUL)


@dataclass(frozen=True, slots=True)
class PortFile:
    """A file of a port directory: its path relative to the directory, git mode and blob id."""

    path: str
    mode: FileMode
    id: str


@dataclass(frozen=True, slots=True)
class PathEntry:
    """What a commit (or a directory hashed as git would) holds at a repository path: its
    git mode (a ``FileMode``, or 0o160000 for a submodule) and object id (hex)."""

    mode: int
    id: str


SUBMODULE_MODE = 0o160000


@dataclass(frozen=True, slots=True)
class PortChange:
    """A commit that changed ``ports/<port>/``: which files, and the commit's summary line."""

    commit: str
    port: str
    summary: str
    author: str
    time: int
    files: tuple[str, ...]


class PortsListing:
    """The port directories of one ``ports/`` tree object: name -> tree id (hex).

    Entries that are not directories (a README in ports/) are kept in the raw object but
    are not ports. ``compare`` derives another version's listing from the bytes that
    differ, parsing only the entries in between.
    """

    __slots__ = ("raw", "ids", "_bounds")

    def __init__(self, raw: bytes, ids: dict[str, str], bounds: list[int]) -> None:
        self.raw = raw
        self.ids = ids
        self._bounds = bounds  # 0, then where each entry ends

    @classmethod
    def parse(cls, raw: bytes, label: str = "ports") -> PortsListing:
        """The listing of a raw tree object; ``GitError`` if it is not one."""
        entries = _parse_entries(raw, 0, len(raw))
        if entries is None:
            raise GitError(label, "malformed tree object for ports/")
        ids, ends = entries
        return cls(raw, ids, [0, *ends])

    def compare(self, raw: bytes) -> tuple[PortsListing, dict[str, str | None]]:
        """The listing of ``raw`` (another version of this tree) and the ports that differ.

        Each changed port maps to its new tree id, or None if it is gone. Only the entries
        between the longest common prefix and suffix of the two objects are parsed.
        """
        old = self.raw
        if raw == old:
            return self, {}
        shortest = min(len(old), len(raw))
        prefix = _common_prefix(old, raw)
        suffix = _common_suffix(old, raw, shortest - prefix)
        bounds = self._bounds
        first = bisect_right(bounds, prefix) - 1  # entries before this one are unchanged
        last = bisect_left(bounds, len(old) - suffix)  # ... and so are those from this one on
        start, shift = bounds[first], len(raw) - len(old)
        parsed = _parse_entries(raw, start, bounds[last] + shift)
        if parsed is None:  # the common suffix does not start at an entry of ``raw``
            last = len(bounds) - 1
            parsed = _parse_entries(raw, start, len(raw))
            if parsed is None:
                raise GitError("ports", "malformed tree object for ports/")
        new_ids, new_ends = parsed
        old_ids = _parse_entries(old, start, bounds[last])
        assert old_ids is not None  # this listing was parsed from ``old``
        changes: dict[str, str | None] = {}
        ids = dict(self.ids)
        for name, tree_id in old_ids[0].items():
            if new_ids.get(name) != tree_id:
                changes[name] = None
                del ids[name]
        for name, tree_id in new_ids.items():
            if old_ids[0].get(name) != tree_id:
                changes[name] = tree_id
                ids[name] = tree_id
        tail = [end + shift for end in bounds[last + 1 :]] if shift else bounds[last + 1 :]
        return PortsListing(raw, ids, [*bounds[: first + 1], *new_ends, *tail]), changes


def _parse_entries(raw: bytes, start: int, stop: int) -> tuple[dict[str, str], list[int]] | None:
    """Directory entries (name -> id) of ``raw[start:stop]`` and where every entry ends, or
    None unless the range is exactly a run of whole entries."""
    found = _ENTRY.findall(raw, start, stop)
    ends = list(accumulate((len(mode) + len(name) + 22 for mode, name, _ in found), initial=start))
    if ends[-1] != stop:
        return None
    ids = {
        name.decode("utf-8", "surrogateescape"): tree_id.hex()
        for mode, name, tree_id in found
        if mode == _TREE_MODE
    }
    return ids, ends[1:]


def _common_prefix(a: bytes, b: bytes) -> int:
    low, high = 0, min(len(a), len(b))
    while low < high:  # a[:low] == b[:low], and they differ somewhere before high + 1
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    low, high = 0, limit
    la, lb = len(a), len(b)
    while low < high:
        middle = (low + high + 1) // 2
        if a[la - middle : la - low] == b[lb - middle : lb - low]:
            low = middle
        else:
            high = middle - 1
    return low


class GitRepo:
    """A ports repository, opened read-only.

    Raises ``GitError`` naming the repository for anything that cannot be read: not a
    repository, an unknown revision, a commit without ``ports/``.
    """

    __slots__ = ("path", "_repo")

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._repo = pygit2.Repository(self.path, pygit2.enums.RepositoryOpenFlag.NO_SEARCH)
        except pygit2.GitError:
            raise GitError(self.path, "not a git repository") from None

    def __reduce__(self) -> tuple[type[GitRepo], tuple[str]]:
        return GitRepo, (self.path,)  # reopened by path in worker processes

    @property
    def workdir(self) -> str | None:
        return self._repo.workdir

    @property
    def gitdir(self) -> str:
        """The git directory itself (``.git`` of a working tree, or the bare repository)."""
        return str(self._repo.path)

    def head_branch(self) -> str:
        """The branch HEAD names (it may not exist yet in a fresh bare repository)."""
        target = self._repo.references["HEAD"].target
        if not isinstance(target, str) or not target.startswith("refs/heads/"):
            raise GitError(self.path, "HEAD is detached: name the branch to follow")
        return target.removeprefix("refs/heads/")

    def commit(self, revision: str) -> str:
        """The id of the commit ``revision`` (an id, branch, tag or any rev-parse spec) names."""
        try:
            target = self._repo.revparse_single(revision)
        except (KeyError, ValueError, pygit2.GitError):
            raise GitError(self.path, f"unknown revision '{revision}'") from None
        try:
            return str(target.peel(pygit2.Commit).id)
        except (ValueError, pygit2.GitError):
            raise GitError(self.path, f"'{revision}' does not name a commit") from None

    def ports_tree(self, commit: str) -> str | None:
        """The id of ``ports/`` in ``commit``, or None if it has none."""
        tree = self._repo[commit].peel(pygit2.Tree)
        entry = tree[PORTS_DIR] if PORTS_DIR in tree else None
        return str(entry.id) if entry is not None and entry.type_str == "tree" else None

    def listing(self, commit: str) -> PortsListing:
        """Every port directory of ``commit`` with its tree id."""
        tree_id = self.ports_tree(commit)
        if tree_id is None:
            raise GitError(self.path, f"commit {commit[:12]} has no ports/ directory")
        return PortsListing.parse(self.read_raw(tree_id), self.path)

    def entry(self, commit: str, path: str) -> PathEntry | None:
        """The mode and object id of ``path`` (``a/b/c``, relative to the root) in
        ``commit``, or None if the commit has nothing there."""
        root = self._repo[commit].peel(pygit2.Tree)
        try:
            found = root[path]
        except KeyError:  # also when a component on the way is not a directory
            return None
        return PathEntry(found.filemode, str(found.id))

    def read_raw(self, object_id: str) -> bytes:
        return self._repo.odb.read(object_id)[1]

    def read_blob(self, blob_id: str) -> bytes:
        kind, data = self._repo.odb.read(pygit2.Oid(hex=blob_id))
        if kind != pygit2.enums.ObjectType.BLOB:
            raise GitError(self.path, f"object {blob_id} is not a blob")
        return data

    def _tree(self, tree_id: str) -> pygit2.Tree:
        tree = self._repo[pygit2.Oid(hex=tree_id)]  # an Oid: a hex string is a prefix lookup
        if not isinstance(tree, pygit2.Tree):
            raise GitError(self.path, f"object {tree_id} is not a tree")
        return tree

    def _entries(self, tree: pygit2.Tree) -> Iterator[tuple[str, pygit2.Object]]:
        for entry in tree:
            name = entry.name or ""
            if name in _UNSAFE_NAMES or "/" in name:
                raise GitError(self.path, f"unsafe name {name!r} in tree {tree.id}")
            yield name, entry

    def files(self, tree_id: str) -> list[PortFile]:
        """The files of a directory tree, recursively, in git's order (submodules left out)."""
        return list(self._walk(self._tree(tree_id), ""))

    def _walk(self, tree: pygit2.Tree, prefix: str) -> Iterator[PortFile]:
        for name, entry in self._entries(tree):
            if isinstance(entry, pygit2.Tree):
                yield from self._walk(entry, f"{prefix}{name}/")
            elif isinstance(entry, pygit2.Blob):
                yield PortFile(f"{prefix}{name}", _MODES[entry.filemode], str(entry.id))

    def read_dir(
        self, tree_id: str, wanted: str
    ) -> tuple[list[str], FileMode | None, bytes | None]:
        """What parsing a port needs: the paths of a tree's files (recursively), and the
        mode and content of its top-level file ``wanted`` (None if there is none, and no
        content unless it is a regular file). Cheaper than ``files``: only ``wanted`` is
        asked its mode, and its blob is read through the entry in hand."""
        # This runs for every port of a cold load: one flat loop, no generators.
        paths: list[str] = []
        mode = data = None
        pending = [(self._tree(tree_id), "")]
        while pending:
            tree, prefix = pending.pop()
            for entry in tree:
                name = entry.name or ""
                if name in _UNSAFE_NAMES or "/" in name:
                    raise GitError(self.path, f"unsafe name {name!r} in tree {tree.id}")
                if isinstance(entry, pygit2.Blob):
                    paths.append(prefix + name)
                    if name == wanted and not prefix:
                        mode = _MODES[entry.filemode]
                        data = entry.data if mode != FileMode.SYMLINK else None
                elif isinstance(entry, pygit2.Tree):
                    pending.append((entry, f"{prefix}{name}/"))
        return paths, mode, data

    def export(self, tree_id: str, dest: Path) -> None:
        """Write the files of a tree into ``dest`` (created; it must not exist or be empty)."""
        dest.mkdir(parents=True, exist_ok=True)
        for entry in self.files(tree_id):
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_file(target, entry.mode, self.read_blob(entry.id))

    def changed_ports(self, old: str, new: str) -> dict[str, str | None]:
        """Ports whose directory differs between two revisions: name -> new tree id or None."""
        before = self.listing(self.commit(old))
        after = self.ports_tree(self.commit(new))
        if after is None:
            raise GitError(self.path, f"'{new}' has no ports/ directory")
        return before.compare(self.read_raw(after))[1]

    def history(
        self,
        names: Iterable[str],
        since: str | None = None,
        until: str = "HEAD",
        known: Iterable[tuple[str, PortsListing]] = (),
    ) -> list[PortChange]:
        """Commits after ``since`` up to ``until`` that changed ``ports/<name>/`` for a name.

        Newest first. As in ``git log -- ports/<name>``, a merge counts only when the port
        differs from every parent; its files are those that differ from the first parent.
        ``known`` are listings the caller already has (commit id, listing): a one-commit
        push then costs no parsing at all.
        """
        wanted = set(names)
        walker = self._repo.walk(self.commit(until), pygit2.enums.SortMode.TOPOLOGICAL)
        if since is not None:
            walker.hide(self.commit(since))
        listings = _ListingMemo(self)
        for commit_id, listing in known:
            listings.seed(commit_id, listing)
        changes: list[PortChange] = []
        for commit in walker:
            here = listings.of(str(commit.id))
            touched = wanted & here.ids.keys() if not commit.parents else set(wanted)
            for parent in commit.parents:
                touched &= listings.changed(here, str(parent.id)).keys()
            first = str(commit.parents[0].id) if commit.parents else None
            for name in sorted(touched):
                before = listings.of(first).ids.get(name) if first else None
                changes.append(
                    PortChange(
                        commit=str(commit.id),
                        port=name,
                        summary=commit.message.split("\n", 1)[0],
                        author=commit.author.name,
                        time=commit.commit_time,
                        files=tuple(self._changed_files(name, before, here.ids.get(name))),
                    )
                )
        return changes

    def _changed_files(self, name: str, before: str | None, after: str | None) -> list[str]:
        old = {entry.path: entry for entry in self.files(before)} if before else {}
        new = {entry.path: entry for entry in self.files(after)} if after else {}
        return [
            f"{PORTS_DIR}/{name}/{path}"
            for path in sorted(old.keys() | new.keys())
            if old.get(path) != new.get(path)
        ]


class _ListingMemo:
    """Listings of the commits a history walk visits, each derived from its child's.

    A commit without ``ports/`` lists no ports. Only the most recent listings are kept:
    a topological walk needs those near its frontier.
    """

    def __init__(self, repo: GitRepo, keep: int = 64) -> None:
        self.repo = repo
        self.keep = keep
        self.by_tree: dict[str | None, PortsListing] = {None: PortsListing(b"", {}, [0])}
        self.tree_of: dict[str, str | None] = {}

    def _tree(self, commit: str) -> str | None:
        if commit not in self.tree_of:
            self.tree_of[commit] = self.repo.ports_tree(commit)
        return self.tree_of[commit]

    def _remember(self, tree: str | None, listing: PortsListing) -> PortsListing:
        self.by_tree[tree] = listing
        if len(self.by_tree) > self.keep:
            del self.by_tree[next(t for t in self.by_tree if t is not None)]
        return listing

    def seed(self, commit: str, listing: PortsListing) -> None:
        self._remember(self._tree(commit), listing)

    def of(self, commit: str) -> PortsListing:
        tree = self._tree(commit)
        known = self.by_tree.get(tree)
        if known is not None:
            return known
        assert tree is not None
        return self._remember(tree, PortsListing.parse(self.repo.read_raw(tree), self.repo.path))

    def changed(self, child: PortsListing, parent: str) -> dict[str, str | None]:
        """Ports that differ between ``child`` and the listing of the commit ``parent``."""
        tree = self._tree(parent)
        known = self.by_tree.get(tree)
        if known is not None:
            return child.compare(known.raw)[1]
        assert tree is not None
        listing, changes = child.compare(self.repo.read_raw(tree))
        self._remember(tree, listing)
        return changes


def _write_file(target: Path, mode: FileMode, data: bytes) -> None:
    if mode == FileMode.SYMLINK:
        os.symlink(os.fsdecode(data), target)
        return
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(target, flags, 0o755 if mode == FileMode.EXECUTABLE else 0o644)
    with os.fdopen(fd, "wb") as file:
        file.write(data)


# -- hashing a directory as git does ---------------------------------------------------


def hash_object(kind: str, data: bytes) -> bytes:
    """The binary object id git gives ``data`` as a ``kind`` (blob, tree) object."""
    return hashlib.sha1(b"%s %d\0%s" % (kind.encode(), len(data), data)).digest()


def tree_object(entries: Iterable[tuple[FileMode, bytes, bytes]]) -> bytes:
    """The body of a tree object from (mode, name, binary id), sorted as git sorts them:
    by name bytes, a directory's name compared as if it ended with '/'."""
    ordered = sorted(entries, key=lambda e: e[1] + b"/" if e[0] == FileMode.TREE else e[1])
    return b"".join(b"%o %s\0%s" % (mode, name, oid) for mode, name, oid in ordered)


@dataclass(frozen=True, slots=True)
class HashedDirectory:
    """A directory as git would commit it: its tree id and its files (their paths relative
    to the directory), plus the contents of the files asked for while hashing."""

    tree_id: str
    files: tuple[PortFile, ...]
    contents: dict[str, bytes]


def hash_directory(
    path: Path, keep: Sequence[str] = (), ignored: Callable[[Path], bool] | None = None
) -> HashedDirectory | None:
    """Hash ``path`` as ``git add`` followed by ``git write-tree`` would, without filters.

    Regular files are 100644, or 100755 if the owner may execute them; symlinks are 120000
    (the blob is the link's target); directories without files are left out, as are
    ``.git``, anything ``ignored`` says to ignore, and sockets, fifos and devices. Returns
    None for a directory with no files at all (git cannot record it). The contents of the
    files named in ``keep`` are returned too, read in the same pass.
    """
    files: list[PortFile] = []
    contents: dict[str, bytes] = {}
    tree = _hash_tree(path, "", files, contents, set(keep), ignored)
    if tree is None:
        return None
    return HashedDirectory(tree.hex(), tuple(files), contents)


def _hash_tree(
    directory: Path,
    prefix: str,
    files: list[PortFile],
    contents: dict[str, bytes],
    keep: set[str],
    ignored: Callable[[Path], bool] | None,
) -> bytes | None:
    entries: list[tuple[FileMode, bytes, bytes]] = []
    with os.scandir(directory) as scan:
        found = sorted(scan, key=lambda entry: entry.name)
    for entry in found:
        full = Path(entry.path)
        if entry.name == ".git" or (ignored is not None and ignored(full)):
            continue
        relative = prefix + entry.name
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(info.st_mode):
            mode, data = FileMode.SYMLINK, os.fsencode(os.readlink(full))
        elif stat.S_ISREG(info.st_mode):
            executable = info.st_mode & stat.S_IXUSR
            mode = FileMode.EXECUTABLE if executable else FileMode.REGULAR
            data = full.read_bytes()
        elif stat.S_ISDIR(info.st_mode):
            subtree = _hash_tree(full, relative + "/", files, contents, keep, ignored)
            if subtree is not None:
                entries.append((FileMode.TREE, os.fsencode(entry.name), subtree))
            continue
        else:
            continue
        blob = hash_object("blob", data)
        files.append(PortFile(relative, mode, blob.hex()))
        if relative in keep:
            contents[relative] = data
        entries.append((mode, os.fsencode(entry.name), blob))
    if not entries:
        return None
    return hash_object("tree", tree_object(entries))


# -- snapshots: one state of a ports tree, from a commit or a directory -----------------


@dataclass(frozen=True, slots=True)
class PortFiles:
    """What parsing a port needs: its port.toml and the paths of all its files."""

    recipe: bytes
    files: tuple[str, ...]


class TreeSnapshot(Protocol):
    """One state of a ports tree: its port directories, their tree ids and their files."""

    @property
    def label(self) -> str:
        """Where the tree comes from, for messages."""
        ...

    def listing(self) -> Mapping[str, str]:
        """Every port directory's name and git tree id."""
        ...

    def read_port(self, name: str) -> PortFiles:
        """The port's files; ``RecipeError`` when it has no port.toml to read."""
        ...

    def export_port(self, name: str, dest: Path) -> None:
        """Write the port directory's files into ``dest`` (which must not exist or be empty)."""
        ...

    def path_entry(self, path: str) -> PathEntry | None:
        """What the tree holds at ``path`` (relative to its root; outside ports/), as git
        records it; None if nothing git could record is there."""
        ...

    def export_path(self, path: str, dest: Path) -> None:
        """Write the file or directory at ``path`` to ``dest`` (which must not exist):
        exactly the content ``path_entry`` identifies, or ``GitError``."""
        ...

    def read_file(self, path: str) -> bytes | None:
        """The regular file at ``path`` (outside ports/), or None if there is none."""
        ...


def _missing_recipe(name: str, why: str) -> RecipeError:
    return RecipeError(name, [FileProblem(f"{PORTS_DIR}/{name}/{RECIPE_FILE}", why)])


class GitSnapshot:
    """The ports tree of one commit, read from git objects."""

    __slots__ = ("repo", "commit", "_listing")

    def __init__(self, repo: GitRepo, commit: str, listing: PortsListing | None = None) -> None:
        self.repo = repo
        self.commit = commit
        self._listing = listing

    @classmethod
    def open(cls, path: str | os.PathLike[str], revision: str = "HEAD") -> GitSnapshot:
        """The commit ``revision`` names in the repository at ``path``; ``GitError`` if none."""
        repo = GitRepo(path)
        return cls(repo, repo.commit(revision))

    def __reduce__(self) -> tuple[type[GitSnapshot], tuple[GitRepo, str]]:
        return GitSnapshot, (self.repo, self.commit)

    @property
    def label(self) -> str:
        return f"{self.repo.path}@{self.commit[:12]}"

    def ports(self) -> PortsListing:
        if self._listing is None:
            self._listing = self.repo.listing(self.commit)
        return self._listing

    def listing(self) -> Mapping[str, str]:
        return self.ports().ids

    def at(self, revision: str) -> tuple[GitSnapshot, dict[str, str | None]]:
        """Another commit of the same repository, and the ports that differ from this one
        (name -> new tree id, or None if removed), found from the bytes that differ."""
        commit = self.repo.commit(revision)
        tree = self.repo.ports_tree(commit)
        if tree is None:
            raise GitError(self.repo.path, f"commit {commit[:12]} has no ports/ directory")
        listing, changes = self.ports().compare(self.repo.read_raw(tree))
        return GitSnapshot(self.repo, commit, listing), changes

    def _tree_id(self, name: str) -> str:
        tree_id = self.listing().get(name)
        if tree_id is None:
            raise GitError(self.repo.path, f"commit {self.commit[:12]} has no port '{name}'")
        return tree_id

    def read_port(self, name: str) -> PortFiles:
        try:
            paths, mode, data = self.repo.read_dir(self._tree_id(name), RECIPE_FILE)
        except GitError as error:
            raise _missing_recipe(name, str(error)) from None
        return _port_files(name, paths, mode, data)

    def export_port(self, name: str, dest: Path) -> None:
        self.repo.export(self._tree_id(name), dest)

    def path_entry(self, path: str) -> PathEntry | None:
        return self.repo.entry(self.commit, path)

    def read_file(self, path: str) -> bytes | None:
        entry = self.path_entry(path)
        if entry is None or entry.mode not in (FileMode.REGULAR, FileMode.EXECUTABLE):
            return None
        return self.repo.read_blob(entry.id)

    def export_path(self, path: str, dest: Path) -> None:
        entry = self.path_entry(path)
        if entry is None:
            raise GitError(self.repo.path, f"commit {self.commit[:12]} has no '{path}'")
        if entry.mode == FileMode.TREE:
            self.repo.export(entry.id, dest)
        elif entry.mode in (FileMode.REGULAR, FileMode.EXECUTABLE):
            dest.parent.mkdir(parents=True, exist_ok=True)
            _write_file(dest, _MODES[entry.mode], self.repo.read_blob(entry.id))
        else:
            raise GitError(self.repo.path, f"'{path}' is not a file or directory")


def _port_files(
    name: str, paths: Sequence[str], mode: FileMode | None, data: bytes | None
) -> PortFiles:
    if mode is None:
        raise _missing_recipe(name, f"missing: ports/{name}/ has no {RECIPE_FILE}")
    if mode == FileMode.SYMLINK or data is None:
        raise _missing_recipe(name, "must be a regular file, not a symlink")
    return PortFiles(data, tuple(paths))


class DirSnapshot:
    """The ports tree in a plain directory (``<root>/ports/<name>/``), as it is right now.

    Tree ids are computed as git would (``gitrepo.hash_directory``); inside a git work tree,
    files git ignores are left out, as ``git add`` would leave them out. The directory is
    hashed once, on the first ``listing``; later edits are not seen by this snapshot.
    """

    __slots__ = ("root", "_ports", "_paths", "_ignored")

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self._ports: dict[str, HashedDirectory] | None = None
        self._paths: dict[str, _HashedPath] = {}  # hashed once each, like the ports
        self._ignored: tuple[Callable[[Path], bool] | None] | None = None  # None: not looked up

    @property
    def label(self) -> str:
        return str(self.root)

    def _hashed(self) -> dict[str, HashedDirectory]:
        if self._ports is None:
            ports = self.root / PORTS_DIR
            if not ports.is_dir():
                raise GitError(str(self.root), "no ports/ directory")
            ignored = self._ignore_rules()
            hashed: dict[str, HashedDirectory] = {}
            for entry in sorted(os.scandir(ports), key=lambda e: e.name):
                path = Path(entry.path)
                if not entry.is_dir(follow_symlinks=False) or (ignored and ignored(path)):
                    continue
                port = hash_directory(path, (RECIPE_FILE,), ignored)
                if port is not None:  # git cannot record an empty directory
                    hashed[entry.name] = port
            self._ports = hashed
        return self._ports

    def listing(self) -> Mapping[str, str]:
        return {name: port.tree_id for name, port in self._hashed().items()}

    def _port(self, name: str) -> HashedDirectory:
        port = self._hashed().get(name)
        if port is None:
            raise GitError(str(self.root), f"no port '{name}'")
        return port

    def read_port(self, name: str) -> PortFiles:
        port = self._port(name)
        recipe = next((f for f in port.files if f.path == RECIPE_FILE), None)
        paths = [f.path for f in port.files]
        mode = recipe.mode if recipe is not None else None
        return _port_files(name, paths, mode, port.contents.get(RECIPE_FILE))

    def export_port(self, name: str, dest: Path) -> None:
        source = self.root / PORTS_DIR / name
        dest.mkdir(parents=True, exist_ok=True)
        for entry in self._port(name).files:
            target = dest / entry.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if entry.mode == FileMode.SYMLINK:
                data = os.fsencode(os.readlink(source / entry.path))
            else:
                data = (source / entry.path).read_bytes()
            _write_file(target, entry.mode, data)

    def path_entry(self, path: str) -> PathEntry | None:
        return self._path(path).entry

    def read_file(self, path: str) -> bytes | None:
        entry = self.path_entry(path)
        if entry is None or entry.mode not in (FileMode.REGULAR, FileMode.EXECUTABLE):
            return None
        return (self.root / path).read_bytes()

    def export_path(self, path: str, dest: Path) -> None:
        hashed = self._path(path)
        if hashed.entry is None:
            raise GitError(str(self.root), f"no '{path}' (or git would not record it)")
        source = self.root / path
        if hashed.directory is not None:
            dest.mkdir(parents=True)
            for entry in hashed.directory.files:
                target = dest / entry.path
                target.parent.mkdir(parents=True, exist_ok=True)
                _write_file(target, entry.mode, _read_entry(source / entry.path, entry.mode))
            copied = hash_directory(dest)
            exported = copied.tree_id if copied is not None else None
        else:
            mode = _MODES[hashed.entry.mode]
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = _read_entry(source, mode)
            _write_file(dest, mode, data)
            exported = hash_object("blob", data).hex()
        # The key was computed from the hash taken when the tree was read: a build must
        # not get other content under that key because someone kept editing meanwhile.
        if exported != hashed.entry.id:
            raise GitError(str(self.root), f"'{path}' changed after the tree was read; run again")

    def _path(self, path: str) -> _HashedPath:
        known = self._paths.get(path)
        if known is None:
            known = self._paths[path] = _hash_path(self.root, path, self._ignore_rules())
        return known

    def _ignore_rules(self) -> Callable[[Path], bool] | None:
        if self._ignored is None:
            self._ignored = (_ignore_rules(self.root),)
        return self._ignored[0]


@dataclass(frozen=True, slots=True)
class _HashedPath:
    """A path of a plain directory tree as git would record it (``entry`` None: it would
    not), with the files hashed when it is a directory."""

    entry: PathEntry | None
    directory: HashedDirectory | None = None


def _hash_path(root: Path, path: str, ignored: Callable[[Path], bool] | None) -> _HashedPath:
    """Hash ``root/path`` without following a symlink anywhere on the way, as git would
    see it: a component that is a symlink, or ignored, hides everything below it."""
    current = root
    *parents, last = path.split("/")
    try:
        for part in parents:
            current = current / part
            if not stat.S_ISDIR(current.lstat().st_mode) or (ignored and ignored(current)):
                return _HashedPath(None)
        current = current / last
        info = current.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return _HashedPath(None)
    if ignored is not None and ignored(current):
        return _HashedPath(None)
    if stat.S_ISDIR(info.st_mode):
        directory = hash_directory(current, ignored=ignored)
        if directory is None:  # no files: git cannot record it
            return _HashedPath(None)
        return _HashedPath(PathEntry(FileMode.TREE, directory.tree_id), directory)
    if stat.S_ISLNK(info.st_mode):
        mode = FileMode.SYMLINK
    elif stat.S_ISREG(info.st_mode):
        mode = FileMode.EXECUTABLE if info.st_mode & stat.S_IXUSR else FileMode.REGULAR
    else:  # sockets, fifos, devices: git records none of them
        return _HashedPath(None)
    return _HashedPath(PathEntry(mode, hash_object("blob", _read_entry(current, mode)).hex()))


def _read_entry(path: Path, mode: FileMode) -> bytes:
    """A file's blob content as git stores it: a symlink's is its target."""
    return os.fsencode(os.readlink(path)) if mode == FileMode.SYMLINK else path.read_bytes()


def _ignore_rules(base: Path) -> Callable[[Path], bool] | None:
    """A predicate for paths under ``base`` that git ignores, if ``base`` is inside a git
    work tree."""
    found = pygit2.discover_repository(str(base))
    if found is None:
        return None
    repo = pygit2.Repository(found)
    if repo.workdir is None:
        return None
    try:
        inside = Path(os.path.realpath(base)).relative_to(os.path.realpath(repo.workdir))
    except ValueError:
        return None

    def ignored(path: Path) -> bool:
        # Never resolve ``path`` itself: it may be a symlink pointing anywhere.
        relative = inside / path.relative_to(base)
        return bool(repo.path_is_ignored(relative.as_posix()))

    return ignored
