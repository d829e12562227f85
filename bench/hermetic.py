"""Hermetic build roots: composing dependency trees and a trivial build's overhead, side by side.

    .venv/bin/python bench/hermetic.py [--deps 20] [--files 1000] [--reps 9] [--seed DIR] [--json]

(a) Composing the build root of a port with ``--deps`` dependencies of ``--files`` files
    each (synthetic packages made with ``create_package`` and unpacked into a ``Store``;
    the seed toolchain is the overlay's lower layer and is never copied):
    - cold:   ``Store.composed`` of a set of keys not composed yet (``compose_root``);
    - cached: what a second build on the same keys does (``Store.ensure`` of every key,
              then ``Store.composed``, both finding their trees);
    - peer:   ``cp -al`` of the same unpacked trees into one directory (one per tree, the
              only way cp merges them).
    Targets: cached under 20 ms, cold within 1.2x of ``cp -al``.
(b) One ``Workspace.build`` of a trivial port (build step ``true``, package step writes one
    file): export, sandbox set-up, composition, three sandbox runs (prepare, build,
    package), packing and publishing; without dependencies and with the ``--deps`` above
    (built by the same workspace first). The peer is the same three sandbox runs of
    ``true`` alone; the difference is the builder's own overhead. Target: under 100 ms.

The seed is ``--seed`` (default: the one ``ports seed`` keeps), made on first use. Work
happens on tmpfs when there is one. The machine is shared, so the load average is printed.
Results: docs/benchmarks.md, "Hermetic build roots".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portsd.build import sandbox
from portsd.build.builder import DESTDIR, HOME, PORTDIR, SRCDIR, TMPDIR
from portsd.build.pipeline import Revision, Workspace
from portsd.build.run import run
from portsd.build.sandbox import Host, Mount, SandboxSpec
from portsd.build.store import Store
from portsd.config import Config
from portsd.core.metadata import PackageMeta
from portsd.core.plan import PlannedBuild, make_plan
from portsd.pkg.package import create_package
from portsd.tree.checkout import open_checkout

ARCH = "x86_64"
DEFAULT_SEED = Path.home() / ".local/share/portsd/seed"

TRIVIAL = """name = "trivial"
version = "1.0"
release = 1
summary = "a port that compiles nothing"
license = "MIT"
{depends}
[build]
build = "true"
package = '''
mkdir -p "$DESTDIR/usr/share/trivial"
echo trivial > "$DESTDIR/usr/share/trivial/file"
'''
"""

DEPENDENCY = """name = "{name}"
version = "1.0"
release = 1
summary = "a dependency of {files} files"
license = "MIT"

[build]
package = '''
mkdir -p "$DESTDIR/usr/include/{name}" "$DESTDIR/usr/lib" "$DESTDIR/usr/share/{name}"
i=0
while [ $i -lt {files} ]; do
    case $((i % 3)) in
    0) echo "int {name}_$i;" > "$DESTDIR/usr/include/{name}/h$i.h" ;;
    1) echo "{name} $i" > "$DESTDIR/usr/lib/lib{name}_$i.a" ;;
    2) mkdir -p "$DESTDIR/usr/share/{name}/d$((i % 10))"
       echo "{name} $i" > "$DESTDIR/usr/share/{name}/d$((i % 10))/f$i" ;;
    esac
    i=$((i + 1))
done
'''
"""
"""1,000 files over a package's usual places: its own include directory, the shared
usr/lib, a tree under usr/share."""


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def dependency_destdir(dest: Path, name: str, files: int) -> None:
    """What the dependency port's package step installs, written from Python."""
    for i in range(files):
        match i % 3:
            case 0:
                path = dest / f"usr/include/{name}/h{i}.h"
            case 1:
                path = dest / f"usr/lib/lib{name}_{i}.a"
            case _:
                path = dest / f"usr/share/{name}/d{i % 10}/f{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{name} {i}\n")


