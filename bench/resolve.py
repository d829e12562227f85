"""Client resolution on a 30,000-package index, with the index's decoding side by side.

    .venv/bin/python bench/resolve.py [--runs N] [--packages N] [--closure N]

Generates a synthetic signed-repository index (deterministic from a seed): package names
as a distribution has them (a core everything builds on, then families), 0-4 runtime
dependencies each forming a DAG (half towards the core, half towards recent packages,
so closures are deep), a version constraint on one dependency in five, virtual
``provides`` (``sh``, ``awk``, ``libjpeg`` ...) with their users depending on the virtual
name, a few ``conflicts`` between alternative providers. The request is a handful of
leaf packages whose runtime closure reaches about ``--closure`` packages.

Times, each the median of ``--runs`` runs (min in brackets), in this process:

- ``decode_index`` of the 30,000-entry index (zstd, msgpack, every field validated),
  what a client pays per index fetch, and ``resolve`` after it;
- resolve into an empty root; and into a root holding half the closure already (the
  usual ``ports install``), and ``upgrade`` of the whole request when a third of the
  installed packages have new build keys.

Target: resolution < 100 ms on this 2-core machine (decode is reported beside it).
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgpack
import zstandard

from portsd.core.index import FORMAT, Index, IndexEntry, decode_index, encode_index
from portsd.core.metadata import PackageMeta
from portsd.core.resolve import Catalog, Mode, resolve
from portsd.gcpause import paused_gc

SEED = 20_250_101
CORE = (
    "musl busybox zlib openssl ncurses readline libffi expat xz bzip2 zstd curl sqlite pcre2 "
    "libxml2 gmp mpfr libpng libjpeg-turbo freetype fontconfig glib pixman cairo harfbuzz"
).split()
FAMILIES = ("lib", "py", "perl", "font", "x", "gtk", "qt", "ruby", "go", "rust", "tcl", "lua")
VIRTUALS = ("sh", "awk", "libjpeg", "ssl", "cc", "editor", "pager", "mta")
T = TypeVar("T")
_NAME = re.compile(r"[^<>=]+")


def synthetic_index(count: int, seed: int) -> Index:
    """``count`` entries, sorted by name, every dependency resolvable."""
    rng = random.Random(seed)
    names = list(CORE)
    while len(names) < count:
        names.append(f"{rng.choice(FAMILIES)}-{len(names):05d}")
    providers: dict[str, list[int]] = {virtual: [] for virtual in VIRTUALS}
    entries: list[IndexEntry] = []
    for position, name in enumerate(names):
        version = f"{rng.randint(0, 9)}.{rng.randint(0, 30)}.{rng.randint(0, 9)}"
        depends: list[str] = []
        if position:
            for _ in range(rng.choice((0, 1, 1, 2, 2, 3, 4))):
                if rng.random() < 0.5:
                    target = rng.randrange(min(position, len(CORE)))
                else:
                    target = rng.randrange(max(0, position - 2000), position)
                if rng.random() < 0.1:
                    # a virtual name some earlier package provides
                    virtual = rng.choice(VIRTUALS)
                    if providers[virtual] and providers[virtual][0] < position:
                        depends.append(virtual)
                        continue
                dep = names[target]
                if rng.random() < 0.2:
                    dep += f">={entries[target].meta.version.split('.')[0]}.0"
                depends.append(dep)
        provides: list[str] = []
        conflicts: list[str] = []
        if rng.random() < 0.02:
            virtual = rng.choice(VIRTUALS)
            provides.append(f"{virtual}={version}" if rng.random() < 0.5 else virtual)
            providers[virtual].append(position)
            if len(providers[virtual]) > 1 and rng.random() < 0.3:
                conflicts.append(names[providers[virtual][0]])
        key = hashlib.sha256(f"{seed}/{name}/{version}".encode()).hexdigest()
        meta = PackageMeta(
            name=name,
            version=version,
            release=rng.randint(1, 3),
            arch="x86_64",
            build_key=key,
            summary=f"The {name} package, for benchmarks",
            license="MIT",
            depends=tuple(dict.fromkeys(depends)),
            provides=tuple(provides),
            conflicts=tuple(conflicts),
            installed_size=rng.randint(10_000, 80_000_000),
        )
        entries.append(
            IndexEntry(
                meta,
                file=meta.filename,
                size=rng.randint(2_000, 20_000_000),
                sha256=hashlib.sha256(key.encode()).hexdigest(),
                content=hashlib.sha256(meta.filename.encode()).hexdigest(),
            )
        )
    entries.sort(key=lambda entry: entry.meta.name)
    return Index(FORMAT, "x86_64", 42, 1_700_000_000, 1_800_000_000, "c0ffee", tuple(entries))


def request_of_size(available: dict[str, PackageMeta], size: int, seed: int) -> list[str]:
    """Leaf-ward packages, added until their closure (``naive_closure``) reaches ``size``;
    none whose closure holds a package and one it conflicts with."""
    rng = random.Random(seed)
    late = sorted(available)[-(len(available) // 3) :]
    providers = naive_providers(available)
    request: list[str] = []
    closure: set[str] = set()
    while len(closure) < size:
        name = rng.choice(late)
        grown = closure | naive_closure(available, providers, [name])
        clash = any(
            _NAME.match(text)[0] in grown  # type: ignore[index]
            for member in grown
            for text in available[member].conflicts
        )
        if len(grown) > size * 1.1 or clash:  # a request that cannot be met measures nothing
            continue
        request.append(name)
        closure = grown
    return request


def naive_providers(available: Mapping[str, PackageMeta]) -> dict[str, list[str]]:
    """Virtual name -> its providers, sorted: the table any resolver builds first."""
    providers: dict[str, list[str]] = {}
    for name in sorted(available):
        for text in available[name].provides:
            providers.setdefault(text.partition("=")[0], []).append(name)
    return providers


def naive_closure(
    available: Mapping[str, PackageMeta], providers: Mapping[str, list[str]], request: list[str]
) -> set[str]:
    """The reference: a plain breadth-first walk of names, as a first ``apk`` would do it.

    The name itself, else its first provider; no version, conflict or installed-package
    checks, no order, no explanations: the least any resolver must do.
    """
    seen: set[str] = set()
    queue = deque(request)
    while queue:
        name = queue.popleft()
        if name in seen:
            continue
        seen.add(name)
        for text in available[name].depends:
            dep = _NAME.match(text)
            assert dep is not None
            queue.append(dep[0] if dep[0] in available else providers[dep[0]][0])
    return seen


def timed(runs: int, action: Callable[[], T]) -> tuple[list[float], T]:
    times: list[float] = []
    result: T | None = None
    for _ in range(runs):
        start = time.perf_counter()
        result = action()
        times.append(time.perf_counter() - start)
    assert result is not None
    return times, result


def row(label: str, times: list[float], peer: list[float] | None, target: float | None) -> str:
    """One line of the table: ours, the peer, and the verdict against ``target`` (ms)."""
    cells = ""
    for runs in (times, peer):
        cell = f"{statistics.median(runs) * 1000:.1f} ({min(runs) * 1000:.1f})" if runs else "-"
        cells += f"{cell:>18}"
    verdict = ""
    if target is not None:
        met = statistics.median(times) * 1000 < target
        verdict = f"< {target:.0f} ms {'ok' if met else 'MISSED'}"
    return f"{label:<46}{cells}   {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--packages", type=int, default=30_000)
    parser.add_argument("--closure", type=int, default=1_000)
    args = parser.parse_args()

    index = synthetic_index(args.packages, SEED)
    data = encode_index(index)
    available = {entry.meta.name: entry.meta for entry in index}
    request = request_of_size(available, args.closure, SEED)
    load = os.getloadavg()[0]
    n = f"{len(index) // 1000}k"

    payload = zstandard.ZstdDecompressor().decompress(data)
    unpack_times, _ = timed(
        args.runs, lambda: msgpack.unpackb(payload, raw=False, strict_map_key=True, use_list=False)
    )
    decode_times, decoded = timed(args.runs, lambda: decode_index(data, "bench"))
    assert decoded == index

    def decode_as_the_client_does() -> Index:
        with paused_gc():
            return decode_index(data, "bench")

    paused_times, _ = timed(args.runs, decode_as_the_client_does)
    table_times, catalog = timed(args.runs, lambda: Catalog.of(available))
    providers_times, providers = timed(args.runs, lambda: naive_providers(available))

    naive_times, naive = timed(args.runs, lambda: naive_closure(available, providers, request))
    empty_times, fresh = timed(args.runs, lambda: resolve(catalog, {}, request))
    whole_times, _ = timed(args.runs, lambda: resolve(available, {}, request))
    closure = [step.package for step in fresh]
    half = {entry.name: entry for entry in closure[::2]}
    half_times, partial = timed(args.runs, lambda: resolve(catalog, half, request))
    installed = {entry.name: entry for entry in closure}
    for position, entry in enumerate(closure):
        if position % 3 == 0:  # an older build of it is installed
            installed[entry.name] = replace(
                entry, build_key=hashlib.sha256(entry.build_key.encode()).hexdigest()
            )
    upgrade_times, upgrade = timed(
        args.runs, lambda: resolve(catalog, installed, request, Mode.UPGRADE)
    )

    cores = len(os.sched_getaffinity(0))
    print(f"index: {len(index)} entries, {len(data) / 1e6:.2f} MB compressed")
    print(f"request: {len(request)} packages, closure {len(fresh)} ({len(naive)} by the peer)")
    print(f"{cores} cores, load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"median of {args.runs} runs (min in brackets), ms\n")
    print(f"{'':<46}{'portsd':>18}{'peer':>18}")
    print(row(f"(a) decode_index, {n} (peer: msgpack alone)", decode_times, unpack_times, 300))
    print(row("    the same, gc paused (as the client does)", paused_times, unpack_times, 300))
    print(row(f"(b) Catalog.of, {n} (peer: naive table)", table_times, providers_times, None))
    print(row(f"(c) resolve, empty root ({len(fresh)} steps)", empty_times, naive_times, 100))
    print(row("    the same, (b) included", whole_times, None, 100))
    print(row(f"    half installed ({len(partial)} steps)", half_times, None, 100))
    print(row(f"    upgrade, 1/3 rebuilt ({len(upgrade)} steps)", upgrade_times, None, 100))


if __name__ == "__main__":
    main()
