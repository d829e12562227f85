"""The pure core stays pure: no file, network, subprocess, clock or thread in its imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "portsd"
CORE = [
    "core/version",
    "core/recipe",
    "core/provider",
    "core/metadata",
    "core/graph",
    "core/keys",
    "core/plan",
    "core/evaluate",
    "core/explain",
    "core/index",
    "core/resolve",
    "errors",
]
# Serialisation and hashing of values in memory; nothing that reaches outside the process.
ALLOWED = {
    "__future__",
    "abc",
    "ast",
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
    "msgpack",
    "rtoml",
    "zstandard",
}
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval", "__import__"}


def imported_modules(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", CORE)
def test_core_module_imports_only_pure_things(module: str) -> None:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    for name in imported_modules(tree):
        top = name.split(".")[0]
        if top == "portsd":
            assert "/".join(name.split(".")[1:]) in CORE, f"{module} imports the edge module {name}"
        else:
            assert top in ALLOWED, f"{module} imports {name}"
    calls = {
        node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not calls & FORBIDDEN_CALLS, f"{module} calls {calls & FORBIDDEN_CALLS}"
