"""Builders on a Dask cluster: a synthetic DAG of sleeping builds, makespan against the bound;
and the overhead of one remote build.

    .venv/bin/python bench/cluster.py [--ports 500] [--work 24] [--workers 1,2,4,8] [--json]
    .venv/bin/python bench/cluster.py --overhead 10 [--json]

A DAG of ``--ports`` ports: a chain of 40 (the long critical path) and wide layers of the
rest, each port needing one to three ports of earlier layers; build durations drawn from
a Pareto distribution (heavy-tailed, alpha 1.5, seeded) and scaled to ``--work`` seconds
in total. Each build only sleeps, so 8 workers fit on a small machine.

For each worker count k, the plan runs twice through the daemon's scheduler
(``portsd.build.scheduler.Scheduler``, dependencies first, critical path first):
- pool:  its runner sleeps on one of k threads (the daemon's local pool, ``jobs = k``);
- dask:  its runner submits the sleep as a Dask task needing ``build=1`` with the critical
         path as priority, to k real worker processes (``LocalCluster``), as cluster mode
         does: as many builds handed over at once as the workers have build slots.
Printed: makespan, the lower bound max(critical path, total work / k), and their ratio.
Target: within 1.10x of the bound at every size.

``--overhead N``: a real daemon (`portsd serve`) builds a trivial port (one dependency,
``build = "true"``, one file packaged) N times, each after a pushed edit, first on its
local pool, then in cluster mode with one real `dask worker` whose store keeps no roots
(``PORTSD_WORKER_ROOTS=0``: every build fetches and unpacks its dependency from the
daemon). Per build, the daemon's recorded duration (order, submit, fetch the root, build,
upload, check, sign, publish; for the pool: the same build here); the medians and their
difference. Target: under 250 ms more. Results: docs/benchmarks.md, "Cluster".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import distributed

from portsd.build.scheduler import Collector, Outcome, Scheduler
from portsd.core.plan import BuildPlan, PlannedBuild, critical_path
from portsd.daemon.service import IN_FLIGHT


def synthetic(ports: int, work: float, seed: int = 10) -> tuple[BuildPlan, dict[str, float]]:
    """The DAG and each build's duration (seconds)."""
    rng = random.Random(seed)
    chain = [f"c{i:02d}" for i in range(40)]
    builds = [
        PlannedBuild(name, name, (chain[i - 1],) if i else ()) for i, name in enumerate(chain)
    ]
    layers: list[list[str]] = [[]]
    for index in range(ports - len(chain)):
        if len(layers[-1]) >= 60:
            layers.append([])
        earlier = [name for layer in layers[:-1] for name in layer] or chain[:1]
        name = f"p{index:03d}"
        needs = tuple(sorted(set(rng.sample(earlier, min(len(earlier), rng.randint(1, 3))))))
        builds.append(PlannedBuild(name, name, needs))
        layers[-1].append(name)
    raw = {build.name: rng.paretovariate(1.5) for build in builds}
    for name in chain:
        raw[name] *= 4  # the chain is long: the critical path matters
    scale = work / sum(raw.values())
    return BuildPlan(tuple(builds)), {name: value * scale for name, value in raw.items()}


def longest(plan: BuildPlan, durations: dict[str, float]) -> float:
    finish: dict[str, float] = {}
    for build in plan.builds:  # in dependency order
        finish[build.name] = durations[build.name] + max(
            (finish[need] for need in build.needs), default=0.0
        )
    return max(finish.values())


def run(
    plan: BuildPlan,
    priority: dict[str, float],
    runner: Callable[..., None],
    jobs: int,
    limit: int | None = None,
) -> float:
    collector = Collector()
    scheduler = Scheduler(runner, jobs=jobs, reporter=collector)
    if limit is not None:
        scheduler.limit(limit)
    start = time.monotonic()
    scheduler.submit(plan, priority)
    scheduler.wait()
    elapsed = time.monotonic() - start
    scheduler.close()
    assert all(result.outcome is Outcome.BUILT for result in collector.results)
    return elapsed


TINY = """name = "tiny"
version = "1.0"
summary = "a port that compiles nothing"
license = "MIT"
depends = ["base"]
# edit {serial}
[build]
build = "true"
package = '''
mkdir -p "$DESTDIR/usr/share/tiny"
echo tiny > "$DESTDIR/usr/share/tiny/file"
'''
"""
BASE = """name = "base"
version = "1.0"
summary = "the dependency"
license = "MIT"
[build]
package = '''
mkdir -p "$DESTDIR/usr/include"
echo "int base;" > "$DESTDIR/usr/include/base.h"
'''
"""
PORTSD = [sys.executable, "-m", "portsd.cli.daemon"]
DASK = str(Path(sys.executable).parent / "dask")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def git(tree: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"git {' '.join(args)}: {done.stderr}")
    return done.stdout.strip()


