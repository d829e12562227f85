"""Serving repository files: the daemon's application against nginx, side by side, with wrk.

    .venv/bin/python bench/serve.py [--rounds N] [--seconds S] [--conns 1,16,128]

A repository (``Repository``: signed index, ``packages/``) on tmpfs holding a 1 MB and a
64 MB package-like file of random bytes, served on 127.0.0.1 by

- portsd: ``create_app`` with a minimal real engine (sqlite state, the repository, an event
  bus; no builds) under ``create_runner``, in its own process: every route, check, counter
  and the access logger of the daemon, one event loop;
- nginx (Debian's nginx-light), two generated configs: "nginx" is the issue's minimal one
  (``daemon off``, ``worker_processes auto``, ``sendfile on``, temp paths under the bench's
  directory, and no access log, as portsd logs no successful download); "nginx+" adds what
  Debian's default ``http`` block has, ``tcp_nopush on`` (TCP_CORK around headers and
  sendfile, which portsd does too), and keep-alive without a request limit.

Each round runs, for each file size and connection count, wrk against each server in turn
(``wrk -t min(conns, cores) -c conns --timeout 60s``) for S seconds; the table shows medians
over the rounds. MB/s is wrk's Transfer/sec (bytes read, partial responses included); the
ratios are portsd's MB/s over each peer's. Errors are wrk's non-2xx responses plus its
socket errors (connect, read, write, timeout), summed over the rounds. Before measuring,
each file is fetched from every server and checked byte for byte; afterwards portsd's
``/metrics`` must account for at least the bytes wrk read from it.

Targets (from the issue, against the minimal config): >= 0.9x nginx on 64 MB and >= 0.75x
on 1 MB at 16 connections, no failed request at 128 connections. The machine has 2 cores
shared by wrk and the servers, and other work: compare ratios of one run, not numbers
across runs.
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from portsd.config import Config
from portsd.daemon.engine import EngineStatus, PlanGraph
from portsd.daemon.events import EventBus
from portsd.daemon.problems import Problems
from portsd.daemon.state import BuildState, State
from portsd.pkg.repo import Repository
from portsd.pkg.sign import SecretKey

ARCH = "x86_64"
FILES = {"1MB": 1 << 20, "64MB": 64 << 20}
TARGETS = {"1MB": 0.75, "64MB": 0.9}  # at 16 connections
NGINX = "/usr/sbin/nginx"
NGINX_CONF = """\
daemon off;
worker_processes auto;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
{tuning}\
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location /repo/ {{ alias {root}/; }}
    }}
}}
"""
TUNING = "    tcp_nopush on;\n    keepalive_requests 1000000;\n"
"""Debian's default http block adds tcp_nopush (TCP_CORK around headers and sendfile)."""
SERVERS = ("portsd", "nginx", "nginx+")


# -- the daemon side: a minimal real engine, in a process of its own --------------------------


class ServingEngine:
    """The Engine protocol over a state database and a repository; nothing is ever built."""

    def __init__(self, config: Config, state: State, repo: Repository, events: EventBus) -> None:
        self.config = config
        self.state = state
        self.repo = repo
        self.events = events

    def trigger(self, source: str) -> None:
        pass

    def rebuild(self, names: Sequence[str]) -> list[str]:
        return []

    def status(self) -> EngineStatus:
        queued = self.state.counts()[BuildState.QUEUED]
        return EngineStatus("main", None, None, None, False, queued, (), None)

    def plan_graph(self) -> PlanGraph:
        return PlanGraph(revision=None)

    def problems(self) -> Problems:
        return Problems(ports=0, published=0)


def serve(state_dir: Path, port: int) -> None:
    """Run the daemon's application on 127.0.0.1:``port`` until SIGTERM."""
    from aiohttp import web

    from portsd.daemon.server.app import create_app, create_runner

    async def main() -> None:
        config = Config(state_dir=state_dir)
        loop = asyncio.get_running_loop()
        engine = ServingEngine(
            config, State(config.database), Repository(config.repo, ARCH, None), EventBus(loop)
        )
        runner = create_runner(create_app(config, engine))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        print("ready", flush=True)
        await stop.wait()
        await runner.cleanup()

    asyncio.run(main())


# -- the bench ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    rps: float
    mbps: float
    errors: int
    bytes_read: int


_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


