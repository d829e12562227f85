"""The ports tree at one commit (or in one directory), its recipes parsed once per version.

A ``TreeLoader`` turns a snapshot (``gitrepo.GitSnapshot``: a commit read from git objects;
``gitrepo.DirSnapshot``: a plain directory hashed as git would) into a ``Tree``: every
``ports/<name>/`` with its tree id, mapped to its ``Recipe`` or to the ``RecipeError`` that
explains why it has none (a broken port never stops the rest of the tree loading). Parsed
recipes are kept in a ``RecipeCache`` keyed by (name, tree id), so loading the next commit
parses only the ports whose directories changed, and with a cache directory a restarted
process starts warm.

A port with ``path`` sources (files of the repository outside ports/) is keyed on more
than its directory: ``Tree.inputs()`` gives each port the id its build key covers, the
tree id for most, a combined id (``combined_id``) of the tree id and the git ids of the
referenced paths for those. The cache remembers which (name, tree id) keys have path
sources, so finding those few ports costs nothing per port of the tree.

Costs on a 30,000-port tree (bench/tree.py has the numbers): a cold load reads and parses
every recipe, in a pool of processes when there are many; a warm load lists the tree ids
and reads one cache file, decoding each recipe only when it is first used.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
from array import array
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from itertools import accumulate
from pathlib import Path
from typing import Any

import msgpack

from portsd.core import recipe as recipe_module
from portsd.core import version as version_module
from portsd.core.evaluate import changes_between
from portsd.core.recipe import (
    BuildSpec,
    BuildStyle,
    Dependency,
    Recipe,
    Source,
    parse_recipe,
    source_line,
)
from portsd.core.toolchain import TOOLCHAIN_FILE, ToolchainSpec, parse_toolchain
from portsd.errors import FileProblem, GitError, RecipeError, ToolchainError
from portsd.fsio import write_atomic
from portsd.gcpause import paused_gc
from portsd.tree.gitrepo import (
    PORTS_DIR,
    RECIPE_FILE,
    SUBMODULE_MODE,
    DirSnapshot,
    FileMode,
    GitSnapshot,
    PathEntry,
    PortFiles,
    TreeSnapshot,
)

Port = Recipe | RecipeError
Key = tuple[str, str]
"""A cache key: the port's name and the tree id of its directory."""


# -- the recipe cache --------------------------------------------------------------------

CACHE_FORMAT = 3
"""2: path sources, and the keys of the recipes that have them; 3: bootstrap-depends, and
allow-missing-sonames (which format 2 lost)"""
CACHE_FILE = "recipes.msgpack"
_MAGIC = "portsd-recipe-cache"
_RECIPE, _ERROR = 1, 0


def _code_stamp() -> str:
    """Identifies the parser a cache was written by: its format and the parsing code, so
    an upgraded or edited parser never reuses recipes its predecessor validated."""
    digest = hashlib.sha256(b"%d" % CACHE_FORMAT)
    for module in (recipe_module, version_module):
        try:
            digest.update(Path(module.__file__ or "").read_bytes())
        except OSError:
            digest.update(module.__name__.encode())
    return digest.hexdigest()


def encode_port(port: Port) -> bytes:
    """A compact msgpack encoding of a parse result (see ``RecipeCache``)."""
    if isinstance(port, RecipeError):
        problems = [[p.path, p.message, p.line] for p in port.problems]
        return msgpack.packb([_ERROR, port.port, problems])
    build = port.build
    return msgpack.packb(
        [
            _RECIPE,
            port.name,
            port.version,
            port.release,
            port.summary,
            port.license,
            port.homepage,
            None if port.arch == ("any",) else list(port.arch),
            *([str(dep) for dep in deps] for deps in _dependency_lists(port)),
            [[s.filename, s.url, s.file, s.sha256, s.path] for s in port.sources],
            [
                build.style.value,
                list(build.configure_args),
                build.dir,
                build.prepare,
                build.build,
                build.check,
                build.package,
                list(build.allow_missing_sonames),
            ],
        ]
    )


