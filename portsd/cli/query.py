"""``ports list|files|owner``: questions about a root that need no cache (and import none).

Every command, reading ones included, first finishes or rolls back a transaction a crash
interrupted, unless another client is at work (which recovers it itself).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from portsd.cli.output import emit_json, emit_lines, table
from portsd.client.db import InstalledPackage
from portsd.client.journal import DB_DIR
from portsd.client.settings import ClientSettings, load_settings
from portsd.client.transaction import JOURNAL_NAME, Installed
from portsd.core.metadata import PackageMeta
from portsd.errors import InstallError, RootError, RootLocked
from portsd.fsio import remove_tree


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


def open_root(
    settings: ClientSettings, wait: float, console: Console, *, initdb: bool = False
) -> Installed:
    """The root for changing; ``initdb`` creates a missing root directory (apk's --initdb)."""
    check_root(settings.root, create=initdb)
    installed = Installed.open(settings.root, wait=wait)
    if installed.recovered is not None:
        console.print(f"[yellow]recovered an interrupted transaction:[/] {installed.recovered}")
    return installed


def read_root(settings: ClientSettings, console: Console) -> Installed:
    """The root for reading; an interrupted transaction is first recovered if no other
    client is at work (that one recovers it itself)."""
    check_root(settings.root, create=False)
    if (settings.root / DB_DIR / JOURNAL_NAME).exists():
        try:
            open_root(settings, 0.0, console).close()
        except (RootLocked, RootError):  # at work, or not ours to recover: read as it is
            pass
    return Installed.open(settings.root, readonly=True)


@contextmanager
def fresh_root_undone(root: Path) -> Iterator[None]:
    """On failure, remove what a command that committed nothing made in a root that had
    no database yet (its database, lock, download store): a refused install into a fresh
    root leaves it as it was."""
    made = [root / DB_DIR, root / "var/cache/ports", root / "var/lib", root / "var/cache"]
    made = [path for path in [*made, root / "var"] if not path.exists()]
    try:
        yield
    except BaseException:
        if made and (root / DB_DIR) in made and not _committed(root):
            for path in made:  # deepest first; the parents only when left empty
                if path.is_dir() and (path.name == "ports" or not any(path.iterdir())):
                    remove_tree(path)
        raise


def _committed(root: Path) -> bool:
    if not (root / DB_DIR).is_dir():
        return False
    with Installed.open(root, readonly=True) as installed:
        return bool(installed.db.history(1))


def check_root(root: Path, *, create: bool) -> None:
    """An existing directory (made if ``create``), or an error that says which it is not."""
    if create and not root.exists():
        try:
            root.mkdir(parents=True)
        except OSError as exc:
            raise InstallError(f"{root}: cannot create the root: {exc.strerror}") from None
    if not root.exists():
        missing = InstallError(f"{root}: the root does not exist")
        missing.hint = "create it, or give --initdb to have it created"
        raise missing
    if not root.is_dir():
        raise InstallError(f"{root}: the root is not a directory")


def list_command(args: argparse.Namespace, console: Console) -> int:
    settings = settings_from(args)
    with read_root(settings, console) as installed:
        packages = installed.db.packages()
    if args.json:
        emit_json(console, [package_json(p) for p in packages])
        return 0
    if args.quiet:
        emit_lines(console, [p.meta.name for p in packages])
        return 0
    grid = table(console, "name", "version", "size", "reason", "from", right=("size",))
    for p in packages:
        grid.add_row(
            p.meta.name,
            p.meta.full_version,
            size(p.meta.installed_size),
            str(p.reason),
            escape(p.origin),
        )
    console.print(grid)
    console.print(f"{len(packages)} packages installed in {settings.root}")
    return 0


def meta_json(meta: PackageMeta) -> dict[str, object]:
    """A package's facts for ``--json``, installed or available."""
    return {
        "name": meta.name,
        "version": meta.full_version,
        "build_key": meta.build_key,
        "summary": meta.summary,
        "license": meta.license,
        "depends": list(meta.depends),
        "provides": list(meta.provides),
        "conflicts": list(meta.conflicts),
        "installed_size": meta.installed_size,
    }


def package_json(package: InstalledPackage) -> dict[str, object]:
    """An installed package for ``--json``: its manifest's facts and why it is here."""
    return meta_json(package.meta) | {
        "reason": str(package.reason),
        "origin": package.origin,
        "installed_at": package.installed_at,
    }


def files_command(args: argparse.Namespace, console: Console) -> int:
    settings = settings_from(args)
    with read_root(settings, console) as installed:
        if installed.db.installed(args.name) is None:
            raise InstallError(f"{args.name} is not installed in {settings.root}")
        files = installed.db.files(args.name)
    if args.json:
        emit_json(
            console,
            [
                {
                    "path": "/" + f.path,
                    "type": str(f.type),
                    "mode": f.mode,
                    "size": f.size,
                    "sha256": f.sha256,
                    "target": f.target,
                }
                for f in files
            ],
        )
        return 0
    if args.quiet:
        emit_lines(console, ["/" + f.path for f in files])
        return 0
    grid = table(console, "path", "type", "mode", "size", right=("size",))
    for f in files:
        path = "/" + f.path + (f" -> {f.target}" if f.target else "")
        grid.add_row(escape(path), str(f.type), f"{f.mode:04o}", size(f.size) if f.size else "")
    console.print(grid)
    return 0


def owner_command(args: argparse.Namespace, console: Console) -> int:
    settings = settings_from(args)
    path = args.path
    inside = Path(path).absolute()
    if inside.is_relative_to(settings.root) and settings.root != Path("/"):
        path = "/" + inside.relative_to(settings.root).as_posix()  # a path into the root
    with read_root(settings, console) as installed:
        owners = installed.owners(path)
        packages = {o.package: installed.db.installed(o.package) for o in owners}
    shown = "/" + (owners[0].path if owners else path.lstrip("/"))
    found = [
        (name, package.meta.full_version if package else "?")
        for name, package in sorted(packages.items())
    ]
    if args.json:
        emit_json(console, {"path": shown, "owners": [{"name": n, "version": v} for n, v in found]})
    elif args.quiet:
        emit_lines(console, [name for name, _ in found])
    elif not owners:
        console.print(f"{shown} is not owned by any package")
    else:
        for name, version in found:
            console.print(f"{shown} is owned by {name} {version}")
    return 0 if owners else 1


def check_command(args: argparse.Namespace, console: Console) -> int:
    """Every installed file as the database has it (type, mode, content, link target):
    what a disk error, a hand edit or an intruder changed. Exit 1 if anything differs,
    unless ``--repair`` installed the damaged packages again."""
    settings = settings_from(args)
    with read_root(settings, console) as installed:
        names = args.names or [p.meta.name for p in installed.db.packages()]
        problems: dict[str, list[str]] = {}
        for name in names:
            if installed.db.installed(name) is None:
                raise InstallError(f"{name} is not installed in {settings.root}")
            problems[name] = installed.verify(name)
    broken = sum(bool(found) for found in problems.values())
    if args.repair and broken:
        from portsd.cli.client import repair  # the caches, only when a repair needs them

        for name, found in problems.items():
            for problem in found:
                console.print(f"[red]{escape(name)}[/]: {escape(problem)}")
        return repair(args, console, [name for name, found in problems.items() if found])
    if args.json:
        emit_json(console, problems)
        return 1 if broken else 0
    for name, found in problems.items():
        for problem in found:
            if args.quiet:
                emit_lines(console, [name])
                break
            console.print(f"[red]{escape(name)}[/]: {escape(problem)}")
    if not args.quiet:
        console.print(f"{len(problems)} package(s) checked, {broken} with differences")
    return 1 if broken else 0


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
