"""Output for people and for scripts: tables with box lines only on a terminal (plain
aligned columns when piped), ``--json`` documents and ``-q`` name lists on stdout."""

from __future__ import annotations

import json
from collections.abc import Collection

from rich.console import Console
from rich.table import Table


def table(console: Console, *columns: str, right: Collection[str] = (), title: str = "") -> Table:
    """An empty table with ``columns`` (those in ``right`` right-aligned)."""
    if console.is_terminal:
        grid = Table(show_edge=False, title=title or None)
    else:  # piped: no box-drawing characters for grep, cut and awk to trip on
        grid = Table(box=None, show_edge=False, pad_edge=False, title=title or None)
    for column in columns:
        grid.add_column(column, justify="right" if column in right else "left")
    return grid


def emit_json(console: Console, value: object) -> None:
    """``value`` as one JSON document on the console's stream, unstyled and unwrapped."""
    console.file.write(json.dumps(value, indent=2) + "\n")


def emit_lines(console: Console, lines: Collection[str]) -> None:
    """One line each, unstyled (``-q``)."""
    console.file.write("".join(f"{line}\n" for line in lines))
