"""Command-line entry points. The only place errors become ``error: ...`` and exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape

from portsd.errors import PortsdError

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def err_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def report_error(error: PortsdError, console: Console) -> None:
    """One readable line, then the detail lines, then the hint."""
    first, *detail = str(error).splitlines() or [type(error).__name__]
    console.print(f"[bold red]error:[/] {escape(first)}")
    for line in detail:
        console.print(f"  {escape(line)}")
    if error.hint:
        console.print(f"[dim]hint: {escape(error.hint)}[/]")


def run_main(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run ``main``, turning PortsdError and Ctrl-C into a message and an exit status."""
    console = err_console()
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except PortsdError as error:
        report_error(error, console)
        return EXIT_ERROR
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]")
        return EXIT_INTERRUPTED
