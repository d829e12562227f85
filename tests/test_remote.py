"""LAN caches as a client sees them, against the real daemon application on 127.0.0.1 serving
a real signed repository: verification, freshness, failover, the substituter query, and
downloads of what they offer."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from portsd.client.db import PackageDb
from portsd.client.download import Download, download_all
from portsd.client.remote import Caches, Substitute, ask_for_key, open_caches
from portsd.config import Config
from portsd.core.metadata import PackageMeta
from portsd.daemon.state import State
from portsd.errors import ConfigError, DownloadError
from portsd.pkg.archive import content_id
from portsd.pkg.package import create_package
from portsd.pkg.repo import DEFAULT_EXPIRY, SIG_SUFFIX, Repository
from portsd.pkg.sign import PublicKey, SecretKey
from tests.serving import World, serving

ARCH = "x86_64"
EPOCH = 1_700_000_000
NOW = EPOCH + 60


def build_key(name: str, version: str) -> str:
    return hashlib.sha256(f"{name}-{version}".encode()).hexdigest()


@dataclass
class Site:
    """A signed repository on disk and what a test needs to know about it."""

    world: World
    key: SecretKey

    @property
    def repo(self) -> Repository:
        return self.world.repo

    @property
    def public(self) -> PublicKey:
        return self.key.public_key


def make_site(
    root: Path,
    key: SecretKey,
    packages: Sequence[tuple[str, str]] = (("zlib", "1.3"), ("hello", "2.12")),
    arch: str = ARCH,
) -> Site:
    """A repository at ``root`` signed by ``key`` with one real package per (name, version)."""
    config = Config(state_dir=root / "state")
    config.state_dir.mkdir(parents=True)
    repo = Repository(config.repo, arch, key, clock=lambda: EPOCH, expires_in=DEFAULT_EXPIRY)
    world = World(root, config, State(config.database), repo)
    for name, version in packages:
        destdir = root / "destdir" / name
        (destdir / "usr/share" / name).mkdir(parents=True)
        (destdir / "usr/share" / name / "data").write_bytes(os.urandom(40_000))
        meta = PackageMeta(name, version, 1, arch, build_key(name, version), summary=name)
        built = create_package(destdir, meta, root / "out", epoch=EPOCH)
        world.packages[name] = repo.publish(
            built.path, built.info.meta, content=content_id(built.info.files), commit="c0ffee"
        )
    return Site(world, key)


@asynccontextmanager
async def served(*sites: Site) -> AsyncIterator[list[str]]:
    """The real daemon application serving each site on its own loopback port."""
    async with AsyncExitStack() as stack:
        urls = [(await stack.enter_async_context(serving(site.world))).url for site in sites]
        yield urls


def run(scenario: Callable[[aiohttp.ClientSession], Awaitable[None]]) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            await asyncio.wait_for(scenario(session), 30)

    asyncio.run(main())


@pytest.fixture
def db(tmp_path: Path) -> Iterator[PackageDb]:
    database = PackageDb(tmp_path / "client.sqlite")
    yield database
    database.close()


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return make_site(tmp_path / "cache", SecretKey.generate())


def open_sites(
    sites: Sequence[Site],
    keys: Sequence[PublicKey],
    serials: PackageDb,
    *,
    now: int = NOW,
    extra: Sequence[str] = (),
    after: Callable[[aiohttp.ClientSession, Caches], Awaitable[None]] | None = None,
) -> Caches:
    """``open_caches`` on ``extra`` URLs then the sites, served for the call."""
    opened: list[Caches] = []

    async def scenario(session: aiohttp.ClientSession) -> None:
        async with served(*sites) as urls:
            caches = await open_caches(session, [*extra, *urls], ARCH, keys, serials, now=now)
            opened.append(caches)
            if after is not None:
                await after(session, caches)

    run(scenario)
    return opened[0]


# -- open_caches ------------------------------------------------------------------------------


def test_a_good_index_verifies_and_its_serial_is_recorded(site: Site, db: PackageDb) -> None:
    caches = open_sites([site], [SecretKey.generate().public_key, site.public], db)
    assert caches.problems == ()
    (cache,) = caches.usable
    assert cache.url.startswith("http://127.0.0.1:") and not cache.url.endswith("/")
    assert cache.signer == site.public
    assert cache.index == site.repo.index()
    assert db.last_serial(site.public.key_id) == site.repo.index().serial == 3
    assert [entry.meta.name for entry in caches.entries()] == ["hello", "zlib"]
    found = caches.entry("zlib")
    assert found is not None and found == (cache, site.world.packages["zlib"])
    assert caches.entry("nothing") is None
    zlib = site.world.packages["zlib"]
    assert caches.by_key(zlib.meta.build_key) == Substitute(
        cache.url, zlib, f"{cache.url}/repo/{ARCH}/packages/{zlib.file}", None
    )
    assert caches.by_key("0" * 64) is None


def damage_index(site: Site) -> None:
    data = bytearray(site.repo.index_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    replace(site.repo.index_path, bytes(data))


def untrusted_signature(site: Site) -> None:
    other = SecretKey.generate()
    replace(site.repo.signature_path, other.sign(site.repo.index_path.read_bytes(), "x").encode())


def signature_of_other_data(site: Site) -> None:
    replace(site.repo.signature_path, site.key.sign(b"another index", "x").encode())


def garbage_signature(site: Site) -> None:
    replace(site.repo.signature_path, b"untrusted comment: hi\nnot a signature\n")


def no_signature(site: Site) -> None:
    site.repo.signature_path.unlink()


def replace(path: Path, data: bytes) -> None:
    """A new file in the old one's place, as a writer (or an attacker with the disk) would."""
    temp = path.with_name(path.name + ".new")
    temp.write_bytes(data)
    os.replace(temp, path)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (damage_index, "index signature: bad signature: the data does not match (key "),
        (untrusted_signature, "index signature: signed by unknown key "),
        (signature_of_other_data, "index signature: bad signature: the data does not match"),
        (garbage_signature, "index signature: malformed signature file: "),
        (no_signature, "index signature: HTTP 404"),
    ],
    ids=["flipped-byte", "untrusted-key", "other-data", "garbage", "missing"],
)
def test_a_bad_signature_makes_the_cache_unusable_and_records_nothing(
    tmp_path: Path, db: PackageDb, damage: Callable[[Site], None], problem: str
) -> None:
    good = make_site(tmp_path / "good", SecretKey.generate(), [("zlib", "1.3")])
    bad = make_site(tmp_path / "bad", SecretKey.generate())
    damage(bad)
    caches = open_sites([bad, good], [bad.public, good.public], db)
    assert [cache.signer for cache in caches.usable] == [good.public]
    ((url, line),) = caches.problems
    assert url.startswith("http://127.0.0.1:") and line.startswith(problem)
    assert "\n" not in line
    assert db.last_serial(bad.public.key_id) is None
    # not half-used either: hello is only in the bad cache
    assert caches.entry("hello") is None and [e.meta.name for e in caches.entries()] == ["zlib"]


