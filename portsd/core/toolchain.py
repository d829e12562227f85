"""The toolchain a tree declares (``toolchain.toml``) and the stages that build it.

Pure. A tree may name, in ``toolchain.toml`` beside ``ports/``, the ports every build gets
implicitly. They cannot be built with themselves before they exist, so they are built in
stages: stage 1 on the bootstrap seed alone, stage k+1 on stage k's packages (the
toolchain ports and their runtime closure: the **layer**), over the seed, or, for a
``self-contained`` toolchain, with no seed beneath at all. A stage's key set is an
ordinary ``KeySet`` whose toolchain id covers the layer's content ids and the seed
beneath it (if any), so stage k+1 == stage k in content means stage k+2 would repeat
stage k+1 key for key: the fixed point. The stage that reaches it is the final one;
every port of the tree is built on it. A tree without ``toolchain.toml`` has one stage,
the seed, and keys as before.

While the toolchain is still building, only its ports (and what they need) are planned;
every other port waits for the toolchain. More than ``stages`` stages is an error naming
the ports whose content still differs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import msgpack
import rtoml

from portsd.core.graph import Graph
from portsd.core.keys import Contents, KeySet
from portsd.errors import FileProblem, ToolchainError

TOOLCHAIN_FILE = "toolchain.toml"
DEFAULT_STAGES = 3
MAX_STAGES = 10


@dataclass(frozen=True, slots=True)
class ToolchainSpec:
    """What ``toolchain.toml`` declares: the ports (sorted) and the most stages allowed."""

    ports: tuple[str, ...]
    stages: int = DEFAULT_STAGES
    arch: tuple[str, ...] = ()  # the architectures it is for; empty: every one
    self_contained: bool = False  # from stage 2 on, no seed beneath the stage's packages

    def applies_to(self, arch: str) -> bool:
        return not self.arch or arch in self.arch


def parse_toolchain(text: str, path: str = TOOLCHAIN_FILE) -> ToolchainSpec:
    """``toolchain.toml``'s text as a spec; ``ToolchainError`` names the file and line."""
    try:
        data = rtoml.loads(text)
    except rtoml.TomlParsingError as error:
        first = str(error).splitlines()[0]
        raise ToolchainError(FileProblem(path, f"invalid TOML: {first}")) from None
    lines = text.splitlines()

    def fail(key: str, message: str) -> ToolchainError:
        line = next((n + 1 for n, t in enumerate(lines) if t.split("=")[0].strip() == key), None)
        return ToolchainError(FileProblem(path, message, line))

    for key in data:
        if key not in ("ports", "stages", "arch", "self-contained"):
            raise fail(
                key,
                f"unknown key '{key}' (toolchain.toml has 'ports', 'stages', 'arch' and"
                " 'self-contained')",
            )
    ports = data.get("ports")
    if not isinstance(ports, list) or not ports or not all(isinstance(p, str) for p in ports):
        raise fail("ports", "'ports' must be a non-empty list of port names")
    if len(set(ports)) != len(ports):
        raise fail("ports", "a port is listed twice in 'ports'")
    stages = data.get("stages", DEFAULT_STAGES)
    if type(stages) is not int or not 2 <= stages <= MAX_STAGES:
        # two at least: a fixed point is a stage that reproduces the one before
        raise fail("stages", f"'stages' must be a whole number from 2 to {MAX_STAGES}")
    arch = data.get("arch", [])
    if not isinstance(arch, list) or not all(isinstance(a, str) and a for a in arch):
        raise fail("arch", "'arch' must be a list of architecture names")
    alone = data.get("self-contained", False)
    if not isinstance(alone, bool):
        raise fail("self-contained", "'self-contained' must be true or false")
    return ToolchainSpec(tuple(sorted(ports)), stages, tuple(sorted(set(arch))), alone)


Layer = tuple[tuple[str, str, str], ...]
"""(name, build key, content id) of each package a stage stands on, sorted by name."""


def toolchain_id(seed: str, layer: Layer, self_contained: bool = False) -> str:
    """The toolchain id that enters a stage's keys: the seed's content id alone without a
    layer (so a tree without a toolchain keeps its keys), else a digest of both; for a
    self-contained layer, of the layer alone (no seed is beneath it: two seeds that give
    the same stage 1 give the same keys from stage 2 on)."""
    if not layer:
        return seed
    contents = [[name, content] for name, _, content in layer]
    beneath = None if self_contained else seed
    return hashlib.sha256(msgpack.packb(["portsd-toolchain", beneath, contents])).hexdigest()


