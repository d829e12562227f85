"""``ports lint``, ``ports graph`` and ``ports why``: looking at a tree without building it."""

from __future__ import annotations

import argparse
import difflib
import platform

from rich.console import Console
from rich.markup import escape
from rich.tree import Tree as RichTree

from portsd.cli.workspace import config_from, open_tree
from portsd.config import Config
from portsd.core.evaluate import Evaluation
from portsd.core.explain import Evaluated, Touch, explain
from portsd.core.graph import Graph
from portsd.core.plan import stage_one_only
from portsd.core.recipe import Dependency
from portsd.errors import (
    ConfigError,
    DependencyCycle,
    GitError,
    MissingDependency,
    RecipeError,
    RepoError,
)
from portsd.pkg.repo import Repository, StoredContents
from portsd.pkg.sign import PublicKey
from portsd.tree.gitrepo import GitRepo, GitSnapshot, TreeSnapshot
from portsd.tree.loader import TreeLoader


def lint(args: argparse.Namespace, console: Console) -> int:
    """Print every problem of every port; exit 1 if there is any."""
    opened = open_tree(args, None, args.arch or platform.machine())
    graph = opened.evaluation.graph
    count, ports = 0, 0
    cycles: set[frozenset[str]] = set()
    for _name, problem in graph.problems():
        if isinstance(problem, RecipeError):
            lines = [str(p) for p in problem.problems]
        elif isinstance(problem, DependencyCycle):
            if frozenset(problem.cycle) in cycles:
                continue  # each port on it reports it: say it once
            cycles.add(frozenset(problem.cycle))
            first, then = problem.cycle[0], problem.cycle[1 % len(problem.cycle)]
            lines = [f"{_where(opened.tree.snapshot, first, then)}: {problem}"]
        elif isinstance(problem, MissingDependency):
            where = _where(opened.tree.snapshot, problem.port, problem.dependency)
            lines = [f"{where}: {problem}"]
        else:
            lines = [str(problem)]
        ports += 1
        for line in lines:
            count += 1
            console.print(f"[red]{escape(line)}[/]")
    for line in _unused_bootstraps(opened.evaluation, opened.tree.snapshot):
        ports += 1
        count += 1
        console.print(f"[red]{escape(line)}[/]")
    total = len(opened.tree.listing)
    if count:
        console.print(f"{total} ports checked: {count} problem(s) in {ports} port(s)")
        return 1
    console.print(f"{total} ports checked: no problems")
    return 0


def _unused_bootstraps(evaluation: Evaluation, snapshot: TreeSnapshot) -> list[str]:
    """Where a tree's toolchain applies, only stage 1 builds on the seed, and it builds only
    the toolchain and what that needs: ``bootstrap-depends`` of any other port are dead."""
    stages, graph = evaluation.stages, evaluation.graph
    if stages.spec is None:
        return []  # every build stands on the seed: every bootstrap-depends counts
    stage1 = graph.dependency_closure(stages.members, on_seed=True)
    found = []
    for name in sorted(set(graph.names()) - stage1):
        recipe = graph.recipe(name)
        if recipe is not None and recipe.bootstrap_depends:
            where = _where(snapshot, name, str(recipe.bootstrap_depends[0]))
            found.append(
                f"{where}: {name} is not built in stage 1 of the toolchain (toolchain.toml),"
                " so its bootstrap-depends are never used"
            )
    return found


def _where(snapshot: TreeSnapshot, port: str, dependency: str) -> str:
    """``ports/PORT/port.toml:LINE``: the line of the recipe naming ``dependency`` (its
    name, for a versioned one), or the file alone when no line does."""
    path = f"ports/{port}/port.toml"
    try:
        text = snapshot.read_port(port).recipe.decode("utf-8", errors="replace")
    except RecipeError:
        return path
    name = Dependency.parse(dependency).name
    for number, line in enumerate(text.splitlines(), 1):
        if f'"{dependency}"' in line or f'"{name}' in line:
            return f"{path}:{number}"
    return path


def graph(args: argparse.Namespace, console: Console) -> int:
    """What NAME needs (to build and to run) and what needs it."""
    config = config_from(args)
    opened = open_tree(args, config, config.arch)
    g = opened.evaluation.graph
    name = known_port(g, args.name)
    if args.dot:
        console.print(_dot(g, name), highlight=False, markup=False, soft_wrap=True)
        return 0
    recipe = g.recipe(name)
    key = opened.evaluation.keys.key(name)
    version = recipe.full_version if recipe else "?"
    console.print(f"[bold]{name}[/] {version}" + (f"  [dim]key {key[:12]}[/]" if key else ""))
    waits = opened.evaluation.keys.pending.get(name)
    if waits is not None:
        console.print(f"[yellow]pending:[/] its key needs the package of {waits} (build it first)")
    problem = g.problem(name) or opened.evaluation.keys.blocked.get(name)
    if problem is not None:
        console.print(f"[red]cannot be built:[/] {escape(str(problem).splitlines()[0])}")
    needs = RichTree("[bold]needs[/]")
    _grow(g, name, needs, set())
    console.print(needs)
    root = opened.evaluation.keys.build_root(g, name) if recipe else []
    console.print(f"[bold]build root[/] ({len(root)}): {', '.join(root) or '-'}")
    stages = opened.evaluation.stages
    if stages.spec is None:
        toolchain = opened.evaluation.keys.toolchain
        console.print(f"[bold]toolchain[/]: the seed {toolchain[:12]} [dim](ports seed)[/]")
    else:
        console.print(f"[bold]toolchain[/]: {escape(stages.describe())}")
    direct = sorted(g.dependents(name))
    rest = sorted(g.reverse_closure([name]) - set(direct) - {name})
    kinds = {d: ", ".join(e.kind.value for e in g.edges(d) if e.target == name) for d in direct}
    console.print(
        f"[bold]needed by[/] ({len(direct)}): "
        + (", ".join(f"{d} ({kinds[d]})" for d in direct) or "-")
    )
    if rest:
        console.print(f"[bold]and transitively[/] ({len(rest)}): {', '.join(rest)}")
    return 0


