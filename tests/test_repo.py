"""The repository on disk: stock minisign, concurrent writers, and writers killed with -9."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from portsd.core.metadata import PackageMeta
from portsd.errors import BadSignature, RepoError
from portsd.pkg.repo import DEFAULT_EXPIRY, INDEX_NAME, SIG_SUFFIX, Repository
from portsd.pkg.sign import PublicKey, SecretKey

ARCH = "x86_64"
MINISIGN = shutil.which("minisign")
CONTENT = "c" * 64  # the content id: these packages are stand-in bytes


def build_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def meta(name: str, version: str = "1.0", arch: str = ARCH) -> PackageMeta:
    return PackageMeta(
        name=name,
        version=version,
        release=1,
        arch=arch,
        build_key=build_key(f"{name}-{version}-{arch}"),
        summary=f"the {name} package",
        depends=("musl",),
    )


def package(directory: Path, label: str, size: int = 3000) -> Path:
    path = directory / f"{label}.build"
    path.write_bytes(label.encode() + os.urandom(size))
    return path


def minisign_verifies(public: Path, path: Path) -> bool:
    assert MINISIGN is not None, "the minisign binary is required"
    result = subprocess.run(
        [MINISIGN, "-Vq", "-p", str(public), "-m", str(path)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return result.returncode == 0


@pytest.fixture
def key(tmp_path: Path) -> SecretKey:
    secret = SecretKey.generate()
    secret.save(tmp_path / "repo.key")
    secret.public_key.save(tmp_path / "repo.pub")
    return secret


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "build"
    path.mkdir()
    return path


@pytest.fixture
def repo(tmp_path: Path, key: SecretKey) -> Repository:
    return Repository(tmp_path / "repo", ARCH, key)


def assert_consistent(root: Path, public: PublicKey, pub_file: Path) -> int:
    """The invariants a client relies on; returns the serial."""
    arch = root / ARCH
    assert minisign_verifies(pub_file, arch / INDEX_NAME)
    reader = Repository.reader(root, ARCH, [public])
    assert reader.check() == ()
    return reader.index().serial


# -- publishing ----------------------------------------------------------------------------


def test_new_repository_serves_an_empty_signed_index(tmp_path: Path, key: SecretKey) -> None:
    repo = Repository(tmp_path / "repo", ARCH, key, clock=lambda: 1_000_000.7)
    index = repo.index()
    assert (index.serial, index.packages, index.commit) == (1, (), None)
    assert (index.generated, index.expires) == (1_000_000, 1_000_000 + DEFAULT_EXPIRY)
    assert minisign_verifies(tmp_path / "repo.pub", repo.index_path)
    # opening again changes nothing
    Repository(tmp_path / "repo", ARCH, key)
    assert repo.index().serial == 1


def test_publish_several(tmp_path: Path, key: SecretKey, repo: Repository, work: Path) -> None:
    serials = []
    for n, name in enumerate(["zlib", "musl", "busybox", "zstd"]):
        source = package(work, name)
        data = source.read_bytes()
        entry = repo.publish(source, meta(name), content=CONTENT, commit=f"c{n}")
        assert not source.exists()  # moved in
        stored = repo.package_path(entry)
        assert stored.read_bytes() == data
        assert stat.S_IMODE(stored.stat().st_mode) == 0o644
        assert (entry.size, entry.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert entry.file == meta(name).filename
        assert minisign_verifies(tmp_path / "repo.pub", stored)
        serials.append(repo.index().serial)
    assert serials == [2, 3, 4, 5]
    index = repo.index()
    assert index.names() == ("busybox", "musl", "zlib", "zstd")
    assert index.commit == "c3"
    assert minisign_verifies(tmp_path / "repo.pub", repo.index_path)
    assert repo.check() == ()
    trusted = repo.signature_path.read_text().splitlines()[2]
    assert trusted == f"trusted comment: timestamp:{index.generated}\tfile:{INDEX_NAME}\tserial:5"


def test_same_name_is_replaced(repo: Repository, work: Path) -> None:
    repo.publish(package(work, "a"), meta("zlib", "1.0"), content=CONTENT, commit="c1")
    newer = repo.publish(package(work, "b"), meta("zlib", "1.1"), content=CONTENT, commit="c2")
    assert repo.index().packages == (newer,)
    assert repo.index().serial == 3


def test_republishing_the_same_key_keeps_the_first_file(repo: Repository, work: Path) -> None:
    first = repo.publish(package(work, "one"), meta("zlib"), content=CONTENT, commit="c1")
    before = repo.package_path(first).read_bytes()
    again = package(work, "two")  # same key, different bytes: a non-reproducible rebuild
    entry = repo.publish(again, meta("zlib"), content=CONTENT, commit="c1")
    assert entry == first
    assert repo.package_path(first).read_bytes() == before
    assert not again.exists()
    assert repo.index().serial == 2  # nothing changed, so no new index
    repo.publish(package(work, "three"), meta("zlib"), content=CONTENT, commit="c2")
    assert (repo.index().serial, repo.index().commit) == (3, "c2")


def test_a_foreign_file_under_the_name_is_never_replaced(repo: Repository, work: Path) -> None:
    target = repo.packages_path / meta("zlib").filename
    target.write_bytes(b"someone else's bytes")
    source = package(work, "zlib")
    with pytest.raises(RepoError, match="different file is stored under this name") as info:
        repo.publish(source, meta("zlib"), content=CONTENT, commit="c1")
    assert str(target) in str(info.value)
    assert source.exists() and target.read_bytes() == b"someone else's bytes"
    assert repo.index().serial == 1


def test_an_identical_unrecorded_file_is_adopted(repo: Repository, work: Path) -> None:
    source = package(work, "zlib")
    (repo.packages_path / meta("zlib").filename).write_bytes(source.read_bytes())
    entry = repo.publish(source, meta("zlib"), content=CONTENT, commit="c1")
    assert repo.find_key(entry.meta.build_key) == entry
    assert repo.check() == ()


def test_wrong_architecture_is_refused(repo: Repository, work: Path) -> None:
    with pytest.raises(RepoError, match="a package for aarch64 in a x86_64 repository"):
        repo.publish(package(work, "x"), meta("zlib", arch="aarch64"), content=CONTENT, commit=None)
    entry = repo.publish(
        package(work, "y"), meta("tzdata", arch="any"), content=CONTENT, commit=None
    )
    assert entry.file.endswith(f"-any-{entry.meta.build_key[:12]}.pkg.tar.zst")


def test_unusable_names_are_refused(
    tmp_path: Path, key: SecretKey, repo: Repository, work: Path
) -> None:
    with pytest.raises(ValueError, match="not an architecture"):
        Repository(tmp_path / "repo", "../escape", key)
    source = package(work, "long")
    with pytest.raises(RepoError, match="cannot be published: file: not a plain file name"):
        repo.publish(source, meta("a" * 250), content=CONTENT, commit=None)
    assert source.exists() and repo.index().serial == 1


def test_a_missing_source_names_it(repo: Repository, work: Path) -> None:
    with pytest.raises(RepoError, match="No such file") as info:
        repo.publish(work / "absent", meta("zlib"), content=CONTENT, commit=None)
    assert "absent" in str(info.value)


def test_copy_across_filesystems(repo: Repository) -> None:
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == repo.path.stat().st_dev:
        pytest.skip("needs a second filesystem (/dev/shm) to exercise the copy path")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        source = package(Path(other), "zlib", size=3 << 20)
        data = source.read_bytes()
        entry = repo.publish(source, meta("zlib"), content=CONTENT, commit="c1")
        assert not source.exists()
    assert repo.package_path(entry).read_bytes() == data
    assert repo.check() == ()


# -- archive, removal, expiry --------------------------------------------------------------


def test_find_key_finds_superseded_packages(repo: Repository, work: Path) -> None:
    old = repo.publish(package(work, "old"), meta("zlib", "1.0"), content=CONTENT, commit="c1")
    new = repo.publish(package(work, "new"), meta("zlib", "1.1"), content=CONTENT, commit="c2")
    assert repo.index().by_key(old.meta.build_key) is None
    assert repo.find_key(old.meta.build_key) == old
    assert repo.find_key(new.meta.build_key) == new
    # a revert: the old key is wanted again and comes back without a rebuild
    restored = repo.restore(old.meta.build_key, commit="c3")
    assert restored == old
    index = repo.index()
    assert (index.packages, index.serial, index.commit) == ((old,), 4, "c3")
    assert repo.check() == ()


def test_find_key_of_unknown_or_malformed_keys(repo: Repository) -> None:
    assert repo.find_key(build_key("never built")) is None
    for bad in ("", "../../../etc/passwd", "AB" * 32, "ab" * 31, "ab" * 33):
        assert repo.find_key(bad) is None
    with pytest.raises(RepoError, match="no stored package has build key"):
        repo.restore(build_key("never built"), commit=None)


def test_restore_refuses_a_damaged_file(repo: Repository, work: Path) -> None:
    old = repo.publish(package(work, "old"), meta("zlib", "1.0"), content=CONTENT, commit="c1")
    repo.publish(package(work, "new"), meta("zlib", "1.1"), content=CONTENT, commit="c2")
    path = repo.package_path(old)
    path.write_bytes(b"x" * old.size)  # same size, other bytes
    with pytest.raises(RepoError, match="does not match its record"):
        repo.restore(old.meta.build_key, commit="c3")
    assert repo.index().serial == 3


def test_unpublish(tmp_path: Path, repo: Repository, work: Path) -> None:
    entries = [
        repo.publish(package(work, n), meta(n), content=CONTENT, commit="c")
        for n in ("a", "b", "c")
    ]
    assert repo.unpublish(["b", "zz"], commit="c2") == ("b",)
    index = repo.index()
    assert (index.names(), index.serial, index.commit) == (("a", "c"), 5, "c2")
    assert repo.package_path(entries[1]).exists()  # kept for find_key
    assert repo.find_key(entries[1].meta.build_key) == entries[1]
    assert repo.unpublish(["b"], commit="c2") == ()
    assert repo.index().serial == 5
    assert minisign_verifies(tmp_path / "repo.pub", repo.index_path)


def test_refresh_resigns_with_new_expiry(tmp_path: Path, key: SecretKey, work: Path) -> None:
    now = [5_000_000.0]
    repo = Repository(tmp_path / "repo", ARCH, key, expires_in=3600, clock=lambda: now[0])
    repo.publish(package(work, "a"), meta("a"), content=CONTENT, commit="c1")
    before = repo.index()
    assert before.expires == 5_003_600
    now[0] += 1800
    after = repo.refresh(expires_in=60)
    assert repo.index() == after
    assert (after.serial, after.generated, after.expires) == (
        before.serial + 1,
        5_001_800,
        5_001_860,
    )
    assert (after.packages, after.commit) == (before.packages, before.commit)
    assert minisign_verifies(tmp_path / "repo.pub", repo.index_path)


# -- readers -------------------------------------------------------------------------------


def test_reader_trusts_only_its_keys(tmp_path: Path, repo: Repository, work: Path) -> None:
    repo.publish(package(work, "a"), meta("a"), content=CONTENT, commit="c1")
    root = tmp_path / "repo"
    other = SecretKey.generate().public_key
    with pytest.raises(BadSignature, match="unknown key"):
        Repository.reader(root, ARCH, [other]).index()
    reader = Repository.reader(root, ARCH, [other, repo_public(tmp_path)])
    assert reader.index().names() == ("a",)
    with pytest.raises(RepoError, match="read-only"):
        reader.publish(package(work, "b"), meta("b"), content=CONTENT, commit=None)
    with pytest.raises(RepoError, match="no index"):
        Repository.reader(tmp_path / "elsewhere", ARCH, [other]).index()


def repo_public(tmp_path: Path) -> PublicKey:
    return PublicKey.load(tmp_path / "repo.pub")


def test_tampering_is_caught(tmp_path: Path, repo: Repository, work: Path) -> None:
    entry = repo.publish(package(work, "a"), meta("a"), content=CONTENT, commit="c1")
    reader = Repository.reader(tmp_path / "repo", ARCH, [repo_public(tmp_path)])
    stored = repo.package_path(entry)
    stored.write_bytes(stored.read_bytes()[:-1] + b"\0")
    problems = reader.check()
    assert len(problems) == 1 and "bad signature" in problems[0]
    data = bytearray(repo.index_path.read_bytes())
    data[-1] ^= 0xFF
    repo.index_path.write_bytes(bytes(data))
    with pytest.raises(BadSignature, match="bad signature"):
        reader.index()
    assert not minisign_verifies(tmp_path / "repo.pub", repo.index_path)


# -- concurrency ---------------------------------------------------------------------------


def publish_many(root: str, key_file: str, work: str, prefix: str, count: int) -> None:
    """Runs in a child process: publish ``count`` packages named ``<prefix><n>``."""
    repo = Repository(root, ARCH, SecretKey.load(key_file))
    for n in range(count):
        name = f"{prefix}{n}"
        repo.publish(package(Path(work), name), meta(name), content=CONTENT, commit=name)


def test_two_processes_publishing_lose_nothing(tmp_path: Path, key: SecretKey, work: Path) -> None:
    root = tmp_path / "repo"
    Repository(root, ARCH, key)
    context = multiprocessing.get_context("spawn")
    count = 25
    children = [
        context.Process(
            target=publish_many,
            args=(str(root), str(tmp_path / "repo.key"), str(work), prefix, count),
        )
        for prefix in ("left", "right")
    ]
    for child in children:
        child.start()
    # meanwhile a reader never sees a torn index/signature pair, nor a serial going back
    reader = Repository.reader(root, ARCH, [key.public_key])
    seen = [reader.index().serial]
    while any(child.is_alive() for child in children):
        seen.append(reader.index().serial)
        time.sleep(0.001)
    for child in children:
        child.join(timeout=120)
        assert child.exitcode == 0
    assert seen == sorted(seen)
    index = reader.index()
    expected = {f"{prefix}{n}" for prefix in ("left", "right") for n in range(count)}
    assert set(index.names()) == expected
    assert index.serial == 1 + 2 * count
    assert assert_consistent(root, key.public_key, tmp_path / "repo.pub") == index.serial


def test_threads_publishing_lose_nothing(tmp_path: Path, key: SecretKey, work: Path) -> None:
    shared = Repository(tmp_path / "repo", ARCH, key)
    errors: list[BaseException] = []

    def run(repo: Repository, prefix: str) -> None:
        try:
            for n in range(10):
                name = f"{prefix}{n}"
                repo.publish(package(work, name), meta(name), content=CONTENT, commit=name)
        except BaseException as error:  # surfaced by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(shared, f"t{i}-")) for i in range(4)]
    threads.append(
        threading.Thread(target=run, args=(Repository(shared.path.parent, ARCH, key), "own-"))
    )
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert len(shared.index()) == 50 and shared.index().serial == 51
    assert shared.check() == ()


# -- crashes -------------------------------------------------------------------------------

CHILD = """
import sys
from pathlib import Path
sys.path[:0] = [sys.argv[5]]
from test_repo import ARCH, CONTENT, meta, package
from portsd.pkg.repo import Repository
from portsd.pkg.sign import SecretKey

