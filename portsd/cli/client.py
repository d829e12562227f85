"""``ports install|remove|upgrade|info|search|list|files|owner``: the client side of ``ports``.

Settings come from the client config (``--config``, ``$PORTS_CONFIG``, ``/etc/ports.toml``)
and every one of them is also a flag. Commands that change the root take its lock; every
command first finishes or rolls back a transaction a crash interrupted.
"""

from __future__ import annotations

import argparse
import threading
from pathlib import Path

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

from portsd.client.download import Download
from portsd.client.journal import DB_DIR
from portsd.client.progress import Phase
from portsd.client.progress import Progress as TransactionProgress
from portsd.client.resolve import Action, Candidate, Mode, Resolution
from portsd.client.session import Sources, add_package_files, install, open_sources, remove
from portsd.client.settings import ClientSettings, SourcePolicy, load_settings
from portsd.client.transaction import JOURNAL_NAME, Installed, TransactionResult
from portsd.errors import InstallError, RootLocked
from portsd.package import PortInfo
from portsd.plan import PlannedBuild
from portsd.scheduler import Outcome, Result
from portsd.version import full_version


def add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the client's subcommands to ``ports``."""
    p = commands.add_parser("install", help="install packages and what they need")
    p.add_argument(
        "names",
        nargs="+",
        metavar="NAME|FILE",
        help="a name (zlib, zlib>=1.3) or a "
        "package file (./x.pkg.tar.zst, checked against its .minisig)",
    )
    _changing(p)
    _sources(p)
    p.add_argument(
        "--allow-untrusted",
        action="store_true",
        help="install package files without a trusted signature",
    )
    p.set_defaults(handler=install_command)

    p = commands.add_parser("upgrade", help="replace packages whose build key changed")
    p.add_argument("names", nargs="*", metavar="NAME", help="default: everything installed")
    _changing(p)
    _sources(p)
    p.set_defaults(handler=upgrade_command)

    p = commands.add_parser("remove", help="remove packages (only the files they own)")
    p.add_argument("names", nargs="+", metavar="NAME")
    _changing(p)
    p.set_defaults(handler=remove_command)

    p = commands.add_parser("info", help="what a package is, installed or available")
    p.add_argument("name")
    _reading(p)
    _sources(p)
    p.set_defaults(handler=info_command)

    p = commands.add_parser("search", help="packages whose name or summary contains TEXT")
    p.add_argument("text")
    _reading(p)
    _sources(p)
    p.add_argument("--installed", action="store_true", help="search installed packages only")
    p.set_defaults(handler=search_command)

    p = commands.add_parser("list", help="the installed packages")
    _reading(p)
    p.set_defaults(handler=list_command)

    p = commands.add_parser("files", help="the files an installed package owns")
    p.add_argument("name")
    _reading(p)
    p.set_defaults(handler=files_command)

    p = commands.add_parser("owner", help="which installed package owns a path")
    p.add_argument("path")
    _reading(p)
    p.set_defaults(handler=owner_command)


def _reading(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, help="the root installed into (default: /)")
    p.add_argument("--config", type=Path, help="the client config (default: /etc/ports.toml)")


def _changing(p: argparse.ArgumentParser) -> None:
    _reading(p)
    p.add_argument("--force", action="store_true", help="even if dependencies break")
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for another client's lock (default: do not wait)",
    )


def _sources(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache",
        action="append",
        metavar="URL",
        help="a binary cache (repeatable; replaces the config's caches)",
    )
    p.add_argument(
        "--key",
        action="append",
        metavar="KEY",
        help="trust this public key: a file or minisign's base64 (repeatable)",
    )
    p.add_argument("--tree", type=Path, help="a ports checkout to build from")
    p.add_argument("--cache-dir", type=Path, help="downloads and builds (default: in the root)")
    p.add_argument("--arch", help="the architecture (default: this machine's)")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--build",
        dest="source",
        action="store_const",
        const=SourcePolicy.ALWAYS,
        help="build everything from the ports tree",
    )
    source.add_argument(
        "--no-build",
        dest="source",
        action="store_const",
        const=SourcePolicy.NEVER,
        help="never build: only cached packages",
    )
    p.add_argument(
        "--discover",
        action="store_const",
        const=True,
        help="also use trusted caches found on the LAN",
    )