def _grow(g: Graph, name: str, node: RichTree, shown: set[str]) -> None:
    for edge in g.edges(name):
        wanted = str(edge.dependency)
        how = edge.kind.value if wanted == edge.target else f"{edge.kind.value}: {escape(wanted)}"
        label = f"{edge.target} [dim]({how})[/]"
        if edge.target in shown:
            node.add(label + " [dim]...[/]")
            continue
        shown.add(edge.target)
        _grow(g, edge.target, node.add(label), shown)


def _dot(g: Graph, name: str) -> str:
    """Graphviz of what ``name`` needs and what needs it; dashed: build/check edges."""
    nodes = g.dependency_closure([name]) | g.reverse_closure([name])
    lines = ["digraph ports {", "  rankdir=BT;", f'  "{name}" [style=bold];']
    for source in sorted(nodes):
        for edge in g.edges(source):
            if edge.target in nodes:
                style = "" if edge.kind.value == "depends" else " [style=dashed]"
                lines.append(f'  "{source}" -> "{edge.target}"{style};')
    lines.append("}")
    return "\n".join(lines)


def why(args: argparse.Namespace, console: Console) -> int:
    """Explain why NAME must be (re)built since an earlier revision."""
    config = config_from(args)
    opened = open_tree(args, config, config.arch)
    name = known_port(opened.evaluation.graph, args.name)
    if opened.repo is None:
        raise GitError(str(args.tree), "'ports why' needs the tree's git history")
    repo = opened.repo
    present = _stored_keys(config)
    since = args.since or _published_commit(config) or _parent_of(repo, opened.commit or "HEAD")
    old: Evaluated | None = None
    touches: dict[str, list[Touch]] = {}
    if since is not None:
        since_commit = repo.commit(since)
        old_tree = TreeLoader(config.cache).load(GitSnapshot(repo, since_commit))
        old_eval = Evaluation.full(
            old_tree.inputs(),
            old_tree.recipes(),
            config.arch,
            opened.evaluation.seed,
            StoredContents(Repository(config.repo, config.arch, None)),
            old_tree.toolchain(),
        )
        old = Evaluated(since_commit, old_eval.graph, old_eval.keys, old_tree.inputs())
        closure = opened.evaluation.graph.dependency_closure([name])
        until = opened.commit or repo.commit("HEAD")
        for change in repo.history(closure, since=since_commit, until=until):
            touches.setdefault(change.port, []).append(
                Touch(change.commit, change.summary, change.files)
            )
    current = opened.commit or "working directory"
    new = Evaluated(current, opened.evaluation.graph, opened.evaluation.keys, opened.tree.inputs())
    unused = stage_one_only(opened.evaluation)
    explanation = explain(name, old, new, touches, present, unused)
    for line in explanation.lines():
        console.print(escape(line))
    console.print(escape(f"  built on {opened.evaluation.stages.describe()}"))
    if (
        opened.commit is None
        and old is not None
        and old.tree_ids.get(name) != new.tree_ids.get(name)
    ):
        console.print("  [dim](the working directory has uncommitted changes to its inputs)[/]")
    return 0


def known_port(g: Graph, name: str) -> str:
    """``name`` if the tree has such a port; otherwise an error suggesting close names."""
    if name in g:
        return name
    close = difflib.get_close_matches(name, list(g.names()), n=3)
    error = ConfigError(f"no port named '{name}'")
    error.hint = f"did you mean: {', '.join(close)}?" if close else None
    raise error


def _stored_keys(config: Config) -> frozenset[str]:
    try:
        return _reader(config).stored_keys()
    except (RepoError, ConfigError, OSError):
        return frozenset()


def _published_commit(config: Config) -> str | None:
    try:
        return _reader(config).index().commit
    except (RepoError, ConfigError, OSError):
        return None


def _reader(config: Config) -> Repository:
    return Repository.reader(config.repo, config.arch, [PublicKey.load(config.public_key)])


def _parent_of(repo: GitRepo, revision: str) -> str | None:
    try:
        return repo.commit(f"{revision}~1")
    except GitError:
        return None
