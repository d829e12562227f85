"""The layers hold, checked two ways: by reading every module's imports (relative ones
included), and, for the pure modules, by importing each in a fresh interpreter and
looking at what got loaded, which also sees package ``__init__`` side effects and what
the libraries they use import in turn.

Floors, lowest first. A module imports from its own floor and the floors below, never
from a floor above:

    0  ground   the top-level modules (errors, fsio, config, gcpause, ...)
    1  core     pure: values in, values out
    2  tree, pkg
    3  build
    4  daemon (with daemon.server), client, cluster
    5  cli

Edge rules (EDGES) cut across the floors. Every rule is also shown failing on a planted
violation in a small fake package, so a checker that sees nothing cannot pass.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "portsd"

GROUND = 0
FLOORS = {
    "core": 1,
    "tree": 2,
    "pkg": 2,
    "build": 3,
    "daemon": 4,
    "client": 4,
    "cluster": 4,
    "cli": 5,
}
"""The floor of each subpackage; a top-level module is on the ground floor."""

PURE = ("core", "errors")
"""Modules with no I/O: these packages and modules, and everything below them."""
PURE_IMPORTS = {
    "__future__",
    "abc",
    "bisect",
    "collections",
    "dataclasses",
    "enum",
    "functools",
    "hashlib",
    "heapq",
    "itertools",
    "math",
    "operator",
    "re",
    "typing",
    # serialisation and compression of values in memory
    "msgpack",
    "rtoml",
    "zstandard",
}
PURE_FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval", "__import__", "breakpoint"}
LOADED_FORBIDDEN = (
    "aiohttp",
    "asyncio",
    "concurrent",
    "cryptography",
    "fcntl",
    "http",
    "jinja2",
    "logging",
    "multiprocessing",
    "pygit2",
    "rich",
    "selectors",
    "shutil",
    "signal",
    "socket",
    "sqlite3",
    "ssl",
    "subprocess",
    "tempfile",
    "threading",
    "urllib.request",
    "watchdog",
    "zeroconf",
)
"""What importing a pure module must not load: files, network, processes, threads, clocks
of an event loop (``time`` and ``pathlib`` are loaded by every interpreter's start-up)."""

SPAWNING = (
    "subprocess",
    "asyncio.subprocess",
    "asyncio.create_subprocess_exec",
    "asyncio.create_subprocess_shell",
    "os.system",
    "os.popen",
    "os.posix_spawn",
    "os.posix_spawnp",
    "os.fork",
    "os.forkpty",
    "os.execv",
    "os.execve",
    "os.execvp",
    "os.execvpe",
    "pty",
)
"""Ways to start a child process: every one goes through build/run.py."""


@dataclass(frozen=True, slots=True)
class Apart:
    """No module under ``importer`` imports anything under ``imported``."""

    importer: str
    imported: str
    why: str


@dataclass(frozen=True, slots=True)
class Confined:
    """Only the ``owners`` (modules, or packages with everything below) use ``names``."""

    names: tuple[str, ...]
    owners: tuple[str, ...]
    why: str


EDGES = (
    Apart("daemon", "client", "the two ends of the wire share only pkg and core"),
    Apart("client", "daemon", "the two ends of the wire share only pkg and core"),
    Apart("cluster", "daemon", "workers talk to the daemon over HTTP, never through its code"),
    Apart("client", "cluster", "an installer needs no cluster"),
    Confined(("rich",), ("cli",), "only the command line draws on a terminal"),
    Confined(
        SPAWNING,
        ("build.run", "build.reaper"),
        "one wrapper (and its reaper) starts every child process",
    ),
    Confined(
        ("pygit2",),
        ("tree.gitrepo", "daemon.initrepo"),
        "git is read in tree.gitrepo; daemon.initrepo creates the bare repository",
    ),
)


@dataclass(frozen=True, slots=True)
class Use:
    """A dotted name a module imports or reaches through an imported module
    (``portsd.core.recipe.Recipe``, ``os.system``), and the line it is on."""

    name: str
    line: int


@dataclass(frozen=True, slots=True)
class Module:
    """One module of a package as read: what it imports and reaches, and what it calls."""

    name: str
    """Relative to the package: ``core.recipe``; the package itself is ``""``."""
    path: Path
    uses: tuple[Use, ...]
    calls: frozenset[str]
    """Builtins called by name (``open(...)``)."""


def scan(root: Path) -> list[Module]:
    """Every module of the package in directory ``root``, with what it uses."""
    paths: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    known = {qualified(root.name, name) for name in paths}
    return [read_module(root.name, name, path, known) for name, path in paths.items()]


def qualified(package: str, name: str) -> str:
    return f"{package}.{name}" if name else package


def read_module(package: str, name: str, path: Path, known: set[str]) -> Module:
    tree = ast.parse(path.read_text(), str(path))
    here = qualified(package, name)
    if path.name != "__init__.py":
        here = here.rpartition(".")[0]
    bound: dict[str, str] = {}  # a local name -> the module an ``import`` bound it to
    uses: set[Use] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                uses.add(Use(alias.name, node.lineno))
                local = alias.asname or alias.name.partition(".")[0]
                bound[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                full = f"{base}.{alias.name}"
                inside = base == package or base.startswith(f"{package}.")
                uses.add(
                    Use(
                        base if alias.name == "*" or (inside and full not in known) else full,
                        node.lineno,
                    )
                )
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id in bound:
                uses.add(Use(f"{bound[node.value.id]}.{node.attr}", node.lineno))
    calls = frozenset(
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    )
    return Module(name, path, tuple(sorted(uses, key=lambda u: (u.line, u.name))), calls)


def under(name: str, prefix: str) -> bool:
    """Whether dotted ``name`` is ``prefix`` or below it."""
    return name == prefix or name.startswith(f"{prefix}.")


def floor_of(root: Path, name: str) -> int | None:
    """The floor of a module named relative to the package; None if it is on none."""
    top = name.partition(".")[0]
    if top in FLOORS:
        return FLOORS[top]
    if not name or (root / f"{top}.py").is_file():
        return GROUND
    return None


def floor_name(floor: int) -> str:
    """``3 (build)``: a floor's number and what is on it."""
    names = [name for name, n in FLOORS.items() if n == floor] or ["ground"]
    return f"{floor} ({', '.join(names)})"


def violations(root: Path, module: Module) -> list[str]:
    """Every rule ``module`` breaks, one line each, naming its file and line."""
    package = root.name
    where = module.path.relative_to(root.parent)
    found: list[str] = []
    floor = floor_of(root, module.name)
    if floor is None:
        found.append(f"{where}: {module.name} is on no floor (give its package one in FLOORS)")
    pure = any(under(module.name, p) for p in PURE)
    for use in module.uses:
        at = f"{where}:{use.line}: {module.name or package} uses {use.name}"
        ours = under(use.name, package)
        target = use.name.removeprefix(package).removeprefix(".") if ours else None
        if target is not None and floor is not None:
            target_floor = floor_of(root, target)
            if target_floor is not None and target_floor > floor:
                found.append(
                    f"{at}: floor {floor_name(target_floor)} is above floor {floor_name(floor)}"
                )
        for edge in EDGES:
            if isinstance(edge, Apart):
                if under(module.name, edge.importer) and target and under(target, edge.imported):
                    found.append(
                        f"{at}: {edge.importer} never imports {edge.imported} ({edge.why})"
                    )
            elif any(under(use.name, n) for n in edge.names) and not any(
                under(module.name, owner) for owner in edge.owners
            ):
                found.append(f"{at}: only {', '.join(edge.owners)} may ({edge.why})")
        if pure:
            if target is None and use.name.partition(".")[0] not in PURE_IMPORTS:
                found.append(f"{at}: a pure module imports only {sorted(PURE_IMPORTS)}")
            elif target and not any(under(target, p) for p in PURE):
                found.append(f"{at}, which is not pure")
    if pure and module.calls & PURE_FORBIDDEN_CALLS:
        found.append(
            f"{where}: pure {module.name} calls {sorted(module.calls & PURE_FORBIDDEN_CALLS)}"
        )
    return found


def loaded_forbidden(root: Path, name: str) -> list[str]:
    """The LOADED_FORBIDDEN modules a fresh interpreter holds after importing module
    ``name`` of the package at ``root`` (and nothing else)."""
    code = (
        f"import sys; sys.path.insert(0, {str(root.parent)!r}); "
        f"__import__({qualified(root.name, name)!r}); print('\\n'.join(sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    return sorted(m for m in loaded if any(under(m, f) for f in LOADED_FORBIDDEN))


# -- portsd itself -------------------------------------------------------------------------

MODULES = scan(PACKAGE)


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.name or "portsd")
def test_module_keeps_to_its_floor_and_the_edge_rules(module: Module) -> None:
    assert violations(PACKAGE, module) == []


@pytest.mark.parametrize("name", [m.name for m in MODULES if any(under(m.name, p) for p in PURE)])
def test_importing_a_pure_module_loads_nothing_forbidden(name: str) -> None:
    assert loaded_forbidden(PACKAGE, name) == []


def test_the_pure_modules_are_found() -> None:
    pure = {m.name for m in MODULES if any(under(m.name, p) for p in PURE)}
    assert {"errors", "core", "core.recipe", "core.graph", "core.keys", "core.index"} <= pure


# -- each rule, failing on a planted violation ----------------------------------------------


def plant(tmp_path: Path, files: dict[str, str]) -> Path:
    """A fake ``portsd`` package in tmp_path: ``files`` (relative path -> text), with an
    empty ``__init__.py`` in every directory that lacks one."""
    root = tmp_path / "portsd"
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for directory in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        if not (directory / "__init__.py").exists():
            (directory / "__init__.py").write_text("")
    return root


def planted_violations(root: Path) -> list[str]:
    return [line for module in scan(root) for line in violations(root, module)]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        pytest.param(
            {"core/plan.py": "from ..build import run\n", "build/run.py": ""},
            "portsd/core/plan.py:1: core.plan uses portsd.build.run: "
            "floor 3 (build) is above floor 1 (core)",
            id="relative-import-up-a-floor",
        ),
        pytest.param(
            {"tree/a.py": "import portsd.cli\n"},
            "portsd/tree/a.py:1: tree.a uses portsd.cli: "
            "floor 5 (cli) is above floor 2 (tree, pkg)",
            id="absolute-import-up-a-floor",
        ),
        pytest.param(
            {"fsio.py": "\n\nfrom portsd.pkg import repo\n", "pkg/repo.py": ""},
            "portsd/fsio.py:3: fsio uses portsd.pkg.repo: "
            "floor 2 (tree, pkg) is above floor 0 (ground)",
            id="ground-imports-up",
        ),
        pytest.param(
            {"extra/a.py": ""},
            "portsd/extra/a.py: extra.a is on no floor",
            id="no-floor",
        ),
        pytest.param(
            {
                "daemon/server/api.py": "from portsd.client import session\n",
                "client/session.py": "",
            },
            "portsd/daemon/server/api.py:1: daemon.server.api uses portsd.client.session: "
            "daemon never imports client",
            id="server-imports-client",
        ),
        pytest.param(
            {"client/obtain.py": "from ..daemon import state\n", "daemon/state.py": ""},
            "client.obtain uses portsd.daemon.state: client never imports daemon",
            id="client-imports-daemon",
        ),
        pytest.param(
            {"pkg/a.py": "from rich.console import Console\n"},
            "portsd/pkg/a.py:1: pkg.a uses rich.console.Console: only cli may",
            id="rich-outside-cli",
        ),
        pytest.param(
            {"build/sandbox.py": "import subprocess\n"},
            "build.sandbox uses subprocess: only build.run, build.reaper may",
            id="subprocess-outside-run",
        ),
        pytest.param(
            {"daemon/x.py": "import os\n\nos.system('true')\n"},
            "portsd/daemon/x.py:3: daemon.x uses os.system: only build.run, build.reaper may",
            id="os-system-outside-run",
        ),
        pytest.param(
            {"client/x.py": "from asyncio import create_subprocess_exec as spawn\n"},
            "client.x uses asyncio.create_subprocess_exec: only build.run, build.reaper may",
            id="asyncio-spawn-outside-run",
        ),
        pytest.param(
            {"build/a.py": "import pygit2 as git\n"},
            "build.a uses pygit2: only tree.gitrepo, daemon.initrepo may",
            id="pygit2-outside-git-modules",
        ),
        pytest.param(
            {"core/a.py": "import os\n"},
            "portsd/core/a.py:1: core.a uses os: a pure module imports only",
            id="pure-imports-os",
        ),
        pytest.param(
            {"core/a.py": "from .. import fsio\n", "fsio.py": ""},
            "portsd/core/a.py:1: core.a uses portsd.fsio, which is not pure",
            id="pure-imports-impure-ground",
        ),
        pytest.param(
            {"errors.py": "def f() -> None:\n    print(open('x').read())\n"},
            "portsd/errors.py: pure errors calls ['open', 'print']",
            id="pure-calls-open",
        ),
    ],
)
def test_planted_violation_is_reported(
    tmp_path: Path, files: dict[str, str], expected: str
) -> None:
    reported = planted_violations(plant(tmp_path, files))
    assert any(expected in line for line in reported), reported