def api(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except OSError:
        return None


def idle(url: str, commit: str) -> bool:
    status = api(f"{url}/api/v1/status")
    return bool(
        status
        and status["evaluated"] == commit
        and not status["evaluating"]
        and status["queued"] == 0
        and not status["running"]
        and status["pending"] == 0  # no key still waits for a build (early cutoff)
        and (status["cluster"] is None or status["cluster"]["workers"])
    )


def until(condition: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


@contextmanager
def running(argv: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    with log.open("ab") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=60)


def builds(url: str, reps: int, tree: Path, serial: list[int]) -> list[float]:
    """Durations of ``reps`` builds of tiny, each after a pushed edit."""
    durations = []
    for _ in range(reps):
        serial[0] += 1
        (tree / "ports/tiny/port.toml").write_text(TINY.format(serial=serial[0]))
        git(tree, "commit", "-qam", f"edit {serial[0]}")
        git(tree, "push", "-q", "build", "main")
        commit = git(tree, "rev-parse", "HEAD")
        until(partial(idle, url, commit), f"the build of {commit[:10]}")
        (row,) = [b for b in api(f"{url}/api/v1/builds?port=tiny&limit=1")["builds"]]
        assert row["state"] == "built", row
        durations.append(float(row["duration"]))
    return durations


def overhead(reps: int) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="portsd-overhead-"))
    try:
        tree, bare = work / "tree", work / "build.git"
        for name, text in (("base", BASE), ("tiny", TINY.format(serial=0))):
            (tree / "ports" / name).mkdir(parents=True)
            (tree / "ports" / name / "port.toml").write_text(text)
        git(tree.parent, "init", "-q", "-b", "main", str(tree))
        git(tree, "add", "-A")
        git(tree, "-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "start")
        git(tree, "config", "user.name", "bench")
        git(tree, "config", "user.email", "bench@localhost")
        subprocess.run([*PORTSD, "init", str(bare)], check=True, capture_output=True)
        git(tree, "remote", "add", "build", str(bare))
        state = bare / "portsd"
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve = [*PORTSD, "serve", "--repo", str(bare), "--port", str(port)]
        serial = [0]
        with running(serve, work / "local.log"):
            until(lambda: api(f"{url}/api/v1/status") is not None, "the daemon")
            builds(url, 1, tree, serial)  # base, and a warm start
            local = builds(url, reps, tree, serial)
        scheduler = free_port()
        address = f"tcp://127.0.0.1:{scheduler}"
        env = dict(os.environ) | {
            "PORTSD_WORKER_STATE": str(work / "worker"),
            "PORTSD_DAEMON_URL": url,
            "PORTSD_WORKER_KEY": str(state / "keys" / "portsd.pub"),
            "PORTSD_WORKER_TOKEN_FILE": str(state / "worker-token"),
            "PORTSD_WORKER_ROOTS": "0",
        }
        worker = [DASK, "worker", address, "--nthreads", "1", "--resources", "build=1"]
        worker += ["--preload", "portsd.cluster.worker", "--no-nanny", "--no-dashboard"]
        with (
            running(
                [DASK, "scheduler", "--port", str(scheduler), "--no-dashboard"], work / "s.log"
            ),
            running([*serve, "--cluster", address], work / "cluster.log"),
            running([*worker, "--host", "127.0.0.1"], work / "worker.log", env),
        ):
            until(lambda: api(f"{url}/api/v1/status") is not None, "the daemon")
            builds(url, 1, tree, serial)
            remote = builds(url, reps, tree, serial)
        return {
            "reps": reps,
            "local_ms": statistics.median(local) * 1000,
            "remote_ms": statistics.median(remote) * 1000,
            "more_ms": (statistics.median(remote) - statistics.median(local)) * 1000,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ports", type=int, default=500)
    parser.add_argument("--work", type=float, default=24.0, help="total seconds of builds")
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--overhead", type=int, metavar="N", help="N builds of a trivial port")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.overhead:
        result = overhead(args.overhead)
        if args.json:
            print(json.dumps(result))
        else:
            print(
                f"median of {args.overhead} builds of a trivial port: local pool "
                f"{result['local_ms']:.0f} ms, cluster {result['remote_ms']:.0f} ms, "
                f"{result['more_ms']:+.0f} ms"
            )
        return
    plan, durations = synthetic(args.ports, args.work)
    priority = critical_path(plan, durations)
    path = longest(plan, durations)
    rows = []
    for k in [int(n) for n in args.workers.split(",")]:
        bound = max(path, sum(durations.values()) / k)

        def sleep(build: PlannedBuild, cancel: threading.Event) -> None:
            time.sleep(durations[build.name])

        pool = run(plan, priority, sleep, k)
        with (
            distributed.LocalCluster(
                n_workers=k,
                threads_per_worker=1,
                resources={"build": 1},
                dashboard_address=None,
                host="127.0.0.1",
            ) as cluster,
            distributed.Client(cluster) as client,
        ):

            def remote(build: PlannedBuild, cancel: threading.Event) -> None:
                client.submit(
                    time.sleep,
                    durations[build.name],
                    key=f"sleep-{build.name}",
                    pure=False,
                    resources={"build": 1},
                    priority=int(priority[build.name] * 1000),
                ).result()

            dask = run(plan, priority, remote, IN_FLIGHT, limit=k)
        rows.append({"workers": k, "bound": bound, "pool": pool, "dask": dask})
    load = os.getloadavg()[0]
    if args.json:
        print(json.dumps({"critical_path": path, "work": args.work, "rows": rows, "load": load}))
        return
    print(
        f"{args.ports} ports, {args.work:g} s of work, critical path {path:.2f} s, load {load:.2f}"
    )
    print(f"{'workers':>7} {'bound':>7} {'pool':>7} {'ratio':>6} {'dask':>7} {'ratio':>6}")
    for row in rows:
        print(
            f"{row['workers']:>7} {row['bound']:>7.2f} {row['pool']:>7.2f} "
            f"{row['pool'] / row['bound']:>6.2f} {row['dask']:>7.2f} "
            f"{row['dask'] / row['bound']:>6.2f}"
        )


if __name__ == "__main__":
    main()
