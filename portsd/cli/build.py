"""``ports build``: build what the named ports need, in parallel, with progress, and publish."""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from portsd.build.builder import step_of
from portsd.build.onroot import RootBuild, build_on_root, root_key
from portsd.build.pipeline import Revision, Workspace
from portsd.build.scheduler import Outcome, Result, run_plan
from portsd.cli import output
from portsd.cli.inspect import known_port
from portsd.cli.workspace import build_settings, config_from, open_tree
from portsd.client.db import InstalledFile
from portsd.client.transaction import Installed
from portsd.config import Config
from portsd.core.linkage import usr_path
from portsd.core.plan import PlannedBuild, critical_path, staged_plan
from portsd.daemon.binding import bind_state
from portsd.daemon.instance import InstanceLock
from portsd.errors import ConfigError, InstallError, PortsdError
from portsd.pkg.archive import ManifestEntry


class BuildDisplay:
    """Progress for a terminal (live bars) and one line per event for logs and pipes.

    Implements the scheduler's Reporter and the fetcher's FetchReporter; every method may
    be called from any build thread (rich's Progress is thread-safe).
    """

    def __init__(self, console: Console, total: int) -> None:
        self.console = console
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            DownloadColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.overall = self.progress.add_task("[bold]building", total=total)
        self.running: dict[str, TaskID] = {}
        self.downloads: dict[tuple[str, str], TaskID] = {}
        self.lock = threading.Lock()
        self.done = 0
        self.total = total

    def __enter__(self) -> BuildDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    # scheduler.Reporter
    def started(self, build: PlannedBuild) -> None:
        with self.lock:
            self.running[build.name] = self.progress.add_task(f"{build.name}: starting", total=None)

    def finished(self, result: Result) -> None:
        with self.lock:
            task = self.running.pop(result.name, None)
            if task is not None:
                self.progress.remove_task(task)
            self.done += 1
        self.progress.advance(self.overall)
        prefix = f"[{self.done}/{self.total}]"
        match result.outcome:
            case Outcome.BUILT:
                line = f"{prefix} [green]built[/] {result.name} ({result.duration:.1f} s)"
            case Outcome.FAILED:
                first, *rest = (result.reason or "").splitlines() or [""]
                line = f"{prefix} [red]failed[/] {escape(first)}" + "".join(
                    f"\n  {escape(r)}" for r in rest
                )
            case Outcome.SKIPPED:
                line = f"{prefix} [yellow]skipped[/] {result.name}: {escape(result.reason or '')}"
            case Outcome.CANCELLED:
                line = f"{prefix} [yellow]cancelled[/] {result.name}"
        self.progress.console.print(line)

    def step(self, name: str, line: str) -> None:
        """The builder's log line; "==> step" lines update the row of that build."""
        step = step_of(line)
        if step is not None:
            with self.lock:
                task = self.running.get(name)
            if task is not None:
                self.progress.update(task, description=f"{name}: {step}")

    # fetch.FetchReporter
    def started_download(self, port: str, filename: str, total: int | None) -> None:
        with self.lock:
            self.downloads[(port, filename)] = self.progress.add_task(
                f"  ↓ {filename}", total=total
            )

    def advanced_download(self, port: str, filename: str, nbytes: int) -> None:
        with self.lock:
            task = self.downloads.get((port, filename))
        if task is not None:
            self.progress.advance(task, nbytes)

    def ended_download(self, port: str, filename: str) -> None:
        with self.lock:
            task = self.downloads.pop((port, filename), None)
        if task is not None:
            self.progress.remove_task(task)


class _FetchEvents:
    """Adapts the fetcher's reporter protocol to the display."""

    def __init__(self, display: BuildDisplay | None = None) -> None:
        self.display = display

    def started(
        self, port: str, filename: str, total_bytes: int | None, location: str, resumed_from: int
    ) -> None:
        if self.display is not None:
            self.display.started_download(port, filename, total_bytes)
            if resumed_from:
                self.display.advanced_download(port, filename, resumed_from)

    def advanced(self, port: str, filename: str, nbytes: int) -> None:
        if self.display is not None:
            self.display.advanced_download(port, filename, nbytes)

    def finished(self, port: str, filename: str, location: str, path: Path) -> None:
        if self.display is not None:
            self.display.ended_download(port, filename)

    def failed(self, port: str, filename: str, location: str, reason: str) -> None:
        if self.display is not None:
            self.display.ended_download(port, filename)


def build(args: argparse.Namespace, console: Console) -> int:
    config = config_from(args, **build_settings(args))
    config.state_dir.mkdir(parents=True, exist_ok=True)
    # one writer per state: not beside its daemon, and only for the tree it belongs to
    lock = InstanceLock.acquire(config.state_dir, "")
    try:
        bind_state(config.state_dir, args.tree, force=args.force)
        if args.on_root is not None:
            return _build_on_root(args, console, config, args.on_root)
        if args.json:
            raise ConfigError("--json goes with --on-root (ports build prints a table)")
        return _build(args, console, config)
    finally:
        lock.release()