def test_a_lower_serial_is_a_rollback(site: Site, db: PackageDb) -> None:
    db.record_serial(site.public.key_id, 7)
    caches = open_sites([site], [site.public], db)
    assert caches.usable == ()
    assert caches.problems[0][1] == "index serial 3 is lower than 7, already seen"
    assert db.last_serial(site.public.key_id) == 7


def test_the_same_serial_again_is_fine_and_a_higher_one_is_recorded(
    site: Site, db: PackageDb
) -> None:
    db.record_serial(site.public.key_id, 3)
    assert len(open_sites([site], [site.public], db).usable) == 1
    site.repo.unpublish(["hello"], commit="c0ffee")
    caches = open_sites([site], [site.public], db)
    assert [e.meta.name for e in caches.entries()] == ["zlib"]
    assert db.last_serial(site.public.key_id) == 4


def test_a_lagging_cache_with_the_same_key_is_a_rollback_whatever_the_order(
    tmp_path: Path, db: PackageDb
) -> None:
    key = SecretKey.generate()
    ahead = make_site(tmp_path / "ahead", key, [("zlib", "1.3"), ("hello", "2.12")])
    behind = make_site(tmp_path / "behind", key, [("zlib", "1.2")])
    caches = open_sites([behind, ahead], [key.public_key], db)
    assert [cache.index.serial for cache in caches.usable] == [3]
    assert caches.problems[0][1] == "index serial 2 is lower than 3, already seen"
    assert db.last_serial(key.public_key.key_id) == 3


