"""The daemon's side of a cluster: build orders submitted to a Dask scheduler.

``Cluster.build`` submits one order as a task that needs the worker resource ``build``
(``dask worker ... --resources build=1``), with the build's critical path as its Dask
priority, and waits for it on the calling scheduler thread. Setting the build's cancel
event cancels the task on the cluster (its worker stops the sandbox). A worker that dies
mid-build never answers; Dask runs the task again on another worker, and only the answer
of a task that finished names an upload, so nothing a dead worker half-made is ever taken.
With ``verify = N`` the order is built N times, each on a worker that has not built it
yet, and the answers are returned for ``agree`` to compare.

Log lines arrive as Dask events (``LOG_TOPIC``) and go to the build's ``on_line``; the
task's answer carries the lines no event did, and how many the events carried, so the
log is complete (or says how many lines did not arrive) the moment the answer is in.
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import distributed

from portsd.build.order import BuildOrder
from portsd.cluster.worker import LOG_TOPIC, Built, Failed, build_on_worker
from portsd.errors import ConfigError, PortsdError

CONNECT_TIMEOUT = 10.0  # seconds to reach the scheduler at start
_POLL = 0.05  # seconds between looks at a build's cancel event
DASHBOARD_EVERY = 60.0  # seconds between looks at the scheduler's dashboard
DASHBOARD_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class WorkerView:
    """One worker as the status page shows it."""

    name: str
    address: str
    running: tuple[str, ...]  # the builds it runs (port and key)
    done: int  # builds it finished for this daemon
    last_seen: float  # seconds ago


@dataclass(frozen=True, slots=True)
class Dashboard:
    """The scheduler's Dask dashboard, or why there is none."""

    link: str | None
    missing: str | None  # one line, when ``link`` is None


class Cancelled(PortsdError):
    """The build was cancelled while its task was on the cluster."""


@dataclass(slots=True)
class _Follower:
    """Where a task's log lines go, and how many have arrived."""

    on_line: Callable[[str], None]
    received: int = 0


