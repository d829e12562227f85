"""``ports checksum NAME``: download every ``url`` source of a recipe and write its sha256
into ``port.toml`` (like ``updpkgsums``), touching no other byte of the file.

``mirror://NAME/PATH`` sources are looked up in the configured places of NAME, in order.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from portsd.build.fetch import LocationKind, Mirror
from portsd.core.recipe import mirror_of
from portsd.errors import FetchError
from portsd.fsio import file_sha256
from portsd.tomlfile import TomlFile

_TABLE = re.compile(r"\s*\[")
_SOURCE = re.compile(r"\s*\[\[\s*source\s*\]\]\s*(#.*)?$")
_KEY = re.compile(r'(\s*)(url|sha256)(\s*=\s*)"([^"]*)"')
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Sum:
    """The sha256 of the ``index``-th source (0-based) of a recipe, and what it was."""

    index: int
    url: str
    sha256: str
    before: str | None


def url_sources(recipe: Path) -> list[tuple[int, str, str | None]]:
    """(index, url, sha256 or None) of each ``url`` source of ``recipe``."""
    sources = TomlFile.read(recipe).data.get("source", [])
    return [
        (index, str(source["url"]), source.get("sha256"))
        for index, source in enumerate(sources if isinstance(sources, list) else [])
        if isinstance(source, dict) and "url" in source
    ]


def checksum(recipe: Path, port: str, named_mirrors: Mapping[str, Sequence[str]]) -> list[Sum]:
    """Download every url source of ``recipe`` and write the sha256s into it."""
    sums = asyncio.run(_digests(port, url_sources(recipe), named_mirrors))
    text = recipe.read_text()
    updated = with_sums(text, {s.index: s.sha256 for s in sums})
    if updated != text:
        recipe.write_text(updated)
    return sums


def with_sums(text: str, sums: Mapping[int, str]) -> str:
    """``text`` with ``sha256 = "..."`` of each numbered ``[[source]]`` table set: the
    existing line's value replaced, or a line added after the table's ``url``."""
    lines = text.splitlines(keepends=True)
    index = -1  # the [[source]] table the line is in, -1 outside one
    url_line: int | None = None
    written = False
    out: list[str] = []

    def finish() -> None:
        if index in sums and not written and url_line is not None:
            indent = _KEY.match(out[url_line])
            prefix = indent.group(1) if indent else ""
            out.insert(url_line + 1, f'{prefix}sha256 = "{sums[index]}"\n')

    sources = -1
    for line in lines:
        if _TABLE.match(line):
            finish()
            url_line, written = None, False
            if _SOURCE.match(line):
                sources += 1
                index = sources
            else:
                index = -1
        key = _KEY.match(line) if index in sums else None
        if key is not None and key.group(2) == "url":
            url_line = len(out)
        elif key is not None:  # sha256
            line = f'{key.group(1)}sha256{key.group(3)}"{sums[index]}"{line[key.end() :]}'
            written = True
        out.append(line if line.endswith("\n") else line + "\n")
    finish()
    return "".join(out)


async def _digests(
    port: str, sources: list[tuple[int, str, str | None]], named: Mapping[str, Sequence[str]]
) -> list[Sum]:
    timeout = aiohttp.ClientTimeout(sock_connect=10, sock_read=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        sums = []
        for index, url, before in sources:
            sha256 = await _first(session, port, url, _places(url, named))
            sums.append(Sum(index, url, sha256, before))
        return sums


def _places(url: str, named: Mapping[str, Sequence[str]]) -> list[tuple[LocationKind, str]]:
    mirror = mirror_of(url)
    if mirror is None:
        return [(LocationKind.HTTP, url)]
    name, path = mirror
    places = [Mirror.parse(place).locate(path) for place in named.get(name, ())]
    return [(place.kind, place.address) for place in places]


async def _first(
    session: aiohttp.ClientSession,
    port: str,
    url: str,
    places: list[tuple[LocationKind, str]],
) -> str:
    """The sha256 of the file at the first place that has it."""
    failures = []
    for kind, address in places:
        try:
            if kind is LocationKind.DIRECTORY:
                return await asyncio.to_thread(file_sha256, Path(address))
            return await _url_sha256(session, address)
        except (TimeoutError, OSError, aiohttp.ClientError) as error:
            failures.append(f"{address}: {getattr(error, 'strerror', None) or error}")
    if not places:
        failures.append("no place configured for its mirror ([sources] mirror.NAME)")
    raise FetchError(port, url, "; ".join(failures))


async def _url_sha256(session: aiohttp.ClientSession, url: str) -> str:
    digest = hashlib.sha256()
    async with session.get(url) as response:
        if response.status != 200:
            raise aiohttp.ClientError(f"HTTP {response.status}")
        async for chunk in response.content.iter_chunked(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