def test_an_expired_index_is_refused(site: Site, db: PackageDb) -> None:
    expires = site.repo.index().expires
    caches = open_sites([site], [site.public], db, now=expires + 5)
    assert caches.usable == ()
    assert caches.problems[0][1] == f"index serial 3 expired at {expires} (5s ago)"
    assert db.last_serial(site.public.key_id) is None


def test_an_index_for_another_arch_is_refused(tmp_path: Path, db: PackageDb) -> None:
    key = SecretKey.generate()
    site = make_site(tmp_path / "c", key, [("zlib", "1.3")])
    other = make_site(tmp_path / "other", key, [("zlib", "1.3")], arch="aarch64")
    shutil.copy(other.repo.index_path, site.repo.index_path)
    shutil.copy(other.repo.signature_path, site.repo.signature_path)
    caches = open_sites([site], [key.public_key], db)
    assert caches.usable == ()
    assert caches.problems[0][1] == "index is for aarch64, not x86_64"
    assert db.last_serial(key.public_key.key_id) is None


def test_first_cache_with_a_name_wins(tmp_path: Path, db: PackageDb) -> None:
    first = make_site(tmp_path / "a", SecretKey.generate(), [("zlib", "1.3")])
    second = make_site(tmp_path / "b", SecretKey.generate(), [("zlib", "1.2"), ("hello", "2")])
    caches = open_sites([first, second], [second.public, first.public], db)
    assert [(e.meta.name, e.meta.version) for e in caches.entries()] == [
        ("hello", "2"),
        ("zlib", "1.3"),
    ]
    found = caches.entry("zlib")
    assert found is not None and found[0].signer == first.public
    old = second.world.packages["zlib"]
    substitute = caches.by_key(old.meta.build_key)  # the older build is still offered by its key
    assert substitute is not None and substitute.cache == caches.usable[1].url
    assert db.last_serial(first.public.key_id) == 2 and db.last_serial(second.public.key_id) == 3


def test_a_silent_cache_costs_about_a_second_and_the_next_is_used(
    site: Site, db: PackageDb, silent_port: int, refusing_port: int
) -> None:
    silent = f"http://127.0.0.1:{silent_port}"
    refused = f"http://127.0.0.1:{refusing_port}/"
    began = time.monotonic()
    caches = open_sites([site], [site.public], db, extra=[silent, refused])
    elapsed = time.monotonic() - began
    assert elapsed < 3
    assert len(caches.usable) == 1
    assert caches.problems == (
        (silent, "no answer within 1 s"),
        (refused.rstrip("/"), "connection refused"),
    )


def test_no_trusted_key_is_a_config_error(site: Site, db: PackageDb) -> None:
    with pytest.raises(ConfigError, match="no trusted signing keys"):
        open_sites([site], [], db)


