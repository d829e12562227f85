"""``ports install|remove|upgrade|info|search|list|files|owner``: the client side of ``ports``.

Settings come from the client config (``--config``, ``$PORTS_CONFIG``, ``/etc/ports.toml``)
and every one of them is also a flag. Commands that change the root take its lock; every
command first finishes or rolls back a transaction a crash interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import threading

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from portsd.build.builder import step_of
from portsd.build.scheduler import Outcome, Result
from portsd.cli import err_console
from portsd.cli.output import emit_json, emit_lines, table
from portsd.cli.query import (
    fresh_root_undone,
    meta_json,
    open_root,
    package_json,
    read_root,
    settings_from,
    size,
)
from portsd.client.db import PackageDb
from portsd.client.download import Download
from portsd.client.progress import Phase
from portsd.client.progress import Progress as TransactionProgress
from portsd.client.relations import orphans
from portsd.client.rootconf import remember
from portsd.client.session import (
    Sources,
    add_package_files,
    install,
    open_sources,
    plan,
    reinstall,
    removal,
    remove,
)
from portsd.client.settings import ClientSettings
from portsd.client.transaction import TransactionResult
from portsd.client.verify import verify
from portsd.core.metadata import PACKAGE_SUFFIX, PackageMeta
from portsd.core.plan import PlannedBuild
from portsd.core.resolve import Action, Mode, Resolution
from portsd.core.version import full_version
from portsd.errors import ConfigError, InstallError
from portsd.pkg.package import PortInfo

NO_CACHES = "--cache URL --key KEY once (the root remembers them), or caches in /etc/ports.toml"

# -- changing the root ---------------------------------------------------------------------


def install_command(args: argparse.Namespace, console: Console) -> int:
    return _change(args, console, Mode.INSTALL)


def upgrade_command(args: argparse.Namespace, console: Console) -> int:
    return _change(args, console, Mode.UPGRADE)


def _change(args: argparse.Namespace, console: Console, mode: Mode) -> int:
    settings = settings_from(args)
    files = any(name.endswith(PACKAGE_SUFFIX) for name in args.names)
    if args.dry_run:  # no lock, no serials recorded, nothing written
        with read_root(settings, console) as installed, Display(console) as display:
            sources = open_sources(settings, _Unrecorded(installed.db), display, files_given=files)
            names = add_package_files(
                sources, args.names, unsigned=getattr(args, "allow_untrusted", False)
            )
            resolution = plan(installed, sources, names, mode)
            display.resolved(resolution)
        console.print("dry run: nothing changed" if resolution.steps else "nothing to do")
        return 0
    initdb = getattr(args, "initdb", False)  # install only
    with fresh_root_undone(settings.root):
        with (
            open_root(settings, args.wait, console, initdb=initdb) as installed,
            Display(console) as display,
        ):
            sources = open_sources(settings, installed.db, display, files_given=files)
            names = add_package_files(
                sources, args.names, unsigned=getattr(args, "allow_untrusted", False)
            )
            if getattr(args, "reinstall", False):  # install only
                result: TransactionResult | None = reinstall(installed, sources, names, display)
            else:
                result = install(installed, sources, names, display, mode=mode, force=args.force)
        if args.cache or args.key:  # the root remembers where it came from
            remember(
                settings.root,
                settings.caches if args.cache else None,
                settings.trusted_keys if args.key else (),
            )
    if result is None:
        console.print(
            "nothing to do: "
            + ("everything is up to date" if mode is Mode.UPGRADE else "already installed")
        )
    else:
        _done(console, result)
    return 0


def remove_command(args: argparse.Namespace, console: Console) -> int:
    settings = settings_from(args)
    if args.dry_run:
        with read_root(settings, console) as installed:
            for package in removal(installed, args.names, force=args.force):
                console.print(f"would remove {package.meta.name} {package.meta.full_version}")
        console.print("dry run: nothing changed")
        return 0
    with open_root(settings, args.wait, console) as installed, Display(console) as display:
        result = remove(installed, args.names, display, force=args.force)
    _done(console, result)
    return 0


def autoremove_command(args: argparse.Namespace, console: Console) -> int:
    """Remove the packages installed as dependencies that nothing needs any more."""
    settings = settings_from(args)
    if args.dry_run:
        with read_root(settings, console) as installed:
            for package in orphans(installed.db.packages()):
                console.print(f"would remove {package.meta.name} {package.meta.full_version}")
        console.print("dry run: nothing changed")
        return 0
    with open_root(settings, args.wait, console) as installed, Display(console) as display:
        names = [package.meta.name for package in orphans(installed.db.packages())]
        if not names:
            console.print("nothing to do: every installed package is needed")
            return 0
        result = remove(installed, names, display)
    _done(console, result)
    return 0


def repair(args: argparse.Namespace, console: Console, names: list[str]) -> int:
    """``ports check --repair``: install the damaged packages ``names`` again."""
    settings = settings_from(args)
    with open_root(settings, 0.0, console) as installed, Display(console) as display:
        sources = open_sources(settings, installed.db, display)
        result = reinstall(installed, sources, names, display)
    _done(console, result)
    return 0


def _done(console: Console, result: TransactionResult) -> None:
    for package in result.installed:
        console.print(f"[green]installed[/] {package.meta.name} {package.meta.full_version}")
    for old_row, new_row in result.upgraded:
        old, new = old_row.meta, new_row.meta
        change = f"{old.full_version} -> {new.full_version}"
        if old.build_key == new.build_key:
            console.print(f"[green]reinstalled[/] {new.name} {new.full_version}")
            continue
        if old.full_version == new.full_version:
            change = f"{old.full_version} (build {old.build_key[:12]} -> {new.build_key[:12]})"
        console.print(f"[green]upgraded[/] {new.name} {change}")
    for package in result.removed:
        console.print(f"[green]removed[/] {package.meta.name} {package.meta.full_version}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    if result.installed or result.upgraded:
        console.print(f"{result.files} files, {size(result.bytes)}")
    else:  # nothing unpacked: say what went
        freed = sum(package.meta.installed_size for package in result.removed)
        console.print(f"{len(result.removed)} package(s) removed, {size(freed)} freed")


def verify_command(args: argparse.Namespace, console: Console) -> int:
    """Exit status 1 when any package differs from the cache's."""
    settings = settings_from(args)
    with Display(console) as display:
        sources = open_sources(settings, _Unrecorded(), display)
        verdicts = verify(sources, args.names, display)
    if args.json:
        print(json.dumps([dataclasses.asdict(v) | {"agrees": v.agrees} for v in verdicts]))
    for verdict in [] if args.json else verdicts:
        if verdict.agrees:
            console.print(f"[green]agrees[/] {verdict.name} (key {verdict.key[:12]})")
            continue
        console.print(
            f"[red]differs[/] {verdict.name} (key {verdict.key[:12]}): the cache serves "
            f"{verdict.served[:12]}, built here {verdict.built[:12]}"
        )
        for path in verdict.files:
            console.print(f"  {escape(path)}")
    return 0 if all(verdict.agrees for verdict in verdicts) else 1


