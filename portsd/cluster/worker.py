"""A Dask worker that builds: ``dask worker tcp://HOST:8786 --resources build=1
--preload portsd.cluster.worker``.

The preload (``dask_setup``) gives the worker its own builder, configured by environment
variables (docs/cluster.md):

    PORTSD_WORKER_STATE       its state directory: work, store, distfiles, logs, seed
    PORTSD_DAEMON_URL         the daemon, http://HOST:PORT: packages, sources, uploads
    PORTSD_WORKER_KEY         the repository's public key file: layers are verified with it
    PORTSD_WORKER_TOKEN_FILE  the daemon's worker token (its <state>/worker-token)
    PORTSD_WORKER_ROOTS       unpacked packages (and composed roots) kept; default 64
    PORTSD_WORKER_FAULT       fault injection for tests: 1 makes every package of this worker
                              differ (a byte appended to the first regular file)
    PORTSD_SEED               the bootstrap seed, as for the daemon (must be the daemon's;
                              a worker that keeps none takes the daemon's at start)

``build_on_worker`` is the task the daemon submits. It holds a cluster-wide lock named by
the build key (one key never builds twice at once, even across a daemon restart), stops
the build as soon as the task is released on the scheduler (cancelled, superseded, or
its daemon gone), sends the log lines to the daemon as Dask events (``LOG_TOPIC``), and
returns what the daemon needs to take the package: where the upload is, its size and
sha256, and the worker's name. The answer also ends the log: the lines not sent yet, and
how many were, so the daemon completes its copy from the answer alone (or says what did
not arrive) instead of waiting for events. A worker that dies mid-build returns nothing,
and Dask runs the task again elsewhere.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import distributed

from portsd.build.fetch import Fetcher
from portsd.build.order import BuildOrder
from portsd.build.pipeline import seed_of
from portsd.build.produce import Producer, limits_of
from portsd.build.seed import Seed
from portsd.build.store import Store
from portsd.client.seed import take_seed
from portsd.cluster.remote import DaemonPackages, Uploaded, upload
from portsd.config import Config, load_config
from portsd.core.metadata import PackageMeta
from portsd.errors import ConfigError, PortsdError
from portsd.pkg.sign import PublicKey

log = logging.getLogger("distributed.portsd")  # in Dask's worker log, as Dask's own lines

EXTENSION = "portsd"
LOG_TOPIC = "portsd-log"
FLUSH_EVERY = 0.2  # seconds between log batches (and looks at the task's state)
DEFAULT_ROOTS = 64
_GONE = {"cancelled", "released", "forgotten", "error"}  # the scheduler no longer wants it


@dataclass(frozen=True, slots=True)
class LogEnd:
    """The end of a build's log, in its task's answer."""

    sent: int  # lines sent as events before the answer
    tail: tuple[str, ...]  # the lines after those


@dataclass(frozen=True, slots=True)
class Built:
    """A finished remote build."""

    worker: str
    upload: Uploaded
    log: LogEnd


@dataclass(frozen=True, slots=True)
class Failed:
    """A build that failed on the worker, as one readable line (exceptions of portsd do not
    all survive pickling, and a failure is an answer, not a lost worker)."""

    worker: str
    reason: str
    log: LogEnd = LogEnd(0, ())
    cancelled: bool = False


@dataclass(slots=True)
class LogStream:
    """A build's log lines on their way to the daemon: the build thread appends, the
    watcher sends what has gathered as one event, the answer carries the rest."""

    lines: list[str] = field(default_factory=list)
    sent: int = 0

    def send(self, worker: distributed.Worker, task: str) -> None:
        batch = self.lines[:]
        del self.lines[: len(batch)]  # list ops are atomic: the build thread only appends
        if batch:
            worker.log_event(LOG_TOPIC, {"task": task, "lines": batch})
            self.sent += len(batch)

    def end(self) -> LogEnd:
        """Once the build thread is done: the lines no event carries."""
        return LogEnd(self.sent, tuple(self.lines))


@dataclass(slots=True)
class WorkerBuilder:
    """One worker's builder and its settings."""

    producer: Producer
    config: Config
    daemon: str
    token: Path
    roots: int
    lock: threading.Lock

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> WorkerBuilder:
        def need(name: str) -> str:
            value = environ.get(name)
            if not value:
                raise ConfigError(f"a portsd worker needs {name} (see docs/cluster.md)")
            return value

        config = load_config(Path(need("PORTSD_WORKER_STATE")).absolute())
        daemon = need("PORTSD_DAEMON_URL").rstrip("/")
        key = PublicKey.load(Path(need("PORTSD_WORKER_KEY")))
        token = Path(need("PORTSD_WORKER_TOKEN_FILE"))
        roots = int(environ.get("PORTSD_WORKER_ROOTS") or DEFAULT_ROOTS)
        for directory in (config.work, config.logs, config.state_dir / "packages"):
            directory.mkdir(parents=True, exist_ok=True)
        fetcher = Fetcher(
            config.distfiles,
            config.mirrors,
            named_mirrors=dict(config.named_mirrors),
            by_sha256=(f"{daemon}/distfiles",),
        )
        producer = Producer(
            config.work,
            config.arch,
            fetcher,
            Store(config.store),
            _seed(config, daemon, key),
            DaemonPackages(daemon, config.arch, (key,), config.state_dir / "packages"),
            hidden=(config.state_dir.resolve(),),
            alter=_fault if environ.get("PORTSD_WORKER_FAULT") == "1" else None,
            limits=limits_of(config),
        )
        return cls(producer, config, daemon, token, roots, threading.Lock())

    def build(
        self,
        order: BuildOrder,
        worker: distributed.Worker,
        task: str,
        still_wanted: Callable[[], bool],
        stream: LogStream,
    ) -> Built:
        """Build ``order``, upload the package; raises a PortsdError on failure."""
        cancel = threading.Event()
        stop = threading.Event()
        watcher = threading.Thread(
            target=self._watch, args=(worker, task, still_wanted, cancel, stream, stop), daemon=True
        )
        watcher.start()
        try:
            key_lock = distributed.Lock(f"portsd-build-{order.key}")
            while not key_lock.acquire(timeout=FLUSH_EVERY * 5):
                if cancel.is_set():
                    raise PortsdError(f"{order.label}: cancelled")
            try:
                with self.lock:  # one build at a time here, whatever the resources say
                    uploaded = self.producer.produce(
                        order,
                        cancel,
                        self._deliver,
                        log=self.config.logs / order.name / f"{order.key[:12]}.log",
                        on_line=stream.lines.append,
                    )
                    self.producer.store.prune(self.roots)
            finally:
                key_lock.release()
        finally:
            stop.set()
            watcher.join()
        return Built(str(worker.name), uploaded, stream.end())

    def _deliver(self, package: Path, meta: PackageMeta, content: str) -> Uploaded:
        # the daemon computes the content id again from what arrives: it trusts no worker
        return upload(self.daemon, self.token.read_text().strip(), package)

    def _watch(
        self,
        worker: distributed.Worker,
        task: str,
        still_wanted: Callable[[], bool],
        cancel: threading.Event,
        stream: LogStream,
        stop: threading.Event,
    ) -> None:
        """Send log lines in batches; set ``cancel`` once the scheduler drops the task.
        What is left when the build ends goes with the answer."""
        while not stop.wait(FLUSH_EVERY):
            stream.send(worker, task)
            if not still_wanted():
                cancel.set()


