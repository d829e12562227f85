"""A toolchain declared by the tree (toolchain.toml): parsed strictly, built in stages up
to its fixed point, everything else built on the final stage; a non-converging one stops
with one line. The real build uses the smallest toolchain that exercises the same paths:
``tinycc``, a compiler wrapper around the seed's cc whose package says what built it, so
stage 1 (built by the seed) differs from stage 2 (built by tinycc) and stage 3 == stage 2."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from portsd.core.evaluate import Evaluation
from portsd.core.explain import Evaluated, explain
from portsd.core.graph import Graph
from portsd.core.keys import KeySet
from portsd.core.plan import stage_one_only, staged_plan
from portsd.core.recipe import Dependency, Recipe, parse_recipe
from portsd.core.toolchain import (
    Stages,
    ToolchainSpec,
    compute_stages,
    parse_toolchain,
    toolchain_id,
)
from portsd.errors import FileProblem, RecipeError, ToolchainError
from tests.test_build import build, ports, published, rebuilt
from tests.test_graph import port

SEED = "5" * 64


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('ports = ["cc"]\nstage = 2\n', "toolchain.toml:2: unknown key 'stage'"),
        ("ports = []\n", "toolchain.toml:1: 'ports' must be a non-empty list of port names"),
        ('ports = ["cc", "cc"]\n', "toolchain.toml:1: a port is listed twice in 'ports'"),
        ('ports = ["cc"]\nstages = 1\n', "toolchain.toml:2: 'stages' must be a whole number"),
        ("ports = [\n", "toolchain.toml: invalid TOML"),
        ('ports = ["cc"]\narch = "x86_64"\n', "toolchain.toml:2: 'arch' must be a list"),
    ],
)
def test_a_wrong_toolchain_file_names_the_file_and_line(text: str, message: str) -> None:
    with pytest.raises(ToolchainError) as raised:
        parse_toolchain(text)
    assert str(raised.value).startswith(message)


def test_a_toolchain_file_is_its_ports_and_a_cap() -> None:
    assert parse_toolchain('ports = ["make", "cc"]\n') == ToolchainSpec(("cc", "make"), 3)
    assert parse_toolchain('ports = ["cc"]\nstages = 5\n').stages == 5
    spec = parse_toolchain('ports = ["cc"]\narch = ["x86_64_musl"]\n')
    assert spec.arch == ("x86_64_musl",) and spec.applies_to("x86_64_musl")
    assert not spec.applies_to("x86_64") and ToolchainSpec(("cc",)).applies_to("x86_64")


def test_a_toolchain_for_another_architecture_leaves_this_one_on_the_seed() -> None:
    """The base system's toolchain (musl, for x86_64_musl) must not make a build for the
    host's architecture bootstrap it: there, every port builds on the seed as before."""
    ports_ = tree()
    graph = Graph.build(ports_, "x86_64")
    ids = {name: f"tree-{name}" for name in ports_}
    other = compute_stages(graph, ids, SEED, ToolchainSpec(("cc",), 3, ("x86_64_musl",)), {})
    seed_only = compute_stages(graph, ids, SEED, None, {})
    assert other.converged and other.current.keys.keys == seed_only.current.keys.keys
    assert other.describe() == f"the seed {SEED[:12]}"
    mine = compute_stages(graph, ids, SEED, ToolchainSpec(("cc",), 3, ("x86_64",)), {})
    assert not mine.converged and "app" not in mine.current.keys.keys


def tree() -> dict[str, Recipe | RecipeError]:
    recipes = [port("cc", depends=("libc",)), port("libc"), port("app", depends=("libc",))]
    return {recipe.name: recipe for recipe in recipes}


