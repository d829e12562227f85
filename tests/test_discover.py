"""LAN discovery: the TXT contract and the trust rule as pure tests, then real mDNS between
two network namespaces joined by a veth pair, a private two-host LAN made for each test.

Nothing crosses the machine's real interfaces: every zeroconf socket of these tests is
created inside a namespace (a thread of this process joins one with setns(2), and the
threads zeroconf starts from it inherit it), and the daemon runs under `ip netns exec`.
Each test gets its own namespaces, so runs in parallel (pytest -n 2) never hear each other.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
from rich.console import Console

from portsd.cli.discover import discover
from portsd.cli.options import add_discover_options
from portsd.config import Config
from portsd.errors import ConfigError, DiscoveryError
from portsd.pkg.discover import (
    PROTOCOL,
    Advertiser,
    Announcement,
    DiscoveredCache,
    Verdict,
    advertised_addresses,
    announcement_for,
    browse_async,
    parse_advert,
    trusted_caches,
)
from portsd.pkg.sign import PublicKey, SecretKey
from tests.daemon_harness import command_environment, portsd

T = TypeVar("T")

ADDRESS_A = "198.18.0.1"  # RFC 2544 benchmarking range, and only inside our namespaces
ADDRESS_B = "198.18.0.2"
BROWSE = 1.5  # seconds; answers arrive within ~0.1 s on a veth
CLONE_NEWNET = 0x40000000
NETNS_PREFIX = "portsd-test-"  # then <pid of the test process>-<random>-<host>


def key() -> PublicKey:
    return SecretKey.generate().public_key


def announcement(public: PublicKey, **changes: Any) -> Announcement:
    made = Announcement(
        name=f"test {secrets.token_hex(4)}",
        port=8470,
        addresses=(ADDRESS_A,),
        archs=("x86_64", "aarch64"),
        key=public,
        version="9.9.9",
    )
    return replace(made, **changes)


def cache_of(made: Announcement) -> DiscoveredCache:
    return parse_advert(made.name, made.addresses, made.port, made.txt())


# -- the TXT record and the trust rule, without a network -------------------------------


def test_an_announcement_reads_back_as_the_cache_it_describes() -> None:
    public = key()
    made = announcement(public, addresses=("fe80::1%3", "2001:db8::5", ADDRESS_A))
    cache = cache_of(made)
    assert cache.name == made.name
    assert cache.url == f"http://{ADDRESS_A}:8470/repo/"
    assert cache.origin == f"http://{ADDRESS_A}:8470"
    assert cache.addresses == (ADDRESS_A, "2001:db8::5", "fe80::1%3")  # IPv4 first
    assert cache.archs == ("x86_64", "aarch64") and cache.serves("aarch64")
    assert cache.key == public and cache.key_id == public.key_id
    assert cache.version == "9.9.9" and cache.protocol == PROTOCOL
    assert sum(len(k) + len(v) + 2 for k, v in made.txt().items()) < 255  # one small packet


def test_ipv6_only_caches_get_bracketed_urls_with_zones() -> None:
    cache = cache_of(announcement(key(), addresses=("fe80::1%3", "2001:db8::5")))
    assert cache.url == "http://[2001:db8::5]:8470/repo/"
    cache = cache_of(announcement(key(), addresses=("fe80::1%3",)))
    assert cache.url == "http://[fe80::1%253]:8470/repo/"


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"keyid": None}, "lacks 'keyid'"),
        ({"pubkey": None}, "lacks 'pubkey'"),
        ({"proto": "one"}, "bad protocol"),
        ({"pubkey": "RWQnotakey"}, "bad public key"),
        ({"keyid": "0123456789ABCDEF"}, "is not the id of the advertised key"),
        ({"path": "repo/"}, "absolute URL path"),
        ({"path": "/repo"}, "absolute URL path"),
    ],
)
def test_a_malformed_txt_record_is_refused(change: dict[str, str | None], complaint: str) -> None:
    made = announcement(key())
    txt: dict[str, str | None] = {**made.txt(), **change}
    with pytest.raises(DiscoveryError, match=complaint) as caught:
        parse_advert(made.name, made.addresses, made.port, txt)
    assert caught.value.service == made.name


def test_an_advert_of_loopback_addresses_only_is_refused() -> None:
    made = announcement(key())
    with pytest.raises(DiscoveryError, match="no usable address"):
        parse_advert(made.name, ["127.0.0.1", "::1"], made.port, made.txt())


def test_trust_comes_from_the_configured_keys_only() -> None:
    ours, stranger = SecretKey.generate(), key()
    trusted = cache_of(announcement(ours.public_key))
    unknown = cache_of(announcement(stranger))
    # an impostor: our key's id with its own key bytes
    forged = cache_of(announcement(PublicKey(ours.keynum, stranger.key)))
    future = replace(cache_of(announcement(ours.public_key)), protocol=PROTOCOL + 1)
    judged = trusted_caches([unknown, forged, future, trusted], [ours.public_key])
    assert [(j.cache, j.verdict) for j in judged] == [
        (trusted, Verdict.TRUSTED),
        (unknown, Verdict.UNTRUSTED),
        (forged, Verdict.KEY_MISMATCH),
        (future, Verdict.INCOMPATIBLE),
    ]
    assert judged[0].key == ours.public_key and judged[0].url == trusted.url
    assert all(j.key is None and not j.trusted for j in judged[1:])
    assert [j.verdict for j in trusted_caches([trusted], [])] == [Verdict.UNTRUSTED]


def test_a_daemon_on_loopback_has_nothing_to_advertise(tmp_path: Path) -> None:
    assert advertised_addresses("127.0.0.1") == ()
    assert advertised_addresses("::1") == ()
    assert advertised_addresses("localhost") == ()
    assert advertised_addresses(ADDRESS_A) == (ADDRESS_A,)
    with pytest.raises(ConfigError, match="listens on 127.0.0.1 only") as caught:
        announcement_for(Config(state_dir=tmp_path))
    assert caught.value.hint and "--listen" in caught.value.hint


# -- a two-host LAN of network namespaces -----------------------------------------------


def _enter(netns: str) -> None:
    """Move the calling thread (only it) into ``netns``."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"setns {netns}: {os.strerror(error)}")
    finally:
        os.close(fd)


