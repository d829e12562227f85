"""Builders on a Dask cluster, end to end: a real `dask scheduler`, two real `dask worker`
processes with separate state directories (as if on two machines), a real daemon in
cluster mode, a real `git push`, real sandboxed builds, real SIGKILLs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from portsd.build.seed import find_seed
from portsd.fsio import file_sha256
from tests.daemon_harness import RunningDaemon, command_environment, free_port
from tests.fixtures import commit_all, git
from tests.test_daemon import (
    ALL,
    ARCH,
    assert_consistent,
    head,
    keys_at,
    push,
    served_index,
    slow_down,
)

pytestmark = pytest.mark.slow

DASK = Path(sys.executable).parent / "dask"


class Cluster:
    """A Dask scheduler and its portsd workers, on 127.0.0.1."""

    def __init__(self, tmp: Path, bare: Path) -> None:
        self.tmp = tmp
        self.state = bare / "portsd"
        self.port = free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.dashboard = "none"

    def _start(self, name: str, argv: list[str], environment: dict[str, str]) -> None:
        with (self.tmp / f"{name}.log").open("ab") as log:
            self.processes[name] = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=environment
            )

    def scheduler(self, dashboard: str) -> None:
        """``dashboard``: "none" (--no-dashboard), "bokeh", or "no bokeh" (a dashboard
        asked for on a machine without bokeh: an import of bokeh fails there)."""
        argv = [str(DASK), "scheduler", "--host", "127.0.0.1", "--port", str(self.port)]
        self.dashboard = dashboard
        environment = command_environment()
        environment["DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_VALIDATION_INTERVAL"] = "0.5s"
        if dashboard == "none":
            argv.append("--no-dashboard")
        else:
            argv += ["--dashboard-address", f"127.0.0.1:{free_port()}"]
        if dashboard == "no bokeh":
            hidden = self.tmp / "no-bokeh" / "bokeh"
            hidden.mkdir(parents=True)
            (hidden / "__init__.py").write_text("raise ImportError('no bokeh on this machine')\n")
            environment["PYTHONPATH"] = str(hidden.parent)
        self._start("scheduler", argv, environment)

    def worker(self, name: str, daemon: RunningDaemon, **settings: str) -> None:
        state = self.tmp / f"worker-{name}"
        environment = command_environment() | {
            "PORTSD_WORKER_STATE": str(state),
            "PORTSD_DAEMON_URL": daemon.url,
            "PORTSD_WORKER_KEY": str(self.state / "keys" / "portsd.pub"),
            "PORTSD_WORKER_TOKEN_FILE": str(self.state / "worker-token"),
            # a killed worker's build-key lock goes in seconds, not the default 30
            "DASK_DISTRIBUTED__SCHEDULER__LOCKS__LEASE_TIMEOUT": "3s",
        }
        argv = [str(DASK), "worker", self.address, "--name", name, "--nthreads", "1"]
        argv += ["--resources", "build=1", "--preload", "portsd.cluster.worker"]
        argv += ["--no-nanny", "--no-dashboard", "--host", "127.0.0.1"]
        self._start(name, [*argv, "--local-directory", str(state / "dask")], environment | settings)

    def kill(self, name: str) -> None:
        process = self.processes[name]
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def stop(self) -> None:
        """Workers first, then the scheduler; a process slow to close is killed."""
        for process in reversed(self.processes.values()):
            if process.poll() is None:
                process.terminate()
            try:
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, bare: Path) -> Iterator[Cluster]:
    """A scheduler; its dashboard as the test's indirect parameter, default "none"."""
    running = Cluster(tmp_path, bare)
    running.scheduler(getattr(request, "param", "none"))
    try:
        yield running
    finally:
        running.stop()


def wait_workers(daemon: RunningDaemon, count: int) -> None:
    def ready() -> bool:
        status = daemon.get("/api/v1/status")
        return bool(status and len(status["cluster"]["workers"]) == count)

    # a worker without a seed takes the daemon's (100 MB) before it registers
    daemon.wait_for(ready, timeout=120, what=f"{count} workers")


def with_daemon_and_workers(
    tmp: Path, bare: Path, cluster: Cluster, *extra: str, workers: int = 2, **settings: str
) -> RunningDaemon:
    """A daemon in cluster mode and its workers w1, w2...; ``settings`` (a worker's
    environment) go to the last worker."""
    daemon = RunningDaemon(bare, tmp / "daemon.log", "--cluster", cluster.address, *extra)
    daemon.start()
    for number in range(1, workers + 1):
        cluster.worker(f"w{number}", daemon, **(settings if number == workers else {}))
    wait_workers(daemon, workers)
    return daemon


def libbase_alone(tree: Path) -> str:
    """Commit the fixture tree with libbase as its only port."""
    for port in ALL - {"libbase"}:
        git(tree, "rm", "-rq", f"ports/{port}")
    return commit_all(tree, "libbase alone")