def _build(args: argparse.Namespace, console: Console, config: Config) -> int:
    events = _FetchEvents()
    workspace = Workspace.open(config, reporter=events)
    opened = open_tree(args, config, config.arch)
    evaluation = opened.evaluation
    graph = evaluation.graph
    wanted = [known_port(graph, name) for name in args.names] or None
    plan = staged_plan(evaluation, workspace.present(), wanted)
    revision = Revision(opened.tree, evaluation, opened.commit)
    restored = _republish(workspace, revision, plan.up_to_date)
    for name in sorted(plan.blocked):
        first, *rest = str(plan.blocked[name]).splitlines()
        console.print(f"[red]cannot build[/] {escape(first)}")
        for line in rest:
            console.print(f"  {escape(line)}")
    console.print(
        f"{len(plan.builds)} to build"
        + (f", at most {len(plan.pending)} more after them" if plan.pending else "")
        + f", {len(plan.up_to_date)} up to date"
        + (f" ({restored} republished)" if restored else "")
        + (f", {len(plan.blocked)} cannot be built" if plan.blocked else "")
    )
    results: list[Result] = []
    started = time.monotonic()
    waited = set(plan.pending)
    # Waves: the ports pending on this wave's builds get their keys from its packages
    # (early cutoff: those whose dependencies came out identical are up to date); a
    # tree's toolchain is built stage by stage first, up to its fixed point.
    while plan.builds:
        with BuildDisplay(console, len(plan.builds)) as display:
            events.display = display
            results += run_plan(
                plan,
                _runner(workspace, revision, display),
                jobs=config.jobs,
                priority=critical_path(plan, {}),
                reporter=display,
            )
        evaluation = evaluation.advance(evaluation.listing, {}, workspace.contents)
        revision = Revision(opened.tree, evaluation, opened.commit)
        plan = staged_plan(evaluation, workspace.present(), wanted)
        _republish(workspace, revision, plan.up_to_date)
        # a failed build is not tried again in this run; what waits on it stays pending
        tried = {r.build.key for r in results}
        plan = replace(plan, builds=tuple(b for b in plan.builds if b.key not in tried))
    failed_names = {r.name for r in results if r.outcome is not Outcome.BUILT}
    for name, dep in sorted(plan.pending.items()):
        why = "which failed" if dep in failed_names else "which was not built"
        console.print(f"[yellow]not built[/] {name}: its key needs the package of {dep}, {why}")
    if results:
        cut_off = sorted(n for n in waited if n in plan.up_to_date)
        if cut_off:
            console.print(f"cut off (rebuilt identical below them): {', '.join(cut_off)}")
        _summary(console, results, time.monotonic() - started)
    if wanted is None:
        gone = [n for n in workspace.repo.index().names() if n not in opened.tree.listing]
        if gone:
            workspace.repo.unpublish(gone, commit=opened.commit)
            console.print(
                f"unpublished {len(gone)} port(s) no longer in the tree: {', '.join(gone)}"
            )
    failed = any(r.outcome is not Outcome.BUILT for r in results)
    return 1 if failed or plan.blocked or plan.pending else 0


def _runner(
    workspace: Workspace, revision: Revision, display: BuildDisplay
) -> Callable[[PlannedBuild, threading.Event], None]:
    def run(build: PlannedBuild, cancel: threading.Event) -> None:
        workspace.build(
            revision, build, cancel, on_line=lambda line: display.step(build.name, line)
        )

    return run


def _republish(workspace: Workspace, revision: Revision, names: frozenset[str]) -> int:
    """Put back into the index the stored packages of up-to-date ports it does not list
    (a revert to an earlier version, say): no rebuild, just a new index."""
    index = workspace.repo.index()
    count = 0
    for name in sorted(names):
        key = revision.keys.keys[name]
        entry = index.entry(name)
        if entry is None or entry.meta.build_key != key:
            workspace.repo.restore(key, commit=revision.commit)
            count += 1
    return count


def _summary(console: Console, results: list[Result], elapsed: float) -> None:
    table = output.table(
        console,
        "port",
        "result",
        "time",
        "detail",
        right=("time",),
        title=f"build finished in {elapsed:.1f} s",
    )
    colours = {
        Outcome.BUILT: "green",
        Outcome.FAILED: "red",
        Outcome.SKIPPED: "yellow",
        Outcome.CANCELLED: "yellow",
    }
    for result in sorted(results, key=lambda r: (r.outcome is Outcome.BUILT, r.name)):
        detail = (result.reason or "").splitlines()[0] if result.reason else ""
        table.add_row(
            result.name,
            f"[{colours[result.outcome]}]{result.outcome}[/]",
            f"{result.duration:.1f} s" if result.duration else "",
            escape(detail),
        )
    console.print(table)