def test_what_a_verified_index_offers_downloads_intact(
    tmp_path: Path, site: Site, db: PackageDb
) -> None:
    zlib = site.world.packages["zlib"]
    dest = tmp_path / "downloads" / zlib.file
    # half of it is already here from an interrupted run: the real server resumes it
    package = site.repo.package_path(zlib).read_bytes()
    dest.parent.mkdir()
    dest.with_name(zlib.file + ".part").write_bytes(package[: len(package) // 2])
    offsets: list[int] = []

    class Reporter:
        def started(self, download: Download, offset: int) -> None:
            offsets.append(offset)

        def advanced(self, download: Download, nbytes: int) -> None:
            pass

        def finished(self, download: Download) -> None:
            pass

    async def fetch(session: aiohttp.ClientSession, caches: Caches) -> None:
        substitute = caches.by_key(zlib.meta.build_key)
        assert substitute is not None
        wanted = Download(
            "zlib 1.3-1", (substitute.url,), zlib.size, zlib.sha256, dest, signature_urls=()
        )
        await download_all(session, [wanted], [site.public], reporter=Reporter())

    open_sites([site], [site.public], db, after=fetch)
    assert dest.read_bytes() == package
    assert offsets == [len(package) // 2]


# -- ask_for_key ------------------------------------------------------------------------------


def test_ask_for_key_finds_a_stored_package_the_index_no_longer_lists(
    tmp_path: Path, site: Site, silent_port: int
) -> None:
    empty = make_site(tmp_path / "empty", SecretKey.generate(), [])
    site.repo.unpublish(["zlib"], commit="c0ffee")
    zlib = site.world.packages["zlib"]
    assert site.repo.index().entry("zlib") is None
    dest = tmp_path / "downloads" / zlib.file

    async def scenario(session: aiohttp.ClientSession) -> None:
        async with served(empty, site) as (empty_url, url):
            silent = f"http://127.0.0.1:{silent_port}"
            began = time.monotonic()
            found = await ask_for_key(session, [silent, empty_url, url], zlib.meta.build_key)
            assert time.monotonic() - began < 3
            assert found == Substitute(
                url,
                zlib,
                f"{url}/repo/{ARCH}/packages/{zlib.file}",
                f"{url}/repo/{ARCH}/packages/{zlib.file}{SIG_SUFFIX}",
            )
            assert await ask_for_key(session, [empty_url, url], "1" * 64) is None
            assert await ask_for_key(session, [], zlib.meta.build_key) is None
            assert found.signature_url is not None
            wanted = Download(
                "zlib 1.3-1",
                (found.url,),
                found.entry.size,
                found.entry.sha256,
                dest,
                (found.signature_url,),
            )
            await download_all(session, [wanted], [site.public])
            # the same answer, but a key we do not trust: refused, nothing in place
            other = tmp_path / "other" / zlib.file
            stranger = SecretKey.generate().public_key
            with pytest.raises(DownloadError, match="signed by unknown key"):
                await download_all(session, [dataclasses.replace(wanted, dest=other)], [stranger])
            assert not other.exists()

    run(scenario)
    assert dest.read_bytes() == site.repo.package_path(zlib).read_bytes()


def test_a_validly_signed_package_under_another_name_is_refused(tmp_path: Path, site: Site) -> None:
    """A lying cache answers a key query with another package's bytes and signature: the
    signature verifies, but it names the other file, so the download is refused."""
    zlib, hello = site.world.packages["zlib"], site.world.packages["hello"]
    packages = site.repo.packages_path
    impostor = packages / zlib.file
    impostor.with_name(zlib.file + SIG_SUFFIX).write_bytes(
        (packages / (hello.file + SIG_SUFFIX)).read_bytes()
    )
    replace(impostor, (packages / hello.file).read_bytes())
    dest = tmp_path / "downloads" / zlib.file

    async def scenario(session: aiohttp.ClientSession) -> None:
        async with served(site) as (url,):
            base = f"{url}/repo/{ARCH}/packages/{zlib.file}"
            wanted = Download(
                "zlib 1.3-1", (base,), hello.size, hello.sha256, dest, (base + SIG_SUFFIX,)
            )
            with pytest.raises(DownloadError, match=f"the signature names '{hello.file}'"):
                await download_all(session, [wanted], [site.public])

    run(scenario)
    assert not dest.exists() and not dest.with_name(zlib.file + ".part").exists()
