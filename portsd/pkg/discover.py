"""Finding caches on the LAN: a daemon advertises its repository over mDNS/DNS-SD, clients browse.

The service type is ``_portsd._tcp.local.``; the SRV record gives the daemon's port and the
A/AAAA records its addresses. The TXT record (protocol 1) carries:

    proto=1                  the protocol; a client uses no cache of a protocol it does not speak
    path=/repo/              the repository's HTTP path (``<path><arch>/index.msgpack.zst``)
    arch=x86_64,aarch64      the architectures the repository has (comma-separated)
    keyid=EB20802A98EDC401   the id of the key that signs the repository (as minisign prints it)
    pubkey=RWQB...           that public key, base64 as ``minisign -P`` takes it
    version=0.1.0            the daemon's version (information only)

A later protocol keeps these fields and bumps ``proto`` only for changes a protocol-1 client
must not ignore.

An advertisement is a *hint*, never a source of trust: a client uses a cache only when the
advertised key id names a key its own configuration trusts (``trusted_caches``), and then
verifies every index and package against that configured key, never against the advertised
one. Anyone on the LAN can advertise anything; the worst a forged advert achieves is a
download that fails verification.

python-zeroconf runs on the asyncio loop of whoever starts it (no threads of its own here):
``Advertiser`` lives on the daemon's loop; ``browse`` runs a private loop for a bounded time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from importlib import metadata
from types import TracebackType

import ifaddr
from zeroconf import Error as ZeroconfError
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from portsd.config import Config
from portsd.errors import ConfigError, DiscoveryError
from portsd.pkg.sign import PublicKey

log = logging.getLogger(__name__)

SERVICE_TYPE = "_portsd._tcp.local."
PROTOCOL = 1
REPO_PATH = "/repo/"
BROWSE_SECONDS = 3.0  # responders answer within ~0.1 s; the rest covers lost packets
_RESOLVE_GRACE = 0.5  # a service seen just before the deadline still gets this long
_INSTANCE_MAX = 63  # bytes in a DNS label, so in a service instance name


@dataclass(frozen=True, slots=True)
class Announcement:
    """What a daemon tells the LAN about its cache (see the module docstring for the TXT)."""

    name: str  # the instance name people see; zeroconf appends -2, -3... on a conflict
    port: int
    addresses: tuple[str, ...]  # reachable IP addresses of the daemon; never loopback
    archs: tuple[str, ...]
    key: PublicKey
    version: str
    path: str = REPO_PATH

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("an announcement needs at least one address")
        if not self.name or len(self.name.encode()) > _INSTANCE_MAX:
            raise ValueError(f"an instance name is 1 to {_INSTANCE_MAX} bytes: {self.name!r}")
        if not self.archs or any(not a or "," in a for a in self.archs):
            raise ValueError(f"bad architectures: {self.archs!r}")
        _check_path(self.path)

    def txt(self) -> dict[str, str]:
        """The TXT record's key/value pairs."""
        return {
            "proto": str(PROTOCOL),
            "path": self.path,
            "arch": ",".join(self.archs),
            "keyid": self.key.key_id,
            "pubkey": self.key.base64(),
            "version": self.version,
        }


@dataclass(frozen=True, slots=True)
class DiscoveredCache:
    """A cache found on the LAN, as it describes itself (nothing here is trusted)."""

    name: str  # instance name, unique on the LAN
    origin: str  # http://address:port, the daemon's root (its /api/v1/...)
    url: str  # the repository: origin + path; ``<url><arch>/index.msgpack.zst``
    addresses: tuple[str, ...]
    port: int
    archs: tuple[str, ...]
    key_id: str
    key: PublicKey  # as advertised: compared with the trusted keys, never trusted itself
    version: str
    protocol: int

    def serves(self, arch: str) -> bool:
        return arch in self.archs


class Verdict(StrEnum):
    """Whether a client may use a discovered cache."""

    TRUSTED = "trusted"  # signed by a key the client's configuration trusts
    UNTRUSTED = "untrusted"  # signed by a key the client does not know
    KEY_MISMATCH = "key mismatch"  # a trusted key's id, but other key bytes: an impostor
    INCOMPATIBLE = "incompatible"  # a protocol this client does not speak


@dataclass(frozen=True, slots=True)
class JudgedCache:
    """A discovered cache and the client's verdict on it."""

    cache: DiscoveredCache
    verdict: Verdict
    key: PublicKey | None  # the configured key to verify it with (only when trusted)

    @property
    def url(self) -> str:
        return self.cache.url

    @property
    def trusted(self) -> bool:
        return self.verdict is Verdict.TRUSTED