class Cluster:
    """A connection to one Dask scheduler, shared by every build thread."""

    def __init__(self, address: str) -> None:
        try:
            self.client = distributed.Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False)
        except (OSError, TimeoutError) as error:
            raise ConfigError(f"cannot reach the Dask scheduler at {address}: {error}") from None
        self.address = address
        self._lock = threading.Lock()
        self._follow: dict[str, _Follower] = {}  # task -> its build's log
        self._labels: dict[str, str] = {}  # task -> the build it is
        self._done: Counter[str] = Counter()  # worker name -> builds finished
        self._dashboard: tuple[float, Dashboard] | None = None  # when it was looked at
        self.client.subscribe_topic(LOG_TOPIC, self._on_log)

    def close(self) -> None:
        self.client.close()

    def build(
        self,
        order: BuildOrder,
        *,
        times: int,
        priority: float,
        cancel: threading.Event,
        on_line: Callable[[str], None],
    ) -> list[Built]:
        """``order`` built ``times`` times, each on a worker that has not built it yet.

        Raises PortsdError for a build that failed (naming the worker), ``Cancelled``."""
        builds: list[Built] = []
        for _ in range(times):
            avoid = {built.worker for built in builds}
            builds.append(self._once(order, priority, cancel, on_line, avoid))
        return builds

    def _once(
        self,
        order: BuildOrder,
        priority: float,
        cancel: threading.Event,
        on_line: Callable[[str], None],
        avoid: set[str],
    ) -> Built:
        task = f"portsd-{order.name}-{order.key[:12]}-{uuid.uuid4().hex[:8]}"
        options: dict[str, Any] = {}
        if avoid:
            options["workers"] = [
                address
                for address, info in self._workers().items()
                if str(info.get("name")) not in avoid
            ]
            options["allow_other_workers"] = False
            if not options["workers"]:
                raise PortsdError(
                    f"{order.label}: no other worker to build it again on (verify needs as "
                    "many workers)"
                )
        with self._lock:
            self._follow[task] = _Follower(on_line)
            self._labels[task] = f"{order.name} {order.key[:12]}"
        done = threading.Event()
        try:
            future = self.client.submit(
                build_on_worker,
                order,
                key=task,
                pure=False,
                resources={"build": 1},
                priority=int(priority * 1000),
                **options,
            )
            future.add_done_callback(lambda _: done.set())
            while not done.wait(_POLL):
                if cancel.is_set():
                    future.cancel()
                    raise Cancelled(f"{order.label}: cancelled")
            answer = _answer(order, future)
            self._end_log(task, order, answer)
        finally:
            with self._lock:
                self._follow.pop(task, None)
                self._labels.pop(task, None)
        if isinstance(answer, Failed):
            if answer.cancelled or cancel.is_set():
                raise Cancelled(f"{order.label}: cancelled")
            raise PortsdError(f"{answer.reason} (on worker {answer.worker})")
        with self._lock:
            self._done[answer.worker] += 1
        return answer

    def _on_log(self, event: tuple[float, dict[str, Any]]) -> None:
        _, message = event
        with self._lock:  # held while writing: a build's log is not closed under a line
            follower = self._follow.get(str(message.get("task")))
            if follower is not None:
                for line in message.get("lines", ()):
                    follower.on_line(str(line))
                    follower.received += 1

    def _end_log(self, task: str, order: BuildOrder, answer: Built | Failed) -> None:
        """Complete the log from the answer; events still on their way are then dropped."""
        with self._lock:
            follower = self._follow.pop(task)
            missing = answer.log.sent - follower.received
            if missing > 0:
                follower.on_line(
                    f"==> {missing} log lines did not arrive from worker {answer.worker}; its "
                    f"logs/{order.name}/{order.key[:12]}.log has them"
                )
            for line in answer.log.tail:
                follower.on_line(line)

    def _workers(self) -> dict[str, dict[str, Any]]:
        workers: dict[str, dict[str, Any]] = self.client.scheduler_info(n_workers=-1)["workers"]
        return workers

    def slots(self) -> int:
        """Builds the cluster runs at once: the ``build`` resources of its workers. The
        daemon hands over no more than that, and keeps the rest in its own queue,
        critical path first: Dask assigns a task with resources to a worker at once, busy
        or not, so a longer queue there would let a late critical build wait behind
        others."""
        return int(
            sum(info.get("resources", {}).get("build", 0) for info in self._workers().values())
        )

    def workers(self) -> list[WorkerView]:
        """Every worker the scheduler knows, with what it builds for this daemon."""
        processing: dict[str, list[str]] = self.client.processing()
        now = time.time()
        with self._lock:
            labels, done = dict(self._labels), Counter(self._done)
        views = []
        for address, info in sorted(self._workers().items()):
            name = str(info.get("name", address))
            running = tuple(labels[t] for t in processing.get(address, ()) if t in labels)
            seen = float(info.get("last_seen", now))
            views.append(WorkerView(name, address, running, done[name], max(now - seen, 0.0)))
        return views

    def dashboard(self) -> Dashboard:
        """The scheduler's dashboard, looked at once a minute at most: Dask names a link
        whether or not a dashboard is behind it (not with ``--no-dashboard``, nor without
        bokeh on the scheduler's machine)."""
        now = time.monotonic()
        if self._dashboard is None or now - self._dashboard[0] > DASHBOARD_EVERY:
            self._dashboard = (now, _look_at(str(self.client.dashboard_link)))
        return self._dashboard[1]


def _look_at(link: str) -> Dashboard:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(link, timeout=DASHBOARD_TIMEOUT) as response:
            page = response.read(64 * 1024)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            return Dashboard(None, "the scheduler serves no dashboard (--no-dashboard)")
        return Dashboard(None, f"the dashboard {link} answers {error.code}")
    except OSError as error:
        return Dashboard(None, f"the dashboard {link} does not answer here: {error}")
    if b"needs bokeh" in page:  # Dask's page in its place when bokeh is missing
        return Dashboard(
            None, "the scheduler's machine lacks bokeh (pip install bokeh, restart the scheduler)"
        )
    return Dashboard(link, None)


def _answer(order: BuildOrder, future: distributed.Future[Any]) -> Built | Failed:
    try:
        answer = future.result()
    except distributed.client.FutureCancelledError:
        raise Cancelled(f"{order.label}: cancelled on the cluster") from None
    except Exception as error:  # a lost task: KilledWorker after too many dead workers
        raise PortsdError(f"{order.label}: {type(error).__name__}: {error}") from None
    if not isinstance(answer, Built | Failed):
        raise PortsdError(f"{order.label}: the worker answered {answer!r}")
    return answer
