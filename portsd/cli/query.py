"""``ports list|files|owner``: questions about a root that need no cache (and import none).

Every command, reading ones included, first finishes or rolls back a transaction a crash
interrupted, unless another client is at work (which recovers it itself).
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from portsd.client.journal import DB_DIR
from portsd.client.settings import ClientSettings, load_settings
from portsd.client.transaction import JOURNAL_NAME, Installed
from portsd.errors import InstallError, RootLocked


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


def open_root(settings: ClientSettings, wait: float, console: Console) -> Installed:
    if not settings.root.is_dir():
        raise InstallError(f"{settings.root}: the root is not a directory")
    installed = Installed.open(settings.root, wait=wait)
    if installed.recovered is not None:
        console.print(f"[yellow]recovered an interrupted transaction:[/] {installed.recovered}")
    return installed


def read_root(settings: ClientSettings, console: Console) -> Installed:
    """The root for reading; an interrupted transaction is first recovered if no other
    client is at work (that one recovers it itself)."""
    if (settings.root / DB_DIR / JOURNAL_NAME).exists():
        try:
            open_root(settings, 0.0, console).close()
        except RootLocked:
            pass
    return Installed.open(settings.root, readonly=True)


def list_command(args: argparse.Namespace, console: Console) -> int:
    settings = settings_from(args)
    with read_root(settings, console) as installed:
        packages = installed.db.packages()
    table = Table(show_edge=False)
    for column in ("name", "version", "size", "reason", "from"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for p in packages:
        table.add_row(
            p.meta.name,
            p.meta.full_version,
            size(p.meta.installed_size),
            str(p.reason),
            escape(p.origin),
        )
    console.print(table)
    console.print(f"{len(packages)} packages installed in {settings.root}")
    return 0


def files_command(args: argparse.Namespace, console: Console) -> int:
    settings = settings_from(args)
    with read_root(settings, console) as installed:
        if installed.db.installed(args.name) is None:
            raise InstallError(f"{args.name} is not installed in {settings.root}")
        files = installed.db.files(args.name)
    table = Table(show_edge=False)
    for column in ("path", "type", "mode", "size"):
        table.add_column(column, justify="right" if column == "size" else "left")
    for f in files:
        path = "/" + f.path + (f" -> {f.target}" if f.target else "")
        table.add_row(escape(path), str(f.type), f"{f.mode:04o}", size(f.size) if f.size else "")
    console.print(table)
    return 0


def owner_command(args: argparse.Namespace, console: Console) -> int:
    settings = settings_from(args)
    with read_root(settings, console) as installed:
        owners = installed.owners(args.path)
        packages = {o.package: installed.db.installed(o.package) for o in owners}
    if not owners:
        console.print(f"/{args.path.lstrip('/')} is not owned by any package")
        return 1
    for name, package in sorted(packages.items()):
        version = package.meta.full_version if package else "?"
        console.print(f"/{owners[0].path} is owned by {name} {version}")
    return 0


def check_command(args: argparse.Namespace, console: Console) -> int:
    """Every installed file as the database has it (type, mode, content, link target):
    what a disk error, a hand edit or an intruder changed. Exit 1 if anything differs."""
    settings = settings_from(args)
    with read_root(settings, console) as installed:
        names = args.names or [p.meta.name for p in installed.db.packages()]
        problems: dict[str, list[str]] = {}
        for name in names:
            if installed.db.installed(name) is None:
                raise InstallError(f"{name} is not installed in {settings.root}")
            problems[name] = installed.verify(name)
    for name, found in problems.items():
        for problem in found:
            console.print(f"[red]{escape(name)}[/]: {escape(problem)}")
    broken = sum(bool(found) for found in problems.values())
    console.print(f"{len(problems)} package(s) checked, {broken} with differences")
    return 1 if broken else 0


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