def packages(state: Path) -> dict[str, str]:
    """File name -> sha256 of every stored package."""
    folder = state / "repo" / ARCH / "packages"
    return {p.name: file_sha256(p) for p in folder.glob("*.pkg.tar.zst")}


def test_builds_on_workers_are_published_installable_and_identical_to_local_ones(
    tmp_path: Path, bare: Path, ports_tree: Path, cluster: Cluster
) -> None:
    daemon = with_daemon_and_workers(tmp_path, bare, cluster)
    try:
        push(ports_tree)
        commit = head(ports_tree)
        daemon.wait_idle(commit)
        assert served_index(daemon, bare / "portsd") == keys_at(ports_tree, commit, bare / "portsd")
        built = daemon.builds(state="built")
        assert {b["port"] for b in built} == ALL
        assert {b["detail"].removeprefix("built on ") for b in built} <= {"w1", "w2"}
        whole = daemon.get("/api/v1/status")
        # which toolchain built what: this tree declares none, so the seed
        assert {b["toolchain"] for b in built} == {f"the seed {whole['seed'][:12]}"}
        status = whole["cluster"]
        assert sum(w["done"] for w in status["workers"]) == len(ALL)
        assert {w["name"] for w in status["workers"]} == {"w1", "w2"}
        assert status["dashboard"] is None and "--no-dashboard" in status["no_dashboard"]
        code, page = daemon.raw("/")
        assert code == 200 and b"<td>w1</td>" in page and b"<td>w2</td>" in page
        assert b"no Dask dashboard: the scheduler serves no dashboard" in page
        code, port_page = daemon.raw("/port/toptool")
        assert code == 200 and f"<td>the seed {whole['seed'][:12]}</td>".encode() in port_page
        root = tmp_path / "root"
        root.mkdir()
        installed = subprocess.run(
            [sys.executable, "-m", "portsd.cli.ports", "install", "toptool", "--root", str(root)]
            + ["--cache", daemon.url, "--key", str(bare / "portsd" / "keys" / "portsd.pub")],
            capture_output=True,
            text=True,
            env=command_environment(),
        )
        assert installed.returncode == 0, installed.stderr
        assert (root / "usr" / "bin" / "toptool").is_file()
        verified = ports_verify(tmp_path, daemon, bare, ports_tree, "toptool", "hello")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        assert "agrees toptool" in verified.stdout and "agrees hello" in verified.stdout
    finally:
        daemon.stop()
    local = tmp_path / "local"
    subprocess.run(
        [sys.executable, "-m", "portsd.cli.ports", "build", "--tree", str(ports_tree)]
        + ["--state", str(local)],
        capture_output=True,
        check=True,
        env=command_environment(),
    )
    assert packages(bare / "portsd") == packages(local)


def ports_verify(
    tmp: Path, daemon: RunningDaemon, bare: Path, tree: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """`ports verify` on a client with its own cache directory, from the fixture tree."""
    (tmp / "client-root").mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "portsd.cli.ports", "verify", *args, "--tree", str(tree)]
        + ["--root", str(tmp / "client-root"), "--cache-dir", str(tmp / "client-cache")]
        + ["--cache", daemon.url, "--key", str(bare / "portsd" / "keys" / "portsd.pub")],
        capture_output=True,
        text=True,
        env=command_environment(),
    )


def test_ports_verify_finds_what_a_faulty_worker_published(
    tmp_path: Path, bare: Path, ports_tree: Path, cluster: Cluster
) -> None:
    commit = libbase_alone(ports_tree)
    daemon = with_daemon_and_workers(tmp_path, bare, cluster, workers=1, PORTSD_WORKER_FAULT="1")
    try:
        push(ports_tree)
        daemon.wait_idle(commit)
        assert served_index(daemon, bare / "portsd") == keys_at(ports_tree, commit, bare / "portsd")
        verified = ports_verify(tmp_path, daemon, bare, ports_tree, "libbase")
        assert verified.returncode == 1, verified.stdout + verified.stderr
        assert "differs libbase" in verified.stdout
        answer = ports_verify(tmp_path, daemon, bare, ports_tree, "libbase", "--json")
        assert answer.returncode == 1
        (verdict,) = json.loads(answer.stdout)
        assert verdict["name"] == "libbase" and not verdict["agrees"]
        assert verdict["files"] and verdict["files"][0].startswith("usr/")
        assert f"  {verdict['files'][0]}" in verified.stdout
    finally:
        daemon.stop()