def in_netns(netns: str, function: Callable[[], T], timeout: float = 60) -> T:
    """``function()`` in a new thread inside ``netns``; its result or its exception."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            _enter(netns)
            outcome.append((True, function()))
        except BaseException as error:  # handed to the caller
            outcome.append((False, error))

    thread = threading.Thread(target=run, name=f"in {netns}", daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"timed out after {timeout} s in {netns}"
    ok, value = outcome[0]
    if not ok:
        raise value
    return cast(T, value)


class Host:
    """One machine of the test LAN: an event loop on a thread inside a network namespace."""

    def __init__(self, netns: str, address: str) -> None:
        self.netns = netns
        self.address = address
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=netns, daemon=True)
        self._ready = threading.Event()
        self._failure: OSError | None = None
        self._thread.start()
        assert self._ready.wait(10), f"the thread of {netns} did not start"
        if self._failure is not None:
            raise self._failure

    def _run(self) -> None:
        try:
            _enter(self.netns)
        except OSError as error:
            self._failure = error
            self._ready.set()
            return
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        self.loop.run_forever()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def browse(self, seconds: float = BROWSE) -> list[DiscoveredCache]:
        return self.run(browse_async(seconds, [self.address]))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass(frozen=True)
class Lan:
    a: Host
    b: Host


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _sweep_namespaces() -> None:
    """Delete the namespaces of test processes that died before their cleanup ran."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    for line in listing.stdout.splitlines():
        name = line.split(" ", 1)[0]
        if name.startswith(NETNS_PREFIX):
            owner = int(name.removeprefix(NETNS_PREFIX).split("-", 1)[0])
            if not Path(f"/proc/{owner}").exists():
                subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