@dataclass(frozen=True, slots=True)
class Stage:
    """One stage: its keys (on the toolchain of ``layer``) and the layer it stands on."""

    number: int
    keys: KeySet
    layer: Layer  # empty: the seed alone
    self_contained: bool = False  # the layer has no seed beneath

    @property
    def seed_beneath(self) -> bool:
        """Whether this stage's build roots have the seed beneath their packages."""
        return not (self.self_contained and self.layer)

    def describe(self, spec: ToolchainSpec | None) -> str:
        """``the seed 1a2b3c4d5e6f`` or ``stage 2 of gcc, make, musl``, for humans."""
        if spec is None:
            return f"the seed {self.keys.toolchain[:12]}"
        on = "the seed" if not self.layer else f"stage {self.number - 1}'s packages"
        alone = "" if self.seed_beneath else ", no seed"
        return f"stage {self.number} of {', '.join(spec.ports)} (built on {on}{alone})"


@dataclass(frozen=True, slots=True)
class Stages:
    """The stages of an evaluation, up to the current one; ``converged``: the last one
    reproduced the packages of the one before, and every port is built on it."""

    spec: ToolchainSpec | None
    stages: tuple[Stage, ...]
    converged: bool
    members: frozenset[str]  # the toolchain ports and their runtime closure

    @property
    def current(self) -> Stage:
        return self.stages[-1]

    def scope(self, wanted: Iterable[str] | None) -> list[str] | None:
        """What a plan may cover now: the toolchain's ports until it has converged."""
        if self.converged:
            return None if wanted is None else list(wanted)
        return sorted(self.members)

    def describe(self) -> str:
        """Which toolchain the current keys build on, in one line."""
        text = self.current.describe(self.spec)
        if self.spec is not None:
            text += " (its fixed point)" if self.converged else " (not at its fixed point yet)"
        return text


def compute_stages(
    graph: Graph,
    tree_ids: Mapping[str, str],
    seed: str,
    spec: ToolchainSpec | None,
    contents: Contents,
    previous: Stages | None = None,
    affected: Iterable[str] = (),
) -> Stages:
    """Key every stage that can be keyed now: stage 1 on ``seed``, each next one once the
    toolchain's packages of the one before are all built, until one reproduces the one
    before (converged) or one is still building. ``previous`` (the last evaluation's
    stages) makes each stage incremental where its toolchain id is unchanged."""
    affected = frozenset(affected)
    if spec is not None and not spec.applies_to(graph.arch):
        spec = None  # a toolchain for other architectures: this one builds on the seed
    if spec is None:
        before = previous.stages[0].keys if previous is not None and not previous.members else None
        keys = KeySet.compute(graph, tree_ids, seed, contents, before, affected)
        return Stages(None, (Stage(1, keys, ()),), True, frozenset())
    missing = [name for name in spec.ports if name not in graph]  # broken ones are blocked
    if missing:
        raise ToolchainError(
            FileProblem(
                TOOLCHAIN_FILE, f"'ports' names {', '.join(missing)}: not a port of the tree"
            )
        )
    members = frozenset(graph.runtime_closure(spec.ports))
    old = {s.keys.toolchain: s.keys for s in previous.stages} if previous is not None else {}
    stages: list[Stage] = []
    layer: Layer = ()
    previous_layer: Layer = ()
    for number in range(1, spec.stages + 1):
        toolchain = toolchain_id(seed, layer, spec.self_contained)
        keys = KeySet.compute(
            graph, tree_ids, toolchain, contents, old.get(toolchain), affected, on_seed=not layer
        )
        stages.append(Stage(number, keys, layer, spec.self_contained))
        built = tuple(
            (name, keys.keys[name], keys.contents[name])
            for name in sorted(members)
            if name in keys.contents
        )
        if len(built) < len(members):
            return Stages(spec, tuple(stages), False, members)  # this stage is building
        if layer and [(n, c) for n, _, c in built] == [(n, c) for n, _, c in layer]:
            return Stages(spec, tuple(stages), True, members)
        previous_layer, layer = layer, built
    differ = sorted(
        name for (name, _, c), (_, _, b) in zip(layer, previous_layer, strict=True) if c != b
    )
    raise ToolchainError(
        FileProblem(
            TOOLCHAIN_FILE,
            f"the toolchain reached no fixed point in {spec.stages} stages: "
            f"{', '.join(differ) or 'its packages'} still differ between stages "
            f"{spec.stages - 1} and {spec.stages} (raise 'stages', or make the build "
            "reproducible)",
        )
    )
