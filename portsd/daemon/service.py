"""The build host: follows one branch, evaluates each new head, builds what it lacks.

Triggers (the post-receive hook's HTTP call, the refs watcher, a rebuild request, the
start itself) only wake the evaluation loop; a burst of them coalesces into one
evaluation of the newest head. An evaluation loads the tree incrementally (only changed
port directories are parsed), updates graph and keys, plans every port whose key the
repository lacks, explains each planned build (``ports why``), records the plan in
sqlite and hands it to the scheduler, which keeps still-wanted running builds and
cancels the rest. A build that fails is remembered by key and not retried until its key
changes or someone asks; its dependents are skipped with the reason.

Keys contain the content ids of the dependencies' packages, so the ports above a planned
build are pending until it is done: each finished build wakes the loop like a push, and
the same head is evaluated again with the new package's content id. A rebuild that came
out identical leaves its dependents' keys as they were, already in the repository, and
nothing downstream is built (cut off).

Blocking work (git, parsing, sqlite, builds) never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from aiohttp import web

from portsd.build.builder import step_of
from portsd.build.pipeline import Revision, Workspace
from portsd.build.scheduler import Outcome, Result, Scheduler, describe_error
from portsd.cluster.agree import Disagreement, settle
from portsd.cluster.dispatch import Cluster
from portsd.config import Config
from portsd.core.evaluate import Evaluation
from portsd.core.explain import Evaluated, Touch, explain
from portsd.core.index import IndexEntry
from portsd.core.plan import BuildPlan, PlannedBuild, Triage, critical_path, triage
from portsd.daemon.engine import ClusterStatus, EngineStatus, PlanGraph, PlanNode, Running
from portsd.daemon.events import EventBus
from portsd.daemon.instance import local_url
from portsd.daemon.problems import Problems, find_problems, one_line
from portsd.daemon.space import disk_full
from portsd.daemon.state import BuildRow, BuildState, NewBuild, State, StateError
from portsd.daemon.watch import RefWatcher
from portsd.errors import GitError, PortsdError
from portsd.fsio import remove_tree, write_atomic
from portsd.pkg.repo import Repository
from portsd.pkg.retention import policy_of, prune
from portsd.tree.gitrepo import GitRepo, GitSnapshot
from portsd.tree.loader import Tree, TreeLoader

log = logging.getLogger(__name__)

_STATES = {
    Outcome.BUILT: BuildState.BUILT,
    Outcome.FAILED: BuildState.FAILED,
    Outcome.SKIPPED: BuildState.SKIPPED,
    Outcome.CANCELLED: BuildState.CANCELLED,
}
COALESCE = 0.02  # seconds to wait for more triggers before evaluating
REFRESH_EVERY = 86400.0  # re-sign the index daily, well before it expires
SAVE_EVERY = 300.0  # seconds between recipe-cache writes (and one at shutdown)
STOPPED = "the daemon stopped before its builds were queued"  # an evaluation's error
REBUILD = "rebuild"  # the trigger that re-evaluates an unmoved head (failures were forgotten)
IN_FLIGHT = 256  # threads waiting on a cluster's builds: its most build slots
SLOTS_EVERY = 1.0  # seconds between looks at a cluster's build slots
BUILT = "built"  # likewise: a package appeared, the ports waiting on it can be keyed
PRUNE_EVERY = 3600.0  # seconds between removals of old packages (portsd.pkg.retention)
RETRY = "retry"  # the trigger that re-evaluates after a failure of the host (a full disk)
RETRY_EVERY = 5.0  # seconds between looks at whether the disk has room again


@dataclass(frozen=True, slots=True)
class _Evaluated:
    """What the daemon keeps of the latest evaluation."""

    id: int
    revision: Revision
    tree: Tree
    triaged: Triage
    wanted: frozenset[str]  # keys handed to the scheduler
    cut_off: frozenset[str]  # ports of this head once pending, then found up to date
    base: tuple[Revision, Tree] | None  # the last evaluation of an earlier commit: what
    # this head's builds are explained against, in every wave


class Daemon:
    """The engine behind ``portsd serve`` (implements portsd.daemon.engine.Engine)."""

    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop) -> None:
        if config.tree_dir is None:
            raise PortsdError("no ports repository to follow: set [server] tree or pass --tree")
        self.config = config
        self.loop = loop
        self.events = EventBus(loop)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.state = State(config.database)
        self.workspace = Workspace.open(config)
        self.repo: Repository = self.workspace.repo
        self.git = GitRepo(config.tree_dir)  # the evaluation thread's
        self._refs = GitRepo(config.tree_dir)  # anyone's, under _refs_lock: libgit2 objects
        self._refs_lock = threading.Lock()  # are not safe to share between threads
        self.branch = config.branch or self.git.head_branch()
        self.loader = TreeLoader(config.cache)
        self.cluster: Cluster | None = None  # connected by ``lifetime`` in cluster mode
        self._priority: dict[str, float] = {}  # port -> critical path, a cluster's priority
        self._workers: dict[int, str] = {}  # build row -> the worker that built it
        self._disagreements: dict[str, Disagreement] = {}  # build key -> the last one
        if config.cluster is not None and not config.worker_token_file.exists():
            write_atomic(config.worker_token_file, secrets.token_urlsafe(32).encode(), 0o600)
        jobs = IN_FLIGHT if config.cluster is not None else config.jobs
        self.scheduler = Scheduler(self._build, jobs=jobs, reporter=self)
        # One thread for every evaluation: its transient 30,000-entry structures then reuse
        # one malloc arena instead of fragmenting a new one per pool thread.
        self._evaluator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evaluate")
        self._wake = asyncio.Event()
        self._sources: set[str] = set()  # what woke the loop since the last evaluation
        self._evaluating = False
        self._stopping = threading.Event()  # set once, when the daemon starts to stop
        self._latest: _Evaluated | None = None
        self._lock = threading.RLock()  # the maps below; re-entered by scheduler callbacks
        self._rows: dict[str, int] = {}  # key -> active build row
        self._steps: dict[int, str] = {}  # build row -> current step
        self._revisions: dict[str, Revision] = {}  # key -> the revision to build it from
        self._durations: dict[str, float] = {}
        self._parses_saved = 0
        self._saved_at = 0.0
        self._index_keys: tuple[int, dict[str, str]] = (-1, {})  # serial -> name -> key
        # A full disk: outcomes sqlite could not record, and whether to evaluate again
        # (an evaluation failed, builds were interrupted) once there is room.
        self._unrecorded: list[tuple[int, BuildState, str | None]] = []
        self._retry = False

    # -- lifetime ----------------------------------------------------------------------

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup_ctx: recover, start the loop and the watcher; stop them after."""
        await asyncio.to_thread(self._recover)
        if self.config.cluster is not None:
            self.cluster = await asyncio.to_thread(Cluster, self.config.cluster)
            self.scheduler.limit(await asyncio.to_thread(self.cluster.slots))
        watcher = RefWatcher(Path(self.git.gitdir), lambda path: self.trigger("watch"))
        watcher.start()
        evaluations = asyncio.create_task(self._evaluation_loop(), name="evaluations")
        refresh = asyncio.create_task(self._refresh_loop(), name="index refresh")
        slots = asyncio.create_task(self._slots_loop(), name="cluster slots")
        retry = asyncio.create_task(self._retry_loop(), name="retry")
        pruning = asyncio.create_task(self._prune_loop(), name="prune")
        self.trigger("startup")
        try:
            yield
        finally:
            # In order: no more triggers; the evaluation in progress ends (it queues nothing
            # once it sees the stop) and the loop with it; then the builds stop; then the
            # state closes. The scheduler is never closed under an evaluation.
            watcher.stop()
            self._stopping.set()
            self._wake.set()
            refresh.cancel()
            slots.cancel()
            retry.cancel()
            pruning.cancel()
            await asyncio.gather(
                evaluations, refresh, slots, retry, pruning, return_exceptions=True
            )
            await asyncio.to_thread(self.scheduler.close)
            if self.cluster is not None:
                await asyncio.to_thread(self.cluster.close)
            await self.loop.run_in_executor(self._evaluator, partial(self._save_cache, force=True))
            self._evaluator.shutdown()
            self.state.close()

    def _recover(self) -> None:
        interrupted = self.state.recover()
        if interrupted:
            log.warning(
                "%d build(s) interrupted by the last stop will be planned again", len(interrupted)
            )
        remove_tree(self.config.work)  # half-done builds: start over
        remove_tree(self.config.uploads)  # worker results no finished task named: never taken
        self.config.work.mkdir(parents=True, exist_ok=True)

    # -- triggers ----------------------------------------------------------------------

    def trigger(self, source: str) -> None:
        """Look at the branch again soon; safe from any thread."""
        log.debug("trigger: %s", source)
        self.loop.call_soon_threadsafe(self._wake_for, source)

    def rebuild(self, names: Sequence[str]) -> list[str]:
        latest = self._latest
        known = [n for n in names if latest is not None and n in latest.revision.graph]
        if known:
            self.state.forget_failures(known)
        self.trigger(REBUILD)  # handed to the loop like any trigger, so none is ever lost
        return known

    def _wake_for(self, source: str) -> None:
        """On the loop thread: the only writer of the pending triggers."""
        self._sources.add(source)
        self._wake.set()

    async def _evaluation_loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(COALESCE)  # let a burst of triggers land
            if self._stopping.is_set():
                return
            self._wake.clear()
            sources, self._sources = self._sources, set()
            forced = bool(sources & {REBUILD, BUILT, RETRY})  # even if the head has not moved
            self._evaluating = True
            try:
                await self.loop.run_in_executor(
                    self._evaluator, self._evaluate, forced, ",".join(sorted(sources))
                )
            except PortsdError as error:
                log.error("evaluation failed: %s", error)
                self.events.publish("evaluation", error=str(error))
                self._retry = True  # a host's failure passes (a full disk); a tree's recurs
            except Exception:
                log.exception("evaluation crashed")
            finally:
                self._evaluating = False
                self.events.publish("status")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_EVERY)
            try:
                await asyncio.to_thread(self.repo.refresh)
            except PortsdError as error:
                log.error("index refresh failed: %s", error)

    async def _slots_loop(self) -> None:
        """In cluster mode, hand over as many builds as the workers have build slots."""
        cluster = self.cluster
        while cluster is not None:
            await asyncio.sleep(SLOTS_EVERY)
            try:
                self.scheduler.limit(await asyncio.to_thread(cluster.slots))
            except OSError as error:
                log.error("the Dask scheduler does not answer: %s", error)

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_EVERY)
            try:
                removed = await asyncio.to_thread(prune, self.repo, policy_of(self.config))
            except PortsdError as error:
                log.error("removing old packages failed: %s", error)
                continue
            if removed:
                log.info(
                    "removed %d old package(s), %d bytes: %s",
                    len(removed),
                    sum(entry.size for entry in removed),
                    ", ".join(entry.file for entry in removed),
                )

    async def _retry_loop(self) -> None:
        """Once the disk has room again: record what could not be, and evaluate again."""
        while True:
            await asyncio.sleep(RETRY_EVERY)
            if not self._retry or self._full() is not None:
                continue
            self._retry = False
            await asyncio.to_thread(self._record_unrecorded)
            self.trigger(RETRY)

    def _full(self) -> str | None:
        return disk_full(self.config.state_dir, self.config.work)

    def _record_unrecorded(self) -> None:
        with self._lock:
            pending, self._unrecorded = self._unrecorded, []
        for index, (row, state, detail) in enumerate(pending):
            try:
                self._log_outcome(self.state.finish_build(row, state, detail))
            except StateError as error:
                log.error("still cannot record build #%d: %s", row, error)
                with self._lock:
                    self._unrecorded[:0] = pending[index:]
                self._retry = True
                return
        if pending:
            self.events.publish("status")

    # -- evaluation (on a worker thread, one at a time) -------------------------------------

    def _head(self) -> str | None:
        with self._refs_lock:
            try:
                return self._refs.commit(f"refs/heads/{self.branch}")
            except GitError:
                return None  # nothing pushed yet

    def _evaluate(self, forced: bool, sources: str) -> None:
        head = self._head()
        previous = self._latest
        if head is None or (
            previous is not None and previous.revision.commit == head and not forced
        ):
            return
        started = time.monotonic()
        phases: dict[str, float] = {}

        def lap(name: str, since: list[float] = [started]) -> None:  # noqa: B006 - a stopwatch
            now = time.monotonic()
            phases[name] = (now - since[0]) * 1000
            since[0] = now

        evaluation_id = self.state.start_evaluation(head, self.branch, sources or "push")
        try:  # from here on the evaluation's row is finished, whatever happens
            tree, evaluation = self._load(head, previous)
            lap("load")
            revision = Revision(tree, evaluation, head)
            present = self.repo.stored_keys()
            failed = self.state.failed_keys()
            triaged = triage(evaluation, present, failed)
            lap("plan")
            lost = self._republish(revision, triaged.plan, tree)
            if lost:  # recorded, but their files are gone: build them again
                present = present - lost
                triaged = triage(evaluation, present, failed)
            lap("republish")
        except Exception as error:
            self.state.finish_evaluation(evaluation_id, [], blocked=0, error=describe_error(error))
            raise
        if self._stopping.is_set():  # its builds would be cancelled at once: queue none
            self.state.finish_evaluation(
                evaluation_id, [], blocked=len(triaged.blocked), error=STOPPED
            )
            return
        cut_off = frozenset(
            name
            for name in (previous.triaged.wanted.pending if previous is not None else ())
            if name in triaged.plan.up_to_date
        )
        base = (previous.revision, previous.tree) if previous is not None else None
        if previous is not None and previous.revision.commit == head:
            cut_off |= previous.cut_off
            base = previous.base
        rows = self._hand_over(evaluation_id, revision, tree, triaged, cut_off, base, again=lost)
        lap("record")
        # Off the critical path: builds are already starting.
        reasons = self._reasons(base, revision, tree, triaged.wanted, present)
        self.state.explain({row.id: reasons[row.port] for row in rows if row.port in reasons})
        lap("explain")
        self._save_cache(force=previous is None)
        lap("cache")
        _return_memory(full=previous is None)

        log.info(
            "evaluated %s in %.0f ms: %d to build, %d blocked (%s)",
            head[:12],
            (time.monotonic() - started) * 1000,
            len(triaged.wanted),
            len(triaged.blocked),
            ", ".join(f"{name} {ms:.0f}" for name, ms in phases.items()),
        )
        self.events.publish(
            "evaluation",
            id=evaluation_id,
            revision=head,
            planned=len(triaged.wanted),
            blocked=len(triaged.blocked),
        )

    def _hand_over(
        self,
        evaluation_id: int,
        revision: Revision,
        tree: Tree,
        triaged: Triage,
        cut_off: frozenset[str],
        base: tuple[Revision, Tree] | None,
        *,
        again: frozenset[str],
    ) -> list[BuildRow]:
        """Record the evaluation's builds and hand them to the scheduler; returns the rows.

        Under the lock from the first look at the running builds to the hand-off, so no
        build thread sees half of it. Queued builds no longer wanted are superseded; the
        doomed ones are recorded as skipped."""
        keep = frozenset(b.key for b in triaged.wanted.builds)
        with self._lock:
            _, running = self.scheduler.snapshot()
            running_keys = {build.key for build, _ in running}
            dropped = [
                row
                for key, row in self._rows.items()
                if key not in keep and key not in running_keys
            ]
            stages = revision.evaluation.stages
            on = stages.current.describe(stages.spec)  # every key planned here stands on it
            builds = [
                NewBuild(b.name, _version(revision, b.name), b.key, "", on)
                for b in triaged.wanted.builds
                if b.key not in self._rows
            ] + [
                NewBuild(s.build.name, _version(revision, s.build.name), s.build.key, s.reason, on)
                for s in triaged.doomed
            ]
            rows = self.state.finish_evaluation(
                evaluation_id, builds, blocked=len(triaged.blocked), superseded=dropped
            )
            self._rows = {key: row for key, row in self._rows.items() if row not in dropped}
            skipped = {skip.build.key: skip.reason for skip in triaged.doomed}
            for row in rows:
                if row.key in skipped:
                    done = self.state.finish_build(row.id, BuildState.SKIPPED, skipped[row.key])
                    self._log_outcome(done)
                else:
                    self._rows[row.key] = row.id
            self._revisions = {key: revision for key in keep} | {
                key: self._revisions[key] for key in running_keys if key in self._revisions
            }
            self._durations = self.state.durations()
            self._latest = _Evaluated(evaluation_id, revision, tree, triaged, keep, cut_off, base)
            self._priority = critical_path(triaged.wanted, self._durations)
            self.scheduler.submit(triaged.wanted, self._priority, again=again)
        return rows

    def _save_cache(self, *, force: bool = False) -> None:
        """Persist new parses, at most every SAVE_EVERY seconds (and after a cold load):
        rewriting the whole cache for each one-recipe push would cost more than it saves."""
        if self.loader.parses == self._parses_saved:
            return
        if force or time.monotonic() - self._saved_at >= SAVE_EVERY:
            self.loader.save()
            self._parses_saved = self.loader.parses
            self._saved_at = time.monotonic()

    def _load(self, head: str, previous: _Evaluated | None) -> tuple[Tree, Evaluation]:
        if previous is None:
            tree = self.loader.load(GitSnapshot(self.git, head))
            evaluation = Evaluation.full(
                tree.inputs(),
                tree.recipes(),
                self.config.arch,
                self.workspace.seed.content_id,
                self.workspace.contents,
                tree.toolchain(),
            )
        else:
            tree = self.loader.advance(previous.tree, head)
            evaluation = previous.revision.evaluation.advance(
                tree.inputs(), tree.changed_ports(), self.workspace.contents, tree.toolchain()
            )
        return tree, evaluation

    def _republish(self, revision: Revision, plan: BuildPlan, tree: Tree) -> frozenset[str]:
        """Index the stored packages of up-to-date ports it does not list (a revert), and
        drop the ports that left the tree. Returns the keys whose stored package is gone
        (removed by hand): one lost file costs a rebuild, never the whole evaluation."""
        index = self.repo.index()
        if self._index_keys[0] != index.serial:
            self._index_keys = (index.serial, {e.meta.name: e.meta.build_key for e in index})
        listed = self._index_keys[1]
        keys = revision.keys.keys
        lost = set()
        for name in sorted(n for n in plan.up_to_date if listed.get(n) != keys[n]):
            if self.repo.find_key(keys[name]) is None:
                log.warning(
                    "%s: the stored package of key %s is gone; building it again",
                    name,
                    keys[name][:12],
                )
                lost.add(keys[name])
                continue
            self.repo.restore(keys[name], commit=revision.commit)
            log.info("republished: %s (key %s, built before)", name, keys[name][:12])
        gone = [name for name in listed if name not in tree.listing]
        if gone:
            self.repo.unpublish(gone, commit=revision.commit)
            log.info("unpublished (no longer in the tree): %s", ", ".join(gone))
        return frozenset(lost)

    def _reasons(
        self,
        base: tuple[Revision, Tree] | None,
        revision: Revision,
        tree: Tree,
        plan: BuildPlan,
        present: frozenset[str],
    ) -> dict[str, str]:
        old = None
        touches: dict[str, list[Touch]] = {}
        if base is not None:
            before, before_tree = base
            old = Evaluated(before.commit or "", before.graph, before.keys, before_tree.inputs())
            changed = [n for n, t in tree.listing.items() if before_tree.listing.get(n) != t]
            if changed and before.commit and revision.commit:
                known = [
                    (loaded.snapshot.commit, loaded.snapshot.ports())
                    for loaded in (before_tree, tree)
                    if isinstance(loaded.snapshot, GitSnapshot)
                ]
                history = self.git.history(
                    changed, since=before.commit, until=revision.commit, known=known
                )
                for change in history:
                    touches.setdefault(change.port, []).append(
                        Touch(change.commit, change.summary, change.files)
                    )
        new = Evaluated(revision.commit or "", revision.graph, revision.keys, tree.inputs())
        return {
            b.name: "\n".join(explain(b.name, old, new, touches, present).lines())
            for b in plan.builds
        }

    # -- builds (on scheduler threads) ------------------------------------------------------

    def _build(self, build: PlannedBuild, cancel: threading.Event) -> None:
        with self._lock:
            row = self._rows[build.key]
            revision = self._revisions[build.key]
        if self.cluster is not None:
            entry = self._build_on(self.cluster, revision, build, row, cancel)
        else:
            entry = self.workspace.build(
                revision,
                build,
                cancel,
                log=self._log_path(build.name, row),
                on_line=lambda line: self._line(row, line),
            )
        log.info("build #%d published: %s", row, entry.file)

    def _build_on(
        self,
        cluster: Cluster,
        revision: Revision,
        build: PlannedBuild,
        row: int,
        cancel: threading.Event,
    ) -> IndexEntry:
        """Build on the cluster (``verify`` times), its log lines streamed into the build's
        log here; publish what the builds agree on."""
        order = self.workspace.order(revision, build, cancel)
        log_path = self._log_path(build.name, row)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("a", buffering=1) as log_file:

            def on_line(line: str) -> None:
                log_file.write(line + "\n")
                self._line(row, line)

            builds = cluster.build(
                order,
                times=self.config.verify,
                priority=self._priority.get(build.name, 0.0),
                cancel=cancel,
                on_line=on_line,
            )
            workers = ", ".join(built.worker for built in builds)
            on_line(f"==> built on {workers}")
        with self._lock:
            self._workers[row] = workers
        try:
            entry = settle(self.workspace, order, builds, commit=revision.commit)
        except Disagreement as disagreement:
            with self._lock:
                self._disagreements[build.key] = disagreement
            raise
        with self._lock:
            self._disagreements.pop(build.key, None)
        return entry

    def _log_path(self, port: str, row: int) -> Path:
        return self.config.logs / port / f"{row}.log"

    def _line(self, row: int, line: str) -> None:
        step = step_of(line)
        if step is not None:
            with self._lock:
                self._steps[row] = step
            self.events.publish("build", id=row, step=step)

    def started(self, build: PlannedBuild) -> None:
        with self._lock:
            row = self._rows[build.key]
            self._steps[row] = "starting"
        try:
            self.state.start_build(row, str(self._log_path(build.name, row)))
        except StateError as error:  # the build runs all the same; its end is recorded
            log.error("build #%d: cannot record its start: %s", row, error)
        log.info("build #%d started: %s (key %s)", row, build.name, build.key[:12])
        self.events.publish(
            "build", id=row, port=build.name, key=build.key, state=BuildState.RUNNING.value
        )

    def finished(self, result: Result) -> None:
        with self._lock:
            row = self._rows.get(result.build.key)
            wanted = self._latest is not None and result.build.key in self._latest.wanted
            if result.outcome is Outcome.CANCELLED and wanted:
                return  # stopped by shutdown: the next start recovers the row as interrupted
            self._rows.pop(result.build.key, None)
            if row is not None:
                self._steps.pop(row, None)
        if row is None:
            return
        state = _STATES[result.outcome]
        detail = (
            "superseded by a newer commit" if result.outcome is Outcome.CANCELLED else result.reason
        )
        with self._lock:
            worker = self._workers.pop(row, None)
        if worker is not None and result.outcome is Outcome.BUILT:
            detail = f"built on {worker}"
        if detail is not None:  # the row links its log: no host path for visitors to see
            detail = detail.replace(f"; log: {self._log_path(result.name, row)}", "")
        full = self._full() if state is BuildState.FAILED else None
        if full is not None:  # not the port's fault: not remembered, built again later
            state, detail = BuildState.INTERRUPTED, f"{full}; built again once it has room"
            self._retry = True
        try:
            finished = self.state.finish_build(row, state, detail)
        except StateError as error:
            log.error("build #%d %s, but cannot be recorded yet: %s", row, state.value, error)
            with self._lock:
                self._unrecorded.append((row, state, detail))
            self._retry = True
        else:
            self._log_outcome(finished)
        self.events.publish(
            "build", id=row, port=result.name, key=result.build.key, state=state.value
        )
        if result.outcome is Outcome.BUILT:
            self.trigger(BUILT)  # the ports waiting on this package can be keyed now

    def _log_outcome(self, row: BuildRow) -> None:
        """One line per finished build, for the journal: what, how long, why, the log."""
        what = f"build #{row.id} {row.state.value}: {row.port} {row.version}"
        if row.state is BuildState.BUILT:
            log.info("%s in %s", what, _seconds(row.duration))
        elif row.state in (BuildState.FAILED, BuildState.INTERRUPTED):
            url = f"{local_url(self.config)}/api/v1/builds/{row.id}/log"
            reason = one_line(row.port, row.detail)
            log.warning("%s: %s (after %s); log: %s", what, reason, _seconds(row.duration), url)
        else:
            log.info("%s: %s", what, one_line(row.port, row.detail))

    # -- views -----------------------------------------------------------------------------

    def status(self) -> EngineStatus:
        latest = self._latest
        queued, running = self.scheduler.snapshot()
        with self._lock:
            rows = {build.key: self._rows.get(build.key) for build, _ in running}
            steps = dict(self._steps)
        current = []
        for build, _ in running:
            row_id = rows.get(build.key)
            row = self.state.build(row_id) if row_id is not None else None
            if row is not None:
                current.append(Running(row, steps.get(row.id, "starting")))
        return EngineStatus(
            branch=self.branch,
            head=self._head(),
            evaluated=latest.revision.commit if latest else None,
            evaluation=latest.id if latest else None,
            evaluating=self._evaluating,
            queued=len(queued),
            running=tuple(current),
            eta=self._eta(queued, running),
            blocked=len(latest.triaged.blocked) if latest else 0,
            seed=self.workspace.seed.content_id,
            pending=len(latest.triaged.wanted.pending) if latest else 0,
            cut_off=tuple(sorted(latest.cut_off)) if latest else (),
            toolchain=latest.revision.evaluation.stages.describe() if latest else "",
            cluster=self._cluster_status(),
        )

    def _cluster_status(self) -> ClusterStatus | None:
        cluster = self.cluster
        if cluster is None:
            return None
        with self._lock:
            disagreements = tuple(self._disagreements.values())
        try:
            workers = tuple(cluster.workers())
        except OSError as error:  # the scheduler is away: the page still shows the rest
            log.warning("the Dask scheduler does not answer: %s", error)
            workers = ()
        return ClusterStatus(
            scheduler=cluster.address,
            dashboard=cluster.dashboard(),
            workers=workers,
            disagreements=tuple((str(d), d.workers, d.files) for d in disagreements),
        )

    def _eta(
        self, queued: list[PlannedBuild], running: list[tuple[PlannedBuild, float]]
    ) -> float | None:
        if not queued and not running:
            return None
        guess = 60.0
        work = sum(self._durations.get(b.name, guess) for b in queued)
        now = time.monotonic()
        work += sum(max(self._durations.get(b.name, guess) - (now - t), 1.0) for b, t in running)
        return work / max(self.config.jobs, 1)

    def problems(self) -> Problems:
        latest = self._latest
        if latest is None:
            return Problems(ports=0, published=0)
        triaged = latest.triaged
        blocked = {name: str(problem) for name, problem in triaged.plan.blocked.items()}
        # a port whose key waits for a dependency that failed (or was skipped) is not a
        # build, but it is as unpublished as a skipped one
        doomed = {skip.build.name for skip in triaged.doomed}
        waiting = {
            name: f"dependency {dep} {'was skipped' if dep in doomed else 'failed'}"
            for name, dep in triaged.stranded.items()
        }
        return find_problems(
            self.state, latest.revision.keys.keys, blocked, self.repo.stored_keys(), waiting
        )

    def plan_graph(self) -> PlanGraph:
        latest = self._latest
        if latest is None:
            return PlanGraph(revision=None)
        graph = latest.revision.graph
        rows = {row.key: row for row in self.state.builds(evaluation=latest.id, limit=100000)}
        planned = {b.name for b in latest.triaged.plan.builds}
        pending = latest.triaged.wanted.pending
        names = set(planned) | set(latest.triaged.blocked) | set(pending) | latest.cut_off
        for name in list(planned):
            names.update(edge.target for edge in graph.edges(name))
        nodes = []
        for name in sorted(names):
            key = latest.revision.keys.key(name)
            row = rows.get(key) if key else None
            state = row.state if row else None
            if row is None and key is not None and key in self._rows:
                active = self.state.build(self._rows[key])
                state = active.state if active else None
            reason = (row.reason if row else "") or latest.triaged.blocked.get(name, "")
            if name in pending:
                reason = f"its key waits for the package of {pending[name]}"
            elif name in latest.cut_off:
                reason = "cut off: the build it waited for came out identical"
            nodes.append(
                PlanNode(
                    port=name,
                    key=key,
                    state=state,
                    reason=reason,
                    pending=pending.get(name),
                    cut_off=name in latest.cut_off,
                )
            )
        edges = tuple(
            (name, edge.target, edge.kind.value)
            for name in sorted(names)
            for edge in graph.edges(name)
            if edge.target in names
        )
        return PlanGraph(revision=latest.revision.commit, nodes=tuple(nodes), edges=edges)


def _return_memory(*, full: bool) -> None:
    """Ask glibc to hand freed heap back, RSS would otherwise stay at every peak; after a
    cold load (``full``) collect the garbage first."""
    if full:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: the memory is reused by later allocations anyway


def _seconds(seconds: float | None) -> str:
    return "?" if seconds is None else f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.0f} s"


def _version(revision: Revision, name: str) -> str:
    recipe = revision.graph.recipe(name)
    assert recipe is not None, f"{name} was planned without a recipe"
    return recipe.full_version
