"""What the ``ports`` subcommands share: finding the tree, the state, the evaluation."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from portsd.checkout import Checkout, open_checkout
from portsd.config import Config, load_config

DEFAULT_STATE = Path("~/.local/share/portsd")


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
        f"{DEFAULT_STATE})",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="a config file (default: <state>/portsd.toml)"
    )
    parser.add_argument(
        "--arch", default=None, help="the target architecture (default: this machine's)"
    )


def config_from(args: argparse.Namespace, **overrides: object) -> Config:
    state = args.state or Path(os.environ.get("PORTSD_STATE", DEFAULT_STATE)).expanduser()
    return load_config(state.absolute(), args.config, {"arch": args.arch, **overrides})


def open_tree(args: argparse.Namespace, config: Config | None, arch: str) -> Checkout:
    """Load and evaluate the tree the arguments name, with the recipe cache if ``config``."""
    return open_checkout(args.tree, args.rev, config.cache if config else None, arch)
