"""Push-to-build-start latency and daemon memory on a 30,000-port tree.

    .venv/bin/python bench/push.py [--pushes N]

Uses bench/tree.py's synthetic 30,000-port repository. A bare repository made by
`portsd init` receives it, and its binary repository is seeded with a package for every
build key of that commit, as on a host that has built the whole tree (one small package
hard-linked 30,000 times, real records, a signed index): the daemon evaluates the whole
tree at start and has nothing to build. Then, N times per trigger, a commit edits one
leaf recipe and `git push` sends it: the latency is from `git push` returning to the
daemon's "build running" event for that port, read from its SSE stream.
First with the post-receive hook, then with the hook removed (the refs watcher alone).

Peers in the same run: `git diff --name-only` between the two commits (the change
detection every git-driven builder needs) and the daemon's own evaluation time (its log).
Targets: p95 under 300 ms through the hook, under 1 s through the watcher; daemon RSS
with the tree loaded under 300 MB.
Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pygit2

from bench.tree import TOOLCHAIN, synthetic_tree
from portsd.config import load_config
from portsd.core.evaluate import Evaluation
from portsd.core.index import FORMAT, Index, IndexEntry, encode_entry, encode_index
from portsd.core.metadata import PackageMeta
from portsd.pkg.archive import content_id
from portsd.pkg.package import create_package
from portsd.pkg.sign import SecretKey
from portsd.tree.loader import TreeLoader
from tests.daemon_harness import free_port


def commit_edit(repo: pygit2.Repository, leaf: str, serial: int) -> str:
    """A commit on main editing ports/<leaf>/port.toml, made with plumbing (no checkout)."""
    parent = repo.revparse_single("refs/heads/main").peel(pygit2.Commit)
    root = parent.tree
    ports = root["ports"].peel(pygit2.Tree)
    port = ports[leaf].peel(pygit2.Tree)
    recipe = port["port.toml"].peel(pygit2.Blob).data
    recipe = re.sub(rb"\n# bench \d+\n$", b"\n", recipe) + b"# bench %d\n" % serial
    builder = repo.TreeBuilder(port)
    builder.insert("port.toml", repo.create_blob(recipe), pygit2.enums.FileMode.BLOB)
    ports_builder = repo.TreeBuilder(ports)
    ports_builder.insert(leaf, builder.write(), pygit2.enums.FileMode.TREE)
    root_builder = repo.TreeBuilder(root)
    root_builder.insert("ports", ports_builder.write(), pygit2.enums.FileMode.TREE)
    signature = pygit2.Signature("bench", "bench@example.org")
    commit = repo.create_commit(
        "refs/heads/main",
        signature,
        signature,
        f"{leaf}: bench {serial}",
        root_builder.write(),
        [parent.id],
    )
    return str(commit)


class _Same:
    """Contents where every key's package has one content id."""

    def __init__(self, content: str) -> None:
        self.content = content

    def get(self, key: str, /) -> str:
        return self.content


def seed_built_repository(state_dir: Path, source: Path) -> tuple[int, str]:
    """Make the repository hold a package for every port of main, as on a build host that
    has built the whole tree: one small real package, hard-linked under each port's file
    name, a record per key and one signed index, in repo.py's documented layout.

    Returns the number of ports and a leaf to edit: a port with no dependencies that
    nothing depends on, so its rebuild is exactly one build.
    """
    arch = os.uname().machine
    config = load_config(state_dir)
    secret = SecretKey.load(config.secret_key)
    root = config.repo / arch
    for directory in (root / "packages", root / "keys"):
        directory.mkdir(parents=True, exist_ok=True)
    destdir = state_dir / "seed-destdir"
    (destdir / "usr/share").mkdir(parents=True)
    (destdir / "usr/share/seed").write_text("seed\n")
    template = create_package(
        destdir, PackageMeta("seed", "1", 1, arch, "0" * 64), state_dir, epoch=0
    )
    signature = secret.sign_file(template.path, "seed package")
    content = content_id(template.info.files)
    tree = TreeLoader().load_git(source, "main")
    # every key's package is the template, so every key is computable now
    evaluation = Evaluation.full(tree.inputs(), tree.recipes(), arch, TOOLCHAIN, _Same(content))
    graph, keys = evaluation.graph, evaluation.keys.keys
    leaf = next(n for n in sorted(keys) if not graph.edges(n) and not graph.dependents(n))
    entries = []
    for name, key in sorted(keys.items()):
        recipe = graph.recipe(name)
        assert recipe is not None
        meta = PackageMeta(
            name, recipe.version, recipe.release, arch, key, recipe.summary, recipe.license
        )
        entry = IndexEntry(meta, meta.filename, template.size, template.sha256, content)
        os.link(template.path, root / "packages" / entry.file)
        (root / "packages" / f"{entry.file}.minisig").write_text(signature)
        (root / "keys" / key).write_bytes(encode_entry(entry))
        entries.append(entry)
    now = int(time.time())
    index = Index(FORMAT, arch, 2, now, now + 7 * 86400, None, tuple(entries))
    data = encode_index(index)
    (root / "index.msgpack.zst").write_bytes(data)
    (root / "index.msgpack.zst.minisig").write_text(
        secret.sign(data, f"timestamp:{now}\tfile:index.msgpack.zst\tserial:2")
    )
    return len(keys), leaf


