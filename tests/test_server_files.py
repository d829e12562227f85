"""``/repo/<arch>/...``: the repository's public files with ranges and validators, and not
one byte of anything else, however the path is spelled."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from portsd.daemon.server.appkeys import COUNTERS
from portsd.daemon.server.files import _OPEN, Unsatisfiable, parse_range, plan_reply
from portsd.pkg.repo import INDEX_NAME
from tests.serving import ARCH, CANARY, TOKEN, Server, World, make_world, run, tls_context

INDEX = f"/repo/{ARCH}/{INDEX_NAME}"


@pytest.fixture
def world(tmp_path: Path) -> World:
    return make_world(tmp_path)


def package_url(world: World, name: str) -> str:
    return f"/repo/{ARCH}/packages/{world.packages[name].file}"


# -- the pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        ("bytes=0-99", 1000, (0, 100)),
        ("bytes=100-199", 1000, (100, 100)),
        ("bytes=-10", 1000, (990, 10)),
        ("bytes=-5000", 1000, (0, 1000)),
        ("bytes=990-", 1000, (990, 10)),
        ("bytes=10-999999", 1000, (10, 990)),
        ("BYTES = 1 - 2", 1000, (1, 2)),
        ("bytes=5-3", 1000, None),  # invalid: ignored, the whole file
        ("bytes=0-1,5-6", 1000, None),  # several ranges: the whole file
        ("items=0-1", 1000, None),
        ("bytes=-", 1000, None),
        ("bytes=a-b", 1000, None),
        ("bytes=" + "9" * 30 + "-", 1000, None),
    ],
)
def test_parse_range(header: str, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"), [("bytes=1000-", 1000), ("bytes=-0", 10), ("bytes=0-", 0)]
)
def test_unsatisfiable_ranges(header: str, size: int) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, size)


def test_plan_reply_precedence() -> None:
    tag = '"1-2-3"'
    assert plan_reply("GET", {"If-None-Match": tag, "Range": "bytes=0-1"}, 10, tag).status == 304
    assert plan_reply("GET", {"If-None-Match": f'"x", W/{tag}'}, 10, tag).status == 304
    assert plan_reply("HEAD", {"Range": "bytes=0-1"}, 10, tag).status == 200
    assert plan_reply("GET", {"Range": "bytes=0-1", "If-Range": f"W/{tag}"}, 10, tag).status == 200
    assert plan_reply("GET", {"Range": "bytes=0-1", "If-Range": tag}, 10, tag).status == 206
    assert plan_reply("GET", {"Range": "bytes=20-"}, 10, tag).status == 416


# -- whole files, validators ------------------------------------------------------------------


def test_serves_index_signature_and_packages(world: World) -> None:
    async def scenario(server: Server) -> None:
        status, headers, body = await server.get(INDEX)
        assert status == 200
        assert body == world.repo.index_path.read_bytes()
        assert headers["Accept-Ranges"] == "bytes"
        assert headers["Cache-Control"] == "no-cache"
        assert headers["ETag"].startswith('"') and headers["ETag"].endswith('"')

        status, headers, body = await server.get(INDEX + ".minisig")
        assert status == 200
        assert body == world.repo.signature_path.read_bytes()
        assert headers["Content-Type"].startswith("text/plain")

        for name, entry in world.packages.items():
            status, headers, body = await server.get(package_url(world, name))
            assert status == 200, name
            assert (len(body), hashlib.sha256(body).hexdigest()) == (entry.size, entry.sha256)
            assert "immutable" in headers["Cache-Control"]
            status, _, signature = await server.get(package_url(world, name) + ".minisig")
            assert status == 200 and signature.startswith(b"untrusted comment:")

    run(world, scenario)


def test_etag_if_none_match_and_head(world: World) -> None:
    url = package_url(world, "zlib")
    size = world.packages["zlib"].size

    async def scenario(server: Server) -> None:
        _, headers, _ = await server.get(url)
        etag = headers["ETag"]
        status, headers, body = await server.get(url, headers={"If-None-Match": etag})
        assert (status, body, headers["ETag"]) == (304, b"", etag)
        status, _, _ = await server.get(url, headers={"If-None-Match": f"W/{etag}"})
        assert status == 304
        status, _, body = await server.get(url, headers={"If-None-Match": '"stale"'})
        assert status == 200 and len(body) == size

        async with server.session.head(server.url + url) as response:
            assert response.status == 200
            assert response.headers["Content-Length"] == str(size)
            assert response.headers["ETag"] == etag
            assert await response.read() == b""

        # a new index is a new file: its old validator no longer matches
        _, headers, _ = await server.get(INDEX)
        old = headers["ETag"]
        world.repo.unpublish(["hello"], commit="d00d")
        status, headers, body = await server.get(INDEX, headers={"If-None-Match": old})
        assert status == 200 and headers["ETag"] != old
        assert body == world.repo.index_path.read_bytes()

    run(world, scenario)


# -- ranges ---------------------------------------------------------------------------------


def test_ranges(world: World) -> None:
    url = package_url(world, "zlib")
    data = world.package_path("zlib").read_bytes()
    size = len(data)

    async def scenario(server: Server) -> None:
        async def ranged(spec: str, **extra: str) -> tuple[int, CIMultiDict[str], bytes]:
            return await server.get(url, headers={"Range": spec, **extra})

        status, headers, body = await ranged("bytes=0-99")
        assert (status, body) == (206, data[:100])
        assert headers["Content-Range"] == f"bytes 0-99/{size}"
        assert headers["Content-Length"] == "100"

        status, headers, body = await ranged("bytes=1000-1999")
        assert (status, body) == (206, data[1000:2000])
        assert headers["Content-Range"] == f"bytes 1000-1999/{size}"

        status, headers, body = await ranged("bytes=-300")
        assert (status, body) == (206, data[-300:])
        assert headers["Content-Range"] == f"bytes {size - 300}-{size - 1}/{size}"

        status, headers, body = await ranged(f"bytes={size - 17}-")
        assert (status, body) == (206, data[-17:])

        status, headers, body = await ranged(f"bytes={size}-")
        assert status == 416 and body == b""
        assert headers["Content-Range"] == f"bytes */{size}"

        status, _, body = await ranged("bytes=0-0,5-9")
        assert (status, body) == (200, data)

        # If-Range: the current validator gets the range, any other the whole (new) file
        _, headers, _ = await server.get(url)
        etag = headers["ETag"]
        status, _, body = await ranged("bytes=10-19", **{"If-Range": etag})
        assert (status, body) == (206, data[10:20])
        status, _, body = await ranged("bytes=10-19", **{"If-Range": '"1-2-3"'})
        assert (status, body) == (200, data)
        status, _, body = await ranged(
            "bytes=10-19", **{"If-Range": "Wed, 21 Oct 2015 07:28:00 GMT"}
        )
        assert (status, body) == (200, data)

    run(world, scenario)


def test_large_file_to_a_slow_reader(tmp_path: Path) -> None:
    """Past the socket buffer the body waits for room: all bytes arrive, in order, counted."""
    world = make_world(tmp_path, big=6 << 20)
    url = package_url(world, "big")
    data = world.package_path("big").read_bytes()

    async def scenario(server: Server) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(f"GET {url} HTTP/1.1\r\nHost: x\r\nRange: bytes=7-\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 206")
        received = bytearray()
        while len(received) < len(data) - 7:
            received += await reader.read(32 * 1024)
            await asyncio.sleep(0.001)  # slower than the server
        assert bytes(received) == data[7:]
        # the same connection serves the next request (the body ended where it should)
        writer.write(f"HEAD {url} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        assert (await reader.read()).startswith(b"HTTP/1.1 200")
        writer.close()
        assert server.app[COUNTERS].repo_bytes == len(data) - 7

    run(world, scenario)


def test_client_leaving_mid_download_leaks_nothing(tmp_path: Path) -> None:
    world = make_world(tmp_path, big=8 << 20)
    url = package_url(world, "big")

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def scenario(server: Server) -> None:
        await server.get(url, headers={"Range": "bytes=0-0"})  # directories opened and cached
        before = open_fds()
        for _ in range(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            await reader.readexactly(200_000)
            writer.transport.abort()  # RST while the server still has megabytes to send
        for _ in range(200):
            if open_fds() <= before:
                break
            await asyncio.sleep(0.02)
        assert open_fds() <= before
        status, _, body = await server.get(package_url(world, "hello"))
        assert status == 200 and len(body) == world.packages["hello"].size

    run(world, scenario)


def test_open_files_follow_the_names(world: World) -> None:
    """Files are kept open between requests, but a name always serves what it names now."""
    packages = world.repo.packages_path
    name = "swap-1.0-1-x86_64-000000000000.pkg.tar.zst"
    url = f"/repo/{ARCH}/packages/{name}"

    async def scenario(server: Server) -> None:
        (packages / name).write_bytes(b"first version")
        status, headers, body = await server.get(url)
        assert (status, body) == (200, b"first version")
        first = headers["ETag"]
        # replaced by another file under the same name (as the index is)
        staged = packages / ".staged"
        staged.write_bytes(b"second version, longer")
        os.replace(staged, packages / name)
        status, headers, body = await server.get(url)
        assert (status, body) == (200, b"second version, longer")
        assert headers["ETag"] != first
        # replaced by a symlink: not followed, even though a version was open
        (packages / ".link").symlink_to(world.root / "canary")
        os.replace(packages / ".link", packages / name)
        status, _, body = await server.get(url)
        assert status == 404 and CANARY not in body
        (packages / name).unlink()
        assert (await server.get(url))[0] == 404

        # the whole directory replaced: the new one is looked up
        os.rename(packages, packages.with_name("packages.old"))
        packages.mkdir()
        (packages / name).write_bytes(b"in the new directory")
        status, _, body = await server.get(url)
        assert (status, body) == (200, b"in the new directory")

    run(world, scenario)


def test_many_files_keep_few_descriptors(world: World) -> None:
    files = {
        f"f{n:03d}-1.0-1-x86_64-000000000000.pkg.tar.zst": os.urandom(3000) for n in range(150)
    }
    for name, data in files.items():
        (world.repo.packages_path / name).write_bytes(data)

    async def scenario(server: Server) -> None:
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(2):
            for name, data in files.items():
                status, _, body = await server.get(f"/repo/{ARCH}/packages/{name}")
                assert (status, body) == (200, data), name
        # the cache's files, three directories, a connection's two ends: not 150 files
        assert len(os.listdir("/proc/self/fd")) <= before + _OPEN + 5

    run(world, scenario)


def test_tls_connections_get_bytes_not_sendfile(world: World) -> None:
    """Over TLS the body goes through the transport (sendfile would bypass the encryption)."""
    url = package_url(world, "zlib")
    data = world.package_path("zlib").read_bytes()

    async def scenario(server: Server) -> None:
        assert server.url.startswith("https://")
        status, _, body = await server.get(url)
        assert (status, body) == (200, data)
        status, _, body = await server.get(url, headers={"Range": "bytes=100-"})
        assert (status, body) == (206, data[100:])
        assert server.app[COUNTERS].repo_bytes == 2 * len(data) - 100

    run(world, scenario, tls=tls_context(world.root))


# -- nothing else ---------------------------------------------------------------------------


def test_private_files_are_unreachable(world: World) -> None:
    key = world.packages["zlib"].meta.build_key
    paths = [
        f"/repo/{ARCH}/keys/{key}",
        f"/repo/{ARCH}/.lock",
        f"/repo/{ARCH}/.tmp/",
        f"/repo/{ARCH}/.tmp/x",
        f"/repo/{ARCH}/packages/",
        f"/repo/{ARCH}/packages/.hidden",
        f"/repo/{ARCH}/",
        f"/repo/{ARCH}/index.msgpack",
        "/repo/",
        "/repo/x86_64",
    ]
    (world.repo.packages_path / ".hidden").write_bytes(CANARY)

    async def scenario(server: Server) -> None:
        for path in paths:
            status, _, body = await server.get(path)
            assert status == 404, path
            assert CANARY not in body

    run(world, scenario)


TRAVERSALS = [
    "/repo/{arch}/../../canary",
    "/repo/{arch}/packages/../keys/{key}",
    "/repo/{arch}/packages/../../../canary",
    "/repo/{arch}/packages/%2e%2e/keys/{key}",
    "/repo/{arch}/packages/%2E%2E%2Fkeys%2F{key}",
    "/repo/{arch}/packages/..%2f..%2f..%2fcanary",
    "/repo/{arch}/packages/%252e%252e%252f%252e%252e%252f%252e%252e%252fcanary",
    "/repo/{arch}/packages/..%5c..%5c..%5ccanary",
    "/repo/{arch}/packages/..\\..\\..\\canary",
    "/repo/{arch}/packages/%00",
    "/repo/{arch}/packages/x%00.pkg.tar.zst",
    "/repo/{arch}/packages//etc/passwd",
    "/repo/{arch}/packages/%2fetc%2fpasswd",
    "/repo//etc/passwd",
    "/repo/%2e%2e/canary",
    "/repo/..%2f..%2fcanary",
    "/repo/{arch}/%2e%2e/%2e%2e/canary",
    "/repo/{arch}/packages/%c0%ae%c0%ae/%c0%ae%c0%ae/canary",
    "/repo/{root}/canary",
    "/repo/{arch}/packages/{root}/canary",
    "http://127.0.0.1/repo/{arch}/../../canary",
    "/repo/{arch}/packages/./../keys/{key}",
]


def test_traversal_is_impossible(world: World) -> None:
    key = world.packages["zlib"].meta.build_key
    # the canary is beside the state directory, the key record inside the repository
    root = str(world.root).lstrip("/")

    async def scenario(server: Server) -> None:
        for template in TRAVERSALS:
            target = template.format(arch=ARCH, key=key, root=root)
            request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            status, data = await server.raw(request.encode("latin-1"))
            assert status in (400, 404), (target, data[:200])
            assert CANARY not in data and b"root:" not in data, target
            assert key.encode() not in data.split(b"\r\n\r\n", 1)[-1], target
            assert TOKEN.encode() not in data

    run(world, scenario)


def test_symlinks_fifos_and_directories_are_not_followed(world: World) -> None:
    packages = world.repo.packages_path
    (packages / "passwd.pkg.tar.zst").symlink_to("/etc/passwd")
    (packages / "canary.pkg.tar.zst").symlink_to(world.root / "canary")
    inside = world.packages["zlib"].file
    (packages / "alias.pkg.tar.zst").symlink_to(inside)  # even pointing inside: not followed
    os.mkfifo(packages / "fifo.pkg.tar.zst")
    (packages / "dir.pkg.tar.zst").mkdir()
    # whole directories: an architecture that is a symlink, and one whose packages/ is
    evil = world.config.repo / "evil"
    evil.symlink_to("/etc")
    sneaky = world.config.repo / "aarch64"
    sneaky.mkdir()
    (sneaky / "packages").symlink_to(world.root)

    async def scenario(server: Server) -> None:
        for path in [
            f"/repo/{ARCH}/packages/passwd.pkg.tar.zst",
            f"/repo/{ARCH}/packages/canary.pkg.tar.zst",
            f"/repo/{ARCH}/packages/alias.pkg.tar.zst",
            f"/repo/{ARCH}/packages/fifo.pkg.tar.zst",
            f"/repo/{ARCH}/packages/dir.pkg.tar.zst",
            "/repo/evil/index.msgpack.zst",
            "/repo/evil/packages/passwd",
            "/repo/aarch64/packages/canary",
        ]:
            status, _, body = await server.get(path)
            assert status == 404, path
            assert CANARY not in body and b"root:" not in body
        status, _, _ = await server.get(package_url(world, "zlib"))
        assert status == 200

    run(world, scenario)


def test_only_get_and_head(world: World) -> None:
    async def scenario(server: Server) -> None:
        for method in ("POST", "PUT", "DELETE"):
            async with server.session.request(method, server.url + INDEX) as response:
                assert response.status == 405
        assert world.repo.index_path.exists()

    run(world, scenario)


# -- what files.py relies on in aiohttp ---------------------------------------------------------


def test_aiohttp_sends_the_headers_into_the_transport_on_prepare() -> None:
    """files.py writes the body to the socket beside aiohttp's transport, once the
    transport's buffer is empty. That is only correct while ``StreamResponse.prepare`` hands
    the status line and headers to the transport at once (keeping none in aiohttp's own
    writer), ``write_eof`` adds nothing after a body of known length, and the transport
    exposes its socket. This probe does what files.py does, with aiohttp alone."""
    body = b"body written beside the transport\n"
    broken = (
        f"aiohttp {aiohttp.__version__} no longer behaves as portsd/daemon/server/files.py "
        "relies on (it writes the body to the socket beside aiohttp's transport): "
    )

    async def handler(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        assert transport is not None, broken + "request.transport is None"
        raw = transport.get_extra_info("socket")
        assert raw is not None, broken + "the transport does not expose its socket"
        response = web.StreamResponse(headers={"X-Probe": "1"})
        response.content_length = len(body)
        await response.prepare(request)
        while transport.get_write_buffer_size():
            await asyncio.sleep(0.01)
        assert os.write(raw.fileno(), body) == len(body)
        await response.write_eof()
        return response

    async def probe() -> bytes:
        app = web.Application()
        app.router.add_get("/", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            port = runner.addresses[0][1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n")
            await writer.drain()
            received = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            return received
        finally:
            await runner.cleanup()

    received = asyncio.run(probe())
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), broken + f"the reply starts {received[:40]!r}"
    assert b"X-Probe: 1" in head, broken + "the headers did not come first"
    assert rest == body, broken + f"after the headers came {rest!r}"