def _has_paths(port: Port) -> bool:
    return isinstance(port, Recipe) and any(s.path is not None for s in port.sources)


def _dependency_lists(port: Recipe) -> tuple[tuple[Dependency, ...], ...]:
    return (
        port.depends,
        port.build_depends,
        port.check_depends,
        port.bootstrap_depends,
        port.provides,
        port.conflicts,
    )


class _Decoder:
    """Turns encoded recipes back into values, sharing equal dependencies and build specs
    between recipes: most of a tree depends on the same few ports."""

    def __init__(self) -> None:
        self.dependencies: dict[str, Dependency] = {}
        self.builds: dict[tuple[Any, ...], BuildSpec] = {}
        self.styles = {style.value: style for style in BuildStyle}

    def dependency_list(self, texts: Sequence[str]) -> tuple[Dependency, ...]:
        known = self.dependencies
        result = []
        for text in texts:
            dep = known.get(text)
            if dep is None:
                dep = known[text] = Dependency.parse(text)
            result.append(dep)
        return tuple(result)

    def decode(self, data: bytes | memoryview) -> Port:
        fields = msgpack.unpackb(data, use_list=False)
        if fields[0] == _ERROR:
            return RecipeError(fields[1], [FileProblem(*problem) for problem in fields[2]])
        (_, name, version, release, summary, license_, homepage, arch) = fields[:8]
        depends, build_depends, check_depends, bootstrap, provides, conflicts = fields[8:14]
        sources, build = fields[14:]
        spec = self.builds.get(build)
        if spec is None:
            style, args, directory, prepare, steps, check, package, allowed = build
            spec = self.builds[build] = BuildSpec(
                self.styles[style], args, directory, prepare, steps, check, package, allowed
            )
        listed = self.dependency_list  # most lists are empty: skip the call for those
        return Recipe(
            name,
            version,
            release,
            summary,
            license_,
            homepage,
            arch or ("any",),
            listed(depends) if depends else (),
            listed(build_depends) if build_depends else (),
            listed(check_depends) if check_depends else (),
            listed(provides) if provides else (),
            listed(conflicts) if conflicts else (),
            tuple([Source(*source) for source in sources]),
            spec,
            listed(bootstrap) if bootstrap else (),
        )


