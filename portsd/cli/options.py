"""The arguments of the command-line tools, defined apart from what they run: building a
parser imports nothing heavy, so ``ports list`` does not pay for aiohttp, pygit2 or
zeroconf. Handlers are named ``"module:function"`` and imported when chosen."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_STATE = "~/.local/share/portsd/<tree>-<digest>"
"""Where a tree's state lives unless named (portsd.daemon.binding.default_state)."""

Handler = Callable[[argparse.Namespace, "Console"], int]
"""What a subcommand runs: its arguments and the console in, the exit status out."""


def load_handler(name: str) -> Handler:
    """The handler ``"module:function"`` names, its module imported now."""
    module, _, function = name.partition(":")
    handler: Handler = getattr(importlib.import_module(module), function)
    return handler


def add_tree_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tree",
        type=Path,
        default=Path("."),
        help="the ports tree: a git repository (working tree or bare) or a plain directory "
        "holding ports/ (default: the current directory)",
    )
    parser.add_argument(
        "--rev",
        help="read the tree at this git revision instead of the working directory "
        "(default for bare repositories: HEAD)",
    )


def add_state_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state",
        type=Path,
        default=None,
        help="the state directory: repository, sources, logs (default: $PORTSD_STATE or "
        f"the tree's own, {DEFAULT_STATE})",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="a config file (default: <state>/portsd.toml)"
    )
    parser.add_argument(
        "--arch", default=None, help="the target architecture (default: this machine's)"
    )


def add_build_settings(parser: argparse.ArgumentParser) -> None:
    """The config's [build] and [sources] settings as flags (a flag wins over the file)."""
    parser.add_argument("-j", "--jobs", type=int, help="builds at once (default: config, else 2)")
    parser.add_argument(
        "--make-jobs",
        type=int,
        metavar="N",
        help="$JOBS inside each build (default: config, else the CPU count)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="how long a build may take before it is killed (default: config, else 3600)",
    )
    parser.add_argument(
        "--process-limit",
        type=int,
        metavar="N",
        help="processes one build may run at once (default: config, else 4096; 0: none)",
    )
    parser.add_argument(
        "--memory-limit",
        type=_size,
        metavar="SIZE",
        help="memory one build may use, e.g. 2G (default: config, else none)",
    )
    parser.add_argument(
        "--disk-limit",
        type=_size,
        metavar="SIZE",
        help="disk one build's work directory may use, e.g. 20G (default: config, else none)",
    )
    parser.add_argument(
        "--open-files-limit",
        type=int,
        metavar="N",
        help="files each process of a build may open (default: config, else 4096; 0: none)",
    )
    parser.add_argument(
        "--mirror",
        action="append",
        metavar="DIR|URL",
        help="a distfiles mirror: sources by file name, tried before their own URLs "
        "(repeatable, in order; replaces the config's mirrors)",
    )
    parser.add_argument(
        "--named-mirror",
        action="append",
        type=_named_mirror,
        metavar="NAME=DIR|URL",
        help="a place of mirror NAME, where recipe URLs mirror://NAME/PATH point (repeatable, "
        "in order; replaces the config's places of NAME)",
    )
    parser.add_argument(
        "--distfiles",
        type=Path,
        metavar="DIR",
        help="the downloaded sources, by sha256 (default: config, else <state>/distfiles)",
    )


def _size(text: str) -> int:
    from portsd.config import parse_size  # when a flag is given: the parsers stay light

    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size (2G, 512M, bytes): {text!r}") from None