def build_on_worker(order: BuildOrder) -> Built | Failed:
    """The task the daemon submits: build ``order`` on this worker."""
    worker = distributed.get_worker()
    name = str(worker.name)
    builder = worker.extensions.get(EXTENSION)
    if not isinstance(builder, WorkerBuilder):
        return Failed(name, "this worker was started without --preload portsd.cluster.worker")
    task = str(worker.get_current_task())

    def still_wanted() -> bool:
        state = worker.state.tasks.get(task)
        return state is not None and state.state not in _GONE

    stream = LogStream()
    try:
        return builder.build(order, worker, task, still_wanted, stream)
    except PortsdError as error:
        return Failed(name, str(error), stream.end(), cancelled=not still_wanted())


def _seed(config: Config, daemon: str, key: PublicKey) -> Seed:
    """The daemon's seed: taken from it when this worker keeps none (a thread of its own:
    Dask calls the preload on its event loop), else this worker's, checked by the orders."""
    with ThreadPoolExecutor(1) as thread:
        thread.submit(take_seed, (daemon,), config.seed, config.arch, (key,), log.info).result()
    return seed_of(config, log.info)


def _fault(destdir: Path) -> None:
    """PORTSD_WORKER_FAULT=1: a byte appended to the first regular file (by path), or a
    file of its own when there is none; this worker's packages then differ."""
    files = sorted(path for path in destdir.rglob("*") if path.is_file() and not path.is_symlink())
    target = files[0] if files else destdir / "portsd-fault"
    if files:
        target.chmod(target.stat().st_mode | 0o200)
    with target.open("ab") as file:
        file.write(b"\0")


def dask_setup(worker: distributed.Worker) -> None:
    """The preload's entry point: Dask calls it as the worker starts."""
    worker.extensions[EXTENSION] = WorkerBuilder.from_environment(os.environ)