# -- what is available ---------------------------------------------------------------------


def info_command(args: argparse.Namespace, console: Console) -> int:
    settings = settings_from(args)
    with read_root(settings, console) as installed:
        mine = installed.db.installed(args.name)
        files = len(installed.db.files(args.name)) if mine else 0
        available = (
            _catalogue(settings, console, installed.db).available.get(args.name)
            if _has_sources(settings)
            else None
        )
    if mine is None and available is None:
        if not _has_sources(settings):
            error = ConfigError(f"{args.name} is not installed, and no caches are configured")
            error.hint = NO_CACHES
            raise error
        raise InstallError(f"no package named {args.name} is installed or available")
    if args.json:
        emit_json(
            console,
            {
                "name": args.name,
                "installed": None if mine is None else package_json(mine) | {"files": files},
                "available": None if available is None else meta_json(available),
            },
        )
        return 0
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    meta = mine.meta if mine is not None else available
    assert meta is not None  # one of the two, said above
    grid.add_row("name", meta.name)
    if mine is not None:
        grid.add_row(
            "installed",
            f"{meta.full_version} ({mine.reason}, {files} files, {size(meta.installed_size)})",
        )
    grid.add_row("summary", escape(meta.summary or "-"))
    grid.add_row("license", escape(meta.license or "-"))
    if mine is None and meta.installed_size:
        grid.add_row("size", size(meta.installed_size) + " installed")
    grid.add_row("build key", meta.build_key)
    if mine is not None:
        grid.add_row("from", escape(mine.origin))
    grid.add_row("depends", escape(", ".join(meta.depends) or "-"))
    if meta.provides:
        grid.add_row("provides", escape(", ".join(meta.provides)))
    if meta.conflicts:
        grid.add_row("conflicts", escape(", ".join(meta.conflicts)))
    if available is not None:
        state = (
            ""
            if mine is None
            else (" (installed)" if mine.meta.build_key == available.build_key else " (an upgrade)")
        )
        grid.add_row(
            "available",
            f"{available.full_version}, build key {available.build_key[:12]}{state}",
        )
    console.print(grid)
    return 0


