"""Installing packages into an empty root, against ``tar -x`` of the same archives (issue 4).

    .venv/bin/python bench/install.py [--reps N] [--small N] [--large-mb N] [--no-tarfile]
                                      [--dir DIR]

Builds, once, into a temporary directory on tmpfs when there is one (the output says):
``--small`` small packages (a binary of 50-200 KB, a shared library and its ``.so``
symlink, a header, a ``.pc`` file, a man page, under shared ``usr/bin``, ``usr/lib``...)
and one package of ``--large-mb`` MB (copies of the host's ``/usr/lib/x86_64-linux-gnu``
files, compressible as real binaries are, topped up with text and semi-random data).

Then, each round, into a fresh empty root, each contender once:

- **portsd**: ``Installed.open(root)``, one transaction with every small package (each
  ``read_portinfo``'d, its file sha256 expected as an index gives it), committed; then
  one transaction with the large package. Every check is on: manifest, every member
  against it, every file's sha256, the package's sha256, the journal, syncfs. It runs in
  a fresh interpreter, which times itself (imports excluded) and reports its peak RSS.
- **tar** (the floor): ``tar --zstd -xf`` of each archive, one after another, into a
  fresh directory; it checks nothing. For the small set also ``zstd -dc ... | tar -xif -``
  once over every archive, the fastest anything tar-shaped can unpack them.
- **tarfile** (reference): ``tarfile`` + ``zstandard`` with the 'data' filter.

Each contender gets a wall-clock row and a CPU row (user + system of every thread and
child process), the steadier of the two on a shared machine. On tmpfs a sync costs
nothing; with ``--dir`` on a disk, the tar contenders end with ``sync -f`` (syncfs), since
ours makes the root durable before it returns.

Targets: large package <= 1.5x the floor, the small set in under 5 s. The machine is
shared: compare the ratios of one run, and look at the load average printed with them.
Both sides need the second core (tar's zstd process, our decompressing thread), so a busy
neighbour slows both, unevenly, and single runs swing. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import zstandard
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portsd.client import Installed, InstallReason
from portsd.core.metadata import PackageMeta
from portsd.pkg.package import create_package, read_portinfo

EPOCH = 1_700_000_000
HOST_LIBS = Path("/usr/lib/x86_64-linux-gnu")
SEED = 4


@dataclass(frozen=True, slots=True)
class Built:
    """A package file and its sha256, as the repository's index would vouch for it."""

    path: Path
    sha256: str
    files: int
    content: int  # bytes of file content


# -- building the packages -------------------------------------------------------------


def host_blobs(limit: int) -> list[bytes]:
    """Contents of real shared objects from the host, up to ``limit`` bytes in total."""
    blobs: list[bytes] = []
    total = 0
    if HOST_LIBS.is_dir():
        for path in sorted(HOST_LIBS.rglob("*")):
            if total >= limit:
                break
            if path.is_symlink() or not path.is_file() or path.stat().st_size > 16 << 20:
                continue
            try:
                data = path.read_bytes()
            except OSError:
                continue
            blobs.append(data[: limit - total])
            total += len(blobs[-1])
    return blobs


def semi_random(rng: random.Random, size: int) -> bytes:
    """Bytes that compress about as well as code: random words from a small vocabulary."""
    words = [rng.randbytes(rng.randint(2, 12)) for _ in range(512)]
    out = bytearray()
    while len(out) < size:
        out += b"".join(rng.choices(words, k=256))
    return bytes(out[:size])


def text(rng: random.Random, size: int) -> bytes:
    vocabulary = (
        "the of install package root file directory symlink transaction journal commit "
        "verify sha256 manifest member archive include define static int return void char "
        "struct const unsigned size_t if else for while break continue NULL"
    ).split()
    out = []
    length = 0
    while length < size:
        line = " ".join(rng.choices(vocabulary, k=rng.randint(3, 14))) + "\n"
        out.append(line)
        length += len(line)
    return "".join(out).encode()[:size]


def build(destdir: Path, name: str, out: Path, key: int) -> Built:
    meta = PackageMeta(
        name, "1.0", 1, "x86_64", hashlib.sha256(f"{name} {key}".encode()).hexdigest()
    )
    built = create_package(destdir, meta, out, epoch=EPOCH)
    shutil.rmtree(destdir)
    files = [e for e in built.info.files if e.size]
    return Built(built.path, built.sha256, len(built.info.files), sum(e.size for e in files))