class RecipeCache:
    """Parse results keyed by (port name, tree id of the port directory).

    The tree id covers every file of the directory; the name is in the key because a
    recipe must match its directory's name. Entries read from ``path`` (or produced by
    worker processes) stay encoded until first asked for. ``save`` writes the entries
    used since this cache was created (all of them, if none were), so the file follows
    the tree instead of growing with its history.

    ``path_keys`` are the keys whose recipes have ``path`` sources, known without decoding
    anything: a tree's few such ports are found without looking at the others.

    The file is one msgpack array, column by column so that a warm start reads it with a
    handful of large copies instead of 90,000 small objects::

        [magic, stamp, names joined by NUL, tree ids (20 bytes each),
         end offsets (uint32 each), encoded entries back to back,
         [[name, tree id] of each entry with path sources]]
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._values: dict[Key, Port] = {}
        self._encoded: dict[Key, bytes] = {}  # from worker processes
        self._stored: dict[Key, int] = {}  # index into the file's columns
        self._ends: Sequence[int] = ()
        self._entries = memoryview(b"")
        self._used: set[Key] = set()
        self._with_paths: set[Key] = set()
        self._decoder = _Decoder()
        self._stamp = _code_stamp()
        if path is not None:
            self._read(path)

    def __len__(self) -> int:
        return len(self._values.keys() | self._encoded.keys() | self._stored.keys())

    def __contains__(self, key: object) -> bool:
        return key in self._stored or key in self._values or key in self._encoded

    def _read(self, path: Path) -> None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        try:
            magic, stamp, names, tree_ids, ends, entries, with_paths = msgpack.unpackb(data)
            if magic != _MAGIC or stamp != self._stamp:
                return
            path_keys = {(name, tree_id) for name, tree_id in with_paths}
            hexed = tree_ids.hex()
            ids = [hexed[i : i + 40] for i in range(0, len(hexed), 40)]
            keys = zip(names.split("\0") if ids else [], ids, strict=True)
            stored = dict(zip(keys, range(len(tree_ids) // 20), strict=True))
            ends = memoryview(ends).cast("I")
        except (ValueError, TypeError, msgpack.UnpackException):
            return  # a damaged cache is only a slower start
        if len(ends) != len(stored) or (ends and ends[-1] != len(entries)):
            return
        if not path_keys <= stored.keys():
            return
        self._stored, self._ends, self._entries = stored, ends, memoryview(entries)
        self._with_paths = path_keys

    def _load(self, key: Key) -> bytes | memoryview | None:
        index = self._stored.get(key)
        if index is None:
            return self._encoded.get(key)
        return self._entries[self._ends[index - 1] if index else 0 : self._ends[index]]

    def get(self, key: Key) -> Port | None:
        value = self._values.get(key)
        if value is None:
            encoded = self._load(key)
            if encoded is None:
                return None
            value = self._values[key] = self._decoder.decode(encoded)
        self._used.add(key)
        return value

    def put(self, key: Key, value: Port) -> None:
        self._values[key] = value
        self._used.add(key)
        if _has_paths(value):
            self._with_paths.add(key)
        else:
            self._with_paths.discard(key)

    def put_encoded(self, key: Key, data: bytes, has_paths: bool) -> None:
        """Store an ``encode_port`` result; ``has_paths``: whether it has path sources."""
        self._encoded[key] = data
        self._values.pop(key, None)
        self._used.add(key)
        if has_paths:
            self._with_paths.add(key)
        else:
            self._with_paths.discard(key)

    def path_keys(self) -> frozenset[Key]:
        """The keys, among all this cache holds, whose recipes have ``path`` sources."""
        return frozenset(self._with_paths)

    def missing(self, keys: Sequence[Key]) -> list[Key]:
        """The ``keys`` not in the cache; all of them count as used from now on."""
        self._used.update(keys)
        stored, values, encoded = self._stored, self._values, self._encoded
        return [
            key for key in keys if key not in stored and key not in values and key not in encoded
        ]

    def save(self) -> None:
        """Write the cache file atomically (no-op without a path)."""
        if self.path is None:
            return
        keys = sorted(
            self._used or self._stored.keys() | self._values.keys() | self._encoded.keys()
        )
        entries: list[bytes | memoryview] = []
        for key in keys:
            data = self._load(key)
            entries.append(data if data is not None else encode_port(self._values[key]))
        ends = array("I", accumulate(len(entry) for entry in entries))
        payload = msgpack.packb(
            [
                _MAGIC,
                self._stamp,
                "\0".join(name for name, _ in keys),
                bytes.fromhex("".join(tree_id for _, tree_id in keys)),
                ends.tobytes(),
                b"".join(entries),
                [list(key) for key in keys if key in self._with_paths],
            ]
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, payload)


# -- loading -----------------------------------------------------------------------------


class _Ports(Mapping[str, Port]):
    """A tree's ports, decoded from the cache as they are looked up; ``broken`` are the
    ports whose recipes parse but whose ``path`` sources this tree cannot provide."""

    __slots__ = ("_listing", "_cache", "_broken")

    def __init__(
        self, listing: Mapping[str, str], cache: RecipeCache, broken: Mapping[str, RecipeError]
    ) -> None:
        self._listing = listing
        self._cache = cache
        self._broken = broken

    def __getitem__(self, name: str) -> Port:
        broken = self._broken
        if broken and name in broken:
            return broken[name]
        port = self._cache.get((name, self._listing[name]))
        assert port is not None, "the loader parses every port before the tree is returned"
        return port

    def __iter__(self) -> Iterator[str]:
        return iter(self._listing)

    def __len__(self) -> int:
        return len(self._listing)


def combined_id(tree_id: str, paths: Sequence[tuple[str, PathEntry | None]]) -> str:
    """The id a port with ``path`` sources is keyed on: a sha1 over its directory's tree
    id and, in recipe order, each referenced path with its git mode and object id (or
    "missing"). It changes exactly when the directory or the content at a path does."""
    digest = hashlib.sha1(b"portsd-inputs 1\n%s\n" % tree_id.encode())
    for path, entry in paths:
        state = b"%o %s" % (entry.mode, entry.id.encode()) if entry is not None else b"missing"
        digest.update(b"%s\0%s\n" % (path.encode(), state))
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Tree:
    """A loaded ports tree: tree ids and recipes (or why not) of every port directory.

    ``input_ids`` is what ``inputs()`` returns; ``combined`` holds the ports with ``path``
    sources (name -> combined id) and ``paths`` what this tree holds at each path they
    reference (None: nothing). ``changes`` is set on a tree loaded with
    ``TreeLoader.advance``: the ports whose inputs differ from the tree it advanced from,
    their directories or their referenced paths (name -> input id, None if removed).
    """

    snapshot: TreeSnapshot
    listing: Mapping[str, str]
    ports: Mapping[str, Port]
    input_ids: Mapping[str, str]
    combined: Mapping[str, str]
    paths: Mapping[str, PathEntry | None]
    changes: Mapping[str, str | None] | None = None

    def inputs(self) -> Mapping[str, str]:
        """Port name -> the id its build key covers: the tree id of ``ports/<name>/``, or
        for a port with ``path`` sources its combined id (``combined_id``). Evaluate with
        this, never with ``listing``, or edits to referenced paths go unnoticed."""
        return self.input_ids

    def recipes(self) -> dict[str, Port]:
        """Every port decoded at once, as a full evaluation needs them: faster than one by
        one, since the cyclic collector is kept out of the ~10 allocations per recipe."""
        with paused_gc():
            return dict(self.ports)

    def changed_ports(self) -> dict[str, Port | None]:
        """``changes`` with each port's new recipe, as ``Evaluation.advance`` takes them
        (with ``inputs()``)."""
        if self.changes is None:
            raise ValueError("this tree was not loaded with TreeLoader.advance")
        return {n: self.ports[n] if t is not None else None for n, t in self.changes.items()}

    def changed_inputs(self, previous: Tree) -> dict[str, Port | None]:
        """The ports whose inputs differ from ``previous`` (any tree, of any snapshot), with
        their recipes (None: removed), for ``Evaluation.advance``. O(ports); a tree from
        ``TreeLoader.advance`` has them at hand in ``changed_ports``."""
        changes = changes_between(previous.inputs(), self.inputs())
        return {n: self.ports[n] if t is not None else None for n, t in changes.items()}

    def toolchain(self) -> ToolchainSpec | None:
        """What ``toolchain.toml`` declares (None: no such file); ``ToolchainError`` if it
        is wrong."""
        data = self.snapshot.read_file(TOOLCHAIN_FILE)
        if data is None:
            return None
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise ToolchainError(FileProblem(TOOLCHAIN_FILE, "not UTF-8 text")) from None
        return parse_toolchain(text)

    def export_port(self, name: str, dest: Path) -> None:
        """Write the files of ``ports/<name>/`` into ``dest`` for a build."""
        self.snapshot.export_port(name, dest)

    def export_paths(self, name: str, dest: Path) -> dict[str, Path]:
        """Write each ``path`` source of the port into ``dest/<filename>`` (``dest`` is
        created) and return filename -> where it is: exactly the content its key covers."""
        port = self.ports[name]
        if isinstance(port, RecipeError):
            raise port
        exported: dict[str, Path] = {}
        for source in port.sources:
            if source.path is not None:
                dest.mkdir(parents=True, exist_ok=True)
                target = exported[source.filename] = dest / source.filename
                self.snapshot.export_path(source.path, target)
        return exported


def parse_ports(snapshot: TreeSnapshot, names: Sequence[str]) -> list[Port]:
    """Read and parse ports of ``snapshot``; problems come back as ``RecipeError`` values."""
    # All reads, then all parses: interleaved, libgit2 and the parser evict each other
    # from the CPU caches and the whole takes a third longer.
    contents: list[PortFiles | RecipeError] = []
    for name in names:
        try:
            contents.append(snapshot.read_port(name))
        except RecipeError as error:
            contents.append(error)
    parsed: list[Port] = []
    for name, files in zip(names, contents, strict=True):
        if isinstance(files, RecipeError):
            parsed.append(files)
            continue
        try:
            path = f"{PORTS_DIR}/{name}/{RECIPE_FILE}"
            parsed.append(parse_recipe(files.recipe, path, name, files.files))
        except RecipeError as error:
            parsed.append(error)
    return parsed


def _parse_batch(snapshot: TreeSnapshot, names: Sequence[str]) -> list[tuple[bytes, bool]]:
    """Worker process: parse ports and return them encoded (cheaper to ship than objects),
    each with whether it has path sources."""
    with paused_gc():
        return [(encode_port(port), _has_paths(port)) for port in parse_ports(snapshot, names)]


def _path_problems(
    snapshot: TreeSnapshot, name: str, recipe: Recipe, found: Mapping[str, PathEntry | None]
) -> list[FileProblem]:
    """What is wrong with the port's ``path`` sources in this tree: each path that holds
    nothing, a symlink or a submodule, at the line of its source. The messages depend on
    nothing but the port's inputs, so an incremental evaluation keeps them right."""
    problems: list[tuple[int, str]] = []
    for number, source in enumerate(recipe.sources, start=1):
        if source.path is None:
            continue
        entry = found[source.path]
        if entry is None:
            why = "does not exist in the tree (git would not record it there)"
        elif entry.mode == FileMode.SYMLINK:
            why = "is a symlink (name the file or directory it points to)"
        elif entry.mode == SUBMODULE_MODE:
            why = "is a submodule (its files are not in this repository)"
        else:
            continue
        problems.append((number, f"source #{number}: path '{source.path}' {why}"))
    if not problems:
        return []
    file = f"{PORTS_DIR}/{name}/{RECIPE_FILE}"
    try:
        text = snapshot.read_port(name).recipe.decode()
    except (RecipeError, GitError, UnicodeDecodeError):
        text = ""  # it parsed a moment ago; without its text, only the line is lost
    return [FileProblem(file, message, source_line(text, n, "path")) for n, message in problems]