def _amount(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)([KMGT]?B)", text)
    assert match is not None, text
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(url: str, conns: int, seconds: float) -> Result:
    threads = max(1, min(conns, len(os.sched_getaffinity(0))))
    command = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds:g}s", "--timeout", "60s", url]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    transfer = re.search(r"Transfer/sec:\s+(\S+)", out).group(1)  # type: ignore[union-attr]
    total = re.search(r"requests in [0-9.]+\w+, (\S+) read", out).group(1)  # type: ignore[union-attr]
    errors = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(match.group(1))
    if match := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    ):
        errors += sum(int(n) for n in match.groups())
    return Result(rps, _amount(transfer) / 1e6, errors, int(_amount(total)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextmanager
def running(command: list[str], port: int) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port, process)
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        data: bytes = response.read()
        return data


def sent_bytes(base: str) -> int:
    text = fetch(base + "/metrics").decode()
    match = re.search(r"^portsd_repo_sent_bytes_total (\d+)$", text, re.MULTILINE)
    assert match is not None
    return int(match.group(1))


def prepare(work: Path) -> tuple[Path, dict[str, str]]:
    """A state directory whose repository holds the files; their paths under /repo/."""
    state = work / "state"
    repo = Repository(Config(state_dir=state).repo, ARCH, SecretKey.generate())
    paths = {}
    for label, size in FILES.items():
        name = f"bench{label.lower()}-1.0-1-{ARCH}-{'0' * 12}.pkg.tar.zst"
        (repo.packages_path / name).write_bytes(os.urandom(size))
        paths[label] = f"/repo/{ARCH}/packages/{name}"
    return state, paths


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--conns", default="1,16,128")
    parser.add_argument("--serve", nargs=2, metavar=("STATE", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), int(args.serve[1]))
        return 0
    for tool in ("wrk", NGINX):
        if shutil.which(tool) is None:
            print(f"bench/serve.py needs {tool}", file=sys.stderr)
            return 2
    conns = [int(n) for n in args.conns.split(",")]
    work = Path(tempfile.mkdtemp(prefix="portsd-serve-", dir="/dev/shm"))
    work.chmod(0o755)  # nginx's workers run as nobody
    try:
        return measure(work, conns, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def commands(work: Path, state: Path, ports: dict[str, int]) -> dict[str, list[str]]:
    """How to start each server (nginx configs written under ``work``)."""
    out = {"portsd": [sys.executable, __file__, "--serve", str(state), str(ports["portsd"])]}
    for name, tuning in (("nginx", ""), ("nginx+", TUNING)):
        directory = work / name
        directory.mkdir()
        conf = directory / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(dir=directory, port=ports[name], root=state / "repo", tuning=tuning)
        )
        out[name] = [
            NGINX,
            "-p",
            str(directory),
            "-c",
            str(conf),
            "-e",
            str(directory / "error.log"),
        ]
    return out


def measure(work: Path, conns: list[int], args: argparse.Namespace) -> int:
    state, paths = prepare(work)
    ports = {name: free_port() for name in SERVERS}
    results: dict[tuple[str, str, int], list[Result]] = {}
    load = os.getloadavg()[0]
    with ExitStack() as stack:
        for name, command in commands(work, state, ports).items():
            stack.enter_context(running(command, ports[name]))
        bases = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        for label, path in paths.items():
            expected = hashlib.sha256((state / "repo" / path.removeprefix("/repo/")).read_bytes())
            for name, base in bases.items():
                got = hashlib.sha256(fetch(base + path)).hexdigest()
                assert got == expected.hexdigest(), f"{name} served {label} wrong"
        before = sent_bytes(bases["portsd"])
        read_from_portsd = 0
        for _ in range(args.rounds):
            for label, path in paths.items():
                for n in conns:
                    for name, base in bases.items():
                        result = wrk(base + path, n, args.seconds)
                        results.setdefault((label, name, n), []).append(result)
                        if name == "portsd":
                            read_from_portsd += result.bytes_read
        counted = sent_bytes(bases["portsd"]) - before
    report(results, conns, args, load)
    print(
        f"\nportsd /metrics: {counted / 1e9:.2f} GB sent; wrk read {read_from_portsd / 1e9:.2f} GB"
    )
    # wrk rounds what it prints; the server also sends what wrk stops reading at the end
    if counted < read_from_portsd * 0.99:
        print("error: /metrics counted fewer bytes than wrk read", file=sys.stderr)
        return 1
    return 0


def report(
    results: dict[tuple[str, str, int], list[Result]],
    conns: list[int],
    args: argparse.Namespace,
    load: float,
) -> None:
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores, load average {load:.2f} -> {os.getloadavg()[0]:.2f}")
    print(f"median of {args.rounds} rounds of {args.seconds:g} s; ratio = portsd MB/s / peer MB/s")
    print("nginx: the issue's minimal config; nginx+: with tcp_nopush and unlimited keep-alive\n")
    header = f"{'file':<5}{'conns':>6} |"
    for name in SERVERS:
        header += f"{name + ' req/s':>13}{'MB/s':>7}{'err':>4} |"
    header += f"{'vs nginx':>9}{'vs nginx+':>10}{'target':>9}"
    print(header)
    print("-" * len(header))
    for label in FILES:
        for n in conns:
            line = f"{label:<5}{n:>6} |"
            mbps = {}
            for name in SERVERS:
                runs = results[(label, name, n)]
                rps = statistics.median(r.rps for r in runs)
                mbps[name] = statistics.median(r.mbps for r in runs)
                errors = sum(r.errors for r in runs)
                line += f"{rps:>13.1f}{mbps[name]:>7.0f}{errors:>4} |"
            for peer, width in (("nginx", 8), ("nginx+", 9)):
                ratio = mbps["portsd"] / mbps[peer] if mbps[peer] else float("nan")
                line += f"{ratio:>{width}.2f}x"
            target = f">={TARGETS[label]}x" if n == 16 else ("0 err" if n == 128 else "")
            print(f"{line}{target:>9}")


if __name__ == "__main__":
    raise SystemExit(main())