def test_stages_run_to_the_fixed_point_and_then_everything_builds_on_it() -> None:
    """Simulated builds: a toolchain port's content depends on the stage that built it
    until stage 2, then repeats; stage 3 == stage 2 is the fixed point."""
    ports_ = tree()
    graph = Graph.build(ports_, "x86_64")
    ids = {name: f"tree-{name}" for name in ports_}
    spec = ToolchainSpec(("cc",), 3)
    contents: dict[str, str] = {}
    stages = compute_stages(graph, ids, SEED, spec, contents)
    assert stages.current.keys.toolchain == SEED and not stages.converged  # stage 1: the seed
    assert stages.scope(None) == ["cc", "libc"]
    while not stages.converged:
        number = stages.current.number
        for name in stages.current.keys.unbuilt & stages.members:
            key = stages.current.keys.keys[name]
            contents[key] = hashlib.sha256(f"{name} of stage {min(number, 2)}".encode()).hexdigest()
        stages = compute_stages(graph, ids, SEED, spec, contents, stages)
    assert stages.current.number == 3 and stages.scope(None) is None
    final = stages.current
    assert final.keys.toolchain == toolchain_id(SEED, final.layer) != SEED
    assert [name for name, _, _ in final.layer] == ["cc", "libc"]  # its runtime closure too
    assert "app" in final.keys.keys  # every port builds on the final stage
    assert stages.describe() == "stage 3 of cc (built on stage 2's packages) (its fixed point)"


def test_a_toolchain_that_never_repeats_itself_stops_at_the_cap() -> None:
    ports_ = tree()
    graph = Graph.build(ports_, "x86_64")
    ids = {name: f"tree-{name}" for name in ports_}
    spec = ToolchainSpec(("cc",), 2)

    class Drifting:  # every build differs: no fixed point
        def get(self, key: str, /) -> str:
            return hashlib.sha256(key.encode()).hexdigest()

    with pytest.raises(ToolchainError) as raised:
        compute_stages(graph, ids, SEED, spec, Drifting())
    assert str(raised.value) == (
        "toolchain.toml: the toolchain reached no fixed point in 2 stages: cc, libc still "
        "differ between stages 1 and 2 (raise 'stages', or make the build reproducible)"
    )


def test_no_toolchain_file_is_the_seed_alone_with_the_keys_of_before() -> None:
    ports_ = tree()
    graph = Graph.build(ports_, "x86_64")
    ids = {name: f"tree-{name}" for name in ports_}
    stages = compute_stages(graph, ids, SEED, None, {})
    assert stages.converged and len(stages.stages) == 1
    assert stages.current.keys.keys == KeySet.compute(graph, ids, SEED, {}).keys
    assert stages.describe() == f"the seed {SEED[:12]}"


TINYCC = """\
name = "tinycc"
version = "1.0"
summary = "A compiler wrapper: the smallest toolchain that builds itself"
license = "MIT"

[build]
style = "custom"
package = '''
mkdir -p "$DESTDIR/usr/bin" "$DESTDIR/usr/share/tinycc"
printf '#!/bin/sh\\nexec cc "$@"\\n' > "$DESTDIR/usr/bin/tcc"
chmod 755 "$DESTDIR/usr/bin/tcc"
if command -v tcc >/dev/null; then by=tinycc; else by=seed; fi
echo "built by $by" > "$DESTDIR/usr/share/tinycc/built-by"
'''
"""

HELLO = """\
name = "hello"
version = "1.0"
summary = "Compiled with the tree's toolchain"
license = "MIT"

[build]
style = "custom"
build = 'printf "int main(void) { return 0; }\\\\n" > m.c && tcc -o m m.c'
package = 'mkdir -p "$DESTDIR/usr/bin" && cp m "$DESTDIR/usr/bin/hello"'
"""