def compose(work: Path, deps: int, files: int, reps: int) -> dict[str, list[float]]:
    """(a): cold and cached composition against cp -al."""
    store = Store(work / "store")
    layers: list[tuple[str, Path]] = []
    packages: list[tuple[str, Path]] = []
    for n in range(deps):
        name = f"dep{n:02d}"
        key = hashlib.sha256(name.encode()).hexdigest()
        dependency_destdir(work / "destdir" / name, name, files)
        meta = PackageMeta(name, "1.0", 1, ARCH, key)
        built = create_package(work / "destdir" / name, meta, work / "packages", epoch=1)
        packages.append((key, built.path))
        layers.append((key, store.ensure(key, built.path)))
    shutil.rmtree(work / "destdir")
    composed = store.composed(layers)  # warm the dentry cache for both sides
    peer = work / "peer"
    copy = 'for root; do cp -al "$root/." "$DEST/"; done'
    argv = ["sh", "-c", copy, "cp-al", *(str(root) for _, root in layers)]
    env = {"PATH": sandbox.SYSTEM_PATH, "DEST": str(peer)}
    times: dict[str, list[float]] = {"cold": [], "cached": [], "cp -al": []}
    for _ in range(reps):
        shutil.rmtree(composed)
        times["cold"].append(timed(lambda: store.composed(layers)))
        times["cached"].append(
            timed(lambda: [store.ensure(k, p) for k, p in packages] and store.composed(layers))
        )
        shutil.rmtree(peer, ignore_errors=True)
        peer.mkdir()
        times["cp -al"].append(timed(lambda: subprocess.run(argv, env=env, check=True)))
    return times


def write_tree(tree: Path, deps: int, files: int) -> None:
    names = [f"dep{n:02d}" for n in range(deps)]
    for name in names:
        (tree / "ports" / name).mkdir(parents=True)
        (tree / "ports" / name / "port.toml").write_text(DEPENDENCY.format(name=name, files=files))
    (tree / "ports" / "trivial").mkdir(parents=True)
    depends = "depends = [" + ", ".join(f'"{n}"' for n in names) + "]\n" if names else ""
    (tree / "ports/trivial/port.toml").write_text(TRIVIAL.format(depends=depends))


def trivial_builds(
    work: Path, seed_dir: Path, deps: int, files: int, reps: int
) -> dict[str, list[float]]:
    """(b): Workspace.build of the trivial port against its three sandbox runs."""
    tree = work / "tree"
    write_tree(tree, deps, files)
    config = Config(state_dir=work / "state", arch=ARCH, seed_dir=seed_dir, make_jobs=1)
    workspace = Workspace.open(config, say=lambda line: print(line, file=sys.stderr))
    checkout = open_checkout(tree, None, None, ARCH, workspace.seed.content_id, workspace.contents)
    evaluation = checkout.evaluation
    cancel = threading.Event()
    trivial: PlannedBuild | None = None
    while trivial is None:  # the dependencies first, then trivial has its key
        revision = Revision(checkout.tree, evaluation, None)
        plan = make_plan(revision.graph, revision.keys, workspace.present(), None)
        for build in plan.builds:
            if build.name == "trivial":
                trivial = build
            else:
                workspace.build(revision, build, cancel)
        evaluation = evaluation.advance(evaluation.listing, {}, workspace.contents)
    first = timed(lambda: workspace.build(revision, trivial, cancel))
    builds = [timed(lambda: workspace.build(revision, trivial, cancel)) for _ in range(reps)]

    layers = [
        (revision.keys.keys[d], workspace.store.path(revision.keys.keys[d]))
        for d in revision.keys.build_root(revision.graph, "trivial")
    ]
    base = work / "peer-sandbox"
    for name in ("etc", "src", "pkg", "home", "tmp", "port", "usr"):
        (base / name).mkdir(parents=True)
    for name, content in sandbox.etc_files():
        (base / "etc" / name).write_text(content)
    spec = SandboxSpec(
        host=Host.probe(),
        toolchain=workspace.seed.root.resolve(),
        etc=base / "etc",
        mounts=(
            Mount(base / "src", SRCDIR, writable=True),
            Mount(base / "pkg", DESTDIR, writable=True),
            Mount(base / "home", HOME, writable=True),
            Mount(base / "tmp", TMPDIR, writable=True),
            Mount(base / "port", PORTDIR),
        ),
        cwd=SRCDIR,
        env=(("PATH", sandbox.SYSTEM_PATH),),
        root=workspace.store.composed(layers) if len(layers) > 1 else None,
        mountpoint=base / "usr",
    )
    argv = sandbox.command(spec, ["sh", "-eu", "-c", "true"])
    env = {"PATH": sandbox.SYSTEM_PATH, "LANG": "C.UTF-8"}

    def three_runs() -> None:
        for _ in range(3):
            assert run(argv, env=env).ok

    peers = [timed(three_runs) for _ in range(reps)]
    return {"first build": [first], "build": builds, "3 sandbox runs": peers}


