"""``ports checksum NAME``: fill in the sha256 of every url source of a recipe."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from portsd.build.checksum import checksum as write_sums
from portsd.cli.workspace import config_from
from portsd.errors import ConfigError


def checksum(args: argparse.Namespace, console: Console) -> int:
    recipe = args.tree.absolute() / "ports" / args.name / "port.toml"
    if not recipe.is_file():
        raise ConfigError(f"{recipe}: no such recipe (checksum edits a working tree)")
    named = dict(config_from(args).named_mirrors)
    sums = write_sums(recipe, args.name, named)
    for s in sums:
        change = (
            "unchanged" if s.before == s.sha256 else ("added" if s.before is None else "changed")
        )
        console.print(f"source #{s.index + 1} {escape(s.url)}: {s.sha256} ({change})")
    if not sums:
        console.print(f"{args.name} has no url sources")
    return 0