class TreeLoader:
    """Loads ports trees, parsing each (port name, directory tree id) only once.

    ``parses`` counts the recipes parsed on this loader's behalf, by it or its worker
    processes (``parsed_by_workers`` counts those alone): the cache's misses. With
    ``cache_dir``, ``save`` persists the parsed recipes so that a new process starts warm.
    When more than ``parallel_threshold`` recipes need parsing, ``workers`` processes share
    the work (forked, so only when no other thread runs). Not thread-safe: one thread at a
    time per loader.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        workers: int | None = None,
        parallel_threshold: int = 4000,
    ) -> None:
        path = Path(cache_dir) / CACHE_FILE if cache_dir is not None else None
        self.cache = RecipeCache(path)
        self.workers = workers if workers is not None else (os.cpu_count() or 1)
        self.parallel_threshold = parallel_threshold
        self.parses = 0
        self.parsed_by_workers = 0

    def load(self, snapshot: TreeSnapshot) -> Tree:
        """Every port of ``snapshot`` with its recipe; ``GitError`` if the tree is unreadable."""
        listing = snapshot.listing()
        self._parse_missing(snapshot, listing)
        return self._tree(snapshot, listing)

    def load_git(self, repository: str | os.PathLike[str], revision: str = "HEAD") -> Tree:
        return self.load(GitSnapshot.open(repository, revision))

    def load_dir(self, root: str | os.PathLike[str]) -> Tree:
        return self.load(DirSnapshot(root))

    def advance(self, tree: Tree, revision: str) -> Tree:
        """The tree at ``revision`` of the same repository, found from what differs from
        ``tree``: only the changed ports are listed and parsed."""
        if not isinstance(tree.snapshot, GitSnapshot):
            raise TypeError("advance needs a tree loaded from git")
        snapshot, moved = tree.snapshot.at(revision)
        listing = snapshot.listing()
        changed = {name: tree_id for name, tree_id in moved.items() if tree_id is not None}
        self._parse_missing(snapshot, changed)
        new = self._tree(snapshot, listing)
        # Edited or removed directories, then the ports whose referenced paths changed
        # while their directories did not.
        changes = {name: new.input_ids.get(name) for name in moved}
        for name, input_id in new.combined.items():
            if tree.input_ids.get(name) != input_id:
                changes[name] = input_id
        return replace(new, changes=changes)

    def save(self) -> None:
        """Persist the recipe cache (atomically); a no-op without a cache directory."""
        self.cache.save()

    def _tree(self, snapshot: TreeSnapshot, listing: Mapping[str, str]) -> Tree:
        """The tree of a listing whose ports are all parsed: for the few ports with path
        sources (known from the cache, without decoding the others), their combined ids
        and, where a path is not usable, a ``RecipeError`` in place of the recipe."""
        cache = self.cache
        combined: dict[str, str] = {}
        broken: dict[str, RecipeError] = {}
        paths: dict[str, PathEntry | None] = {}
        for name, tree_id in sorted(cache.path_keys()):
            if listing.get(name) != tree_id:
                continue  # another version of the port, from another commit
            recipe = cache.get((name, tree_id))
            assert isinstance(recipe, Recipe), "only parsed recipes have path sources"
            for path in recipe.source_paths:
                if path not in paths:
                    paths[path] = snapshot.path_entry(path)
            found = [(path, paths[path]) for path in recipe.source_paths]
            combined[name] = combined_id(tree_id, found)
            problems = _path_problems(snapshot, name, recipe, dict(found))
            if problems:
                broken[name] = RecipeError(name, problems)
        inputs: Mapping[str, str] = listing
        if combined:
            inputs = dict(listing)  # a copy of a dict is a memcpy: cheap even at 30,000
            inputs.update(combined)
        ports = _Ports(listing, cache, broken)
        return Tree(snapshot, listing, ports, inputs, combined, paths)

    def _parse_missing(self, snapshot: TreeSnapshot, names: Mapping[str, str]) -> None:
        cache = self.cache
        keys = list(names.items())
        missing = cache.missing(keys)
        if not missing:
            return
        self.parses += len(missing)
        with paused_gc():
            # Forking while other threads run (the daemon loads on a worker thread) could
            # copy a lock held by one of them into the child, libgit2's included, and hang
            # it; forkserver and spawn would re-import the caller's main module. So a pool
            # only from a single-threaded process; a cold start happens once per cache.
            parallel = self.workers > 1 and len(missing) >= self.parallel_threshold
            if parallel and threading.active_count() == 1:
                self._parse_in_pool(snapshot, missing)
            else:
                ports = parse_ports(snapshot, [name for name, _ in missing])
                for key, port in zip(missing, ports, strict=True):
                    cache.put(key, port)

    def _parse_in_pool(self, snapshot: TreeSnapshot, missing: list[Key]) -> None:
        # This process parses one share itself while the workers parse the others: their
        # results must be shipped back and decoded, which costs about a fifth of a parse.
        shares = [missing[i :: self.workers] for i in range(self.workers)]
        context = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(self.workers - 1, mp_context=context) as pool:
            futures = [
                (share, pool.submit(_parse_batch, snapshot, [name for name, _ in share]))
                for share in shares[1:]
            ]
            mine = parse_ports(snapshot, [name for name, _ in shares[0]])
            for key, port in zip(shares[0], mine, strict=True):
                self.cache.put(key, port)
            for share, future in futures:
                for key, (data, has_paths) in zip(share, future.result(), strict=True):
                    self.cache.put_encoded(key, data, has_paths)
                self.parsed_by_workers += len(share)