def settings_from(args: argparse.Namespace) -> ClientSettings:
    return load_settings(
        args.config,
        root=args.root,
        caches=getattr(args, "cache", None),
        trusted_keys=getattr(args, "key", None),
        tree=getattr(args, "tree", None),
        source=getattr(args, "source", None),
        cache_dir=getattr(args, "cache_dir", None),
        arch=getattr(args, "arch", None),
        discover=getattr(args, "discover", None),
    )


# -- changing the root ---------------------------------------------------------------------


def install_command(args: argparse.Namespace, console: Console) -> int:
    return _change(args, console, Mode.INSTALL)


def upgrade_command(args: argparse.Namespace, console: Console) -> int:
    return _change(args, console, Mode.UPGRADE)


def _change(args: argparse.Namespace, console: Console, mode: Mode) -> int:
    settings = settings_from(args)
    with _open(settings, args.wait, console) as installed, Display(console) as display:
        sources = open_sources(settings, installed.db, display)
        names = add_package_files(
            sources, args.names, unsigned=getattr(args, "allow_untrusted", False)
        )
        result = install(installed, sources, names, display, mode=mode, force=args.force)
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
    with _open(settings, args.wait, console) as installed, Display(console) as display:
        result = remove(installed, args.names, display, force=args.force)
    _done(console, result)
    return 0


def _open(settings: ClientSettings, wait: float, console: Console) -> Installed:
    if not settings.root.is_dir():
        raise InstallError(f"{settings.root}: the root is not a directory")
    installed = Installed.open(settings.root, wait=wait)
    if installed.recovered is not None:
        console.print(f"[yellow]recovered an interrupted transaction:[/] {installed.recovered}")
    return installed


def _done(console: Console, result: TransactionResult) -> None:
    for package in result.installed:
        console.print(f"[green]installed[/] {package.name} {package.full_version}")
    for old, new in result.upgraded:
        change = f"{old.full_version} -> {new.full_version}"
        if old.full_version == new.full_version:
            change = f"{old.full_version} (build {old.build_key[:12]} -> {new.build_key[:12]})"
        console.print(f"[green]upgraded[/] {new.name} {change}")
    for package in result.removed:
        console.print(f"[green]removed[/] {package.name} {package.full_version}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {escape(note)}")
    console.print(f"{result.files} files, {_size(result.bytes)}")


# -- reading -------------------------------------------------------------------------------


def _read(settings: ClientSettings, console: Console) -> Installed:
    """The root for reading; an interrupted transaction is first recovered if no other
    client is at work (that one recovers it itself)."""
    if (settings.root / DB_DIR / JOURNAL_NAME).exists():
        try:
            _open(settings, 0.0, console).close()
        except RootLocked:
            pass
    return Installed.open(settings.root, readonly=True)


