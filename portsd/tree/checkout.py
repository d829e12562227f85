"""A ports tree opened for building: a git repository at a revision, or a plain directory,
loaded (recipes cached by tree id) and evaluated (graph and build keys).

``ports build`` and the client's source builds share it; the daemon follows a branch itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from portsd.core.evaluate import Evaluation
from portsd.core.keys import Contents
from portsd.errors import ConfigError, GitError
from portsd.tree.gitrepo import DirSnapshot, GitRepo, GitSnapshot
from portsd.tree.loader import Tree, TreeLoader


@dataclass(frozen=True, slots=True)
class Checkout:
    """A loaded tree, its evaluation, and the commit it is (None: uncommitted changes)."""

    tree: Tree
    evaluation: Evaluation
    commit: str | None
    repo: GitRepo | None


def open_checkout(
    path: Path, rev: str | None, cache: Path | None, arch: str, toolchain: str, contents: Contents
) -> Checkout:
    """Load and evaluate the ports tree at ``path``: a git repository at ``rev`` (bare
    repositories default to HEAD), else the directory as it is. ``cache``: where parsed
    recipes are kept between runs (by git tree id), None for none; ``toolchain``: the
    content id builds stand on (the seed's); ``contents``: the content ids of the packages
    built so far (a repository's, an index's), which the keys of their dependents contain."""
    loader = TreeLoader(cache)
    repo = _git_repo(path)
    if rev is not None or (repo is not None and repo.workdir is None):
        if repo is None:
            raise GitError(str(path), "not a git repository, so a revision cannot apply")
        commit: str | None = repo.commit(rev or "HEAD")
        assert commit is not None
        tree = loader.load(GitSnapshot(repo, commit))
    else:
        if not (path / "ports").is_dir():
            raise _not_a_tree(path)
        tree = loader.load(DirSnapshot(path))
        commit = _clean_head(repo, tree)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        loader.save()
    ports = tree.recipes()
    evaluation = Evaluation.full(tree.inputs(), ports, arch, toolchain, contents, tree.toolchain())
    return Checkout(tree, evaluation, commit, repo)


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