def trusted_caches(
    discovered: Iterable[DiscoveredCache], trusted_keys: Iterable[PublicKey]
) -> list[JudgedCache]:
    """Every discovered cache with its verdict: trusted ones first, then in the given order.

    Trust comes only from ``trusted_keys`` (the client's configuration): a cache is trusted
    when its advertised key id is a trusted key's and the advertised key bytes are that key's.
    The key to verify its files with is ``JudgedCache.key``, the configured one.
    """
    by_id = {key.key_id: key for key in trusted_keys}
    judged = []
    for cache in discovered:
        known = by_id.get(cache.key_id)
        if cache.protocol != PROTOCOL:
            verdict = Verdict.INCOMPATIBLE
        elif known is None:
            verdict = Verdict.UNTRUSTED
        elif known != cache.key:
            verdict = Verdict.KEY_MISMATCH
        else:
            verdict = Verdict.TRUSTED
        judged.append(JudgedCache(cache, verdict, known if verdict is Verdict.TRUSTED else None))
    judged.sort(key=lambda j: not j.trusted)  # stable: keeps the order within each group
    return judged


def parse_advert(
    name: str, addresses: Sequence[str], port: int, txt: Mapping[str, str | None]
) -> DiscoveredCache:
    """A cache from the parts of its DNS-SD records; ``DiscoveryError`` if malformed.

    ``addresses`` are IP addresses (IPv6 may carry a ``%scope``); loopback ones are dropped,
    since they would point a client at itself. ``name`` is the instance name.
    """

    def field(key: str) -> str:
        value = txt.get(key)
        if not value:
            raise DiscoveryError(f"the TXT record lacks '{key}'", service=name)
        return value

    try:
        protocol = int(field("proto"))
    except ValueError:
        raise DiscoveryError(f"bad protocol {txt.get('proto')!r}", service=name) from None
    path = field("path")
    try:
        _check_path(path)
    except ValueError as error:
        raise DiscoveryError(str(error), service=name) from None
    try:
        key = PublicKey.parse(field("pubkey"), f"{name}: pubkey")
    except ConfigError as error:
        raise DiscoveryError(f"bad public key: {error.message}", service=name) from None
    key_id = field("keyid")
    if key_id != key.key_id:
        raise DiscoveryError(
            f"key id {key_id} is not the id of the advertised key ({key.key_id})", service=name
        )
    usable = sorted((a for a in addresses if not _is_loopback(a)), key=_preference)
    if not usable:
        raise DiscoveryError("no usable address (none, or only loopback)", service=name)
    if not 0 < port < 65536:
        raise DiscoveryError(f"bad port {port}", service=name)
    origin = f"http://{_url_host(usable[0])}:{port}"
    return DiscoveredCache(
        name=name,
        origin=origin,
        url=origin + path,
        addresses=tuple(usable),
        port=port,
        archs=tuple(a for a in field("arch").split(",") if a),
        key_id=key_id,
        key=key,
        version=txt.get("version") or "?",
        protocol=protocol,
    )


