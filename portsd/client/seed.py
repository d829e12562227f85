"""A daemon's bootstrap seed, for a client that builds from a ports checkout.

Every build key contains the content id of the seed its build stands on, so a client
computes the keys of a cache's packages only with that cache's seed. A client without a
seed of its own takes the first cache's (``GET /api/v1/seed``, then the package with its
size, sha256 and signature by a trusted key checked before anything is unpacked; the
content id is computed here from what arrived), instead of making one from its host,
which needs a Debian toolchain and would give other keys wherever the host differs. A
client that already keeps another seed is told that its keys cannot match the cache's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import quote

import aiohttp

from portsd.build.seed import Seed, adopt_seed, find_seed
from portsd.client.download import Download, DownloadReporter, download_all
from portsd.errors import PortsdError
from portsd.pkg.sign import PublicKey

ANSWER_WITHIN = 5.0  # seconds for a cache to describe its seed


def take_seed(
    caches: Sequence[str],
    directory: Path,
    arch: str,
    keys: Sequence[PublicKey],
    say: Callable[[str], None],
    reporter: DownloadReporter | None = None,
) -> None:
    """Keep the first of the ``caches``' seeds (base URLs: caches, or a cluster worker's
    daemon) in ``directory`` if it has none; ``say`` what happened, or why not."""
    own = find_seed(directory)
    for url in caches:
        try:
            taken = asyncio.run(_take(url, directory, arch, keys, own, reporter))
        except (PortsdError, OSError, aiohttp.ClientError, ValueError) as error:
            say(f"not using the bootstrap seed of {url}: {error}")
            continue
        if taken is None:
            continue  # no daemon behind this cache, or one without a seed
        if own is not None and own.content_id != taken:
            say(
                f"{url} builds on the seed {taken[:12]}, this client on "
                f"{own.content_id[:12]} ({directory}): no key computed here is one of its "
                f"packages (remove {directory} to take its seed)"
            )
        elif own is None:
            say(f"took the bootstrap seed {taken[:12]} of {url}")
        return


async def _take(
    url: str,
    directory: Path,
    arch: str,
    keys: Sequence[PublicKey],
    own: Seed | None,
    reporter: DownloadReporter | None,
) -> str | None:
    """The content id of ``url``'s seed (kept in ``directory`` when ``own`` is None)."""
    timeout = aiohttp.ClientTimeout(total=ANSWER_WITHIN)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/api/v1/seed", timeout=timeout) as response:
            if response.status == 404:
                return None
            if response.status != 200:
                raise PortsdError(f"GET /api/v1/seed answered {response.status}")
            described = json.loads(await response.read())
        content = str(described["content"])
        if own is not None:
            return content
        file = str(described["file"])
        location = f"{url}/seed/{quote(file)}"
        download = Download(
            label=f"the bootstrap seed of {url}",
            urls=(location,),
            size=int(described["size"]),
            sha256=str(described["sha256"]),
            dest=directory / ".download" / file,
            signature_urls=(f"{location}.minisig",),
        )
        download.dest.parent.mkdir(parents=True, exist_ok=True)
        await download_all(session, [download], keys, reporter=reporter)
    seed = await asyncio.to_thread(adopt_seed, download.dest, directory, arch)
    return seed.content_id  # of the signed bytes, whatever the description said
