"""``portsd``: the build host's daemon and its administration."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console

from portsd.cli import run_main
from portsd.cli.workspace import DEFAULT_STATE
from portsd.config import load_config
from portsd.pipeline import ensure_signing_key


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="portsd", description="The portsd build host.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("keygen", help="create the repository signing key (once)")
    p.add_argument("--state", type=Path, default=DEFAULT_STATE.expanduser())
    return top


def _main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    console = Console(highlight=False)
    config = load_config(args.state.absolute())
    existed = config.secret_key.exists()
    key = ensure_signing_key(config)
    verb = "exists" if existed else "created"
    console.print(f"signing key {verb}: {config.secret_key} (key id {key.key_id})")
    console.print(f"public key: {config.public_key}")
    return 0


def main() -> int:
    return run_main(_main)
