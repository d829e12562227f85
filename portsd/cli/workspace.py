"""What the ``ports`` subcommands share: finding the tree, the state, the evaluation."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from portsd.build.pipeline import seed_of
from portsd.config import Config, load_config
from portsd.daemon.binding import default_state
from portsd.pkg.repo import Repository, StoredContents
from portsd.tree.checkout import Checkout, open_checkout


def config_from(args: argparse.Namespace, **overrides: object) -> Config:
    """The config of the state the arguments name: ``--state``, $PORTSD_STATE, or the
    tree's own state (``--tree``, default the current directory)."""
    named = args.state or os.environ.get("PORTSD_STATE")
    tree = getattr(args, "tree", None) or Path(".")
    state = Path(named).expanduser() if named else default_state(tree)
    return load_config(state.absolute(), args.config, {"arch": args.arch, **overrides})


def build_settings(args: argparse.Namespace) -> dict[str, object]:
    """The config settings the flags of ``add_build_settings`` override (None: not given)."""
    places: dict[str, list[str]] = {}
    for name, place in args.named_mirror or ():
        places.setdefault(name, []).append(place)
    return {
        "jobs": args.jobs,
        "make_jobs": args.make_jobs,
        "build_timeout": args.timeout,
        "process_limit": args.process_limit,
        "memory_limit": args.memory_limit,
        "disk_limit": args.disk_limit,
        "open_files_limit": args.open_files_limit,
        "mirrors": tuple(args.mirror) if args.mirror else None,
        "named_mirrors": tuple(sorted((n, tuple(p)) for n, p in places.items())) or None,
        "distfiles_dir": args.distfiles.absolute() if args.distfiles else None,
    }


def open_tree(args: argparse.Namespace, config: Config | None, arch: str) -> Checkout:
    """Load and evaluate the tree the arguments name. With ``config``: the state's recipe
    cache, and keys on the seed its builds stand on (made on first use, said on stderr);
    without (``ports lint``): no cache, and keys that name no seed."""
    if config is None:
        return open_checkout(args.tree, args.rev, None, arch, toolchain="", contents={})
    seed = seed_of(config, say=lambda line: print(line, file=sys.stderr))
    contents = StoredContents(Repository(config.repo, arch, None))
    return open_checkout(args.tree, args.rev, config.cache, arch, seed.content_id, contents)