def test_only_workers_with_the_token_upload(
    tmp_path: Path, bare: Path, ports_tree: Path, cluster: Cluster
) -> None:
    commit = libbase_alone(ports_tree)
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not the token\n")
    daemon = with_daemon_and_workers(
        tmp_path, bare, cluster, workers=1, PORTSD_WORKER_TOKEN_FILE=str(wrong)
    )
    try:
        push(ports_tree)
        daemon.wait_idle(commit)
        (failed,) = daemon.builds(port="libbase", state="failed")
        assert "401" in failed["detail"] and "worker token" in failed["detail"]
        assert packages(bare / "portsd") == {}

        token = (bare / "portsd" / "worker-token").read_text().strip()
        body = b"not a package"
        digest = {"X-Portsd-Sha256": hashlib.sha256(body).hexdigest()}
        for headers, expected in [
            ({}, 401),
            ({"Authorization": "Bearer wrong"}, 401),
            ({"Authorization": f"Bearer {token}"}, 201),
        ]:
            assert daemon.send("PUT", "/api/v1/uploads", body, headers | digest) == expected
        assert len(list((bare / "portsd" / "uploads").iterdir())) == 1
    finally:
        daemon.stop()


def slow(tree: Path, port: str, seconds: float) -> str:
    return slow_down(tree, port, f"sleep {seconds}", f"{port}: slow")


def test_a_worker_killed_mid_build_leaves_the_build_to_the_other(
    tmp_path: Path, bare: Path, ports_tree: Path, cluster: Cluster
) -> None:
    commit = slow(ports_tree, "libbase", 4)
    daemon = with_daemon_and_workers(tmp_path, bare, cluster)
    try:
        push(ports_tree)

        def builder() -> str:
            status = daemon.get("/api/v1/status")
            for worker in status["cluster"]["workers"] if status else ():
                if any(r.startswith("libbase ") for r in worker["running"]):
                    return str(worker["name"])
            return ""

        victim = daemon.wait_for(builder, timeout=60, what="libbase to build on a worker")
        (running,) = daemon.builds(port="libbase", state="running")
        log = bare / "portsd" / "logs" / "libbase" / f"{running['id']}.log"
        # the worker's log lines reach the daemon's log of the build while it runs
        daemon.wait_for(
            lambda: log.is_file() and "$ sleep 4" in log.read_text(),
            timeout=30,
            what="the worker's log lines",
        )
        cluster.kill(victim)
        daemon.wait_idle(commit, timeout=120)
        assert served_index(daemon, bare / "portsd") == keys_at(ports_tree, commit, bare / "portsd")
        libbase = daemon.builds(port="libbase", state="built")
        survivor = {"w1", "w2"} - {victim}
        assert [b["detail"] for b in libbase] == [f"built on {survivor.pop()}"]
        assert all(b["detail"] != f"built on {victim}" for b in daemon.builds(state="built"))
    finally:
        daemon.stop()
    assert_consistent(bare)


def test_the_daemon_killed_while_workers_build_publishes_each_key_once(
    tmp_path: Path, bare: Path, ports_tree: Path, cluster: Cluster
) -> None:
    commit = slow(ports_tree, "libbase", 2)
    daemon = with_daemon_and_workers(tmp_path, bare, cluster)
    push(ports_tree)
    daemon.wait_for(
        lambda: any(b["state"] == "running" for b in daemon.builds()),
        timeout=60,
        what="a build on a worker",
    )
    daemon.kill()
    assert_consistent(bare)
    daemon.start()
    try:
        daemon.wait_idle(commit, timeout=120)
        assert served_index(daemon, bare / "portsd") == keys_at(ports_tree, commit, bare / "portsd")
    finally:
        daemon.stop()
    assert_consistent(bare)
    stored = packages(bare / "portsd")
    assert len(stored) == len(ALL)  # one package per key: none twice, none half
    assert not list((bare / "portsd" / "uploads").glob("*"))


def test_verify_2_publishes_nothing_when_a_worker_disagrees(
    tmp_path: Path, bare: Path, ports_tree: Path, cluster: Cluster
) -> None:
    commit = libbase_alone(ports_tree)  # alone: what depends on it cannot build
    daemon = with_daemon_and_workers(
        tmp_path, bare, cluster, "--verify", "2", PORTSD_WORKER_FAULT="1"
    )
    try:
        push(ports_tree)
        daemon.wait_idle(commit)
        failed = daemon.builds(port="libbase", state="failed")
        assert failed and "built different packages" in failed[0]["detail"]
        disagreements = daemon.get("/api/v1/status")["cluster"]["disagreements"]
        assert len(disagreements) == 1
        assert sorted(disagreements[0]["workers"]) == ["w1", "w2"]
        files = disagreements[0]["files"]
        assert files and all(f.startswith("usr/") for f in files)
        assert files[0] in failed[0]["detail"]
        code, page = daemon.raw("/")
        assert code == 200 and b"built different packages" in page
        assert packages(bare / "portsd") == {}
    finally:
        daemon.stop()