async def browse_async(
    timeout: float = BROWSE_SECONDS, interfaces: Sequence[str] | None = None
) -> list[DiscoveredCache]:
    """The caches that answer within ``timeout`` seconds, sorted by name.

    ``interfaces``: IP addresses of the interfaces to ask on (default: every interface).
    Takes ``timeout`` plus at most ``_RESOLVE_GRACE`` seconds; malformed adverts are left
    out (logged at debug level). Raises ``DiscoveryError`` when mDNS cannot be used at all.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    zc = _open(interfaces)
    lookups: dict[str, asyncio.Task[DiscoveredCache | None]] = {}

    def changed(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        log.debug("mDNS: %s %s", state_change.name.lower(), name)
        old = lookups.pop(name, None)
        if old is not None:
            old.cancel()  # gone, or its records changed: look again
        if state_change is not ServiceStateChange.Removed:
            lookups[name] = loop.create_task(_resolve(zeroconf, name, deadline))

    try:
        # zeroconf's questions: the first asks for a unicast answer (fast even when the
        # responder multicast a moment ago), the next ones, from 1 s on, for multicast answers
        # (heard even when another responder on this machine, avahi say, shares port 5353)
        browser = AsyncServiceBrowser(zc.zeroconf, SERVICE_TYPE, handlers=[changed])
        try:
            await asyncio.sleep(max(0.0, deadline - loop.time()))
        finally:
            await browser.async_cancel()
        found = await asyncio.gather(*lookups.values())
    finally:
        for task in lookups.values():
            task.cancel()
        await _close(zc, 2.0)
    return sorted((cache for cache in found if cache is not None), key=lambda c: c.name)


def browse(
    timeout: float = BROWSE_SECONDS, interfaces: Sequence[str] | None = None
) -> list[DiscoveredCache]:
    """``browse_async`` on a private event loop (not for use inside a running loop)."""
    return asyncio.run(browse_async(timeout, interfaces))


class Advertiser:
    """Announces one cache over mDNS from the running asyncio loop, until ``stop``.

    ``start`` probes for a unique name (renaming on a conflict) and announces: 1.5 to 2 s;
    ``stop`` sends goodbyes, so browsers drop the cache at once, and closes the sockets.
    Both are bounded by their ``timeout``. Usable as ``async with``.
    """

    def __init__(self, announcement: Announcement) -> None:
        self.announcement = announcement
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None

    @property
    def name(self) -> str:
        """The instance name registered (the announced one, or a renamed one after a conflict)."""
        if self._info is None:
            return self.announcement.name
        return _instance(self._info.name)

    async def start(self, timeout: float = 10.0) -> None:
        if self._zc is not None:
            raise RuntimeError("the advertiser is already started")
        a = self.announcement
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{a.name}.{SERVICE_TYPE}",
            port=a.port,
            properties=a.txt(),
            # Not the host's name, which another responder (avahi) may own, nor the instance
            # name, which two machines may share before a rename: then their addresses would
            # merge. No two daemons share an address and a port.
            server=_server_name(a.addresses[0], a.port),
            parsed_addresses=list(a.addresses),
        )
        zc = _open(a.addresses)
        self._zc, self._info = zc, info
        try:
            await asyncio.wait_for(_register(zc, info), timeout)
        except BaseException as error:
            self._zc = self._info = None
            await _close(zc, 2.0)
            if isinstance(error, TimeoutError):
                raise DiscoveryError(
                    f"announcing took over {timeout:g} s", service=a.name
                ) from None
            if isinstance(error, ZeroconfError):
                raise DiscoveryError(f"cannot announce: {error!r}", service=a.name) from None
            raise

    async def stop(self, timeout: float = 5.0) -> None:
        """Withdraw the announcement; idempotent."""
        zc, info = self._zc, self._info
        self._zc = None
        if zc is None or info is None:
            return
        try:
            # Out of the registry before the goodbyes: zeroconf's close sends them with the
            # service still registered, so it answers a query between two goodbyes with the
            # full TTL, and browsers drop the later, identical goodbyes as duplicates.
            await asyncio.wait_for(_unregister(zc, info), timeout)
        except TimeoutError:
            log.warning("mDNS: the goodbyes of %r took over %g s", self.name, timeout)
        finally:
            await _close(zc, timeout)

    async def __aenter__(self) -> Advertiser:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


def advertised_addresses(listen: str) -> tuple[str, ...]:
    """The addresses other machines can reach a daemon listening on ``listen`` at.

    A wildcard (``0.0.0.0``, ``::``, empty) means every non-loopback address of the machine
    (IPv4, plus IPv6 for ``::``). An empty result means the daemon is reachable from this
    machine only, so advertising it would only mislead.
    """
    if listen in ("", "0.0.0.0", "::"):
        found: list[str] = []
        for adapter in ifaddr.get_adapters():
            for ip in adapter.ips:
                if isinstance(ip.ip, str):
                    found.append(ip.ip)
                elif listen == "::" and not ipaddress.ip_address(ip.ip[0]).is_link_local:
                    found.append(ip.ip[0])  # link-local needs a scope no URL of ours carries
        candidates = found
    else:
        try:
            candidates = [str(ipaddress.ip_address(listen))]
        except ValueError:  # a host name
            try:
                infos = socket.getaddrinfo(listen, None, type=socket.SOCK_STREAM)
            except OSError as error:
                raise ConfigError(
                    f"cannot resolve the listen address {listen!r}: {error}"
                ) from None
            candidates = [str(info[4][0]) for info in infos]
    unique = dict.fromkeys(a for a in candidates if not _is_loopback(a))
    return tuple(sorted(unique, key=_preference))


def announcement_for(config: Config, name: str | None = None) -> Announcement:
    """What the daemon of ``config`` announces; ``ConfigError`` if no other machine can reach it.

    Reads the public key (the daemon has created it by then) and the architectures present
    in the repository, besides the configured one.
    """
    addresses = advertised_addresses(config.listen)
    if not addresses:
        error = ConfigError(
            f"the daemon listens on {config.listen} only, which no other machine can reach, "
            "so there is nothing to advertise"
        )
        error.hint = "serve the LAN with --listen 0.0.0.0 (or a LAN address of this machine)"
        raise error
    archs = {config.arch}
    if config.repo.is_dir():
        archs.update(p.name for p in config.repo.iterdir() if (p / "index.msgpack.zst").is_file())
    return Announcement(
        name=name or _default_name(),
        port=config.port,
        addresses=addresses,
        archs=tuple(sorted(archs)),
        key=PublicKey.load(config.public_key),
        version=_version(),
    )


def _open(interfaces: Sequence[str] | None) -> AsyncZeroconf:
    """A zeroconf instance on the running loop, on ``interfaces`` (IP addresses) or all."""
    try:
        if interfaces is None:
            return AsyncZeroconf(ip_version=IPVersion.V4Only)
        return AsyncZeroconf(interfaces=list(interfaces))
    except (OSError, RuntimeError, ValueError) as error:
        where = ", ".join(interfaces) if interfaces else "all interfaces"
        raise DiscoveryError(f"cannot use mDNS on {where}: {error}") from None


async def _register(zc: AsyncZeroconf, info: AsyncServiceInfo) -> None:
    announcing = await zc.async_register_service(info, allow_name_change=True)  # probed
    await announcing


async def _unregister(zc: AsyncZeroconf, info: AsyncServiceInfo) -> None:
    goodbyes = await zc.async_unregister_service(info)
    await goodbyes


async def _close(zc: AsyncZeroconf, timeout: float) -> None:
    """Goodbyes for anything registered, then the sockets; bounded by ``timeout``."""
    try:
        await asyncio.wait_for(zc.async_close(), timeout)
    except TimeoutError:
        log.warning("mDNS did not shut down within %g s; closing its sockets anyway", timeout)
        with contextlib.suppress(Exception):
            zc.zeroconf.engine.close()  # on the loop: closes the transports at once


async def _resolve(zc: Zeroconf, name: str, deadline: float) -> DiscoveredCache | None:
    info = AsyncServiceInfo(SERVICE_TYPE, name)
    remaining = max(deadline - asyncio.get_running_loop().time(), _RESOLVE_GRACE)
    if not await info.async_request(zc, remaining * 1000):
        log.debug("mDNS: %s did not resolve in time", name)
        return None
    try:
        return parse_advert(
            _instance(name), info.parsed_scoped_addresses(), info.port or 0, info.decoded_properties
        )
    except DiscoveryError as error:
        log.debug("mDNS: ignoring a malformed advert: %s", error)
        return None


def _instance(name: str) -> str:
    return name.removesuffix("." + SERVICE_TYPE)


def _check_path(path: str) -> None:
    if not path.startswith("/") or not path.endswith("/") or any(c in path for c in "?#\\ "):
        raise ValueError(
            f"the repository path must be an absolute URL path ending in '/': {path!r}"
        )


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).is_loopback
    except ValueError:
        return True  # not an address at all: as useless as loopback


def _preference(address: str) -> tuple[int, str]:
    """IPv4 first (simplest URLs), then global IPv6, then link-local IPv6."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    return (0 if ip.version == 4 else 2 if ip.is_link_local else 1, address)


def _url_host(address: str) -> str:
    if ":" not in address:
        return address
    bare, _, zone = address.partition("%")
    return f"[{bare}%25{zone}]" if zone else f"[{bare}]"  # RFC 6874 zone in a URL


def _server_name(address: str, port: int) -> str:
    """A host name for the SRV record: ``portsd-192-168-1-5-8470.local.``."""
    label = "".join(c if c.isalnum() else "-" for c in address.split("%", 1)[0].lower())
    return f"portsd-{label}-{port}.local."


def _default_name() -> str:
    host = socket.gethostname().split(".", 1)[0]
    return f"portsd on {host}"[:_INSTANCE_MAX]


def _version() -> str:
    try:
        return metadata.version("portsd")
    except metadata.PackageNotFoundError:
        return "unknown"
