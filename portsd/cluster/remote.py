"""A worker's two HTTP conversations with the daemon: the packages of a build root, by
build key, from the daemon's repository (the client's verified downloads: size, sha256
and the package's signature by the repository key), and the built package back, streamed
from its file to ``PUT /api/v1/uploads`` with the worker token."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import aiohttp

from portsd.build.order import Layer
from portsd.client.download import Download, download_all
from portsd.errors import ConfigError, PortsdError
from portsd.fsio import feed_file
from portsd.pkg.sign import PublicKey

UPLOAD_CHUNK = 1 << 20
UPLOAD_TIMEOUT = 60.0  # seconds without progress before an upload is given up
TOKEN_HEADER = "Authorization"
SHA256_HEADER = "X-Portsd-Sha256"


@dataclass(frozen=True, slots=True)
class Uploaded:
    """A package the daemon holds as ``name`` in its uploads, until it checks it."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True, slots=True)
class DaemonPackages:
    """Layers from the daemon's repository (``portsd.build.produce.Packages``)."""

    daemon: str  # base URL
    arch: str
    keys: tuple[PublicKey, ...]
    into: Path  # where downloads land before they are unpacked

    def obtain(self, layers: Sequence[Layer], cancel: threading.Event) -> dict[str, Path]:
        base = f"{self.daemon}/repo/{quote(self.arch)}/packages"
        downloads = [
            Download(
                label=f"{layer.name} (key {layer.key[:12]})",
                urls=(f"{base}/{quote(layer.file)}",),
                size=layer.size,
                sha256=layer.sha256,
                dest=self.into / layer.file,
                signature_urls=(f"{base}/{quote(layer.file)}.minisig",),
            )
            for layer in layers
        ]

        async def run() -> None:
            async with aiohttp.ClientSession(auto_decompress=False) as session:
                await download_all(session, downloads, self.keys, answer_within=10.0)

        asyncio.run(run())
        return {layer.key: self.into / layer.file for layer in layers}


def upload(daemon: str, token: str, package: Path) -> Uploaded:
    """Stream ``package`` to the daemon (never whole in memory); what it holds now."""
    size = package.stat().st_size
    digest = hashlib.sha256()
    feed_file(digest, package)
    where = urlsplit(daemon)
    if where.scheme != "http" or where.hostname is None:
        raise ConfigError(f"the daemon's URL must be http://HOST:PORT, not '{daemon}'")
    connection = http.client.HTTPConnection(
        where.hostname, where.port or 80, timeout=UPLOAD_TIMEOUT, blocksize=UPLOAD_CHUNK
    )
    try:
        with package.open("rb") as body:
            connection.request(
                "PUT",
                f"{where.path.rstrip('/')}/api/v1/uploads",
                body=body,
                headers={
                    TOKEN_HEADER: f"Bearer {token}",
                    SHA256_HEADER: digest.hexdigest(),
                    "Content-Length": str(size),
                    "Content-Type": "application/octet-stream",
                },
            )
        response = connection.getresponse()
        answer = response.read(64 * 1024)
    except OSError as error:
        raise PortsdError(f"uploading {package.name} to {daemon}: {error}") from None
    finally:
        connection.close()
    if response.status != 201:
        said = answer.decode("utf-8", "replace").strip()
        raise PortsdError(f"uploading {package.name} to {daemon}: {response.status} {said}")
    name = json.loads(answer)["upload"]
    return Uploaded(str(name), size, digest.hexdigest())
