"""Downloading packages against a real aiohttp server on 127.0.0.1: parallel, resumed,
bounded, verified, and failing closed with one line that names every URL tried."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from portsd.client.download import Download, download_all
from portsd.errors import ConfigError, DownloadError
from portsd.pkg.sign import PublicKey, SecretKey
from tests.rangeserver import Seen, Served, Server, range_server

DATA = os.urandom(300_000)  # several network chunks
OTHER = os.urandom(300_000)
KEY = SecretKey.generate()
NAME = "toptool-1.0-1-x86_64-0123456789ab.pkg.tar.zst"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def signature(data: bytes, name: str = NAME, key: SecretKey = KEY) -> bytes:
    return key.sign(data, f"timestamp:1700000000\tfile:{name}\tkey:{'0' * 64}").encode()


# -- a real server in a thread ---------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[Server]:
    with range_server() as srv:
        yield srv


@dataclass
class Reporter:
    """A DownloadReporter that remembers what it was told."""

    events: list[tuple[str, str, int]] = field(default_factory=list)
    received: dict[str, int] = field(default_factory=dict)

    def started(self, download: Download, offset: int) -> None:
        self.events.append(("started", download.label, offset))

    def advanced(self, download: Download, nbytes: int) -> None:
        self.received[download.label] = self.received.get(download.label, 0) + nbytes

    def finished(self, download: Download) -> None:
        self.events.append(("finished", download.label, 0))


def get(
    downloads: Sequence[Download],
    keys: Sequence[PublicKey] = (KEY.public_key,),
    reporter: Reporter | None = None,
    *,
    deadline: float = 600.0,
    stall: float = 30.0,
) -> None:
    async def main() -> None:
        async with aiohttp.ClientSession() as session:
            await download_all(
                session, downloads, keys, reporter=reporter, deadline=deadline, stall=stall
            )

    asyncio.run(asyncio.wait_for(main(), 30))


def download(
    tmp_path: Path,
    urls: Sequence[str],
    data: bytes = DATA,
    signatures: Sequence[str] = (),
    label: str = "toptool 1.0-1",
) -> Download:
    return Download(
        label=label,
        urls=tuple(urls),
        size=len(data),
        sha256=sha(data),
        dest=tmp_path / "cache" / NAME if label == "toptool 1.0-1" else tmp_path / "cache" / label,
        signature_urls=tuple(signatures),
    )


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "cache"))


# -- the tests --------------------------------------------------------------------------------


def test_parallel_downloads_land_verified_and_a_rerun_fetches_nothing(
    tmp_path: Path, server: Server
) -> None:
    server.files["a"] = Served(DATA)
    server.files["b"] = Served(OTHER)
    wanted = [
        download(tmp_path, [server.url("a")], DATA, label="a"),
        download(tmp_path, [server.url("b")], OTHER, label="b"),
    ]
    reporter = Reporter()
    get(wanted, reporter=reporter)
    assert (tmp_path / "cache" / "a").read_bytes() == DATA
    assert (tmp_path / "cache" / "b").read_bytes() == OTHER
    assert leftovers(tmp_path) == ["a", "b"]
    assert sorted(reporter.events) == [
        ("finished", "a", 0),
        ("finished", "b", 0),
        ("started", "a", 0),
        ("started", "b", 0),
    ]
    assert reporter.received == {"a": len(DATA), "b": len(OTHER)}

    again = Reporter()
    get(wanted, reporter=again)
    assert len(server.seen) == 2  # nothing asked again
    assert sorted(again.events) == [
        ("finished", "a", 0),
        ("finished", "b", 0),
        ("started", "a", len(DATA)),
        ("started", "b", len(OTHER)),
    ]


def test_interrupted_transfer_is_resumed_by_the_next_run(tmp_path: Path, server: Server) -> None:
    server.files["p"] = Served(DATA, drop_after=60_000, drops=3)  # more than one run resumes
    wanted = [download(tmp_path, [server.url("p")])]
    with pytest.raises(DownloadError, match=r"connection closed after \d+ bytes") as caught:
        get(wanted)
    assert str(caught.value).startswith(f"toptool 1.0-1: cannot download: tried {server.url('p')}")
    part = tmp_path / "cache" / (NAME + ".part")
    kept = part.stat().st_size
    assert 0 < kept <= 60_000 * 3
    assert not (tmp_path / "cache" / NAME).exists()
    assert [s.status for s in server.seen] == [200, 206, 206]

    reporter = Reporter()
    get(wanted, reporter=reporter)
    assert (tmp_path / "cache" / NAME).read_bytes() == DATA
    assert server.seen[-1] == Seen("p", f"bytes={kept}-", '"v1"', 206)
    assert reporter.events[0] == ("started", "toptool 1.0-1", kept)
    assert reporter.received["toptool 1.0-1"] == len(DATA) - kept
    assert leftovers(tmp_path) == [NAME]


def test_a_drop_is_resumed_within_one_run(tmp_path: Path, server: Server) -> None:
    server.files["p"] = Served(DATA, drop_after=100_000)
    get([download(tmp_path, [server.url("p")])])
    assert (tmp_path / "cache" / NAME).read_bytes() == DATA
    assert [(s.status, s.range) for s in server.seen] == [(200, None), (206, "bytes=100000-")]


def test_a_changed_file_restarts_instead_of_being_spliced(tmp_path: Path, server: Server) -> None:
    server.files["p"] = Served(OTHER, drop_after=60_000, drops=3)
    with pytest.raises(DownloadError):
        get([download(tmp_path, [server.url("p")], OTHER)])
    # the cache now serves another file at that URL: the If-Range validator no longer matches
    server.files["p"] = Served(DATA, etag='"v2"')
    reporter = Reporter()
    get([download(tmp_path, [server.url("p")], DATA)], reporter=reporter)
    assert (tmp_path / "cache" / NAME).read_bytes() == DATA
    assert server.seen[-1].if_range == '"v1"' and server.seen[-1].status == 200
    assert reporter.events[0] == ("started", "toptool 1.0-1", 0)


def test_a_cache_sending_more_than_the_size_is_cut_off_and_nothing_kept(
    tmp_path: Path, server: Server
) -> None:
    server.files["p"] = Served(DATA, endless=True)
    began = time.monotonic()
    with pytest.raises(DownloadError, match=r"sent more than the 300000 bytes expected"):
        get([download(tmp_path, [server.url("p")])])
    assert time.monotonic() - began < 5  # it did not read the endless stream
    assert leftovers(tmp_path) == []


def test_a_declared_length_other_than_the_size_is_refused_before_any_byte(
    tmp_path: Path, server: Server
) -> None:
    server.files["p"] = Served(DATA + b"more")
    with pytest.raises(DownloadError, match=r"the file has 300004 bytes, not the 300000 expected"):
        get([download(tmp_path, [server.url("p")])])
    assert leftovers(tmp_path) == []


def test_wrong_sha256_deletes_the_bytes_and_the_next_url_is_used(
    tmp_path: Path, server: Server
) -> None:
    server.files["bad"] = Served(OTHER)
    with pytest.raises(DownloadError, match=rf"sha256 mismatch: got {sha(OTHER)[:12]}…"):
        get([download(tmp_path, [server.url("bad")])])
    assert leftovers(tmp_path) == []

    server.files["good"] = Served(DATA)
    get([download(tmp_path, [server.url("bad"), server.url("good")])])
    assert (tmp_path / "cache" / NAME).read_bytes() == DATA
    assert [s.path for s in server.seen] == ["bad", "bad", "good"]
    assert leftovers(tmp_path) == [NAME]


def test_a_bad_kept_prefix_is_discarded_and_fetched_again(tmp_path: Path, server: Server) -> None:
    server.files["p"] = Served(DATA)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / (NAME + ".part")).write_bytes(b"\0" * 1000)
    get([download(tmp_path, [server.url("p")])])
    assert (tmp_path / "cache" / NAME).read_bytes() == DATA
    assert [(s.range, s.status) for s in server.seen] == [("bytes=1000-", 206), (None, 200)]


@pytest.mark.parametrize(
    ("minisig", "message"),
    [
        (signature(DATA, key=SecretKey.generate()), "signed by unknown key"),
        (signature(OTHER), "bad signature: the data does not match"),
        (b"untrusted comment: x\nnot base64\n", "malformed signature file"),
        (signature(DATA, name="other-1.0-1-x86_64-ba9876543210.pkg.tar.zst"), "the signature"),
    ],
    ids=["untrusted-key", "other-data", "malformed", "another-file"],
)
def test_a_bad_signature_is_refused_and_nothing_is_put_in_place(
    tmp_path: Path, server: Server, minisig: bytes, message: str
) -> None:
    server.files[NAME] = Served(DATA)
    server.files[NAME + ".minisig"] = Served(minisig)
    wanted = download(tmp_path, [server.url(NAME)], signatures=[server.url(NAME + ".minisig")])
    with pytest.raises(DownloadError, match=message) as caught:
        get([wanted])
    assert f"signature {server.url(NAME + '.minisig')}: " in str(caught.value)
    assert leftovers(tmp_path) == []


def test_a_good_signature_is_accepted(tmp_path: Path, server: Server) -> None:
    server.files[NAME] = Served(DATA)
    server.files[NAME + ".minisig"] = Served(signature(DATA))
    get([download(tmp_path, [server.url(NAME)], signatures=[server.url(NAME + ".minisig")])])
    assert (tmp_path / "cache" / NAME).read_bytes() == DATA


def test_a_missing_signature_costs_no_download_and_the_next_url_is_used(
    tmp_path: Path, server: Server
) -> None:
    server.files["b/" + NAME] = Served(DATA)
    server.files["b/" + NAME + ".minisig"] = Served(signature(DATA))
    server.files["a/" + NAME] = Served(DATA)
    wanted = download(
        tmp_path,
        [server.url("a/" + NAME), server.url("b/" + NAME)],
        signatures=[server.url("a/" + NAME + ".minisig"), server.url("b/" + NAME + ".minisig")],
    )
    get([wanted])
    assert (tmp_path / "cache" / NAME).read_bytes() == DATA
    assert [s.path for s in server.seen] == [
        "a/" + NAME + ".minisig",
        "b/" + NAME + ".minisig",
        "b/" + NAME,
    ]


def test_signatures_without_trusted_keys_are_a_config_error(tmp_path: Path) -> None:
    wanted = download(tmp_path, ["http://127.0.0.1:9/x"], signatures=["http://127.0.0.1:9/x.sig"])
    with pytest.raises(ConfigError, match="no trusted signing keys"):
        get([wanted], keys=())


def test_the_deadline_bounds_the_whole_call_and_keeps_the_bytes(
    tmp_path: Path, server: Server
) -> None:
    server.files["p"] = Served(DATA, stall_after=50_000)
    began = time.monotonic()
    with pytest.raises(DownloadError) as caught:
        get([download(tmp_path, [server.url("p")])], deadline=1.0)
    assert time.monotonic() - began < 3
    assert str(caught.value) == (
        "toptool 1.0-1: cannot download: not finished within the deadline of 1 s; "
        f"tried {server.url('p')} (stopped after 50000 of 300000 bytes)"
    )
    assert (tmp_path / "cache" / (NAME + ".part")).stat().st_size == 50_000


def test_a_stalled_connection_is_abandoned_for_the_next_url(tmp_path: Path, server: Server) -> None:
    server.files["slow"] = Served(DATA, stall_after=50_000)
    server.files["good"] = Served(DATA)
    began = time.monotonic()
    get([download(tmp_path, [server.url("slow"), server.url("good")])], stall=0.3)
    assert time.monotonic() - began < 5
    assert (tmp_path / "cache" / NAME).read_bytes() == DATA
    # resumed twice (a stall mid-body is a live server), then the next URL
    assert [s.path for s in server.seen] == ["slow", "slow", "slow", "good"]


def test_a_silent_url_costs_about_a_second(
    tmp_path: Path, server: Server, silent_port: int
) -> None:
    server.files["p"] = Served(DATA)
    began = time.monotonic()
    get([download(tmp_path, [f"http://127.0.0.1:{silent_port}/p", server.url("p")])])
    assert time.monotonic() - began < 3
    assert (tmp_path / "cache" / NAME).read_bytes() == DATA


def test_one_failure_cancels_the_rest_and_names_every_url_and_why(
    tmp_path: Path, server: Server, refusing_port: int
) -> None:
    server.files["slow"] = Served(OTHER, chunk_delay=0.2)  # about 4 s
    refused = f"http://127.0.0.1:{refusing_port}/p"
    wanted = [
        download(tmp_path, [server.url("slow")], OTHER, label="slow"),
        download(tmp_path, [server.url("missing"), refused], label="toptool 1.0-1"),
    ]
    began = time.monotonic()
    with pytest.raises(DownloadError) as caught:
        get(wanted)
    assert time.monotonic() - began < 2
    assert str(caught.value) == (
        f"toptool 1.0-1: cannot download: tried {server.url('missing')} (HTTP 404 Not Found); "
        f"{refused} (connection refused)"
    )
    assert caught.value.attempts == (
        (server.url("missing"), "HTTP 404 Not Found"),
        (refused, "connection refused"),
    )
    assert not (tmp_path / "cache" / "slow").exists()
    assert (tmp_path / "cache" / "slow.part").exists()  # kept for the next run


def test_two_downloads_into_one_file_are_refused(tmp_path: Path) -> None:
    one = download(tmp_path, ["http://127.0.0.1:9/a"])
    with pytest.raises(ValueError, match="two downloads into one file"):
        get([one, one])