def _build_on_root(args: argparse.Namespace, console: Console, config: Config, root: Path) -> int:
    """Build the named ports with ``root`` as /usr (docs/distro.md, "Running it") and
    compare each with the package of that name installed in ``root``."""
    if not args.names:
        raise ConfigError("--on-root builds the ports it is given: name at least one")
    root = root.resolve()
    if not os.path.lexists(root / "usr" / "bin" / "sh"):
        raise InstallError(f"{root}: no /usr/bin/sh to run the build steps (install busybox)")
    opened = open_tree(args, None, config.arch)  # recipes only: no seed, no stage's keys
    graph = opened.evaluation.graph
    names = [known_port(graph, name) for name in args.names]
    with Installed.open(root, readonly=True) as installed:
        packages = {p.meta.name: p.meta.build_key for p in installed.db.packages()}
        theirs = {name: installed.db.files(name) for name in names if name in packages}
    toolchain = opened.evaluation.stages.members  # in every build root (toolchain.toml)
    for name in names:
        needs = graph.runtime_closure(e.target for e in graph.build_edges(name, False))
        missing = sorted(need for need in needs | toolchain if need not in packages)
        if missing:
            raise InstallError(
                f"{name}: {root} lacks what it builds with: {', '.join(missing)}"
                f" (ports install --root {root} {' '.join(missing)})"
            )
    inputs = opened.tree.inputs()
    reports: list[dict[str, object]] = []
    for name in names:
        recipe = graph.recipe(name)
        assert recipe is not None, f"{name} resolved without a recipe"
        key = root_key(inputs[name], packages.items())
        if not args.json:
            console.print(f"building {name} on {root}")
        try:
            built = build_on_root(
                config, opened.tree, recipe, key, root, config.state_dir / "on-root"
            )
        except PortsdError as error:  # one port's failure; the others are still tried
            reports.append({"port": name, "error": str(error)})
            if not args.json:
                console.print(f"[red]failed[/] {escape(str(error))}")
            continue
        report = _Compared.of(name, built, theirs.get(name, []))
        reports.append(report.as_json())
        if not args.json:
            console.print(report.line(root))
    if args.json:
        output.emit_json(console, reports)
    return 1 if any("error" in report for report in reports) else 0


Row = tuple[str, str, int, int, str]
"""(path on a merged-/usr root, type, mode, size, sha256 or link target) of one file."""


def _row(entry: ManifestEntry | InstalledFile) -> Row:
    what = entry.sha256 or entry.target or ""
    return (usr_path(entry.path), str(entry.type), entry.mode, entry.size, what)


@dataclass(frozen=True, slots=True)
class _Compared:
    """A package built on a root against the one of that name installed there."""

    port: str
    built: RootBuild
    installed: bool
    only_built: tuple[str, ...]
    only_installed: tuple[str, ...]
    differ: tuple[str, ...]

    @classmethod
    def of(cls, port: str, built: RootBuild, installed: list[InstalledFile]) -> _Compared:
        mine = {row[0]: row for row in map(_row, built.files)}
        theirs = {row[0]: row for row in map(_row, installed)}
        return cls(
            port,
            built,
            bool(installed),
            tuple(sorted(set(mine) - set(theirs))),
            tuple(sorted(set(theirs) - set(mine))),
            tuple(sorted(p for p in set(mine) & set(theirs) if mine[p] != theirs[p])),
        )

    @property
    def same_files(self) -> bool:
        return self.installed and not self.only_built and not self.only_installed

    @property
    def identical(self) -> bool:
        return self.same_files and not self.differ

    def as_json(self) -> dict[str, object]:
        return {
            "port": self.port,
            "package": str(self.built.package),
            "content": self.built.content,
            "seconds": round(self.built.seconds, 1),
            "files": len(self.built.files),
            "installed": self.installed,
            "same_files": self.same_files,
            "identical": self.identical,
            "only_built": list(self.only_built),
            "only_installed": list(self.only_installed),
            "differ": list(self.differ),
        }

    def line(self, root: Path) -> str:
        head = (
            f"built {self.port} on {root} in {self.built.seconds:.1f} s,"
            f" {len(self.built.files)} files:"
        )
        if not self.installed:
            return f"{head} [yellow]{self.port} is not installed there[/], nothing to compare"
        if self.identical:
            return f"{head} [green]identical[/] to the installed package, byte for byte"
        if self.same_files:
            return f"{head} the installed package's files, {len(self.differ)} with other bytes"
        return (
            f"{head} [red]not the installed package's files[/]: {len(self.only_built)} more,"
            f" {len(self.only_installed)} missing"
        )