def search_command(args: argparse.Namespace, console: Console) -> int:
    settings = settings_from(args)
    found: dict[str, PackageMeta] = {}
    if not args.installed and not _has_sources(settings):
        err_console().print(
            "[yellow]note:[/] no caches configured: searching installed packages only"
            f" ({NO_CACHES})"
        )
    with read_root(settings, console) as installed:
        mine = {p.meta.name: p for p in installed.db.search(args.text)}
        everything = {p.meta.name: p for p in installed.db.packages()}
        if not args.installed and _has_sources(settings):
            needle = args.text.lower()
            for name, candidate in _catalogue(settings, console, installed.db).available.items():
                if needle in name.lower() or needle in candidate.summary.lower():
                    found[name] = candidate
    rows: list[tuple[str, str, str, str]] = []
    for name in sorted(mine.keys() | found.keys()):
        have = mine.get(name) or everything.get(name)
        package = found.get(name)
        if package is None:
            assert have is not None  # the name came from one of the two
            rows.append((name, have.meta.full_version, "installed", have.meta.summary))
            continue
        status = "available"
        if have is not None:
            status = "installed" if have.meta.build_key == package.build_key else "upgradable"
        summary = package.summary or (have.meta.summary if have else "")
        rows.append((name, package.full_version, status, summary))
    if args.json:
        emit_json(
            console,
            [{"name": n, "version": v, "status": st, "summary": su} for n, v, st, su in rows],
        )
    elif args.quiet:
        emit_lines(console, [row[0] for row in rows])
    elif rows:
        grid = table(console, "name", "version", "status", "summary")
        for name, version, status, summary in rows:
            grid.add_row(name, version, status, escape(summary))
        console.print(grid)
    else:
        err_console().print(f"no package matches {args.text!r}")
    return 0 if rows else 1


def _has_sources(settings: ClientSettings) -> bool:
    return bool(settings.caches or settings.tree or settings.discover)


def _catalogue(settings: ClientSettings, console: Console, db: PackageDb) -> Sources:
    with Display(console) as display:
        return open_sources(settings, _Unrecorded(db), display)


class _Unrecorded:
    """Reading commands (and dry runs) check indexes against the root's memory of serials
    and index contents (rollbacks and forks are refused) but record nothing: they change
    nothing, and the next install records what it uses."""

    def __init__(self, db: PackageDb | None = None) -> None:
        self.db = db

    def last_serial(self, key_id: str) -> int | None:
        return None if self.db is None else self.db.last_serial(key_id)

    def record_serial(self, key_id: str, serial: int) -> int:
        return max(serial, self.last_serial(key_id) or 0)

    def serial_digest(self, key_id: str, serial: int) -> str | None:
        return None if self.db is None else self.db.serial_digest(key_id, serial)

    def record_digest(self, key_id: str, serial: int, sha256: str) -> None:
        pass


