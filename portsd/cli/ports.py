"""``ports``: the command for people working on a ports tree and on the machines it serves."""

from __future__ import annotations

import argparse
import difflib
import logging
import sys
from importlib.metadata import version
from pathlib import Path

from rich.console import Console

from portsd.cli import EXIT_USAGE, run_main
from portsd.cli.options import (
    add_build_settings,
    add_client_commands,
    add_discover_options,
    add_state_options,
    add_tree_options,
    load_handler,
)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="ports",
        description="Build, inspect and install the packages of a ports tree.",
    )
    top.add_argument("-v", "--verbose", action="store_true", help="show debug output")
    top.add_argument("--version", action="version", version=f"%(prog)s {version('portsd')}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("lint", help="check every recipe and dependency; list every problem")
    add_tree_options(p)
    p.add_argument("--arch", default=None, help="the target architecture (default: this machine's)")
    p.set_defaults(handler="portsd.cli.inspect:lint")

    p = commands.add_parser("graph", help="what a port needs and what needs it")
    p.add_argument("name")
    p.add_argument("--dot", action="store_true", help="print Graphviz instead")
    add_tree_options(p)
    add_state_options(p)
    p.set_defaults(handler="portsd.cli.inspect:graph")

    p = commands.add_parser("why", help="why a port must be (re)built")
    p.add_argument("name")
    p.add_argument(
        "--since",
        help="compare with this revision (default: the commit last published, else HEAD~1)",
    )
    add_tree_options(p)
    add_state_options(p)
    p.set_defaults(handler="portsd.cli.inspect:why")

    p = commands.add_parser("build", help="build ports (default: all) and what they need")
    p.add_argument("names", nargs="*", metavar="NAME")
    add_tree_options(p)
    add_state_options(p)
    add_build_settings(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="adopt a state directory that belongs to another tree",
    )
    p.add_argument(
        "--on-root",
        type=Path,
        metavar="ROOT",
        help="build the named ports with an installed root as the build's /usr (no seed, no"
        " packages laid over it), compare each with the package installed there, publish"
        " nothing",
    )
    p.add_argument("--json", action="store_true", help="with --on-root: print JSON")
    p.set_defaults(handler="portsd.cli.build:build")

    p = commands.add_parser(
        "seed", help="the bootstrap seed every build stands on: show, check or remake it"
    )
    action = p.add_mutually_exclusive_group()
    action.add_argument(
        "--check",
        action="store_true",
        help="make it again from this host and compare (exit 1 on any difference)",
    )
    action.add_argument("--remake", action="store_true", help="make it again and keep the new one")
    p.add_argument("--manifest", action="store_true", help="print the packages it is made of")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_state_options(p)
    p.set_defaults(handler="portsd.cli.seed:seed")

    p = commands.add_parser(
        "checksum", help="download a port's url sources and write their sha256s into port.toml"
    )
    p.add_argument("name")
    p.add_argument(
        "--tree", type=Path, default=Path("."), help="the ports tree's working directory"
    )
    add_state_options(p)
    p.set_defaults(handler="portsd.cli.checksum:checksum")

    add_client_commands(commands)
    p = commands.add_parser("discover", help="find portsd caches on the LAN (mDNS)")
    add_discover_options(p)
    p.set_defaults(handler="portsd.cli.discover:discover")

    p = commands.add_parser("completion", help="print a shell completion script")
    p.add_argument("shell", choices=["bash"])
    p.set_defaults(handler="portsd.cli.completion:completion")
    for sub in commands.choices.values():  # global flags after the verb too
        sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    return top


def unknown_command(top: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """'unknown command ...; did you mean ...?' for a misspelt verb, else None."""
    commands = next(a.choices for a in top._actions if isinstance(a, argparse._SubParsersAction))
    verb = next((arg for arg in argv if not arg.startswith("-")), None)
    if verb is None or verb in commands:
        return None
    close = difflib.get_close_matches(verb, list(commands), n=1)
    return f"unknown command {verb!r}" + (f"; did you mean {close[0]}?" if close else "")


def _main(argv: list[str]) -> int:
    top = parser()
    unknown = unknown_command(top, argv)
    if unknown is not None:
        top.print_usage(sys.stderr)
        print(f"ports: error: {unknown}", file=sys.stderr)
        return EXIT_USAGE
    args = top.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s"
    )
    console = Console(highlight=False, soft_wrap=True)
    return load_handler(args.handler)(args, console)  # only what runs is imported


def main() -> int:
    return run_main(_main)


if __name__ == "__main__":
    raise SystemExit(main())