def test_a_superseded_build_stops_on_its_worker(
    tmp_path: Path, bare: Path, ports_tree: Path, cluster: Cluster
) -> None:
    libbase_alone(ports_tree)
    recipe = ports_tree / "ports" / "libbase" / "port.toml"
    plain = recipe.read_text()
    slow(ports_tree, "libbase", 60)
    # one build slot: the newer build waits for the old to stop
    daemon = with_daemon_and_workers(tmp_path, bare, cluster, workers=1)
    try:
        push(ports_tree)
        daemon.wait_for(
            lambda: daemon.builds(port="libbase", state="running"),
            timeout=60,
            what="the slow libbase to run",
        )
        recipe.write_text(plain + "# quick again\n")
        commit = commit_all(ports_tree, "libbase: quick")
        started = time.monotonic()
        push(ports_tree)
        daemon.wait_idle(commit, timeout=50)
        assert time.monotonic() - started < 30  # far less than the 60 s sleep
        (old,) = daemon.builds(port="libbase", state="cancelled")
        assert old["detail"] == "superseded by a newer commit"
        assert served_index(daemon, bare / "portsd") == keys_at(ports_tree, commit, bare / "portsd")
    finally:
        daemon.stop()


def test_the_last_lines_of_a_remote_build_reach_the_daemons_log(
    tmp_path: Path, bare: Path, ports_tree: Path, cluster: Cluster
) -> None:
    """Lines printed at the very end of a build, just before its answer, are all in the
    daemon's copy of its log, in order, before the daemon's own closing line."""
    libbase_alone(ports_tree)
    recipe = ports_tree / "ports" / "libbase" / "port.toml"
    plain = recipe.read_text()
    daemon = with_daemon_and_workers(tmp_path, bare, cluster, workers=1)
    try:
        for round_ in range(3):
            # the package step ends with the lines: nothing of the build runs after them
            tail = f"seq 1 300 | sed s/^/tail-{round_}-/"
            package = f'make DESTDIR="$DESTDIR" PREFIX=/usr install && {tail}'
            recipe.write_text(plain + f"package = '{package}'\n")
            commit = commit_all(ports_tree, f"libbase: {round_}")
            push(ports_tree)
            daemon.wait_idle(commit)
            built = max(daemon.builds(port="libbase", state="built"), key=lambda b: int(b["id"]))
            log = bare / "portsd" / "logs" / "libbase" / f"{built['id']}.log"
            lines = log.read_text().splitlines()
            printed = [line for line in lines if line.startswith(f"tail-{round_}-")]
            assert printed == [f"tail-{round_}-{n}" for n in range(1, 301)]
            assert lines[-1] == "==> built on w1"
    finally:
        daemon.stop()


def test_a_worker_without_a_seed_takes_the_daemons(
    tmp_path: Path, bare: Path, ports_tree: Path, cluster: Cluster
) -> None:
    commit = libbase_alone(ports_tree)
    daemon = with_daemon_and_workers(tmp_path, bare, cluster, workers=1, PORTSD_SEED="")
    try:
        push(ports_tree)
        daemon.wait_idle(commit)
        (built,) = daemon.builds(port="libbase", state="built")
        assert built["detail"] == "built on w1"
    finally:
        daemon.stop()
    daemons = find_seed(Path(os.environ["PORTSD_SEED"]))
    taken = find_seed(tmp_path / "worker-w1" / "seed")
    assert daemons is not None and taken is not None
    assert taken.content_id == daemons.content_id
    log = (tmp_path / "w1.log").read_text()
    assert f"took the bootstrap seed {daemons.content_id[:12]} of {daemon.url}" in log
    assert "making the bootstrap seed" not in log


@pytest.mark.parametrize("cluster", ["bokeh", "no bokeh"], indirect=True)
def test_the_status_links_the_dask_dashboard_or_says_why_there_is_none(
    tmp_path: Path, bare: Path, cluster: Cluster
) -> None:
    daemon = with_daemon_and_workers(tmp_path, bare, cluster, workers=0)
    try:
        status = daemon.get("/api/v1/status")["cluster"]
        code, page = daemon.raw("/")
        assert code == 200
        if cluster.dashboard == "no bokeh":
            assert status["dashboard"] is None and "lacks bokeh" in status["no_dashboard"]
            assert b"no Dask dashboard: the scheduler&#39;s machine lacks bokeh" in page
            return
        link = status["dashboard"]
        assert link.startswith("http://127.0.0.1:") and status["no_dashboard"] is None
        with urllib.request.urlopen(link, timeout=30) as dashboard:
            assert dashboard.status == 200 and b"bokeh" in dashboard.read().lower()
        assert f'<a href="{link}">Dask dashboard</a>'.encode() in page
    finally:
        daemon.stop()