# -- the display ---------------------------------------------------------------------------


class Display:
    """Rich progress for downloads, source builds and the transaction, and one line per
    event when the output is not a terminal. Implements ``ClientReporter``; thread-safe."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self.lock = threading.Lock()
        self.downloads = _Downloads(self)
        self.builds = _Builds(self)

    def __enter__(self) -> Display:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def print(self, text: str | Table) -> None:
        self.progress.console.print(text)

    def warn(self, text: str) -> None:
        self.print(f"[yellow]warning:[/] {escape(text)}")

    def resolved(self, resolution: Resolution) -> None:
        if not resolution.steps:
            return
        grid = table(
            self.console,
            "action",
            "package",
            "version",
            "why",
            title=f"{len(resolution)} package(s)",
        )
        for step in resolution:
            version = full_version(step.package.version, step.package.release)
            if step.replaces is not None:
                old = full_version(step.replaces.version, step.replaces.release)
                version = f"{old} -> {version}" if old != version else f"{version} (rebuilt)"
            colour = "green" if step.action is Action.INSTALL else "cyan"
            grid.add_row(
                f"[{colour}]{step.action}[/]", step.package.name, version, escape(step.why)
            )
        self.print("")
        self.print(grid)

    def transaction(self) -> TransactionProgress:
        return _TransactionBar(self)


class _TransactionBar(TransactionProgress):
    """The commit's stages as one bar over the bytes unpacked, then the ops applied."""

    def __init__(self, display: Display) -> None:
        self.display = display
        self.task: TaskID | None = None

    def phase(self, phase: Phase, total_bytes: int, total_files: int) -> None:
        progress = self.display.progress
        if self.task is not None:
            progress.remove_task(self.task)
            self.task = None
        if phase is Phase.STAGE:
            self.task = progress.add_task("unpacking", total=total_bytes)
        elif phase is Phase.APPLY:
            self.task = progress.add_task("installing", total=None)

    def package(self, info: PortInfo) -> None:
        if self.task is not None:
            self.display.progress.update(self.task, description=f"unpacking {info.meta.name}")

    def advance(self, nbytes: int, nfiles: int) -> None:
        if self.task is not None:
            self.display.progress.advance(self.task, nbytes)


class _Downloads:
    """A bar per download."""

    def __init__(self, display: Display) -> None:
        self.display = display
        self.tasks: dict[str, TaskID] = {}

    def started(self, download: Download, offset: int) -> None:
        with self.display.lock:
            self.tasks[download.label] = self.display.progress.add_task(
                f"↓ {download.label}", total=download.size, completed=offset
            )

    def advanced(self, download: Download, nbytes: int) -> None:
        task = self.tasks.get(download.label)
        if task is not None:
            self.display.progress.advance(task, nbytes)

    def finished(self, download: Download) -> None:
        with self.display.lock:
            task = self.tasks.pop(download.label, None)
        if task is not None:
            self.display.progress.remove_task(task)
        self.display.print(f"downloaded {download.label} ({size(download.size)})")


class _Builds:
    """A spinner per source build, with the step it is at."""

    def __init__(self, display: Display) -> None:
        self.display = display
        self.tasks: dict[str, TaskID] = {}

    def started(self, build: PlannedBuild) -> None:
        with self.display.lock:
            self.tasks[build.name] = self.display.progress.add_task(
                f"building {build.name}", total=None
            )
        self.display.print(f"building {build.name} from source")

    def step(self, name: str, line: str) -> None:
        step = step_of(line)
        task = self.tasks.get(name)
        if step is not None and task is not None:
            self.display.progress.update(task, description=f"building {name}: {step}")

    def finished(self, result: Result) -> None:
        with self.display.lock:
            task = self.tasks.pop(result.name, None)
        if task is not None:
            self.display.progress.remove_task(task)
        colour = "green" if result.outcome is Outcome.BUILT else "red"
        line = f"[{colour}]{result.outcome}[/] {result.name}"
        if result.reason:
            line += f": {escape(result.reason.splitlines()[0])}"
        self.display.print(line)
