"""The signed binary repository on disk, published one package at a time.

Layout of ``<root>/<arch>/`` (everything but ``index*`` and ``packages/`` is private)::

    index.msgpack.zst            the index (portsd.core.index), signed by
    index.msgpack.zst.minisig    ... this minisign signature (stock ``minisign -V`` checks it)
    packages/<file>              package files, never overwritten, never renamed
    packages/<file>.minisig      one signature per package, so a copy stays verifiable
    keys/<build key>             the entry of every package ever published, in the index
                                 or not: after a revert an old key is found, not rebuilt
    .tmp/                        staging; whatever is left there was killed mid-write
    .lock                        flock(2): one writer at a time, across threads and processes

Every operation that writes takes the exclusive lock, first finishes or discards whatever a
killed writer left (see below), re-reads the current index from disk (another process may
have published since), and writes each file as temp + fsync + rename + directory fsync.
Publishing a package writes, in this order: its ``.minisig``, the package itself
(``link``, which cannot replace a file of the same name), an fsync, its ``keys/`` record
(the commit point of the store: ``stored_keys`` lists only keys whose files are all
there), an fsync, and only then a new index that names it. So whatever instant a writer
dies, every file the served index names is complete, and every recorded key has its
package and signature; a package a kill left without its record is adopted by the next
publish of its key if it is byte-identical, refused otherwise.

The index and its signature are two files, so no rename order lets an HTTP reader that
fetches them with two requests always see a matching pair: if a publish lands between its
two requests, the reader holds one old and one new file whichever order the renames take;
the window is the reader's own gap between the requests, and the client retries once on a
mismatch. Readers in this module take a shared lock and never see a torn pair. The order
matters for a writer killed *between* the two renames, and there we chose: both files are
staged and fsynced in ``.tmp/`` first, the index is renamed in, then its signature. A
writer killed between the renames leaves the new index plus the new signature still in
``.tmp/``; the next writer (or ``Repository`` opening with the key) verifies that
signature against the index in place and renames it in. Recovery is a rename of bytes
signed before the crash: nothing is re-signed from whatever happens to be on disk, so a
tampered file never gets a fresh signature. Until that recovery, clients see a mismatch
and fail closed; the daemon, which serves and publishes, recovers when it restarts.

A build key has one package: when a key is published again, the package already stored
under its file name wins (it is an equally good build of the same inputs) and the new
file is discarded, so a published file never changes under a resuming download or a cache.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from portsd.core.index import (
    ARCH_PATTERN,
    Index,
    IndexEntry,
    decode_entry,
    decode_index,
    encode_entry,
    encode_index,
    successor,
    with_entry,
    without,
)
from portsd.core.metadata import PackageMeta
from portsd.errors import BadSignature, RepoError
from portsd.fsio import feed_file, fsync_dir, write_synced
from portsd.pkg.sign import PublicKey, SecretKey, verify, verify_file

DEFAULT_EXPIRY = 7 * 24 * 3600
"""Seconds an index stays valid; the daemon re-signs (``refresh``) well before that."""

INDEX_NAME = "index.msgpack.zst"
SIG_SUFFIX = ".minisig"
_PENDING_SIG = "pending-index.minisig"
_CHUNK = 1 << 20

_FileId = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Stored:
    """A package the repository holds, listed in the index or not."""

    entry: IndexEntry
    stored_at: float  # when its record was written (time.time())


class Repository:
    """One architecture of a signed repository.

    ``Repository(root, arch, secret_key)`` opens it for writing (creating it, with an empty
    signed index, if needed, and recovering from a killed writer); ``Repository.reader``
    opens it read-only and verifies the index against trusted keys. Instances may be shared
    between threads; any number of processes may publish into one repository at once.
    """

    __slots__ = (
        "arch",
        "path",
        "_secret",
        "_cosigners",
        "_trusted",
        "_expires_in",
        "_clock",
        "_cache",
    )

    def __init__(
        self,
        root: str | os.PathLike[str],
        arch: str,
        secret_key: SecretKey | None,
        *,
        trusted: Sequence[PublicKey] = (),
        expires_in: int = DEFAULT_EXPIRY,
        clock: Callable[[], float] = time.time,
        cosigners: Sequence[SecretKey] = (),
    ) -> None:
        if not ARCH_PATTERN.fullmatch(arch):
            raise ValueError(f"not an architecture: {arch!r}")
        self.arch = arch
        self.path = Path(root) / arch
        self._secret = secret_key
        # keys that sign beside it, after it (a rotation: the next key; see _sign)
        self._cosigners = tuple(cosigners) if secret_key is not None else ()
        own = tuple(k.public_key for k in (secret_key, *self._cosigners) if k is not None)
        self._trusted = (*own, *trusted)
        self._expires_in = expires_in
        self._clock = clock
        # (index file identity, signature file identity or None if unverified) -> index:
        # decode and verify only when a writer replaced the files
        self._cache: tuple[_FileId, _FileId | None, Index] | None = None
        if secret_key is not None:
            with _os_errors(self.path):
                self._create()

    @classmethod
    def reader(
        cls, root: str | os.PathLike[str], arch: str, keys: Sequence[PublicKey]
    ) -> Repository:
        """Open read-only: nothing is created or repaired; ``index`` trusts only ``keys``."""
        if not keys:
            raise ValueError("a read-only repository needs at least one trusted key")
        return cls(root, arch, None, trusted=keys)

    # -- paths -----------------------------------------------------------------------------

    @property
    def index_path(self) -> Path:
        return self.path / INDEX_NAME

    @property
    def signature_path(self) -> Path:
        return self.path / (INDEX_NAME + SIG_SUFFIX)

    @property
    def packages_path(self) -> Path:
        return self.path / "packages"

    def package_path(self, entry: IndexEntry) -> Path:
        return self.packages_path / entry.file

    @property
    def _keys(self) -> Path:
        return self.path / "keys"

    @property
    def _tmp(self) -> Path:
        return self.path / ".tmp"

    # -- reading ---------------------------------------------------------------------------

    def index(self) -> Index:
        """The current index, its signature verified against the trusted keys.

        Raises ``BadSignature`` if it does not verify (read under a shared lock, so a
        publish in progress is never mistaken for a bad signature), ``RepoError`` if the
        index is missing or malformed. A writer first repairs what another, killed, writer
        may have left half-renamed.
        """
        try:
            return self._read_index()
        except BadSignature:
            if self._secret is None:
                raise
            with _os_errors(self.path), self._locked():
                self._recover()
            return self._read_index()

    def _read_index(self) -> Index:
        with _os_errors(self.path), self._locked(shared=True):
            try:
                index_id, sig_id = _file_id(self.index_path), _file_id(self.signature_path)
            except FileNotFoundError:
                raise RepoError(str(self.path), "no index: not a repository") from None
            cached = self._cache
            if cached is not None and cached[:2] == (index_id, sig_id):
                return cached[2]
            data = self.index_path.read_bytes()
            signature = self.signature_path.read_text(encoding="utf-8", errors="replace")
            verify(data, signature, self._trusted, label=str(self.index_path))
            index = decode_index(data, str(self.index_path))
            if index.arch != self.arch:
                raise RepoError(str(self.index_path), f"index is for {index.arch}")
            self._cache = (index_id, sig_id, index)
            return index

    def find_key(self, key: str) -> IndexEntry | None:
        """The package built with ``key``, in the index or not, if its files are all there."""
        if len(key) != 64 or key.strip("0123456789abcdef"):
            return None  # not a key; never a path
        record = self._keys / key
        with _os_errors(self.path):
            try:
                entry = decode_entry(record.read_bytes(), str(record))
            except FileNotFoundError:
                return None
            package = self.package_path(entry)
            try:
                size = package.stat().st_size
            except FileNotFoundError:
                return None  # removed by hand (a record comes after its package)
            if size != entry.size or not _exists(package.with_name(entry.file + SIG_SUFFIX)):
                return None
            return entry

    def stored_keys(self) -> frozenset[str]:
        """Every build key with a record, listed in one directory read (cheap for planning).

        A record is written only once its package and signature are durable, so only a
        file removed by hand can be missing; ``find_key`` checks the files themselves.
        """
        with _os_errors(self.path):
            try:
                return frozenset(name for name in os.listdir(self._keys) if len(name) == 64)
            except FileNotFoundError:
                return frozenset()

    def check(self) -> tuple[str, ...]:
        """Every problem a client would hit, as messages; empty when all is well.

        Reads every package in the index: its size, sha256 and signature.
        """
        try:
            index = self.index()
        except RepoError as error:
            return (str(error),)
        problems: list[str] = []
        for entry in index:
            path = self.package_path(entry)
            try:
                size, sha256 = _hash_file(path)
                signature = path.with_name(entry.file + SIG_SUFFIX).read_text(encoding="utf-8")
                verify_file(path, signature, self._trusted)
            except OSError as error:
                problems.append(f"{path}: {error.strerror}")
                continue
            except BadSignature as error:
                problems.append(str(error))
                continue
            if (size, sha256) != (entry.size, entry.sha256):
                problems.append(
                    f"{path}: expected {entry.size} bytes with sha256 {entry.sha256}, "
                    f"found {size} bytes with sha256 {sha256}"
                )
        return tuple(problems)

    # -- writing ---------------------------------------------------------------------------

    def publish(
        self,
        package: str | os.PathLike[str],
        meta: PackageMeta,
        *,
        content: str,
        commit: str | None,
    ) -> IndexEntry:
        """Move ``package`` (of content id ``content``) into the repository and publish a
        new index that lists it.

        The entry replaces any entry of the same name. If the repository already holds a
        package for ``meta.build_key``, that one is published and ``package`` is discarded (the
        returned entry says which file is served). ``package`` is gone on success; on
        error it is left in place. ``commit`` becomes the index's commit. Cheapest when
        ``package`` is on the repository's filesystem (a hard link); otherwise it is copied
        while the lock is held.
        """
        self._writable()
        if meta.arch not in (self.arch, "any"):
            raise RepoError(str(package), f"a package for {meta.arch} in a {self.arch} repository")
        source = Path(package)
        filename = meta.filename
        with _os_errors(source):
            # the expensive reads happen before taking the lock
            size, sha256 = _hash_file(source)
            signature = self._sign_file(source, filename, meta.build_key)
        with _os_errors(self.path), self._locked():
            self._recover()
            target = self.packages_path / filename
            entry = self._stored(meta, target, size, sha256, content, signature)
            if entry is None:
                try:
                    entry = IndexEntry(meta, filename, size, sha256, content)
                except ValueError as error:
                    raise RepoError(str(source), f"cannot be published: {error}") from None
                self._store(source, entry, signature)
            self._replace_index(with_entry(self._current(), entry), commit)
        if source.resolve() != target.resolve():
            source.unlink(missing_ok=True)
        return entry

    def restore(self, key: str, *, commit: str | None) -> IndexEntry:
        """Publish again the package of ``key`` that is stored but not (or no longer) listed.

        Its file is re-hashed first: only a package that is exactly what its record says
        goes back into the index.
        """
        self._writable()
        entry = self.find_key(key)
        if entry is None:
            raise RepoError(str(self.path), f"no stored package has build key {key}")
        path = self.package_path(entry)
        with _os_errors(path):
            size, sha256 = _hash_file(path)
        if (size, sha256) != (entry.size, entry.sha256):
            raise RepoError(str(path), f"does not match its record (sha256 {sha256})")
        with _os_errors(self.path), self._locked():
            self._recover()
            self._replace_index(with_entry(self._current(), entry), commit)
        return entry

    def unpublish(self, names: Collection[str], *, commit: str | None) -> tuple[str, ...]:
        """Drop ``names`` from the index (their files stay, for ``find_key``); the removed."""
        self._writable()
        if isinstance(names, str):
            raise TypeError("unpublish takes a collection of names, not one string")
        with _os_errors(self.path), self._locked():
            self._recover()
            index = self._current()
            removed = tuple(name for name in index.names() if name in names)
            self._replace_index(without(index, names), commit)
        return removed

    def refresh(self, expires_in: int | None = None) -> Index:
        """Re-sign the current index with a new expiry (and a new serial); the new index."""
        self._writable()
        with _os_errors(self.path), self._locked():
            self._recover()
            index = self._current()
            return self._write_index(index, index.commit, force=True, expires_in=expires_in)

    def prune(
        self,
        choose: Callable[[Index, Sequence[Stored]], Collection[str]],
        *,
        dry_run: bool = False,
    ) -> tuple[IndexEntry, ...]:
        """Remove the stored packages whose build keys ``choose`` names, given the current
        index and everything stored; returns them. Under the writers' lock (nothing is
        published meanwhile), and never a package the current index lists. Each goes record
        first (``stored_keys`` and ``find_key`` stop offering it), then its signature and
        file; a download already under way keeps reading the file it opened."""
        with _os_errors(self.path), self._locked():
            if self._secret is not None:
                self._recover()
            index = self._current()
            listed = {entry.meta.build_key for entry in index}
            stored = self._all_stored()
            chosen = set(choose(index, stored)) - listed
            doomed = tuple(s.entry for s in stored if s.entry.meta.build_key in chosen)
            if dry_run or not doomed:
                return doomed
            for entry in doomed:
                (self._keys / entry.meta.build_key).unlink(missing_ok=True)
            fsync_dir(self._keys)
            for entry in doomed:
                path = self.package_path(entry)
                path.with_name(entry.file + SIG_SUFFIX).unlink(missing_ok=True)
                path.unlink(missing_ok=True)
            fsync_dir(self.packages_path)
        return doomed

    def resign(self) -> int:
        """Sign every stored package and the index again with this repository's keys (a
        key rotation: both keys, then the new one); the index gets a new serial. Returns
        how many packages were signed."""
        self._writable()
        with _os_errors(self.path), self._locked():
            self._recover()
            stored = self._all_stored()
            for item in stored:
                entry = item.entry
                path = self.package_path(entry)
                signature = self._sign_file(path, entry.file, entry.meta.build_key)
                self._write_file(path.with_name(entry.file + SIG_SUFFIX), signature.encode())
            fsync_dir(self.packages_path)
            index = self._current()
            self._write_index(index, index.commit, force=True, expires_in=None)
        return len(stored)

    def _signers(self) -> tuple[SecretKey, ...]:
        """The keys that sign, the current one first: stock minisign reads only the first
        signature of a file, and clients not yet given the next key trust the current."""
        return (self._writable(), *self._cosigners)

    def _sign_file(self, path: Path, filename: str, build_key: str) -> str:
        comment = f"timestamp:{self._now()}\tfile:{filename}\tkey:{build_key}"
        return "".join(key.sign_file(path, comment) for key in self._signers())

    def _all_stored(self) -> list[Stored]:
        found = []
        for item in os.scandir(self._keys):
            if len(item.name) != 64:
                continue
            entry = decode_entry(Path(item.path).read_bytes(), item.path)
            found.append(Stored(entry, item.stat().st_mtime))
        return found

    # -- internals -------------------------------------------------------------------------

    def _writable(self) -> SecretKey:
        if self._secret is None:
            raise RepoError(str(self.path), "repository opened read-only")
        return self._secret

    def _now(self) -> int:
        return int(self._clock())

    def _create(self) -> None:
        for directory in (self.path, self.packages_path, self._keys, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._recover()
            if not self.index_path.exists():
                empty = Index.empty(self.arch, now=self._now(), expires_in=self._expires_in)
                self._write_signed(empty)

    @contextmanager
    def _locked(self, *, shared: bool = False) -> Iterator[None]:
        # a fresh open file description per acquisition: flock then excludes threads too
        try:
            flags = os.O_RDONLY if shared else os.O_RDWR | os.O_CREAT
            fd = os.open(self.path / ".lock", flags | os.O_CLOEXEC, 0o644)
        except (FileNotFoundError, PermissionError):
            if not shared:
                raise
            yield  # a read-only reader of a repository it cannot lock: verify and retry
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _recover(self) -> None:
        """Finish or discard what a killed writer left in ``.tmp`` (caller holds the lock)."""
        pending = self._tmp / _PENDING_SIG
        assert self._secret is not None
        if pending.exists() and self.index_path.exists():
            try:
                verify(
                    self.index_path.read_bytes(),
                    pending.read_text(encoding="utf-8", errors="replace"),
                    [key.public_key for key in self._signers()],
                )
            except BadSignature:
                pass  # killed before the index was renamed in: the old pair stands
            else:
                os.replace(pending, self.signature_path)
                fsync_dir(self.path)
        for stray in self._tmp.iterdir():
            stray.unlink()

    def _current(self) -> Index:
        """The index on disk, trusted without verification (caller holds the lock)."""
        index_id = _file_id(self.index_path)
        cached = self._cache
        if cached is not None and cached[0] == index_id:
            return cached[2]
        index = decode_index(self.index_path.read_bytes(), str(self.index_path))
        self._cache = (index_id, None, index)
        return index

    def _stored(
        self, meta: PackageMeta, target: Path, size: int, sha256: str, content: str, signature: str
    ) -> IndexEntry | None:
        """The entry of the package already stored as ``target``, if there is one."""
        if not _exists(target):
            return None
        entry = self.find_key(meta.build_key)
        if entry is not None and self.package_path(entry) == target:
            return entry
        # a file without a complete record (placed by hand?): adopt it only if identical
        if _hash_file(target) != (size, sha256):
            raise RepoError(
                str(target), "a different file is stored under this name; refusing to replace it"
            )
        entry = IndexEntry(meta, target.name, size, sha256, content)
        self._store(None, entry, signature)
        return entry

    def _store(self, source: Path | None, entry: IndexEntry, signature: str) -> None:
        """Sign, move in (unless ``source`` is None) and record a package; caller has the lock.

        The record comes last and durably after the files: it is the commit point of the
        store, so ``stored_keys`` never lists a key whose package a kill left half-stored.
        """
        target = self.packages_path / entry.file
        self._write_file(target.with_name(entry.file + SIG_SUFFIX), signature.encode("ascii"))
        if source is not None:
            staged = self._tmp / f"package-{secrets.token_hex(8)}"
            _stage(source, staged, entry.sha256)
            os.link(staged, target)  # never replaces: checked under the lock, link re-checks
            staged.unlink()
        fsync_dir(self.packages_path)
        self._write_file(self._keys / entry.meta.build_key, encode_entry(entry))
        fsync_dir(self._keys)

    def _replace_index(self, index: Index, commit: str | None) -> None:
        self._write_index(index, commit, force=False, expires_in=None)

    def _write_index(
        self, index: Index, commit: str | None, *, force: bool, expires_in: int | None
    ) -> Index:
        current = self._current()
        if not force and index == current and commit == current.commit:
            return current  # nothing changed: the serial means "new content"
        expires = self._expires_in if expires_in is None else expires_in
        new = successor(index, now=self._now(), expires_in=expires, commit=commit)
        self._write_signed(new)
        return new

    def _write_signed(self, index: Index) -> None:
        """Swap in ``index`` and its signature (order: see the module docstring)."""
        data = encode_index(index)
        comment = f"timestamp:{index.generated}\tfile:{INDEX_NAME}\tserial:{index.serial}"
        signature = "".join(key.sign(data, comment) for key in self._signers())
        staged_index = self._tmp / INDEX_NAME
        staged_sig = self._tmp / _PENDING_SIG
        write_synced(staged_index, data)
        write_synced(staged_sig, signature.encode("ascii"))
        fsync_dir(self._tmp)
        os.replace(staged_index, self.index_path)
        os.replace(staged_sig, self.signature_path)
        fsync_dir(self.path)
        self._cache = (_file_id(self.index_path), _file_id(self.signature_path), index)

    def _write_file(self, path: Path, data: bytes) -> None:
        staged = self._tmp / f"file-{secrets.token_hex(8)}"
        write_synced(staged, data)
        os.replace(staged, path)


class StoredContents:
    """The content ids of a repository's stored packages by build key: what keys are
    computed from (``portsd.core.keys.Contents``). A key's package never changes, so each
    content id found is remembered; a key not (yet) stored is looked up again."""

    __slots__ = ("_repo", "_known")

    def __init__(self, repo: Repository) -> None:
        self._repo = repo
        self._known: dict[str, str] = {}

    def get(self, key: str, /) -> str | None:
        found = self._known.get(key)
        if found is None:
            entry = self._repo.find_key(key)
            if entry is None:
                return None
            found = self._known[key] = entry.content
        return found


def _stage(source: Path, staged: Path, sha256: str) -> None:
    """Put ``source`` at ``staged`` (same filesystem as the repository), durably."""
    try:
        os.link(source, staged)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        digest = hashlib.sha256()
        with open(source, "rb") as src, open(staged, "xb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != sha256:
            raise RepoError(str(source), "changed while it was being published") from None
    fd = os.open(staged, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchmod(fd, 0o644)  # served to anyone who may read the repository
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = feed_file(digest, path)
    return size, digest.hexdigest()


def _file_id(path: Path) -> _FileId:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


@contextmanager
def _os_errors(path: Path) -> Iterator[None]:
    """Report an OSError as a RepoError naming the file it concerns."""
    try:
        yield
    except OSError as error:
        where = error.filename if error.filename is not None else path
        raise RepoError(str(where), error.strerror or str(error)) from error