def make_small(work: Path, index: int, rng: random.Random, binary: bytes) -> Built:
    name = f"small{index:03d}"
    root = work / "destdir" / name
    for sub in ("usr/bin", "usr/lib/pkgconfig", "usr/include", "usr/share/man/man1"):
        (root / sub).mkdir(parents=True)
    size = rng.randint(50_000, 200_000)
    start = rng.randrange(0, max(1, len(binary) - size))
    (root / f"usr/bin/{name}").write_bytes(binary[start : start + size])
    os.chmod(root / f"usr/bin/{name}", 0o755)
    lib = semi_random(rng, rng.randint(8_000, 40_000))
    (root / f"usr/lib/lib{name}.so.1").write_bytes(lib)
    os.symlink(f"lib{name}.so.1", root / f"usr/lib/lib{name}.so")
    (root / f"usr/include/{name}.h").write_bytes(text(rng, rng.randint(1_000, 8_000)))
    (root / f"usr/lib/pkgconfig/{name}.pc").write_text(
        f"prefix=/usr\nlibdir=${{prefix}}/lib\nName: {name}\nVersion: 1.0\n"
        f"Libs: -L${{libdir}} -l{name}\nCflags: -I${{prefix}}/include\n"
    )
    (root / f"usr/share/man/man1/{name}.1").write_bytes(text(rng, rng.randint(2_000, 6_000)))
    return build(root, name, work / "packages", index)