root, key_file, work, start = sys.argv[1], sys.argv[2], Path(sys.argv[3]), int(sys.argv[4])
repo = Repository(root, ARCH, SecretKey.load(key_file))
print("ready", flush=True)
for n in range(start, start + 10_000):
    name = f"p{n % 9}"
    source = package(work, f"{n}", size=n % 7 * 5000)
    repo.publish(source, meta(name, f"1.{n}"), content=CONTENT, commit=f"c{n}")
    if n % 4 == 0:
        repo.unpublish([f"p{(n + 3) % 9}"], commit=f"u{n}")
    if n % 7 == 0:
        repo.refresh()
"""


def test_sigkill_at_random_moments_leaves_a_consistent_repository(
    tmp_path: Path, key: SecretKey, work: Path
) -> None:
    root = tmp_path / "repo"
    Repository(root, ARCH, key)
    rng = random.Random()
    serial = 1
    interrupted = 0
    for round_ in range(15):
        child = subprocess.Popen(
            [
                sys.executable,
                "-c",
                CHILD,
                str(root),
                str(tmp_path / "repo.key"),
                str(work),
                str(round_ * 1000),
                str(Path(__file__).parent),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=60)
        assert child.returncode == -signal.SIGKILL
        arch = root / ARCH
        staged = sorted(p.name for p in (arch / ".tmp").iterdir())
        interrupted += bool(staged)
        # before any repair: the served pair verifies, or the new signature is staged
        pending = arch / ".tmp" / "pending-index.minisig"
        if not minisign_verifies(tmp_path / "repo.pub", arch / INDEX_NAME):
            assert pending.exists()
            assert minisign_verifies_with(tmp_path / "repo.pub", arch / INDEX_NAME, pending)
        # reopening repairs and cleans; then every invariant holds
        repo = Repository(root, ARCH, key)
        assert list((arch / ".tmp").iterdir()) == []
        now = assert_consistent(root, key.public_key, tmp_path / "repo.pub")
        assert now >= serial
        serial = now
        for entry in repo.index():
            assert repo.find_key(entry.meta.build_key) == entry
            assert (arch / "packages" / (entry.file + SIG_SUFFIX)).exists()
        for stored in repo.stored_keys():  # a record means a whole package, kill or not
            assert repo.find_key(stored) is not None, stored
    assert serial > 15  # the children made progress between kills
    assert interrupted >= 1  # and at least one kill landed mid-write


def minisign_verifies_with(public: Path, path: Path, signature: Path) -> bool:
    assert MINISIGN is not None
    result = subprocess.run(
        [MINISIGN, "-Vq", "-p", str(public), "-m", str(path), "-x", str(signature)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    return result.returncode == 0


@pytest.mark.parametrize("repair", ["reopen", "live writer reads"])
def test_kill_between_the_two_renames_is_rolled_forward(
    tmp_path: Path, key: SecretKey, repo: Repository, work: Path, repair: str
) -> None:
    repo.publish(package(work, "a"), meta("a"), content=CONTENT, commit="c1")
    old_signature = repo.signature_path.read_bytes()
    repo.publish(package(work, "b"), meta("b"), content=CONTENT, commit="c2")
    new_signature = repo.signature_path.read_bytes()
    # the state a writer leaves when killed after renaming the index, before the signature
    repo.signature_path.write_bytes(old_signature)
    (repo.path / ".tmp" / "pending-index.minisig").write_bytes(new_signature)
    reader = Repository.reader(tmp_path / "repo", ARCH, [key.public_key])
    with pytest.raises(BadSignature):
        reader.index()  # fails closed until repaired
    if repair == "reopen":
        Repository(tmp_path / "repo", ARCH, key)
    else:
        assert repo.index().serial == 3
    assert reader.index().names() == ("a", "b")
    assert reader.index().serial == 3
    assert list((repo.path / ".tmp").iterdir()) == []
    assert minisign_verifies(tmp_path / "repo.pub", repo.index_path)


def test_kill_before_the_index_rename_keeps_the_old_pair(
    tmp_path: Path, key: SecretKey, repo: Repository, work: Path
) -> None:
    repo.publish(package(work, "a"), meta("a"), content=CONTENT, commit="c1")
    old_index, old_signature = repo.index_path.read_bytes(), repo.signature_path.read_bytes()
    repo.publish(package(work, "b"), meta("b"), content=CONTENT, commit="c2")
    tmp = repo.path / ".tmp"
    (tmp / INDEX_NAME).write_bytes(repo.index_path.read_bytes())
    (tmp / "pending-index.minisig").write_bytes(repo.signature_path.read_bytes())
    (tmp / "package-0123").write_bytes(b"half a package")
    repo.index_path.write_bytes(old_index)
    repo.signature_path.write_bytes(old_signature)
    # the next writer in another process discards the staged files before its own work
    again = Repository(tmp_path / "repo", ARCH, key)
    assert list(tmp.iterdir()) == []
    assert again.index().names() == ("a",) and again.index().serial == 2
    again.publish(package(work, "c"), meta("c"), content=CONTENT, commit="c3")
    assert again.index().names() == ("a", "c")
    assert assert_consistent(tmp_path / "repo", key.public_key, tmp_path / "repo.pub") == 3