def ms(values: list[float]) -> str:
    median, least = statistics.median(values) * 1000, min(values) * 1000
    digits = 3 if median < 1 else 1
    return f"{median:.{digits}f} ({least:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--deps", type=int, default=20)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--seed", type=Path, default=DEFAULT_SEED, help="seed directory")
    parser.add_argument("--dir", type=Path, help="work directory (default: tmpfs if any)")
    parser.add_argument("--json", action="store_true", help="print the timings as JSON")
    args = parser.parse_args()
    parent = args.dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    work = Path(tempfile.mkdtemp(prefix="portsd-bench-", dir=parent))
    load = os.getloadavg()[0]
    try:
        composing = compose(work / "compose", args.deps, args.files, args.reps)
        bare = trivial_builds(work / "bare", args.seed, 0, args.files, args.reps)
        with_deps = trivial_builds(work / "deps", args.seed, args.deps, args.files, args.reps)
    finally:
        subprocess.run(["chmod", "-R", "u+w", str(work)], check=False)
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        results = {"compose": composing, "build": bare, f"build, {args.deps} deps": with_deps}
        print(json.dumps({"load": [load, os.getloadavg()[0]], "seconds": results}, indent=1))
        return
    median = statistics.median
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores, load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"median of {args.reps} (min in brackets), ms\n")
    print(f"(a) build root of {args.deps} dependencies x {args.files} files")
    print(f"{'':<24}{'portsd':>16}{'cp -al':>16}{'ratio':>8}{'target':>10}")
    cold = median(composing["cold"]) / median(composing["cp -al"])
    print(f"{'cold':<24}{ms(composing['cold']):>16}{ms(composing['cp -al']):>16}", end="")
    print(f"{cold:>7.2f}x{'<= 1.20x':>10}")
    cached = median(composing["cached"]) * 1000
    print(f"{'cached':<24}{ms(composing['cached']):>16}{'-':>16}{'':>8}{'< 20 ms':>10}", end="")
    print(" ok" if cached < 20 else " MISSED")
    print("\n(b) Workspace.build of a trivial port")
    print(f"{'':<24}{'build':>16}{'3 sandbox runs':>16}{'overhead':>10}{'target':>10}")
    for label, timings in (("no dependencies", bare), (f"{args.deps} dependencies", with_deps)):
        overhead = (median(timings["build"]) - median(timings["3 sandbox runs"])) * 1000
        print(f"{label:<24}{ms(timings['build']):>16}{ms(timings['3 sandbox runs']):>16}", end="")
        print(f"{overhead:>10.1f}{'< 100 ms':>10}" + (" ok" if overhead < 100 else " MISSED"))
        print(f"{'  first build':<24}{ms(timings['first build']):>16}")


if __name__ == "__main__":
    main()