def make_large(work: Path, size: int, rng: random.Random) -> tuple[Built, str]:
    root = work / "destdir" / "large"
    base = root / "usr/lib/large"
    total = 0
    blobs = host_blobs(size * 7 // 10)
    source = f"{len(blobs)} host libraries" if blobs else "no host libraries"
    for number, blob in enumerate(blobs):
        directory = base / f"d{number % 16:02d}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"lib{number:04d}.so").write_bytes(blob)
        total += len(blob)
    docs = root / "usr/share/doc/large"
    docs.mkdir(parents=True)
    number = 0
    while total < size:  # the rest: text and code-like data, 64 KB - 2 MB a file
        chunk = min(size - total, rng.randint(64 << 10, 2 << 20))
        if number % 3 == 0:
            (docs / f"doc{number:04d}.txt").write_bytes(text(rng, chunk))
        else:
            (base / f"data{number:04d}.bin").parent.mkdir(parents=True, exist_ok=True)
            (base / f"data{number:04d}.bin").write_bytes(semi_random(rng, chunk))
        total += chunk
        number += 1
    return build(root, "large", work / "packages", 0), source


# -- the contenders --------------------------------------------------------------------


def child(root: Path, packages: list[str], digests: list[str]) -> None:
    """One transaction installing ``packages``, timed from here; prints JSON."""
    start, cpu = time.perf_counter(), time.process_time()
    with Installed.open(root) as installed:
        tx = installed.transaction()
        for path, digest in zip(packages, digests, strict=True):
            package = Path(path)
            tx.install(
                package,
                read_portinfo(package),
                InstallReason.EXPLICIT,
                origin="bench",
                sha256=digest,
            )
        tx.commit()
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(json.dumps({"seconds": elapsed, "cpu": cpu, "rss": peak_rss()}))


def peak_rss() -> int:
    """This process's peak RSS in bytes. VmHWM, not getrusage: ru_maxrss survives exec and
    so would report the forking parent's size."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass(frozen=True, slots=True)
class Sample:
    """One contender's run: wall-clock seconds, and CPU seconds (user + system, its
    threads and child processes)."""

    wall: float
    cpu: float


def ours(root: Path, packages: list[Built], rss: list[int]) -> Sample:
    argument = json.dumps([[str(p.path) for p in packages], [p.sha256 for p in packages]])
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(root), argument],
        check=True,
        capture_output=True,
        text=True,
    )
    result = json.loads(done.stdout)
    rss.append(int(result["rss"]))
    return Sample(float(result["seconds"]), float(result["cpu"]))


def tar_each(root: Path, packages: list[Built], sync: bool) -> None:
    for package in packages:
        subprocess.run(["tar", "--zstd", "-xf", str(package.path), "-C", str(root)], check=True)
    if sync:
        subprocess.run(["sync", "-f", str(root)], check=True)


def tar_stream(root: Path, packages: list[Built], sync: bool) -> None:
    paths = " ".join(str(p.path) for p in packages)
    subprocess.run(["sh", "-c", f"zstd -qdc {paths} | tar -C {root} -xif -"], check=True)
    if sync:
        subprocess.run(["sync", "-f", str(root)], check=True)


def tarfile_data(root: Path, packages: list[Built], sync: bool) -> None:
    """tarfile's 'data' filter, except that absolute symlinks are root-relative for us."""

    def data(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        try:
            return tarfile.data_filter(member, path)
        except tarfile.AbsoluteLinkError:
            return member

    for package in packages:
        with open(package.path, "rb") as raw:
            dctx = zstandard.ZstdDecompressor()
            with dctx.stream_reader(raw, read_across_frames=True) as zst:
                with tarfile.open(fileobj=zst, mode="r|") as tar:
                    tar.extractall(root, filter=data)
    if sync:
        subprocess.run(["sync", "-f", str(root)], check=True)


def timed(action: Callable[[], object]) -> Sample:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start, cpu = time.perf_counter(), time.process_time()
    action()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    children = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return Sample(wall, cpu + children)


def on_tmpfs(path: Path) -> bool:
    """Whether ``path`` is on a tmpfs (the longest mount point above it says)."""
    best, kind = "", ""
    resolved = str(path.resolve())
    with open("/proc/mounts", encoding="utf-8") as lines:
        for line in lines:
            point, fstype = line.split()[1:3]
            if (resolved == point or resolved.startswith(point.rstrip("/") + "/")) and len(
                point
            ) >= len(best):
                best, kind = point, fstype
    return kind == "tmpfs"


def tmpfs_dir() -> Path:
    """A base directory for the work: /dev/shm or /tmp if either is a tmpfs."""
    for candidate in (Path("/dev/shm"), Path("/tmp")):
        if candidate.is_dir() and on_tmpfs(candidate) and os.access(candidate, os.W_OK):
            return candidate
    return Path(tempfile.gettempdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--small", type=int, default=200, help="small packages")
    parser.add_argument("--large-mb", type=int, default=100, help="size of the large one")
    parser.add_argument("--no-tarfile", action="store_true", help="skip the tarfile reference")
    parser.add_argument("--dir", type=Path, help="work directory (default: tmpfs if any)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        packages, digests = json.loads(args.child[1])
        child(Path(args.child[0]), packages, digests)
        return

    console = Console(width=max(Console().width, 100))
    base = args.dir or tmpfs_dir()
    # On a disk, ours makes the root durable (syncfs) and tar does not: the floor then
    # ends with ``sync -f`` (syncfs) of its root too, so both promise the same.
    tmpfs = on_tmpfs(base)
    where = f"{base} ({'tmpfs' if tmpfs else 'not tmpfs: the floor ends with sync -f'})"
    work = Path(tempfile.mkdtemp(prefix="portsd-bench-install-", dir=base))
    try:
        rng = random.Random(SEED)
        start = time.perf_counter()
        binary = b"".join(host_blobs(4 << 20)) or semi_random(rng, 4 << 20)
        small = [make_small(work, i, rng, binary) for i in range(args.small)]
        large, source = make_large(work, args.large_mb * 1_000_000, rng)
        built_in = time.perf_counter() - start

        sets = {"small": small, "large": [large]}
        contenders: dict[str, Callable[[Path, list[Built], bool], object]] = {
            "tar -x each": tar_each,
            "zstd -dc | tar -xi": tar_stream,
        }
        if not args.no_tarfile:
            contenders["tarfile 'data'"] = tarfile_data
        times: dict[tuple[str, str], list[Sample]] = {}
        rss: dict[str, list[int]] = {name: [] for name in sets}
        load = os.getloadavg()[0]
        for rep in range(args.reps):
            for set_name, packages in sets.items():
                root = work / f"root-{rep}-{set_name}-portsd"
                root.mkdir()
                times.setdefault((set_name, "portsd"), []).append(
                    ours(root, packages, rss[set_name])
                )
                shutil.rmtree(root)
                for name, action in contenders.items():
                    if set_name == "large" and name == "zstd -dc | tar -xi":
                        continue  # one archive: the same as tar -x each
                    root = work / f"root-{rep}-{set_name}-{name.split()[0]}"
                    root.mkdir()
                    times.setdefault((set_name, name), []).append(
                        timed(functools.partial(action, root, packages, not tmpfs))
                    )
                    shutil.rmtree(root)

        cores = len(os.sched_getaffinity(0))
        console.print(f"work directory: {where}; packages built in {built_in:.1f} s")
        for label, packages in sets.items():
            files = sum(p.files for p in packages)
            content = sum(p.content for p in packages)
            size = sum(p.path.stat().st_size for p in packages)
            console.print(
                f"{label}: {len(packages)} package(s), {files} entries, "
                f"{content / 1e6:.1f} MB of content, {size / 1e6:.1f} MB compressed"
            )
        console.print(f"large package content: {source} + text and code-like data")
        console.print(f"{cores} cores, load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
        table = Table(
            title=f"median of {args.reps} rounds (min), ms; ratio: portsd / tar -x each, the floor"
        )
        table.add_column("")
        names = ["portsd", *contenders]
        for name in names:
            table.add_column(name, justify="right")
        table.add_column("ratio", justify="right")
        table.add_column("target", justify="right")
        for set_name in sets:
            for what in ("wall", "cpu"):
                cells = []
                medians = {}
                for name in names:
                    runs = [getattr(sample, what) for sample in times.get((set_name, name), [])]
                    if not runs:
                        cells.append("-")
                        continue
                    medians[name] = statistics.median(runs)
                    cells.append(f"{medians[name] * 1000:.0f} ({min(runs) * 1000:.0f})")
                ratio = medians["portsd"] / medians["tar -x each"]
                target = ("< 5 s" if set_name == "small" else "<= 1.50x") if what == "wall" else ""
                table.add_row(f"{set_name} {what}", *cells, f"{ratio:.2f}x", target)
        console.print(table)
        stream = statistics.median(s.wall for s in times[("small", "zstd -dc | tar -xi")])
        small_wall = statistics.median(s.wall for s in times[("small", "portsd")])
        console.print(
            f"small set against one zstd -dc | tar -xi stream: {small_wall / stream:.2f}x "
            "(no per-archive processes: a stricter floor)"
        )
        peaks = ", ".join(f"{name} {max(rss[name]) / 1e6:.0f} MB" for name in sets)
        console.print(f"portsd peak RSS (the whole interpreter): {peaks}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