def _named_mirror(text: str) -> tuple[str, str]:
    name, equals, place = text.partition("=")
    if not (name and equals and place):
        raise argparse.ArgumentTypeError(f"expected NAME=DIR|URL, not '{text}'")
    return name, place


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
        "--reinstall",
        action="store_true",
        help="install installed packages again, every file rewritten (repairs damage)",
    )
    p.add_argument(
        "--initdb", action="store_true", help="create the root directory if it does not exist"
    )
    p.add_argument(
        "--allow-untrusted",
        action="store_true",
        help="install package files without a trusted signature",
    )
    p.set_defaults(handler="portsd.cli.client:install_command")

    p = commands.add_parser("upgrade", help="replace packages whose build key changed")
    p.add_argument("names", nargs="*", metavar="NAME", help="default: everything installed")
    _changing(p)
    _sources(p)
    p.set_defaults(handler="portsd.cli.client:upgrade_command")

    p = commands.add_parser(
        "autoremove", help="remove dependencies that no installed package needs any more"
    )
    _changing(p)
    p.set_defaults(handler="portsd.cli.client:autoremove_command")

    p = commands.add_parser("remove", help="remove packages (only the files they own)")
    p.add_argument("names", nargs="+", metavar="NAME")
    _changing(p)
    p.set_defaults(handler="portsd.cli.client:remove_command")

    p = commands.add_parser("info", help="what a package is, installed or available")
    p.add_argument("name")
    _reading(p)
    _sources(p)
    _output(p)
    p.set_defaults(handler="portsd.cli.client:info_command")

    p = commands.add_parser(
        "verify", help="rebuild packages here by their keys and compare with the cache's"
    )
    p.add_argument("names", nargs="+", metavar="NAME")
    _reading(p)
    _sources(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler="portsd.cli.client:verify_command")

    p = commands.add_parser("search", help="packages whose name or summary contains TEXT")
    p.add_argument("text")
    _reading(p)
    _sources(p)
    p.add_argument("--installed", action="store_true", help="search installed packages only")
    _output(p)
    p.set_defaults(handler="portsd.cli.client:search_command")

    p = commands.add_parser("list", help="the installed packages")
    _reading(p)
    _output(p)
    p.set_defaults(handler="portsd.cli.query:list_command")

    p = commands.add_parser("files", help="the files an installed package owns")
    p.add_argument("name")
    _reading(p)
    _output(p)
    p.set_defaults(handler="portsd.cli.query:files_command")

    p = commands.add_parser("check", help="compare installed files with the database")
    p.add_argument("names", nargs="*", metavar="NAME", help="default: every installed package")
    _reading(p)
    _output(p)
    p.add_argument(
        "--repair", action="store_true", help="install the damaged packages again (from a cache)"
    )
    _sources(p)
    p.set_defaults(handler="portsd.cli.query:check_command")

    p = commands.add_parser("owner", help="which installed package owns a path")
    p.add_argument("path")
    _reading(p)
    _output(p)
    p.set_defaults(handler="portsd.cli.query:owner_command")


def _reading(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", type=Path, help="the root installed into (default: /)")
    p.add_argument("--config", type=Path, help="the client config (default: /etc/ports.toml)")


def _output(p: argparse.ArgumentParser) -> None:
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    shape.add_argument("-q", "--quiet", action="store_true", help="print names only")


def _changing(p: argparse.ArgumentParser) -> None:
    _reading(p)
    p.add_argument("--force", action="store_true", help="even if dependencies break")
    p.add_argument(
        "-s",
        "--dry-run",
        action="store_true",
        help="print what would be done, and change nothing",
    )
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
        const="always",
        help="build everything from the ports tree",
    )
    source.add_argument(
        "--no-build",
        dest="source",
        action="store_const",
        const="never",
        help="never build: only cached packages",
    )
    p.add_argument(
        "--discover",
        action="store_const",
        const=True,
        help="also use trusted caches found on the LAN",
    )


def add_discover_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds to listen for answers (default: 3)",
    )
    parser.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="ask only on the interface with this IP address (repeatable; default: all)",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="the client config (default: /etc/ports.toml)"
    )
    parser.add_argument(
        "--trusted-key",
        action="append",
        default=[],
        metavar="KEY",
        help="trust this public key (a file, or the base64 of `minisign -P`) instead of the "
        "config's trusted-keys (repeatable)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")