def test_a_clean_planted_package_reports_nothing(tmp_path: Path) -> None:
    root = plant(
        tmp_path,
        {
            "errors.py": "from dataclasses import dataclass\n",
            "core/a.py": "from .. import errors\nfrom . import b\n",
            "core/b.py": "import re\n",
            "build/run.py": "import subprocess\n",
            "cli/main.py": "from rich.console import Console\nfrom ..build import run\n",
        },
    )
    assert planted_violations(root) == []
    assert loaded_forbidden(root, "core.a") == []


def test_runtime_check_sees_a_package_init_side_effect(tmp_path: Path) -> None:
    root = plant(tmp_path, {"core/__init__.py": "import sqlite3\n", "core/a.py": "x = 1\n"})
    a = next(m for m in scan(root) if m.name == "core.a")
    assert violations(root, a) == []  # invisible when reading core/a.py alone
    assert "sqlite3" in loaded_forbidden(root, "core.a")


def test_runtime_check_sees_what_an_import_chain_loads(tmp_path: Path) -> None:
    root = plant(tmp_path, {"core/a.py": "from . import b\n", "core/b.py": "import threading\n"})
    assert loaded_forbidden(root, "core.a") == ["threading"]


# -- the map -------------------------------------------------------------------------------


def map_entry(module: Module) -> str:
    """How the map names a module: ``core/recipe.py``, or ``daemon/server/`` for a package."""
    if module.path.name == "__init__.py":
        return module.name.replace(".", "/") + "/"
    return module.path.relative_to(PACKAGE).as_posix()


def test_every_module_is_on_the_architecture_map() -> None:
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"(?<![\w/.])(?:\w+/)*(?:\w+\.py|\w+/)", text))
    assert [map_entry(m) for m in MODULES if m.name and map_entry(m) not in named] == []