@pytest.fixture
def lan() -> Iterator[Lan]:
    """Hosts a (198.18.0.1) and b (198.18.0.2) on a veth pair, in namespaces of their own."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (CI has both)")
    _sweep_namespaces()
    tag = secrets.token_hex(4)
    netns = {side: f"{NETNS_PREFIX}{os.getpid()}-{tag}-{side}" for side in "ab"}
    made: list[str] = []
    hosts: list[Host] = []
    try:
        for name in netns.values():
            ip("netns", "add", name)
            made.append(name)
        # both ends are created inside their namespaces: the root namespace never has them
        ip(
            *f"link add pd{tag}a netns {netns['a']} type veth peer name pd{tag}b".split(),
            "netns",
            netns["b"],
        )
        for side, address in (("a", ADDRESS_A), ("b", ADDRESS_B)):
            ip("-n", netns[side], "addr", "add", f"{address}/24", "dev", f"pd{tag}{side}")
            ip("-n", netns[side], "link", "set", f"pd{tag}{side}", "up")
            ip("-n", netns[side], "link", "set", "lo", "up")
            hosts.append(Host(netns[side], address))
        yield Lan(*hosts)
    finally:
        for host in hosts:
            host.close()
        for name in made:  # takes the veth pair with it
            ip("netns", "del", name)


# -- real mDNS between the two hosts ----------------------------------------------------


def test_a_cache_advertised_on_one_host_is_found_and_judged_from_another(lan: Lan) -> None:
    ours = SecretKey.generate().public_key
    made = announcement(ours, port=8471)
    advertiser = Advertiser(made)
    lan.a.run(advertiser.start())
    try:
        found = lan.b.browse()
    finally:
        lan.a.run(advertiser.stop())
    assert len(found) == 1, found  # the LAN is ours alone: exactly one cache
    cache = found[0]
    assert cache.name == made.name == advertiser.name
    assert cache.url == f"http://{ADDRESS_A}:8471/repo/"
    assert cache.key_id == ours.key_id and cache.key == ours
    assert cache.archs == made.archs and cache.version == "9.9.9"
    assert [j.verdict for j in trusted_caches(found, [ours])] == [Verdict.TRUSTED]
    assert [j.verdict for j in trusted_caches(found, [key()])] == [Verdict.UNTRUSTED]
    # stopped: its goodbyes are out, and nobody answers a fresh browse
    assert lan.b.browse() == []


def test_a_stopped_advertiser_leaves_a_running_browse(
    lan: Lan, caplog: pytest.LogCaptureFixture
) -> None:
    """A browse that saw the cache drops it on the goodbyes, before its window ends."""
    caplog.set_level(logging.DEBUG, logger="portsd.pkg.discover")
    advertiser = Advertiser(announcement(key()))
    lan.a.run(advertiser.start())
    browsing = asyncio.run_coroutine_threadsafe(browse_async(3.0, [ADDRESS_B]), lan.b.loop)
    time.sleep(1.5)  # past the browser's second question: it has its answer by now
    lan.a.run(advertiser.stop())
    assert browsing.result(10) == []
    events = [r.getMessage() for r in caplog.records if advertiser.name in r.getMessage()]
    assert events[0].startswith("mDNS: added") and events[-1].startswith("mDNS: removed")


def test_two_caches_of_one_name_are_told_apart(lan: Lan) -> None:
    """Two machines of one host name: the second is renamed, and each keeps its address."""
    made = announcement(key())
    first = Advertiser(made)
    second = Advertiser(replace(made, addresses=(ADDRESS_B,)))
    lan.a.run(first.start())
    lan.b.run(second.start())
    try:
        # from b, beside b's own responder: the answers are multicast, so both hear them
        found = lan.b.browse()
    finally:
        lan.a.run(first.stop())
        lan.b.run(second.stop())
    assert first.name == made.name and second.name == f"{made.name}-2"
    assert {(c.name, c.url) for c in found} == {
        (first.name, f"http://{ADDRESS_A}:8470/repo/"),
        (second.name, f"http://{ADDRESS_B}:8470/repo/"),
    }


def test_browsing_a_quiet_lan_takes_the_timeout_and_finds_nothing(lan: Lan) -> None:
    started = time.monotonic()
    assert lan.b.browse(1.0) == []
    assert 1.0 <= time.monotonic() - started < 3.0


def test_a_wildcard_listener_advertises_its_lan_addresses_only(lan: Lan) -> None:
    assert in_netns(lan.a.netns, lambda: advertised_addresses("0.0.0.0")) == (ADDRESS_A,)
    assert in_netns(lan.a.netns, lambda: advertised_addresses("")) == (ADDRESS_A,)


def test_ports_discover_shows_trusted_and_untrusted_caches(lan: Lan, tmp_path: Path) -> None:
    ours, stranger = key(), key()
    trusted = Advertiser(announcement(ours, name=f"ours {secrets.token_hex(3)}", port=8471))
    other = Advertiser(announcement(stranger, name=f"theirs {secrets.token_hex(3)}", port=8472))
    lan.a.run(trusted.start())
    lan.a.run(other.start())
    config = tmp_path / "ports.toml"
    config.write_text(f'trusted-keys = ["{ours.base64()}"]\n')
    parser = argparse.ArgumentParser()
    add_discover_options(parser)
    args = parser.parse_args(
        ["--config", str(config), "--timeout", str(BROWSE), "--interface", ADDRESS_B]
    )
    out = io.StringIO()
    try:
        # a thread of its own: `ports discover` runs its own event loop, as a command does
        code = in_netns(lan.b.netns, lambda: discover(args, Console(file=out, width=200)))
    finally:
        lan.a.run(trusted.stop())
        lan.a.run(other.stop())
    assert code == 0
    # not a terminal: plain columns, two spaces or more apart (names hold single spaces)
    rows = {re.split(r"\s{2,}", line.strip())[0]: line for line in out.getvalue().splitlines()}
    assert f"http://{ADDRESS_A}:8471/repo/" in rows[trusted.name]
    assert ours.key_id in rows[trusted.name] and rows[trusted.name].rstrip().endswith("trusted")
    assert stranger.key_id in rows[other.name] and "untrusted" in rows[other.name]
    assert "2 cache(s) found, 1 trusted" in out.getvalue()


# -- the daemon: `portsd serve --advertise` ---------------------------------------------


class NetnsDaemon:
    """``portsd serve`` in a namespace (`ip netns exec`), its log in a file."""

    def __init__(self, netns: str, repo: Path, log: Path, *flags: str) -> None:
        self.log = log
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", netns, sys.executable, "-m", "portsd.cli.daemon"]
                + ["serve", "--repo", str(repo), "--port", "8470", "--advertise", *flags],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=command_environment(),
            )

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log.read_text():
            assert self.process.poll() is None, f"the daemon exited:\n{self.log.read_text()}"
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.log.read_text()}"
            time.sleep(0.05)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def fetch_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    made = tmp_path / "build.git"
    portsd("init", made)
    return made


def test_portsd_serve_advertise_is_found_and_answers(lan: Lan, repo: Path, tmp_path: Path) -> None:
    daemon = NetnsDaemon(lan.a.netns, repo, tmp_path / "daemon.log", "--listen", ADDRESS_A)
    try:
        daemon.wait_for_log("advertising")
        found = lan.b.browse()
        assert len(found) == 1, f"{found}\n{daemon.log.read_text()}"
        cache = found[0]
        public = PublicKey.load(repo / "portsd" / "keys" / "portsd.pub")
        assert cache.url == f"http://{ADDRESS_A}:8470/repo/"
        assert cache.key == public
        assert [j.verdict for j in trusted_caches(found, [public])] == [Verdict.TRUSTED]
        # the advertised origin is the daemon itself, reachable from the other host
        status = in_netns(lan.b.netns, lambda: fetch_json(cache.origin + "/api/v1/status"))
        assert status["branch"] == "main"
    finally:
        assert daemon.stop() == 0
    assert lan.b.browse() == []  # unregistered on shutdown


def test_portsd_serve_on_loopback_warns_and_advertises_nothing(
    lan: Lan, repo: Path, tmp_path: Path
) -> None:
    daemon = NetnsDaemon(lan.a.netns, repo, tmp_path / "daemon.log")  # default: 127.0.0.1
    try:
        daemon.wait_for_log("NOT advertising")
        assert "listens on 127.0.0.1 only" in daemon.log.read_text()
        assert lan.b.browse() == []
        # ... and it serves all the same, on loopback
        status = in_netns(lan.a.netns, lambda: fetch_json("http://127.0.0.1:8470/api/v1/status"))
        assert status["branch"] == "main"
    finally:
        assert daemon.stop() == 0
