"""A state directory belongs to one ports tree: ``<state>/tree`` names it.

A state's repository publishes the ports of one tree; building another tree into it
unpublishes every port that tree lacks (a LAN repository emptied by a build run from the
wrong checkout). So the first user of a state records its tree, and every later writer
(``ports build``, ``portsd serve``) must name the same tree, or ``--force`` to adopt the
state for a new one. The default state is therefore per tree, never one shared directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from portsd.errors import PortsdError
from portsd.fsio import write_atomic

BINDING_NAME = "tree"


class WrongTree(PortsdError):
    """The state directory belongs to another tree."""

    def __init__(self, state: Path, recorded: str, tree: str) -> None:
        self.state = state
        self.recorded = recorded
        self.tree = tree
        super().__init__(f"{state} belongs to the tree {recorded}, not {tree}")
        self.hint = (
            f"use that tree, another --state, or --force to adopt this state for {tree}"
            " (its repository then publishes only that tree's ports)"
        )


def tree_identity(tree: Path) -> str:
    """What a state records of its tree: the tree's absolute path, symlinks resolved."""
    return str(tree.resolve())


def bind_state(state_dir: Path, tree: Path, *, force: bool = False) -> None:
    """Record ``tree`` as the tree of ``state_dir`` if it has none (or ``force``); raise
    WrongTree if it belongs to another one. The caller holds the state's lock."""
    wanted = tree_identity(tree)
    path = state_dir / BINDING_NAME
    try:
        recorded = path.read_text().strip()
    except FileNotFoundError:
        recorded = ""
    if recorded == wanted:
        return
    if recorded and not force:
        raise WrongTree(state_dir, recorded, wanted)
    state_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(path, f"{wanted}\n".encode(), 0o644)


def default_state(tree: Path) -> Path:
    """The state of ``tree`` when none is named: one per tree under the user's data
    directory, its name the tree's directory name and a digest of its path."""
    identity = tree_identity(tree)
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return base / "portsd" / f"{Path(identity).name or 'root'}-{digest}"
