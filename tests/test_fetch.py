"""Fetching against a real aiohttp server on 127.0.0.1: cache, mirrors, resume, failures."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import platform
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from portsd.build.fetch import Fetcher, FetchReporter, Mirror
from portsd.build.pipeline import Revision, Workspace
from portsd.config import Config
from portsd.core.plan import make_plan
from portsd.core.recipe import Source
from portsd.errors import ChecksumMismatch, ConfigError, FetchCancelled, FetchError
from portsd.tree.checkout import open_checkout
from tests.fixtures import recipe
from tests.rangeserver import Seen, Served, Server, range_server

DATA = bytes(range(256)) * 800  # 204,800 bytes: several network chunks
BAD = b"not the tarball you are looking for\n" * 100


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def source(url: str, data: bytes = DATA, filename: str = "pkg-1.0.tar.gz") -> Source:
    return Source(filename=filename, url=url, sha256=sha(data))


# -- a real server in a thread ---------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[Server]:
    with range_server() as srv:
        yield srv


@dataclass
class Recorder(FetchReporter):
    events: list[tuple[str, ...]] = field(default_factory=list)
    advanced_bytes: int = 0

    def started(
        self, port: str, filename: str, total_bytes: int | None, location: str, resumed_from: int
    ) -> None:
        self.events.append(("started", location, str(total_bytes), str(resumed_from)))

    def advanced(self, port: str, filename: str, nbytes: int) -> None:
        self.advanced_bytes += nbytes

    def finished(self, port: str, filename: str, location: str, path: Path) -> None:
        self.events.append(("finished", location))

    def failed(self, port: str, filename: str, location: str, reason: str) -> None:
        self.events.append(("failed", location, reason))


def fetch(fetcher: Fetcher, src: Source) -> Path:
    async def run() -> Path:
        async with fetcher:
            return await fetcher.fetch("pkg", src)

    return asyncio.run(run())


def leftovers(distfiles: Path) -> list[str]:
    return sorted(os.listdir(distfiles / "partial"))


def cache(distfiles: Path) -> list[str]:
    return sorted(os.listdir(distfiles / "by-sha256"))


# -- the tests --------------------------------------------------------------------------------


def test_download_then_cache_hit_makes_no_request(tmp_path: Path, server: Server) -> None:
    server.files["pkg-1.0.tar.gz"] = Served(DATA)
    src = source(server.url("pkg-1.0.tar.gz"))
    reporter = Recorder()
    path = fetch(Fetcher(tmp_path, reporter=reporter), src)
    assert path == tmp_path / "by-sha256" / sha(DATA)
    assert path.read_bytes() == DATA
    assert reporter.events == [
        ("started", src.url, str(len(DATA)), "0"),
        ("finished", src.url),
    ]
    assert reporter.advanced_bytes == len(DATA)
    assert leftovers(tmp_path) == []

    again = Fetcher(tmp_path, reporter=reporter)
    assert again.cached(sha(DATA)) == path
    assert fetch(again, src) == path
    assert len(server.seen) == 1
    assert reporter.events[-1] == ("finished", "cache")


def test_dropped_connection_is_resumed_with_range(tmp_path: Path, server: Server) -> None:
    server.files["pkg-1.0.tar.gz"] = Served(DATA, drop_after=70_000)
    src = source(server.url("pkg-1.0.tar.gz"))
    with pytest.raises(FetchError, match=r"connection closed after \d+ bytes"):
        fetch(Fetcher(tmp_path, resume_retries=0), src)
    kept = (tmp_path / "partial" / f"{sha(DATA)}.part").stat().st_size
    assert 0 < kept <= 70_000
    assert cache(tmp_path) == []

    reporter = Recorder()
    path = fetch(Fetcher(tmp_path, reporter=reporter), src)
    assert path.read_bytes() == DATA
    assert server.seen[-1] == Seen("pkg-1.0.tar.gz", f"bytes={kept}-", '"v1"', 206)
    assert reporter.events[0] == ("started", src.url, str(len(DATA)), str(kept))
    assert reporter.advanced_bytes == len(DATA) - kept
    assert leftovers(tmp_path) == []


def test_drop_mid_body_is_resumed_within_one_fetch(tmp_path: Path, server: Server) -> None:
    server.files["pkg-1.0.tar.gz"] = Served(DATA, drop_after=50_000, drops=2)
    path = fetch(Fetcher(tmp_path), source(server.url("pkg-1.0.tar.gz")))
    assert path.read_bytes() == DATA
    assert [s.status for s in server.seen] == [200, 206, 206]
    assert server.seen[0].range is None and server.seen[1].range is not None


def test_server_ignoring_range_restarts_from_zero(tmp_path: Path, server: Server) -> None:
    server.files["pkg-1.0.tar.gz"] = Served(DATA, ignore_range=True, drop_after=70_000)
    src = source(server.url("pkg-1.0.tar.gz"))
    with pytest.raises(FetchError):
        fetch(Fetcher(tmp_path, resume_retries=0), src)
    reporter = Recorder()
    path = fetch(Fetcher(tmp_path, reporter=reporter), src)
    assert path.read_bytes() == DATA
    assert server.seen[-1].range is not None and server.seen[-1].status == 200
    assert reporter.events[0] == ("started", src.url, str(len(DATA)), "0")
    assert reporter.advanced_bytes == len(DATA)


def test_changed_etag_makes_if_range_restart(tmp_path: Path, server: Server) -> None:
    server.files["pkg-1.0.tar.gz"] = Served(DATA, drop_after=70_000)
    src = source(server.url("pkg-1.0.tar.gz"))
    with pytest.raises(FetchError):
        fetch(Fetcher(tmp_path, resume_retries=0), src)
    server.files["pkg-1.0.tar.gz"].etag = '"v2"'
    assert fetch(Fetcher(tmp_path), src).read_bytes() == DATA
    assert server.seen[-1].if_range == '"v1"' and server.seen[-1].status == 200


def test_bad_kept_prefix_is_discarded_and_fetched_again(tmp_path: Path, server: Server) -> None:
    server.files["pkg-1.0.tar.gz"] = Served(DATA)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / f"{sha(DATA)}.part").write_bytes(b"\0" * 1000)
    path = fetch(Fetcher(tmp_path), source(server.url("pkg-1.0.tar.gz")))
    assert path.read_bytes() == DATA
    assert [(s.range, s.status) for s in server.seen] == [("bytes=1000-", 206), (None, 200)]


def test_complete_partial_answered_416_is_committed(tmp_path: Path, server: Server) -> None:
    server.files["pkg-1.0.tar.gz"] = Served(DATA)
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / f"{sha(DATA)}.part").write_bytes(DATA)
    path = fetch(Fetcher(tmp_path), source(server.url("pkg-1.0.tar.gz")))
    assert path.read_bytes() == DATA
    assert len(server.seen) == 1 and leftovers(tmp_path) == []


def test_mirror_order_directory_then_http_then_origin(tmp_path: Path, server: Server) -> None:
    local = tmp_path / "mirror"
    local.mkdir()
    distfiles = tmp_path / "distfiles"
    mirrors = [str(local), server.url("m1"), server.url("m2/")]
    src = source(server.url("origin/pkg-1.0.tar.gz"))
    server.files["origin/pkg-1.0.tar.gz"] = Served(DATA)

    reporter = Recorder()
    assert fetch(Fetcher(distfiles, mirrors, reporter=reporter), src).read_bytes() == DATA
    assert server.paths() == ["m1/pkg-1.0.tar.gz", "m2/pkg-1.0.tar.gz", "origin/pkg-1.0.tar.gz"]
    failures = [e for e in reporter.events if e[0] == "failed"]
    assert failures == [
        ("failed", str(local / "pkg-1.0.tar.gz"), "not found"),
        ("failed", server.url("m1/pkg-1.0.tar.gz"), "HTTP 404 Not Found"),
        ("failed", server.url("m2/pkg-1.0.tar.gz"), "HTTP 404 Not Found"),
    ]

    # The second http mirror has it: the origin is not asked.
    server.seen.clear()
    server.files["m2/pkg-1.0.tar.gz"] = Served(DATA)
    distfiles = tmp_path / "d2"
    assert fetch(Fetcher(distfiles, mirrors), src).read_bytes() == DATA
    assert server.paths() == ["m1/pkg-1.0.tar.gz", "m2/pkg-1.0.tar.gz"]

    # The directory mirror has it: no request at all.
    server.seen.clear()
    (local / "pkg-1.0.tar.gz").write_bytes(DATA)
    distfiles = tmp_path / "d3"
    assert fetch(Fetcher(distfiles, [f"file://{local}"]), src).read_bytes() == DATA
    assert server.seen == []
    assert leftovers(distfiles) == []


def test_mirror_file_names_are_url_quoted(tmp_path: Path, server: Server) -> None:
    server.files["m/a b+c.tar"] = Served(DATA)
    src = source(server.url("nowhere"), filename="a b+c.tar")
    assert fetch(Fetcher(tmp_path, [server.url("m")]), src).read_bytes() == DATA
    assert server.paths() == ["m/a b+c.tar"]


def test_mirror_urls_are_resolved_through_the_named_mirrors(tmp_path: Path, server: Server) -> None:
    """mirror://NAME/PATH: the distfiles mirrors by file name first, then each place of
    mirror NAME in order (directories and http base URLs), PATH below it."""
    local = tmp_path / "gnu"
    server.files["gnu/hello/pkg-1.0.tar.gz"] = Served(DATA)
    src = Source("pkg-1.0.tar.gz", url="mirror://gnu/hello/pkg-1.0.tar.gz", sha256=sha(DATA))
    named = {"gnu": [str(local), server.url("gnu/")], "kde": [server.url("kde")]}
    reporter = Recorder()
    fetcher = Fetcher(tmp_path / "d", [server.url("all")], named_mirrors=named, reporter=reporter)
    assert fetch(fetcher, src).read_bytes() == DATA
    assert server.paths() == ["all/pkg-1.0.tar.gz", "gnu/hello/pkg-1.0.tar.gz"]
    assert [e for e in reporter.events if e[0] != "started"] == [
        ("failed", server.url("all/pkg-1.0.tar.gz"), "HTTP 404 Not Found"),
        ("failed", str(local / "hello" / "pkg-1.0.tar.gz"), "not found"),
        ("finished", server.url("gnu/hello/pkg-1.0.tar.gz")),
    ]

    server.seen.clear()
    (local / "hello").mkdir(parents=True)
    (local / "hello" / "pkg-1.0.tar.gz").write_bytes(DATA)
    assert fetch(Fetcher(tmp_path / "d2", named_mirrors=named), src).read_bytes() == DATA
    assert server.seen == []


def test_an_unknown_mirror_name_is_one_error_naming_the_port_and_the_name(
    tmp_path: Path, server: Server
) -> None:
    """The distfiles mirrors are still tried (they hold files by name, whatever the url);
    when none has the file, the error says which mirror name is not configured."""
    src = Source("pkg-1.0.tar.gz", url="mirror://gnome/x/pkg-1.0.tar.gz", sha256=sha(DATA))
    fetcher = Fetcher(tmp_path / "d", [server.url("all")], named_mirrors={"gnu": ["/srv/gnu"]})
    with pytest.raises(FetchError) as caught:
        fetch(fetcher, src)
    assert str(caught.value) == (
        "pkg: cannot fetch pkg-1.0.tar.gz: unknown mirror 'gnome' in "
        "mirror://gnome/x/pkg-1.0.tar.gz (configure [sources] mirror.gnome); "
        f"tried {server.url('all/pkg-1.0.tar.gz')} (HTTP 404 Not Found)"
    )
    with pytest.raises(FetchError, match=r"fetch pkg-1.0.tar.gz: unknown mirror 'gnome' in \S+ \("):
        fetch(Fetcher(tmp_path / "d"), src)

    server.files["all/pkg-1.0.tar.gz"] = Served(DATA)
    assert fetch(fetcher, src).read_bytes() == DATA


def test_mismatch_at_origin_keeps_nothing(tmp_path: Path, server: Server) -> None:
    server.files["pkg-1.0.tar.gz"] = Served(BAD)
    src = source(server.url("pkg-1.0.tar.gz"))
    with pytest.raises(ChecksumMismatch) as caught:
        fetch(Fetcher(tmp_path), src)
    error = caught.value
    assert (error.port, error.filename) == ("pkg", "pkg-1.0.tar.gz")
    assert (error.expected, error.actual) == (sha(DATA), sha(BAD))
    assert sha(DATA) in str(error) and sha(BAD) in str(error)
    assert error.hint is not None and src.url is not None and src.url in error.hint
    assert cache(tmp_path) == [] and leftovers(tmp_path) == []


def test_mismatch_at_mirrors_then_good_origin(tmp_path: Path, server: Server) -> None:
    local = tmp_path / "mirror"
    local.mkdir()
    (local / "pkg-1.0.tar.gz").write_bytes(BAD)
    server.files["m/pkg-1.0.tar.gz"] = Served(BAD)
    server.files["pkg-1.0.tar.gz"] = Served(DATA)
    distfiles = tmp_path / "d"
    reporter = Recorder()
    fetcher = Fetcher(distfiles, [str(local), server.url("m")], reporter=reporter)
    path = fetch(fetcher, source(server.url("pkg-1.0.tar.gz")))
    assert path.read_bytes() == DATA
    assert cache(distfiles) == [sha(DATA)] and leftovers(distfiles) == []
    reasons = [e[2] for e in reporter.events if e[0] == "failed"]
    assert reasons == [f"sha256 mismatch: got {sha(BAD)[:12]}…"] * 2


def test_stalled_server_times_out_within_bound(tmp_path: Path, silent_port: int) -> None:
    src = source(f"http://127.0.0.1:{silent_port}/pkg-1.0.tar.gz")
    began = time.monotonic()
    with pytest.raises(FetchError, match=r"timed out: no data for 0\.3 s") as caught:
        fetch(Fetcher(tmp_path, read_timeout=0.3), src)
    assert 0.25 < time.monotonic() - began < 2
    assert not isinstance(caught.value, ChecksumMismatch)


def test_stall_mid_body_times_out_and_keeps_bytes(tmp_path: Path, server: Server) -> None:
    server.files["pkg-1.0.tar.gz"] = Served(DATA, stall_after=30_000)
    began = time.monotonic()
    with pytest.raises(FetchError, match=r"timed out after \d+ bytes: no data for 0\.2 s"):
        fetch(
            Fetcher(tmp_path, read_timeout=0.2, resume_retries=0),
            source(server.url("pkg-1.0.tar.gz")),
        )
    assert time.monotonic() - began < 1.5
    assert (tmp_path / "partial" / f"{sha(DATA)}.part").stat().st_size == 30_000


def test_every_location_and_its_failure_in_one_line(
    tmp_path: Path, server: Server, refusing_port: int
) -> None:
    local = tmp_path / "mirror"
    local.mkdir()
    origin = f"http://127.0.0.1:{refusing_port}/pkg-1.0.tar.gz"
    fetcher = Fetcher(tmp_path / "d", [str(local), server.url("m")])
    with pytest.raises(FetchError) as caught:
        fetch(fetcher, source(origin))
    message = str(caught.value)
    assert "\n" not in message
    assert message == (
        f"pkg: cannot fetch pkg-1.0.tar.gz: tried {local / 'pkg-1.0.tar.gz'} (not found); "
        f"{server.url('m/pkg-1.0.tar.gz')} (HTTP 404 Not Found); {origin} (connection refused)"
    )


def test_concurrent_fetches_of_one_file_share_one_download(tmp_path: Path, server: Server) -> None:
    server.files["pkg-1.0.tar.gz"] = Served(DATA, chunk_delay=0.005)
    src = source(server.url("pkg-1.0.tar.gz"))

    async def run() -> tuple[Path, Path]:
        async with Fetcher(tmp_path) as fetcher:
            return await asyncio.gather(fetcher.fetch("a", src), fetcher.fetch("b", src))

    first, second = asyncio.run(run())
    assert first == second and first.read_bytes() == DATA
    assert len(server.seen) == 1


def test_concurrent_fetches_from_two_threads(tmp_path: Path, server: Server) -> None:
    """Two Fetchers with their own loops and sessions: only the flock keeps them apart."""
    server.files["pkg-1.0.tar.gz"] = Served(DATA, chunk_delay=0.005)
    src = source(server.url("pkg-1.0.tar.gz"))
    results: list[dict[str, Path]] = []
    threads = [
        threading.Thread(target=lambda: results.append(Fetcher(tmp_path).fetch_sync("p", [src])))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 2 and results[0] == results[1]
    assert results[0]["pkg-1.0.tar.gz"].read_bytes() == DATA
    assert len(server.seen) == 1


def test_fetch_all_skips_port_files_and_maps_names(tmp_path: Path, server: Server) -> None:
    other = b"second source\n" * 1000
    server.files["a.tar.gz"] = Served(DATA)
    server.files["b.tar.xz"] = Served(other)
    sources = [
        source(server.url("a.tar.gz"), filename="a.tar.gz"),
        Source(filename="fix.patch", file="fix.patch"),
        source(server.url("b.tar.xz"), other, filename="b.tar.xz"),
    ]
    paths = Fetcher(tmp_path).fetch_sync("pkg", sources)
    assert sorted(paths) == ["a.tar.gz", "b.tar.xz"]
    assert paths["b.tar.xz"].read_bytes() == other
    with pytest.raises(FetchError, match="not a url source"):
        fetch(Fetcher(tmp_path), sources[1])


def test_fetch_all_raises_the_first_failure_after_the_rest_finish(
    tmp_path: Path, server: Server
) -> None:
    server.files["b.tar.xz"] = Served(DATA)
    sources = [
        source(server.url("a.tar.gz"), b"gone", filename="a.tar.gz"),
        source(server.url("b.tar.xz"), filename="b.tar.xz"),
    ]
    with pytest.raises(FetchError, match="a.tar.gz.*HTTP 404"):
        Fetcher(tmp_path).fetch_sync("pkg", sources)
    assert cache(tmp_path) == [sha(DATA)]


def test_redirects_are_followed_and_bounded(tmp_path: Path, server: Server) -> None:
    server.files["old/pkg-1.0.tar.gz"] = Served(DATA, redirect="/new/pkg-1.0.tar.gz")
    server.files["new/pkg-1.0.tar.gz"] = Served(DATA)
    server.files["loop"] = Served(DATA, redirect="/loop")
    path = fetch(Fetcher(tmp_path), source(server.url("old/pkg-1.0.tar.gz")))
    assert path.read_bytes() == DATA
    with pytest.raises(FetchError, match=r"more than 3 redirects"):
        fetch(Fetcher(tmp_path / "d", max_redirects=3), source(server.url("loop"), b"x"))
    assert server.paths().count("loop") == 4


def test_size_limit(tmp_path: Path, server: Server) -> None:
    server.files["pkg-1.0.tar.gz"] = Served(DATA)
    with pytest.raises(FetchError, match=r"204800 bytes, more than the limit of 1000"):
        fetch(Fetcher(tmp_path, max_bytes=1000), source(server.url("pkg-1.0.tar.gz")))
    assert leftovers(tmp_path) == []


def test_content_encoding_is_not_decoded(tmp_path: Path, server: Server) -> None:
    """A .tar.gz served as Content-Encoding: gzip is still the .tar.gz the recipe hashed."""
    archive = gzip.compress(DATA, mtime=0)
    server.files["pkg-1.0.tar.gz"] = Served(archive, encoding="gzip")
    path = fetch(Fetcher(tmp_path), source(server.url("pkg-1.0.tar.gz"), archive))
    assert path.read_bytes() == archive


@pytest.mark.parametrize(
    ("src", "message"),
    [
        (Source(filename="x", url="http://h/x"), "no valid sha256"),
        (Source(filename="x", url="http://h/x", sha256="../../etc/passwd"), "no valid sha256"),
        (Source(filename="..", url="http://h/x", sha256="a" * 64), "plain name"),
    ],
)
def test_unusable_sources_are_rejected(tmp_path: Path, src: Source, message: str) -> None:
    with pytest.raises(FetchError, match=message):
        fetch(Fetcher(tmp_path), src)


def test_unsupported_scheme_and_bad_mirror(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"ftp://h/x \(unsupported url scheme 'ftp'\)"):
        fetch(Fetcher(tmp_path), Source(filename="x", url="ftp://h/x", sha256="a" * 64))
    with pytest.raises(ConfigError, match="neither an http"):
        Mirror.parse("ftp://mirror/")
    assert Fetcher(tmp_path).cached("../" + "a" * 61) is None


# -- a cancelled build ------------------------------------------------------------------------


@dataclass
class Flowing(FetchReporter):
    """Says when the first bytes of a download have arrived."""

    event: threading.Event = field(default_factory=threading.Event)

    def advanced(self, port: str, filename: str, nbytes: int) -> None:
        self.event.set()


def test_a_cancelled_build_stops_downloading_and_keeps_only_a_resumable_part(
    tmp_path: Path, server: Server
) -> None:
    """A superseded build's cancel event, set from another thread mid-download, stops the
    fetch at once (the whole download would take about 13 s) with a cancellation error; the
    bytes so far stay in partial/ and the next fetch resumes them."""
    server.files["slow-1.0.tar.gz"] = Served(DATA, chunk_delay=1.0)  # 16 KiB a second
    url = server.url("slow-1.0.tar.gz")
    tree = tmp_path / "tree"
    (tree / "ports" / "slow").mkdir(parents=True)
    (tree / "ports" / "slow" / "port.toml").write_text(
        recipe("slow", source_url=url, source_sha=sha(DATA))
    )
    arch = platform.machine()
    config = Config(state_dir=tmp_path / "state", arch=arch)
    reporter = Flowing()
    workspace = Workspace.open(config, reporter=reporter)
    checkout = open_checkout(tree, None, None, arch, toolchain="", contents={})
    plan = make_plan(checkout.evaluation.graph, checkout.evaluation.keys, set(), ["slow"])
    revision = Revision(checkout.tree, checkout.evaluation, checkout.commit)
    cancel = threading.Event()
    outcome: list[BaseException] = []

    def build() -> None:
        try:
            workspace.build(revision, plan.builds[0], cancel)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=build)
    thread.start()
    assert reporter.event.wait(10), "no byte arrived"
    cancelled_at = time.monotonic()
    cancel.set()
    thread.join(10)
    assert not thread.is_alive()
    assert time.monotonic() - cancelled_at < 2
    (error,) = outcome
    assert isinstance(error, FetchCancelled)
    assert str(error) == "slow: cannot fetch slow-1.0.tar.gz: cancelled"
    distfiles = config.distfiles
    assert cache(distfiles) == []
    assert leftovers(distfiles) == [f"{sha(DATA)}.part", f"{sha(DATA)}.part.json"]
    kept = (distfiles / "partial" / f"{sha(DATA)}.part").stat().st_size
    assert 0 < kept < len(DATA)

    server.files["slow-1.0.tar.gz"].chunk_delay = 0
    path = fetch(Fetcher(distfiles), source(url, filename="slow-1.0.tar.gz"))
    assert path.read_bytes() == DATA
    assert server.seen[-1] == Seen("slow-1.0.tar.gz", f"bytes={kept}-", '"v1"', 206)
