"""What the ``ports`` subcommands share: finding the tree, the state, the evaluation."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from portsd.config import Config, load_config
from portsd.errors import ConfigError, GitError
from portsd.evaluate import Evaluation
from portsd.gitrepo import DirSnapshot, GitRepo, GitSnapshot
from portsd.tree import Tree, TreeLoader

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


@dataclass(frozen=True, slots=True)
class Opened:
    """A loaded tree, its evaluation, and the commit it is (None: uncommitted changes)."""

    tree: Tree
    evaluation: Evaluation
    commit: str | None
    repo: GitRepo | None


def open_tree(args: argparse.Namespace, config: Config | None, arch: str) -> Opened:
    """Load and evaluate the tree the arguments name, with the recipe cache if ``config``."""
    loader = TreeLoader(config.cache if config else None)
    path: Path = args.tree
    repo = _git_repo(path)
    if args.rev is not None or (repo is not None and repo.workdir is None):
        if repo is None:
            raise GitError(str(path), "not a git repository, so --rev cannot apply")
        tree = loader.load(GitSnapshot(repo, repo.commit(args.rev or "HEAD")))
        commit: str | None = repo.commit(args.rev or "HEAD")
    else:
        if not (path / "ports").is_dir():
            raise _not_a_tree(path)
        tree = loader.load(DirSnapshot(path))
        commit = _clean_head(repo, tree)
    if config is not None:
        config.cache.mkdir(parents=True, exist_ok=True)
        loader.save()
    ports = tree.recipes()
    return Opened(tree, Evaluation.full(tree.inputs(), ports, arch), commit, repo)


def _not_a_tree(path: Path) -> ConfigError:
    error = ConfigError("no ports/ directory here", path=str(path))
    error.hint = "run this in a ports tree, or pass --tree DIR"
    return error


def _git_repo(path: Path) -> GitRepo | None:
    try:
        return GitRepo(path)
    except GitError:
        return None


def _clean_head(repo: GitRepo | None, tree: Tree) -> str | None:
    """HEAD's commit id when the directory's ports, and the paths their path sources
    reference, equal HEAD's, for provenance."""
    if repo is None:
        return None
    try:
        head = repo.commit("HEAD")
        if dict(repo.listing(head).ids) != dict(tree.listing):
            return None
        committed = GitSnapshot(repo, head)
        if any(committed.path_entry(path) != entry for path, entry in tree.paths.items()):
            return None
        return head
    except GitError:
        return None
