"""What the ``ports`` subcommands share: finding the tree, the state, the evaluation."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from portsd.build.pipeline import seed_of
from portsd.cli.options import DEFAULT_STATE
from portsd.config import Config, load_config
from portsd.tree.checkout import Checkout, open_checkout


def config_from(args: argparse.Namespace, **overrides: object) -> Config:
    state = args.state or Path(os.environ.get("PORTSD_STATE", DEFAULT_STATE)).expanduser()
    return load_config(state.absolute(), args.config, {"arch": args.arch, **overrides})


def open_tree(args: argparse.Namespace, config: Config | None, arch: str) -> Checkout:
    """Load and evaluate the tree the arguments name. With ``config``: the state's recipe
    cache, and keys on the seed its builds stand on (made on first use, said on stderr);
    without (``ports lint``): no cache, and keys that name no seed."""
    if config is None:
        return open_checkout(args.tree, args.rev, None, arch, toolchain="")
    seed = seed_of(config, say=lambda line: print(line, file=sys.stderr))
    return open_checkout(args.tree, args.rev, config.cache, arch, seed.content_id)