def test_a_tiny_toolchain_reaches_its_fixed_point_and_builds_the_tree(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for name, text in (("tinycc", TINYCC), ("hello", HELLO)):
        (tree / "ports" / name).mkdir(parents=True)
        (tree / "ports" / name / "port.toml").write_text(text)
    (tree / "toolchain.toml").write_text('ports = ["tinycc"]\nstages = 3\n')
    state = tmp_path / "state"
    first = build(tree, state)
    assert "built tinycc" in first.stdout and "built hello" in first.stdout
    graph = ports("graph", "hello", "--tree", tree, "--state", state).stdout
    assert "toolchain: stage 3 of tinycc (built on stage 2's packages) (its fixed point)" in graph
    # stage 1 (by the seed), 2 (by stage 1) and 3 (by stage 2, identical to 2): three builds
    assert first.stdout.count("built tinycc") == 3

    before = published(state)
    recipe = tree / "ports" / "tinycc" / "port.toml"
    recipe.write_text(recipe.read_text() + "# a comment: the same toolchain\n")
    again = build(tree, state)
    assert again.stdout.count("built tinycc") == 3  # every stage's key covers the recipe
    assert "built hello" not in again.stdout  # the fixed point is the same: nothing below
    assert rebuilt(before, published(state)) == {"tinycc"}


def test_a_toolchain_that_cannot_be_built_blocks_the_rest_of_the_tree() -> None:
    broken = RecipeError("libc", [FileProblem("ports/libc/port.toml", "bad")])
    ports_ = tree() | {"libc": broken, "tool": port("tool")}
    ids = {name: f"tree-{name}" for name in ports_}
    evaluation = Evaluation.full(ids, ports_, "x86_64", SEED, {}, ToolchainSpec(("cc",), 3))
    plan = staged_plan(evaluation, set(), None)
    assert plan.builds == () and not plan.pending
    assert (
        str(plan.blocked["app"])
        == "app: dependency libc cannot be built: ports/libc/port.toml: bad"
    )
    assert str(plan.blocked["tool"]) == (
        "tool: dependency cc cannot be built: the tree's toolchain cannot be built"
    )


def bootstrapped() -> dict[str, Recipe | RecipeError]:
    """gcc needs a cross compiler in stage 1 only (``bootstrap-depends``), and gmp always."""
    gcc = replace(port("gcc", depends=("libc",), build=("gmp",)), bootstrap_depends=(dep("cross"),))
    recipes = [gcc, port("cross", build=("gmp",)), port("gmp"), port("libc"), port("app")]
    return {recipe.name: recipe for recipe in recipes}


def dep(text: str) -> Dependency:
    return Dependency.parse(text)


def build_stage(stages: Stages, contents: dict[str, str]) -> None:
    """Simulate the current stage's builds: each port's content says which stage made it,
    until stage 2, then repeats (the fixed point at stage 3)."""
    number = min(stages.current.number, 2)
    for name in stages.current.keys.unbuilt:
        key = stages.current.keys.keys[name]
        contents[key] = hashlib.sha256(f"{name} of stage {number}".encode()).hexdigest()


def test_bootstrap_depends_are_in_stage_1_only() -> None:
    """Stage 1's gcc is keyed (and planned) with the cross compiler, later stages' without:
    their keys are those of a recipe that does not have the key at all."""
    ports_ = bootstrapped()
    graph = Graph.build(ports_, "x86_64_musl")
    ids = {name: f"tree-{name}" for name in ports_}
    spec = ToolchainSpec(("gcc",), 3)
    contents: dict[str, str] = {}
    evaluation = Evaluation.full(ids, ports_, "x86_64_musl", SEED, contents, spec)
    stage1 = evaluation.stages.current.keys
    assert stage1.on_seed and stage1.build_root(graph, "gcc") == ["cross", "gmp", "libc"]
    plan = staged_plan(evaluation, set(), None)
    assert plan.names() == ["gmp", "libc"]  # then cross, then gcc: planned, not pending
    assert plan.pending.keys() == {"app", "cross", "gcc"}
    assert plan.pending["app"] == "gmp" and plan.pending["gcc"] == "gmp"
    stages = evaluation.stages
    while stages.current.number == 1:
        build_stage(stages, contents)
        stages = compute_stages(graph, ids, SEED, spec, contents, stages)
    stage1 = stages.stages[0].keys
    assert "cross" in stage1.contents and "cross" in stage1.build_root(graph, "gcc")
    build_stage(stages, contents)  # stage 2's gmp and libc: gcc's key is known now
    stages = compute_stages(graph, ids, SEED, spec, contents, stages)
    stage2 = stages.current.keys
    assert not stage2.on_seed and stage2.build_root(graph, "gcc") == ["gmp", "libc"]
    gcc = port("gcc", depends=("libc",), build=("gmp",))
    plain = Graph.build(ports_ | {"gcc": gcc}, "x86_64_musl")
    same = KeySet.compute(plain, ids, stage2.toolchain, contents, on_seed=False)
    assert same.keys["gcc"] == stage2.keys["gcc"] != stage1.keys["gcc"]
    evaluation = Evaluation.full(ids, ports_, "x86_64_musl", SEED, contents, spec)
    assert evaluation.stages.current.number == 2
    plan = staged_plan(evaluation, set(contents), None)
    assert plan.names() == ["gcc"]  # no cross compiler again


def test_the_fixed_point_leaves_out_what_only_stage_1_needed() -> None:
    """On the fixed point, the whole tree's plan has no cross compiler, nor what it alone
    needs; a port some other build also needs stays, and asked for by name, all are built."""
    gcc = replace(
        port("gcc", depends=("libc",), build=("gmp",)),
        bootstrap_depends=(dep("cross"), dep("libc")),  # libc: gcc's runtime need as well
    )
    ports_ = bootstrapped() | {
        "gcc": gcc,
        "cross": port("cross", build=("gmp", "sysroot")),
        "sysroot": port("sysroot"),  # cross's alone
    }
    graph = Graph.build(ports_, "x86_64_musl")
    assert graph.bootstrap_only() == {"cross", "sysroot"}
    assert graph.bootstrap_only(keep={"cross"}) == set()
    ids = {name: f"tree-{name}" for name in ports_}
    spec = ToolchainSpec(("gcc",), 3)
    contents: dict[str, str] = {}
    stages = compute_stages(graph, ids, SEED, spec, contents)
    while not stages.converged:
        build_stage(stages, contents)
        stages = compute_stages(graph, ids, SEED, spec, contents, stages)
    assert stages.stages[0].keys.build_root(graph, "cross") == ["gmp", "sysroot"]
    evaluation = Evaluation.full(ids, ports_, "x86_64_musl", SEED, contents, spec)
    assert evaluation.stages.converged and evaluation.stages.current.number == 3
    plan = staged_plan(evaluation, set(), None)
    assert sorted(plan.names()) == ["app", "gcc", "gmp", "libc"]
    assert not plan.pending and not plan.blocked
    # sysroot's package unknown on the fixed point: cross's key waits for it, and neither
    # is planned nor pending
    del contents[evaluation.keys.keys["sysroot"]]
    waiting = Evaluation.full(ids, ports_, "x86_64_musl", SEED, contents, spec)
    assert waiting.keys.pending.keys() == {"cross"}
    plan = staged_plan(waiting, set(), None)
    assert sorted(plan.names()) == ["app", "gcc", "gmp", "libc"]
    assert dict(plan.pending) == {} and len(plan.pending) == 0
    asked = staged_plan(waiting, set(), ["cross"])
    assert asked.names() == ["gmp", "sysroot"] and asked.pending == {"cross": "sysroot"}
    unused = stage_one_only(evaluation)
    assert unused == {"cross", "sysroot"}
    now = Evaluated("HEAD", graph, evaluation.keys, ids)
    [verdict] = explain("cross", None, now, {}, set(), unused).lines()
    assert verdict.startswith("cross is not built for the tree (key ") and verdict.endswith(
        "only stage 1 of the toolchain needs it (bootstrap-depends); `ports build cross` builds it"
    )
    assert explain("app", None, now, {}, set(), unused).lines()[0].startswith("app must be built")


def test_without_a_toolchain_every_build_is_on_the_seed_with_its_bootstrap_depends() -> None:
    ports_ = bootstrapped()
    graph = Graph.build(ports_, "x86_64")
    ids = {name: f"tree-{name}" for name in ports_}
    musl_only = ToolchainSpec(("gcc",), 3, ("x86_64_musl",))
    for spec in (None, musl_only):
        keys = compute_stages(graph, ids, SEED, spec, {}).current.keys
        assert keys.on_seed and keys.build_root(graph, "gcc") == ["cross", "gmp", "libc"]


def test_a_recipe_without_bootstrap_depends_keeps_its_key_on_every_stage() -> None:
    """The key vector of a recipe without the key does not change: ``on_seed`` only drops
    edges that exist."""
    ports_ = tree()
    graph = Graph.build(ports_, "x86_64")
    ids = {name: f"tree-{name}" for name in ports_}
    contents = {
        key: hashlib.sha256(key.encode()).hexdigest()
        for key in KeySet.compute(graph, ids, SEED, {}).keys.values()
    }
    contents |= {
        key: hashlib.sha256(key.encode()).hexdigest()
        for key in KeySet.compute(graph, ids, SEED, contents).keys.values()
    }
    on_seed = KeySet.compute(graph, ids, SEED, contents)
    on_stage = KeySet.compute(graph, ids, SEED, contents, on_seed=False)
    assert on_seed.keys == on_stage.keys and len(on_seed.keys) == 3


def test_an_unknown_bootstrap_dependency_is_the_error_of_build_depends() -> None:
    gcc = replace(port("gcc"), bootstrap_depends=(dep("nowhere"),))
    graph = Graph.build({"gcc": gcc}, "x86_64")
    assert str(graph.problem("gcc")) == (
        "gcc: bootstrap-depends 'nowhere' is not provided by any port"
    )
    text = 'name = "gcc"\nversion = "1"\nsummary = "s"\nlicense = "MIT"\nbootstrap-depends = [1]\n'
    with pytest.raises(RecipeError) as raised:
        parse_recipe(text, "ports/gcc/port.toml", "gcc")
    assert str(raised.value).endswith(
        "ports/gcc/port.toml:5: 'bootstrap-depends' must be a list of strings"
    )
    parsed = parse_recipe(text.replace("[1]", '["cross>=1"]'), "ports/gcc/port.toml", "gcc")
    assert parsed.bootstrap_depends == (dep("cross>=1"),) and parsed.build_depends == ()


BOOT = """\
name = "boot"
version = "1.0"
summary = "A shell and four tools with their libraries: a toolchain that needs no seed"
license = "MIT"
bootstrap-depends = ["probe"]

[build]
package = '''
if [ -e /usr/share/probe/here ]; then echo "with $(cat /usr/share/probe/here)"; fi
for f in /usr/bin/dash /usr/bin/sh /usr/bin/cat /usr/bin/chmod /usr/bin/cp /usr/bin/mkdir \\
    /usr/lib/x86_64-linux-gnu/libc.so.6 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \\
    /usr/lib64/ld-linux-x86-64.so.2 /usr/lib/portsd-seed/libselinux.so.1 \\
    /usr/lib/portsd-seed/libacl.so.1 /usr/lib/portsd-seed/libattr.so.1 \\
    /usr/lib/portsd-seed/libpcre2-8.so.0; do
  mkdir -p "$DESTDIR${f%/*}"
  cp -P "$f" "$DESTDIR$f"
done
'''
"""
"""Stage 1 copies these files from the seed; stage 2, with no seed, from stage 1's
package, at the same paths: the same content, so stage 2 is the fixed point."""

PROBE = """\
name = "probe"
version = "1.0"
summary = "What boot needs in stage 1 only"
license = "MIT"

[build]
package = 'mkdir -p "$DESTDIR/usr/share/probe" && echo here > "$DESTDIR/usr/share/probe/here"'
"""

LOOK = """\
name = "look"
version = "1.0"
summary = "Lists what its build root has"
license = "MIT"

[build]
build = '''
for f in /usr/bin/*; do echo "tool: ${f##*/}"; done
'''
package = 'mkdir -p "$DESTDIR/usr/share/look" && echo seen > "$DESTDIR/usr/share/look/seen"'
"""


def write_tree(tree: Path, toolchain: str, recipes: dict[str, str]) -> None:
    for name, text in recipes.items():
        (tree / "ports" / name).mkdir(parents=True)
        (tree / "ports" / name / "port.toml").write_text(text)
    (tree / "toolchain.toml").write_text(toolchain)


def test_a_self_contained_toolchain_builds_from_stage_2_on_with_no_seed(tmp_path: Path) -> None:
    """Stage 1 of ``boot`` stands on the seed (with its bootstrap dependency ``probe``);
    stage 2 and everything built on it stand on stage 1's packages alone: no seed file
    is in their build roots, and a build that needs a seed tool fails saying why."""
    tree = tmp_path / "tree"
    write_tree(
        tree,
        'ports = ["boot"]\nstages = 3\nself-contained = true\n',
        {"boot": BOOT, "probe": PROBE, "look": LOOK},
    )
    state = tmp_path / "state"
    first = build(tree, state)
    assert first.stdout.count("built boot") == 2  # stage 2 reproduces stage 1
    # probe: for stage 1's boot only; the final stage, which nothing of needs it, leaves it
    assert first.stdout.count("built probe") == 1 and "built look" in first.stdout
    graph = ports("graph", "look", "--tree", tree, "--state", state).stdout
    assert (
        "toolchain: stage 2 of boot (built on stage 1's packages, no seed) (its fixed point)"
        in graph
    )
    assert "build root (0)" in ports("graph", "boot", "--tree", tree, "--state", state).stdout
    log = next((state / "logs" / "look").glob("*.log")).read_text()
    tools = {line[len("tool: ") :] for line in log.splitlines() if line.startswith("tool: ")}
    assert tools == {"dash", "sh", "cat", "chmod", "cp", "mkdir"}  # no gcc, no make, no tar
    boots = [log.read_text().splitlines() for log in (state / "logs" / "boot").glob("*.log")]
    assert sorted("with here" in lines for lines in boots) == [False, True]  # stage 1's only

    gcc = 'name = "cc-user"\nversion = "1"\nsummary = "s"\nlicense = "MIT"\n'
    gcc += "[build]\nbuild = 'gcc --version'\n"
    (tree / "ports" / "cc-user").mkdir()
    (tree / "ports" / "cc-user" / "port.toml").write_text(gcc)
    failed = build(tree, state, "cc-user", check=False)
    assert failed.returncode != 0
    assert (
        "cc-user: build failed (exit 127 (command not found): this build root has nothing of"
        " the seed or the host: only packages (a self-contained toolchain's"
        in " ".join(failed.stdout.split())
    )


def test_a_self_contained_toolchain_without_a_shell_fails_in_one_line(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    write_tree(tree, 'ports = ["probe"]\nself-contained = true\n', {"probe": PROBE, "look": LOOK})
    state = tmp_path / "state"
    result = build(tree, state, check=False)
    assert result.returncode != 0 and result.stdout.count("built probe") == 1  # stage 1
    assert (
        "probe: prepare failed (the build root has no /bin/sh: the toolchain is self-contained"
        " (toolchain.toml), so one of its ports must provide the shell, as busybox does)"
        in " ".join(result.stdout.split())
    )


def test_a_self_contained_toolchain_leaves_the_seed_out_of_its_later_keys() -> None:
    """From stage 2 on nothing of the seed is in a build root, so nothing of it is in the
    keys: two seeds whose stage 1 comes out the same give the same stage 2. A toolchain
    with the seed beneath has other keys (its roots differ)."""
    assert parse_toolchain('ports = ["cc"]\nself-contained = true\n').self_contained
    with pytest.raises(ToolchainError) as raised:
        parse_toolchain('ports = ["cc"]\nself-contained = "yes"\n')
    assert str(raised.value) == "toolchain.toml:2: 'self-contained' must be true or false"
    ports_ = tree()
    graph = Graph.build(ports_, "x86_64")
    ids = {name: f"tree-{name}" for name in ports_}
    alone, beneath = ToolchainSpec(("cc",), 3, (), True), ToolchainSpec(("cc",), 3)
    found = {}
    for seed, spec in ((SEED, alone), ("6" * 64, alone), (SEED, beneath)):
        contents: dict[str, str] = {}
        stages = compute_stages(graph, ids, seed, spec, contents)
        while stages.current.number < 2:
            for name in stages.current.keys.unbuilt:  # stage 1 makes the same content
                contents[stages.current.keys.keys[name]] = hashlib.sha256(name.encode()).hexdigest()
            stages = compute_stages(graph, ids, seed, spec, contents, stages)
        assert stages.current.seed_beneath is not spec.self_contained
        found[seed, spec.self_contained] = stages.current.keys.keys
    assert found[SEED, True] == found["6" * 64, True] != found[SEED, False]
    assert "libc" in found[SEED, True]


def test_the_client_builds_the_toolchain_stages_itself(tmp_path: Path) -> None:
    """``ports install --tree`` with no cache: the toolchain's three stages, then the port
    on the final one, the same builds ``ports build`` makes."""
    tree = tmp_path / "tree"
    write_tree(tree, 'ports = ["tinycc"]\n', {"tinycc": TINYCC, "hello": HELLO})
    root = tmp_path / "root"
    root.mkdir()
    result = ports("install", "hello", "--root", root, "--tree", tree)
    assert result.stdout.count("building tinycc from source") == 3
    assert "building hello from source" in result.stdout
    assert (root / "usr" / "bin" / "hello").is_file()
    state = tmp_path / "state"
    build(tree, state, "hello")  # a build host's: the same stages, the same key
    assert published(state)["hello"] in ports("info", "hello", "--root", root).stdout

    (tree / "ports" / "tinycc" / "port.toml").write_text(
        TINYCC.replace('version = "1.0"', "version = 1")
    )
    other = tmp_path / "other"
    other.mkdir()
    broken = ports("install", "hello", "--root", other, "--tree", tree, check=False)
    assert broken.returncode == 1
    assert "error: the tree's toolchain (toolchain.toml) cannot be built: ports/tinycc" in (
        broken.stderr
    )


def test_lint_names_bootstrap_depends_no_build_uses(tmp_path: Path) -> None:
    """With a toolchain, only stage 1 stands on the seed, and it builds the toolchain and
    what that needs: another port's bootstrap-depends are dead, and lint says so."""
    tree = tmp_path / "tree"
    idle = LOOK.replace('license = "MIT"\n', 'license = "MIT"\nbootstrap-depends = ["probe"]\n')
    write_tree(tree, 'ports = ["boot"]\n', {"boot": BOOT, "probe": PROBE, "look": idle})
    result = ports("lint", "--tree", tree, check=False)
    assert result.returncode == 1
    assert (
        "ports/look/port.toml:5: look is not built in stage 1 of the toolchain (toolchain.toml),"
        " so its bootstrap-depends are never used" in " ".join(result.stdout.split())
    )
    (tree / "toolchain.toml").unlink()  # every build on the seed: they count
    assert "no problems" in ports("lint", "--tree", tree).stdout


@settings(max_examples=40, deadline=None)
@given(
    on_seed=st.booleans(),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c", "d", "e"]),
            st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=2, unique=True),
            st.lists(st.sampled_from(["a", "b", "c", "d", "e"]), max_size=2, unique=True),
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_incremental_keys_with_bootstrap_depends_equal_a_full_evaluation(
    on_seed: bool, edits: list[tuple[str, list[str], list[str]]]
) -> None:
    """Recipes gain and lose build and bootstrap dependencies one commit at a time, every
    build done in between: on the seed or on a stage, the incremental keys are a full
    evaluation's, and on a stage no key depends on a bootstrap dependency."""
    ports: dict[str, Recipe] = {n: port(n) for n in "abcde"}
    graph = Graph.build(ports, "x86_64")
    tree_ids = {name: f"tree-{name}" for name in ports}
    contents: dict[str, str] = {}

    def settle(keys: KeySet | None, affected: frozenset[str] = frozenset()) -> KeySet:
        keys = KeySet.compute(graph, tree_ids, SEED, contents, keys, affected, on_seed)
        while keys.unbuilt:
            for name in keys.unbuilt:
                contents[keys.keys[name]] = hashlib.sha256(keys.keys[name].encode()).hexdigest()
            keys = KeySet.compute(graph, tree_ids, SEED, contents, keys, (), on_seed)
        return keys

    keys = settle(None)
    for step, (name, build_deps, bootstrap) in enumerate(edits):
        recipe = replace(
            port(name, build=tuple(d for d in build_deps if d != name)),
            bootstrap_depends=tuple(dep(d) for d in bootstrap if d != name),
        )
        ports[name] = recipe
        tree_ids[name] = f"tree-{name}-{step}"
        graph, affected = graph.updated({name: recipe})
        # before anything is rebuilt: the same keys, and the same ports waiting for the same
        keys = KeySet.compute(graph, tree_ids, SEED, contents, keys, affected, on_seed)
        fresh = KeySet.compute(graph, tree_ids, SEED, contents, on_seed=on_seed)
        assert keys.keys == fresh.keys and dict(keys.pending) == dict(fresh.pending)
        keys = settle(keys)
        full = KeySet.compute(graph, tree_ids, SEED, contents, on_seed=on_seed)
        assert keys.keys == full.keys and keys.contents == full.contents
        assert {n: str(p) for n, p in keys.blocked.items()} == {
            n: str(p) for n, p in full.blocked.items()
        }
        if not on_seed:  # the same keys as with every bootstrap-depends removed
            plain = {n: replace(r, bootstrap_depends=()) for n, r in ports.items()}
            plain_keys = KeySet.compute(
                Graph.build(plain, "x86_64"), tree_ids, SEED, contents, on_seed=False
            )
            assert plain_keys.keys.keys() <= keys.keys.keys() | full.blocked.keys()
            assert {n: k for n, k in plain_keys.keys.items() if n in keys.keys} == {
                n: keys.keys[n] for n in plain_keys.keys if n in keys.keys
            }


SEES = """\
name = "sees"
version = "1.0"
summary = "Records the tools of its build root"
license = "MIT"
build-depends = ["mark"]

[build]
package = '''
mkdir -p "$DESTDIR/usr/share/sees"
for f in /usr/bin/*; do echo "tool: ${f##*/}"; done > "$DESTDIR/usr/share/sees/tools"
cat "$DESTDIR/usr/share/sees/tools"
'''
"""

MARK = """\
name = "mark"
version = "1.0"
summary = "One file, whatever builds it"
license = "MIT"

[build]
package = 'mkdir -p "$DESTDIR/usr/share/mark" && echo marked > "$DESTDIR/usr/share/mark/file"'
"""


def test_ports_build_on_an_installed_root_uses_that_root_alone(tmp_path: Path) -> None:
    """``ports build --on-root R``: the root's /usr is the whole build root (its shell and
    tools; no seed, no package laid over it), and each package is compared with the one
    installed in R: ``mark`` comes out identical, ``sees`` has the same files with other
    bytes (it lists its build root's tools). A port whose build dependency R lacks is
    refused in one line, before anything is built."""
    tree = tmp_path / "tree"
    write_tree(tree, "", {"boot": BOOT, "probe": PROBE, "mark": MARK, "sees": SEES})
    (tree / "toolchain.toml").unlink()  # boot is installed as a port, built on the seed
    root = tmp_path / "root"
    root.mkdir()
    ports("install", "boot", "mark", "sees", "--root", root, "--tree", tree)
    installed = (root / "usr/share/sees/tools").read_text()
    assert "tool: gcc" in installed  # built on the seed

    state = tmp_path / "state"
    on = ports("build", "mark", "sees", "--tree", tree, "--state", state, "--on-root", root)
    said = " ".join(on.stdout.split())
    assert f"built mark on {root}" in said and "identical to the installed package" in said
    assert "the installed package's files, 1 with other bytes" in said
    shown = json.loads(
        ports(
            "build", "sees", "--tree", tree, "--state", state, "--on-root", root, "--json"
        ).stdout
    )  # fmt: skip
    assert [(r["port"], r["same_files"], r["identical"]) for r in shown] == [("sees", True, False)]
    assert shown[0]["differ"] == ["usr/share/sees/tools"] and shown[0]["files"] == 4
    log = next((state / "logs" / "sees").glob("on-root-*.log")).read_text()
    tools = {line[len("tool: ") :] for line in log.splitlines() if line.startswith("tool: ")}
    assert tools == {"dash", "sh", "cat", "chmod", "cp", "mkdir"}  # the root's, nothing else
    assert not (state / "repo").exists() and not (state / "keys").exists()  # nothing published

    # one port's failure is its line; the others are still built, and the status says it
    cc = 'name = "cc-user"\nversion = "1"\nsummary = "s"\nlicense = "MIT"\n'
    (tree / "ports" / "cc-user").mkdir()
    (tree / "ports" / "cc-user" / "port.toml").write_text(cc + "[build]\nbuild = 'gcc --version'\n")
    both = ports(
        "build", "cc-user", "mark", "--tree", tree, "--state", state, "--on-root", root, "--json",
        check=False,
    )  # fmt: skip
    assert both.returncode == 1
    failed, marked = json.loads(both.stdout)
    assert failed["port"] == "cc-user"
    assert "build failed (exit 127 (command not found): " in failed["error"]
    assert "or the root of --on-root" in failed["error"]
    assert marked["port"] == "mark" and marked["identical"]
    alone = ports("build", "--tree", tree, "--state", state, "--json", check=False)
    assert "error: --json goes with --on-root" in alone.stderr

    bare = tmp_path / "bare"
    bare.mkdir()
    ports("install", "boot", "--root", bare, "--tree", tree)
    refused = ports(
        "build", "sees", "--tree", tree, "--state", state, "--on-root", bare, check=False
    )
    assert refused.returncode != 0
    assert f"error: sees: {bare} lacks what it builds with: mark" in " ".join(
        refused.stderr.split()
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    shell = ports(
        "build", "mark", "--tree", tree, "--state", state, "--on-root", empty, check=False
    )
    assert f"error: {empty}: no /usr/bin/sh to run the build steps" in shell.stderr
    # the tree's toolchain is in every build root, so the root must hold it too
    (tree / "toolchain.toml").write_text('ports = ["boot", "mark"]\n')
    lacking = ports(
        "build", "probe", "--tree", tree, "--state", state, "--on-root", bare, check=False
    )
    assert f"error: probe: {bare} lacks what it builds with: mark" in " ".join(
        lacking.stderr.split()
    )
