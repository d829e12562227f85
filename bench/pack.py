"""Package packing and unpacking against the tar and zstd command-line tools, side by side.

    .venv/bin/python bench/pack.py [--src DIR] [--reps N] [--no-tarfile]

Copies a real Python stdlib (``/usr/lib/python3.11``, else pyenv's) to tmpfs as
``DESTDIR/usr/lib/python3.11`` (a package's layout: its relative symlinks then stay inside
the root) and times, each contender once per round, rounds repeated, medians reported:

- pack:   ``create_package`` (sha256 of every file, manifest, normalised headers) vs
          ``tar -cf - . | zstd -T0 -3``, which hashes and checks nothing;
- unpack: ``extract_package``, every check on (file sha256s, manifest match, package
          sha256 and size) vs ``zstd -dc | tar -xf -``, both on the same package file;
- a straightforward ``tarfile`` + ``zstandard`` version of each (hashing while packing,
  the 'data' extraction filter), the baseline that justifies our own tar code.

Targets: pack <= 1.2x the CLI, unpack <= 1.5x, compressed size within 1%. The machine is
shared, so the load average is printed: compare ratios from one run, not across runs.
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portsd.core.metadata import PackageMeta
from portsd.pkg.package import create_package, extract_package

CANDIDATES = (Path("/usr/lib/python3.11"), Path("/root/.pyenv/versions/3.11.7/lib/python3.11"))
EPOCH = 1_700_000_000
META = PackageMeta("python-stdlib", "3.11", 1, "x86_64", "0" * 64)


def tarfile_pack(destdir: Path, out: Path) -> None:
    """The obvious version: hash every file, then tarfile into a multithreaded zstd writer."""
    paths = sorted(destdir.rglob("*"))
    for path in paths:
        if path.is_file() and not path.is_symlink():
            hashlib.sha256(path.read_bytes()).hexdigest()

    def normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH, 0, 0, "root", "root"
        return info

    with open(out, "wb") as raw:
        cctx = zstandard.ZstdCompressor(level=3, threads=-1)
        with cctx.stream_writer(raw) as zst, tarfile.open(fileobj=zst, mode="w|") as tar:
            for path in paths:
                tar.add(path, str(path.relative_to(destdir)), recursive=False, filter=normalise)


def tarfile_unpack(package: Path, dest: Path) -> None:
    """tarfile's 'data' filter, except that absolute symlinks are root-relative for us."""

    def data(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
        try:
            return tarfile.data_filter(member, path)
        except tarfile.AbsoluteLinkError:
            return member

    with open(package, "rb") as raw:
        dctx = zstandard.ZstdDecompressor()
        with dctx.stream_reader(raw, read_across_frames=True) as zst:
            with tarfile.open(fileobj=zst, mode="r|") as tar:
                tar.extractall(dest, filter=data)


def sh(command: str) -> None:
    subprocess.run(["sh", "-c", command], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--src", type=Path, help="tree to pack (default: a Python stdlib)")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--no-tarfile", action="store_true", help="skip the tarfile baseline")
    args = parser.parse_args()
    src = args.src or next(p for p in CANDIDATES if p.is_dir())
    work = Path(tempfile.mkdtemp(prefix="portsd-bench-", dir="/dev/shm"))
    try:
        destdir = work / "destdir"
        shutil.copytree(src, destdir / "usr/lib" / src.name, symlinks=True)
        members = list(destdir.rglob("*"))
        raw = sum(p.lstat().st_size for p in members if p.is_file() and not p.is_symlink())
        ours, cli_pkg, naive_pkg, dest = (
            work / "ours",
            work / "cli.tar.zst",
            work / "n.zst",
            work / "x",
        )
        built = create_package(destdir, META, ours, epoch=EPOCH)  # warms the page cache too

        pack: dict[str, Callable[[], object]] = {
            "portsd": lambda: create_package(destdir, META, ours, epoch=EPOCH),
            "tar+zstd": lambda: sh(f"tar -C {destdir} -cf - . | zstd -q -T0 -3 > {cli_pkg}"),
            "tarfile": lambda: tarfile_pack(destdir, naive_pkg),
        }
        unpack: dict[str, Callable[[], object]] = {
            "portsd": lambda: extract_package(
                built.path, dest, expected_sha256=built.sha256, expected_size=built.size
            ),
            "tar+zstd": lambda: sh(f"mkdir {dest} && zstd -dc {built.path} | tar -C {dest} -xf -"),
            "tarfile": lambda: tarfile_unpack(built.path, dest),
        }
        if args.no_tarfile:
            del pack["tarfile"], unpack["tarfile"]
        times: dict[tuple[str, str], list[float]] = {}
        load = os.getloadavg()[0]
        for _ in range(args.reps):
            for phase, contenders in (("pack", pack), ("unpack", unpack)):
                for name, action in contenders.items():
                    shutil.rmtree(dest, ignore_errors=True)
                    start = time.perf_counter()
                    action()
                    times.setdefault((phase, name), []).append(time.perf_counter() - start)
        shutil.rmtree(dest, ignore_errors=True)

        cores = len(os.sched_getaffinity(0))
        print(f"tree: {src} -> tmpfs: {len(members)} entries, {raw / 1e6:.1f} MB of files")
        print(f"{cores} cores, load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
        print(f"median of {args.reps} rounds (min in brackets); ratio = portsd / tar+zstd\n")
        names = list(pack)
        print(f"{'':<8}" + "".join(f"{n:>18}" for n in names) + f"{'ratio':>8}{'target':>8}")
        for phase, target in (("pack", 1.2), ("unpack", 1.5)):
            cells = ""
            for name in names:
                runs = times[(phase, name)]
                cell = f"{statistics.median(runs) * 1000:.0f} ms ({min(runs) * 1000:.0f})"
                cells += f"{cell:>18}"
            ratio = statistics.median(times[(phase, "portsd")]) / statistics.median(
                times[(phase, "tar+zstd")]
            )
            print(f"{phase:<8}{cells}{ratio:>7.2f}x{target:>7.2f}x")
        sizes = [built.size, cli_pkg.stat().st_size]
        if not args.no_tarfile:
            sizes.append(naive_pkg.stat().st_size)
        cells = "".join(f"{f'{size / 1e6:.2f} MB':>18}" for size in sizes)
        print(f"{'size':<8}{cells}{sizes[0] / sizes[1]:>7.3f}x{'1.01':>7}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
