"""Builders on a Dask cluster: a synthetic DAG of sleeping builds, makespan against the bound.

    .venv/bin/python bench/cluster.py [--ports 500] [--work 24] [--workers 1,2,4,8] [--json]

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
Target: within 1.10x of the bound at every size. Results: docs/benchmarks.md, "Cluster".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import threading
import time
from collections.abc import Callable

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ports", type=int, default=500)
    parser.add_argument("--work", type=float, default=24.0, help="total seconds of builds")
    parser.add_argument("--workers", default="1,2,4,8")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
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