class BuildStarts:
    """Reads the daemon's SSE stream; ``wait(port)`` returns when that port's build runs."""

    def __init__(self, url: str) -> None:
        self.events: queue.Queue[tuple[str, float]] = queue.Queue()
        self.stream = urllib.request.urlopen(url + "/api/v1/events", timeout=600)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        kind = ""
        for raw in self.stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "build":
                data = json.loads(line[6:])
                if data.get("state") == "running":
                    self.events.put((data.get("port", ""), time.monotonic()))

    def drain(self) -> None:
        while not self.events.empty():
            self.events.get_nowait()

    def wait(self, port: str, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while True:
            name, when = self.events.get(timeout=max(deadline - time.monotonic(), 0.01))
            if name == port:
                return when


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--pushes", type=int, default=20)
    args = parser.parse_args()
    synthetic = synthetic_tree()
    work = Path(tempfile.mkdtemp(prefix="portsd-bench-push-", dir="/dev/shm"))
    daemon: subprocess.Popen[bytes] | None = None
    try:
        source = work / "source.git"
        subprocess.run(
            ["git", "clone", "-q", "--bare", str(synthetic.path), str(source)], check=True
        )
        build = work / "build.git"
        port = free_port()
        portsd = [sys.executable, "-m", "portsd.cli.daemon"]
        subprocess.run(
            [*portsd, "init", str(build), "--port", str(port)], check=True, capture_output=True
        )
        subprocess.run(["git", "-C", str(source), "remote", "add", "build", str(build)], check=True)
        (build / "hooks" / "post-receive").rename(work / "post-receive")  # the first push is set-up
        subprocess.run(["git", "-C", str(source), "push", "-q", "build", "main"], check=True)
        shutil.copy(work / "post-receive", build / "hooks" / "post-receive")
        seeded, leaf = seed_built_repository(build / "portsd", source)
        log = (work / "daemon.log").open("wb")
        started = time.monotonic()
        daemon = subprocess.Popen(
            [*portsd, "serve", "--repo", str(build), "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        main_commit = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "main"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        while True:
            try:
                with urllib.request.urlopen(url + "/api/v1/status", timeout=5) as response:
                    status = json.load(response)
                if status.get("evaluated") == main_commit and not status.get("evaluating"):
                    break
            except OSError:
                pass
            if time.monotonic() - started > 300:
                raise SystemExit("the daemon did not evaluate the tree within 300 s")
            time.sleep(0.1)
        ready = time.monotonic() - started
        rss_loaded = rss_mb(daemon.pid)
        starts = BuildStarts(url)
        repo = pygit2.Repository(str(source))
        results: dict[str, list[float]] = {"hook": [], "watch": []}
        serial = 0
        for mode in ("hook", "watch"):
            if mode == "watch":
                (build / "hooks" / "post-receive").unlink()
            for _ in range(args.pushes):
                serial += 1
                before = repo.revparse_single("refs/heads/main").id
                commit = commit_edit(repo, leaf, serial)
                starts.drain()
                subprocess.run(
                    ["git", "-C", str(source), "push", "-q", "build", "main"],
                    check=True,
                    capture_output=True,
                )
                returned = time.monotonic()
                began = starts.wait(leaf)
                results[mode].append(max(began - returned, 0.0) * 1000)
                time.sleep(0.3)  # let the (failing) build finish before the next push
        diff_ms = []
        for _ in range(5):
            t = time.monotonic()
            subprocess.run(
                ["git", "-C", str(source), "diff", "--name-only", str(before), commit],
                check=True,
                capture_output=True,
            )
            diff_ms.append((time.monotonic() - t) * 1000)
        rss_after = rss_mb(daemon.pid)
        evaluations = [
            float(ms)
            for ms in re.findall(
                rb"evaluated [0-9a-f]+ in (\d+) ms", (work / "daemon.log").read_bytes()
            )[1:]
        ]
        print(f"tree: {seeded} ports; daemon ready (full evaluation) in {ready:.1f} s")
        print(f"{args.pushes} pushes per trigger, each editing {leaf}")
        print(f"{'':44}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}   target")
        rows = [
            ("push -> build start, post-receive hook", results["hook"], 300),
            ("push -> build start, refs watcher only", results["watch"], 1000),
            ("  daemon evaluation (its log)", evaluations, None),
            ("peer: git diff --name-only", diff_ms, None),
        ]
        for label, values, target in rows:
            p50, p95 = statistics.median(values), percentile(values, 0.95)
            goal = f"<{target} {'ok' if p95 < target else 'MISSED'}" if target else ""
            print(f"{label:44}{p50:9.1f}{p95:9.1f}{max(values):9.1f}   {goal}")
        phases = re.findall(rb"blocked \((.*)\)", (work / "daemon.log").read_bytes())
        print(f"  last evaluation's phases (ms): {phases[-1].decode() if phases else '?'}")
        verdict = "ok" if max(rss_loaded, rss_after) < 300 else "MISSED"
        print(f"daemon RSS: {rss_loaded:.0f} MB with the tree loaded, {rss_after:.0f} MB after")
        print(f"  the pushes (target <300 MB: {verdict})")
    except BaseException:
        log_file = work / "daemon.log"
        if log_file.exists():
            print("daemon log (tail):\n" + log_file.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(timeout=60)
        if os.environ.get("KEEP_LOG"):
            shutil.copy(work / "daemon.log", "/tmp/push-daemon.log")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