def list_command(args: argparse.Namespace, console: Console) -> int:
    settings = settings_from(args)
    with _read(settings, console) as installed:
        packages = installed.db.packages()
    table = Table(show_edge=False)
    for column in ("name", "version", "size", "reason", "from"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for p in packages:
        table.add_row(
            p.name, p.full_version, _size(p.installed_size), str(p.reason), escape(p.origin)
        )
    console.print(table)
    console.print(f"{len(packages)} packages installed in {settings.root}")
    return 0


def files_command(args: argparse.Namespace, console: Console) -> int:
    settings = settings_from(args)
    with _read(settings, console) as installed:
        if installed.db.installed(args.name) is None:
            raise InstallError(f"{args.name} is not installed in {settings.root}")
        files = installed.db.files(args.name)
    table = Table(show_edge=False)
    for column in ("path", "type", "mode", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for f in files:
        path = "/" + f.path + (f" -> {f.target}" if f.target else "")
        table.add_row(escape(path), str(f.type), f"{f.mode:04o}", _size(f.size) if f.size else "")
    console.print(table)
    return 0


def owner_command(args: argparse.Namespace, console: Console) -> int:
    settings = settings_from(args)
    with _read(settings, console) as installed:
        owners = installed.owners(args.path)
        packages = {o.package: installed.db.installed(o.package) for o in owners}
    if not owners:
        console.print(f"/{args.path.lstrip('/')} is not owned by any package")
        return 1
    for name, package in sorted(packages.items()):
        version = package.full_version if package else "?"
        console.print(f"/{owners[0].path} is owned by {name} {version}")
    return 0


def info_command(args: argparse.Namespace, console: Console) -> int:
    settings = settings_from(args)
    with _read(settings, console) as installed:
        mine = installed.db.installed(args.name)
        files = len(installed.db.files(args.name)) if mine else 0
    available = (
        _catalogue(settings, console).available.get(args.name) if _has_sources(settings) else None
    )
    if mine is None and available is None:
        raise InstallError(f"no package named {args.name} is installed or available")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    if mine is not None:
        grid.add_row("name", mine.name)
        grid.add_row(
            "installed",
            f"{mine.full_version} ({mine.reason}, {files} files, {_size(mine.installed_size)})",
        )
        grid.add_row("summary", escape(mine.summary))
        grid.add_row("license", escape(mine.license))
        grid.add_row("build key", mine.build_key)
        grid.add_row("from", escape(mine.origin))
        grid.add_row("depends", escape(", ".join(mine.depends) or "-"))
        if mine.provides:
            grid.add_row("provides", escape(", ".join(mine.provides)))
        if mine.conflicts:
            grid.add_row("conflicts", escape(", ".join(mine.conflicts)))
    if available is not None:
        if mine is None:
            grid.add_row("name", available.name)
            grid.add_row("depends", escape(", ".join(available.depends) or "-"))
        version = full_version(available.version, available.release)
        state = (
            ""
            if mine is None
            else (" (installed)" if mine.build_key == available.key else " (an upgrade)")
        )
        grid.add_row("available", f"{version}, build key {available.key[:12]}{state}")
    console.print(grid)
    return 0


def search_command(args: argparse.Namespace, console: Console) -> int:
    settings = settings_from(args)
    with _read(settings, console) as installed:
        mine = {p.name: p for p in installed.db.search(args.text)}
        everything = {p.name: p for p in installed.db.packages()}
    found: dict[str, Candidate] = {}
    if not args.installed and _has_sources(settings):
        needle = args.text.lower()
        for name, candidate in _catalogue(settings, console).available.items():
            summary = getattr(candidate, "summary", "")
            if needle in name.lower() or needle in summary.lower():
                found[name] = candidate
    table = Table(show_edge=False)
    for column in ("name", "version", "status", "summary"):
        table.add_column(column)
    for name in sorted(mine.keys() | found.keys()):
        have = mine.get(name) or everything.get(name)
        package = found.get(name)
        if package is None:
            assert have is not None  # the name came from one of the two
            table.add_row(name, have.full_version, "installed", escape(have.summary))
            continue
        status = "available"
        if have is not None:
            status = "installed" if have.build_key == package.key else "upgradable"
        summary = getattr(package, "summary", "") or (have.summary if have else "")
        table.add_row(name, full_version(package.version, package.release), status, escape(summary))
    if not table.row_count:
        console.print(f"no package matches {args.text!r}")
        return 1
    console.print(table)
    return 0


def _has_sources(settings: ClientSettings) -> bool:
    return bool(settings.caches or settings.tree or settings.discover)


def _catalogue(settings: ClientSettings, console: Console) -> Sources:
    with Display(console) as display:
        return open_sources(settings, _Unrecorded(), display)


class _Unrecorded:
    """Reading commands verify indexes but keep no rollback memory (they change nothing;
    the next install checks the serial against the database)."""

    def last_serial(self, key_id: str) -> int | None:
        return None

    def record_serial(self, key_id: str, serial: int) -> int:
        return serial


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


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

    def resolved(self, resolution: Resolution[Candidate]) -> None:
        if not resolution.steps:
            return
        table = Table(show_edge=False, title=f"{len(resolution)} package(s)")
        for column in ("action", "package", "version", "why"):
            table.add_column(column)
        for step in resolution:
            version = full_version(step.package.version, step.package.release)
            if step.replaces is not None:
                old = full_version(step.replaces.version, step.replaces.release)
                version = f"{old} -> {version}" if old != version else f"{version} (rebuilt)"
            colour = "green" if step.action is Action.INSTALL else "cyan"
            table.add_row(
                f"[{colour}]{step.action}[/]", step.package.name, version, escape(step.why)
            )
        self.print("")
        self.print(table)

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
            self.display.progress.update(self.task, description=f"unpacking {info.name}")

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
        self.display.print(f"downloaded {download.label} ({_size(download.size)})")


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
        if line.startswith("==> ") and ":" not in line:
            task = self.tasks.get(name)
            if task is not None:
                step = line[4:].split()[0]
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
