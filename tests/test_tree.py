"""The ports tree read from real git repositories and plain directories, and its cache."""

from __future__ import annotations

import os
import random
import stat
import subprocess
from pathlib import Path

import pytest

from portsd.core.evaluate import Evaluation
from portsd.core.recipe import Recipe
from portsd.errors import GitError, RecipeError
from portsd.tree.gitrepo import (
    DirSnapshot,
    FileMode,
    GitRepo,
    GitSnapshot,
    PathEntry,
    PortsListing,
    hash_object,
    tree_object,
)
from portsd.tree.loader import CACHE_FILE, Tree, TreeLoader, combined_id
from tests.test_keys import EveryKeyBuilt

SHA = "0" * 64
BUILT = EveryKeyBuilt()  # these tests look at what goes into keys, not at builds


def git(repo: Path, *args: str) -> str:
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(repo),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "Tester",
        "GIT_AUTHOR_EMAIL": "tester@example.org",
        "GIT_COMMITTER_NAME": "Tester",
        "GIT_COMMITTER_EMAIL": "tester@example.org",
    }
    done = subprocess.run(
        ["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


def recipe_text(
    name: str,
    version: str = "1.0",
    depends: tuple[str, ...] = (),
    extra: str = "",
) -> str:
    deps = ", ".join(f'"{d}"' for d in depends)
    return (
        f'name = "{name}"\nversion = "{version}"\nsummary = "{name}"\nlicense = "MIT"\n'
        f"depends = [{deps}]\n{extra}"
        f'[[source]]\nurl = "https://example.org/{name}-{version}.tar.gz"\nsha256 = "{SHA}"\n'
    )


def write_port(
    root: Path,
    name: str,
    text: str | None = None,
    *,
    version: str = "1.0",
    depends: tuple[str, ...] = (),
    extra: str = "",
) -> Path:
    directory = root / "ports" / name
    directory.mkdir(parents=True, exist_ok=True)
    recipe = text if text is not None else recipe_text(name, version, depends, extra)
    (directory / "port.toml").write_text(recipe)
    return directory


def commit_all(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "tree"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    write_port(path, "zlib", version="1.3")
    write_port(path, "curl", depends=("zlib",))
    commit_all(path, "first")
    return path


def names(tree: Tree) -> list[str]:
    return sorted(tree.listing)


# -- reading a commit -------------------------------------------------------------------


def test_loading_a_commit_reads_git_objects_and_ignores_the_work_tree(repo: Path) -> None:
    head = git(repo, "rev-parse", "HEAD")
    write_port(repo, "zlib", version="9.9")  # uncommitted edit
    write_port(repo, "untracked")  # never added
    (repo / "ports" / "curl" / "port.toml").unlink()  # uncommitted deletion
    tree = TreeLoader().load_git(repo, "HEAD")
    assert names(tree) == ["curl", "zlib"]
    zlib = tree.ports["zlib"]
    assert isinstance(zlib, Recipe) and zlib.version == "1.3"
    assert isinstance(tree.ports["curl"], Recipe)
    assert tree.listing["zlib"] == git(repo, "rev-parse", f"{head}:ports/zlib")
    assert isinstance(tree.snapshot, GitSnapshot) and tree.snapshot.commit == head


def test_any_revision_names_a_commit(repo: Path) -> None:
    first = git(repo, "rev-parse", "HEAD")
    git(repo, "tag", "-a", "v1", "-m", "release one")
    write_port(repo, "zlib", version="1.4")
    commit_all(repo, "zlib 1.4")
    git(repo, "branch", "next")
    loader = TreeLoader()

    def zlib_version(revision: str) -> str:
        port = loader.load_git(repo, revision).ports["zlib"]
        assert isinstance(port, Recipe)
        return port.version

    assert zlib_version("HEAD") == zlib_version("next") == zlib_version("main") == "1.4"
    assert zlib_version("v1") == zlib_version(first) == zlib_version("HEAD~1") == "1.3"
    assert zlib_version(first[:10]) == "1.3"


def test_unreadable_trees_raise_git_errors_that_say_why(tmp_path: Path, repo: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(GitError, match="not a git repository") as caught:
        TreeLoader().load_git(plain)
    assert caught.value.path == str(plain)
    with pytest.raises(GitError, match="unknown revision 'no-such-branch'"):
        TreeLoader().load_git(repo, "no-such-branch")
    blob = git(repo, "rev-parse", "HEAD:ports/zlib/port.toml")
    with pytest.raises(GitError, match="does not name a commit"):
        TreeLoader().load_git(repo, blob)
    git(repo, "rm", "-q", "-r", "ports")
    (repo / "README").write_text("nothing here\n")
    commit_all(repo, "no ports")
    with pytest.raises(GitError, match="has no ports/ directory"):
        TreeLoader().load_git(repo)
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    with pytest.raises(GitError, match="unknown revision 'HEAD'"):
        TreeLoader().load_git(empty)
    with pytest.raises(GitError, match="no ports/ directory"):
        TreeLoader().load_dir(plain)


def test_a_broken_port_is_an_error_for_that_port_only(repo: Path) -> None:
    (repo / "ports" / "nofile").mkdir()
    (repo / "ports" / "nofile" / "README").write_text("forgot the recipe\n")
    write_port(repo, "badtoml", 'name = "badtoml"\nversion = \n')
    write_port(repo, "misnamed", recipe_text("othername"))
    (repo / "ports" / "linked").mkdir()
    os.symlink("../zlib/port.toml", repo / "ports" / "linked" / "port.toml")
    (repo / "ports" / "NOTES").write_text("a file in ports/ is not a port\n")
    commit_all(repo, "broken ports")
    for tree in (TreeLoader().load_git(repo), TreeLoader().load_dir(repo)):
        assert names(tree) == ["badtoml", "curl", "linked", "misnamed", "nofile", "zlib"]
        errors = {n: p for n, p in tree.ports.items() if isinstance(p, RecipeError)}
        assert sorted(errors) == ["badtoml", "linked", "misnamed", "nofile"]
        assert (
            str(errors["nofile"])
            == "ports/nofile/port.toml: missing: ports/nofile/ has no port.toml"
        )
        assert str(errors["badtoml"]).startswith("ports/badtoml/port.toml:2: invalid TOML")
        assert "does not match its directory 'misnamed'" in str(errors["misnamed"])
        assert "not a symlink" in str(errors["linked"])
        assert all(e.port == n for n, e in errors.items())


@pytest.mark.parametrize("name", ["..evil", ".hidden", "-x", "Upper", "a b"])
def test_a_port_whose_name_breaks_the_name_rule_is_an_error(repo: Path, name: str) -> None:
    write_port(repo, name)  # its recipe's name matches its directory
    commit_all(repo, "an odd name")
    for tree in (TreeLoader().load_git(repo), TreeLoader().load_dir(repo)):
        error = tree.ports[name]
        assert isinstance(error, RecipeError), f"{name!r} was loaded"
        assert str(error).startswith(f"ports/{name}/port.toml: invalid port name '{name}' (")


# -- the cache --------------------------------------------------------------------------


def test_a_new_commit_reparses_only_the_ports_that_changed(repo: Path) -> None:
    for name in ("musl", "make", "perl"):
        write_port(repo, name)
    first = commit_all(repo, "more ports")
    loader = TreeLoader()
    loader.load_git(repo, first)
    assert loader.parses == 5
    write_port(repo, "curl", version="8.0", depends=("zlib",))
    write_port(repo, "openssl")
    git(repo, "rm", "-q", "-r", "ports/perl")
    (repo / "ports" / "make" / "0001-fix.patch").write_text("--- a\n+++ b\n")
    second = commit_all(repo, "edit curl, add openssl, drop perl, patch make")
    again = loader.load_git(repo, second)
    assert loader.parses == 5 + 3
    assert names(again) == ["curl", "make", "musl", "openssl", "zlib"]
    loader.load_git(repo, first)
    loader.load_git(repo, second)
    assert loader.parses == 8
    # advance: the listing comes from the bytes that differ, the recipes from the cache
    fresh = TreeLoader()
    advanced = fresh.advance(fresh.load_git(repo, first), second)
    assert fresh.parses == 5 + 3
    assert dict(advanced.listing) == dict(again.listing)
    assert advanced.changes == {
        "curl": again.listing["curl"],
        "openssl": again.listing["openssl"],
        "perl": None,
        "make": again.listing["make"],
    }
    assert dict(advanced.ports) == dict(again.ports)


def test_the_cache_is_keyed_by_name_too(repo: Path) -> None:
    # Two directories with identical content: one recipe is right, the other misnamed.
    write_port(repo, "copy", recipe_text("zlib", version="1.3"))
    commit_all(repo, "copy")
    tree = TreeLoader().load_git(repo)
    assert tree.listing["copy"] == tree.listing["zlib"]
    assert isinstance(tree.ports["zlib"], Recipe)
    assert isinstance(tree.ports["copy"], RecipeError)


def test_a_persisted_cache_starts_warm_with_identical_recipes(tmp_path: Path, repo: Path) -> None:
    write_port(repo, "rich", extra=_RICH)
    (repo / "ports" / "rich" / "fix.patch").write_text("--- a\n+++ b\n")
    write_port(repo, "broken", 'name = "broken"\nversion = "1.0"\nsummary = 3\n')
    commit_all(repo, "rich and broken ports")
    cache = tmp_path / "cache"
    first = TreeLoader(cache)
    cold = dict(first.load_git(repo).ports)
    assert first.parses == 4
    first.save()
    assert (cache / CACHE_FILE).is_file()
    assert [p.name for p in cache.iterdir()] == [CACHE_FILE]  # no temporary left behind
    second = TreeLoader(cache)
    warm = dict(second.load_git(repo).ports)
    assert second.parses == 0
    assert {n: p for n, p in warm.items() if isinstance(p, Recipe)} == {
        n: p for n, p in cold.items() if isinstance(p, Recipe)
    }
    rich = warm["rich"]  # every field survives the cache, the rarely used ones too
    assert isinstance(rich, Recipe) and [str(d) for d in rich.bootstrap_depends] == ["cross-cc"]
    assert rich.build.allow_missing_sonames == ("libGL.so.1",)
    assert str(warm["broken"]) == str(cold["broken"])
    error, original = warm["broken"], cold["broken"]
    assert isinstance(error, RecipeError) and isinstance(original, RecipeError)
    assert error.problems == original.problems
    # a damaged cache file costs a cold start, nothing more
    (cache / CACHE_FILE).write_bytes(b"\x93garbage")
    third = TreeLoader(cache)
    assert third.load_git(repo).ports.keys() == cold.keys()
    assert third.parses == 4


_RICH = """\
release = 3
homepage = "https://example.org/rich"
arch = ["x86_64", "aarch64"]
build-depends = ["make>=4.0"]
check-depends = ["perl"]
bootstrap-depends = ["cross-cc"]
provides = ["richness=1.0"]
conflicts = ["poor<2"]
[[source]]
file = "fix.patch"
[build]
style = "autotools"
configure-args = ["--enable-static", "--with-x"]
dir = "rich-1.0"
prepare = "sed -i s/a/b/ configure"
check = "make check"
allow-missing-sonames = ["libGL.so.1"]
"""


def test_the_saved_cache_follows_the_tree(tmp_path: Path, repo: Path) -> None:
    cache = tmp_path / "cache"
    loader = TreeLoader(cache)
    loader.load_git(repo)
    loader.save()
    write_port(repo, "zlib", version="1.4")
    commit_all(repo, "zlib 1.4")
    restarted = TreeLoader(cache)
    restarted.load_git(repo)
    assert restarted.parses == 1
    restarted.save()
    assert len(TreeLoader(cache).cache) == 2  # the old zlib is gone


def test_worker_processes_parse_the_same_recipes(repo: Path) -> None:
    for number in range(30):
        write_port(repo, f"lib{number}", depends=("zlib",) if number % 2 else ())
    write_port(repo, "bad", 'name = "bad"\n')
    commit_all(repo, "many ports")
    serial = TreeLoader(workers=1)
    pooled = TreeLoader(workers=2, parallel_threshold=1)
    expected, got = serial.load_git(repo), pooled.load_git(repo)
    assert pooled.parses == serial.parses == 33
    assert pooled.parsed_by_workers == 16  # one share of two; this process parsed the other
    recipes = {n: p for n, p in got.ports.items() if isinstance(p, Recipe)}
    assert recipes == {n: p for n, p in expected.ports.items() if isinstance(p, Recipe)}
    assert len(recipes) == 32
    assert str(got.ports["bad"]) == str(expected.ports["bad"]) != ""


# -- plain directories ------------------------------------------------------------------


def test_directory_tree_ids_are_git_tree_ids(repo: Path) -> None:
    port = repo / "ports" / "zlib"
    (port / "patches" / "deep").mkdir(parents=True)
    (port / "patches" / "0001-a.patch").write_text("a\n")
    (port / "patches" / "deep" / "0002-b.patch").write_bytes(b"\x00binary\xff")
    (port / "patches-more").write_text("sorts between 'patches' and 'patches/'\n")
    (port / "patches.d").write_text("sorts before 'patches/' in a git tree\n")
    script = port / "hook.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    group_exec = port / "group-exec"
    group_exec.write_text("x\n")
    group_exec.chmod(0o654)  # git only looks at the owner's execute bit
    os.symlink("patches/0001-a.patch", port / "link")
    os.symlink("../curl", port / "dir-link")
    os.symlink("/etc/hostname", port / "absolute-link")
    (port / "empty").mkdir()  # git has no empty directories
    (repo / ".gitignore").write_text("*.orig\nbuild/\n")
    (port / "port.toml.orig").write_text("ignored\n")
    (port / "build").mkdir()
    (port / "build" / "junk").write_text("ignored\n")
    (repo / "ports" / "onlyempty" / "sub").mkdir(parents=True)
    commit_all(repo, "files of every kind")
    tree = TreeLoader().load_dir(repo)
    assert names(tree) == ["curl", "zlib"]
    for name in ("curl", "zlib"):
        assert tree.listing[name] == git(repo, "rev-parse", f"HEAD:ports/{name}")
    listed = git(repo, "ls-tree", "-r", "HEAD", "ports/zlib").splitlines()
    assert len(listed) == 10
    # the same content in a directory outside any git work tree
    export = repo.parent / "outside"
    tree.export_port("zlib", export / "ports" / "zlib")
    assert DirSnapshot(export).listing()["zlib"] == tree.listing["zlib"]


def test_uncommitted_edits_change_the_tree_ids_of_those_ports_only(repo: Path) -> None:
    committed = TreeLoader().load_git(repo)
    (repo / "ports" / "zlib" / "port.toml").write_text(recipe_text("zlib", version="1.4"))
    working = TreeLoader().load_dir(repo)
    assert working.listing["curl"] == committed.listing["curl"]
    assert working.listing["zlib"] != committed.listing["zlib"]
    port = working.ports["zlib"]
    assert isinstance(port, Recipe) and port.version == "1.4"
    commit_all(repo, "zlib 1.4")
    assert working.listing["zlib"] == git(repo, "rev-parse", "HEAD:ports/zlib")


def test_hashing_matches_git_hash_object(tmp_path: Path) -> None:
    data = b"hello\n"
    (tmp_path / "f").write_bytes(data)
    assert hash_object("blob", data).hex() == git(tmp_path, "hash-object", "--no-filters", "f")
    body = tree_object(
        [
            (FileMode.REGULAR, b"b", hash_object("blob", b"")),
            (FileMode.TREE, b"a", hash_object("tree", b"")),
            (FileMode.REGULAR, b"a.c", hash_object("blob", b"x")),
        ]
    )
    assert body.startswith(b"100644 a.c\0")  # 'a.c' < 'a/' since '.' < '/'
    (tmp_path / "t").write_bytes(body)
    git(tmp_path, "init", "-q")
    made = git(tmp_path, "hash-object", "-t", "tree", "--literally", "t")
    assert made == hash_object("tree", body).hex()


# -- export ------------------------------------------------------------------------------


def test_export_materialises_a_port_from_git_and_from_a_directory(
    tmp_path: Path, repo: Path
) -> None:
    port = repo / "ports" / "zlib"
    (port / "patches").mkdir()
    (port / "patches" / "fix.patch").write_text("--- a\n")
    (port / "run.sh").write_text("#!/bin/sh\n")
    (port / "run.sh").chmod(0o755)
    os.symlink("patches/fix.patch", port / "link")
    commit_all(repo, "zlib files")
    (port / "port.toml").write_text(recipe_text("zlib", version="2.0"))  # uncommitted
    from_git, from_dir = tmp_path / "git", tmp_path / "dir"
    TreeLoader().load_git(repo).export_port("zlib", from_git)
    TreeLoader().load_dir(repo).export_port("zlib", from_dir)
    for dest, version in ((from_git, "1.3"), (from_dir, "2.0")):
        assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*")) == [
            "link",
            "patches",
            "patches/fix.patch",
            "port.toml",
            "run.sh",
        ]
        assert f'version = "{version}"' in (dest / "port.toml").read_text()
        assert (dest / "patches" / "fix.patch").read_text() == "--- a\n"
        assert os.readlink(dest / "link") == "patches/fix.patch"
        assert stat.S_IMODE((dest / "run.sh").stat().st_mode) & 0o111
        assert not stat.S_IMODE((dest / "port.toml").stat().st_mode) & 0o111
    with pytest.raises(GitError, match="no port 'nope'"):
        TreeLoader().load_git(repo).export_port("nope", tmp_path / "nope")


# -- what changed ------------------------------------------------------------------------


def test_changed_ports_between_commits(repo: Path) -> None:
    old = git(repo, "rev-parse", "HEAD")
    write_port(repo, "curl", version="8.1")
    write_port(repo, "aaa-first")
    write_port(repo, "zzz-last")
    (repo / "README").write_text("not in ports/\n")
    git(repo, "rm", "-q", "-r", "ports/zlib")
    new = commit_all(repo, "several")
    changes = GitRepo(repo).changed_ports(old, new)
    assert changes == {
        "curl": git(repo, "rev-parse", "HEAD:ports/curl"),
        "aaa-first": git(repo, "rev-parse", "HEAD:ports/aaa-first"),
        "zzz-last": git(repo, "rev-parse", "HEAD:ports/zzz-last"),
        "zlib": None,
    }
    paths = git(repo, "diff", "--no-renames", "--name-only", old, new).splitlines()
    assert set(changes) == {p.split("/")[1] for p in paths if p.startswith("ports/")}
    assert GitRepo(repo).changed_ports(new, new) == {}


def test_listing_compare_equals_a_full_parse_after_random_edits() -> None:
    rng = random.Random(7)

    def oid() -> bytes:
        return rng.randbytes(20)

    entries = {f"p{n:04d}".encode(): oid() for n in range(300)}
    raw = tree_object((FileMode.TREE, name, tree_id) for name, tree_id in entries.items())
    listing = PortsListing.parse(raw)
    for _ in range(200):
        previous = dict(listing.ids)
        for _ in range(rng.choice((1, 1, 2, 5, 40))):
            roll, name = rng.random(), rng.choice(list(entries))
            if roll < 0.5:
                entries[name] = oid()
            elif roll < 0.75 and len(entries) > 1:
                del entries[name]
            else:  # names of other lengths shift every later entry
                entries[name + rng.choice([b"x", b"-long-suffix", b""])] = oid()
        files = [(FileMode.REGULAR, b"README" + bytes([rng.randrange(97, 123)]), oid())]
        raw = tree_object(
            [(FileMode.TREE, n, i) for n, i in entries.items()] + files * rng.randrange(2)
        )
        listing, changes = listing.compare(raw)
        expected = PortsListing.parse(raw).ids
        assert listing.ids == expected == {n.decode(): i.hex() for n, i in entries.items()}
        assert changes == {
            n: expected.get(n)
            for n in previous.keys() | expected.keys()
            if previous.get(n) != expected.get(n)
        }


def test_history_names_the_commits_files_and_summaries_that_touched_a_port(repo: Path) -> None:
    since = git(repo, "rev-parse", "HEAD")
    (repo / "ports" / "zlib" / "fix.patch").write_text("--- a\n")
    patched = commit_all(repo, "zlib: add a patch\n\nLonger explanation.")
    write_port(repo, "curl", version="8.1", depends=("zlib",))
    commit_all(repo, "curl 8.1")
    git(repo, "checkout", "-q", "-b", "side")
    write_port(repo, "zlib", version="1.4")
    side = commit_all(repo, "zlib 1.4")
    git(repo, "checkout", "-q", "main")
    write_port(repo, "musl")
    commit_all(repo, "musl")
    git(repo, "merge", "-q", "--no-ff", "-m", "merge side", "side")
    git(repo, "rm", "-q", "-r", "ports/zlib")
    removed = commit_all(repo, "drop zlib")
    history = GitRepo(repo).history(["zlib"], since)
    assert [(c.commit, c.summary, c.files) for c in history] == [
        (removed, "drop zlib", ("ports/zlib/fix.patch", "ports/zlib/port.toml")),
        (side, "zlib 1.4", ("ports/zlib/port.toml",)),
        (patched, "zlib: add a patch", ("ports/zlib/fix.patch",)),
    ]
    assert all(c.port == "zlib" and c.author == "Tester" for c in history)
    everything = GitRepo(repo).history(["zlib", "curl", "musl"])
    assert [(c.port, c.summary) for c in everything][-3:] == [
        ("zlib", "zlib: add a patch"),
        ("curl", "first"),
        ("zlib", "first"),
    ]
    assert GitRepo(repo).history(["zlib"], removed) == []


# -- evaluation through real commits -----------------------------------------------------


def test_advancing_through_real_commits_equals_loading_each_from_scratch(repo: Path) -> None:
    rng = random.Random(11)
    pool = [f"p{n}" for n in range(12)]
    loader = TreeLoader()
    tree = loader.load_git(repo)
    evaluation = Evaluation.full(tree.listing, tree.ports, "x86_64", "0" * 64, BUILT)
    for step in range(12):
        for _ in range(rng.randrange(1, 4)):
            name = rng.choice(pool)
            if rng.random() < 0.2 and (repo / "ports" / name).exists():
                git(repo, "rm", "-q", "-r", f"ports/{name}")
            else:
                deps = tuple(rng.sample([p for p in pool if p != name], rng.randrange(3)))
                write_port(repo, name, version=f"1.{step}", depends=deps)
        commit_all(repo, f"step {step}")
        tree = loader.advance(tree, "HEAD")
        evaluation = evaluation.advance(tree.listing, tree.changed_ports(), BUILT)
        scratch = TreeLoader().load_git(repo)
        expected = Evaluation.full(scratch.listing, scratch.ports, "x86_64", "0" * 64, BUILT)
        assert evaluation.keys.keys == expected.keys.keys
        assert {n: str(p) for n, p in evaluation.keys.blocked.items()} == {
            n: str(p) for n, p in expected.keys.blocked.items()
        }


# -- path sources: repository paths outside ports/ -----------------------------------------


def path_recipe(
    name: str, paths: tuple[str, ...], depends: tuple[str, ...] = (), release: int = 1
) -> str:
    deps = ", ".join(f'"{d}"' for d in depends)
    sources = "".join(f'[[source]]\npath = "{path}"\n' for path in paths)
    return (
        f'name = "{name}"\nversion = "1.0"\nrelease = {release}\nsummary = "{name}"\n'
        f'license = "MIT"\ndepends = [{deps}]\n{sources}'
    )


@pytest.fixture
def self_hosting(repo: Path) -> Path:
    """The repo fixture plus software of its own outside ports/: ``app`` packages ``src/``
    and ``README``, ``tool`` depends on ``app``, ``docs/`` belongs to no port."""
    (repo / "src" / "lib").mkdir(parents=True)
    (repo / "src" / "lib" / "core.py").write_text("ANSWER = 42\n")
    (repo / "src" / "main.py").write_text("print('app')\n")
    (repo / "README").write_text("the app\n")
    (repo / "docs").mkdir()
    (repo / "docs" / "guide.md").write_text("guide\n")
    write_port(repo, "app", path_recipe("app", ("src", "README"), depends=("zlib",)))
    write_port(repo, "tool", depends=("app",))
    commit_all(repo, "the app packages its own sources")
    return repo


def full_evaluation(tree: Tree) -> Evaluation:
    return Evaluation.full(tree.inputs(), tree.recipes(), "x86_64", "0" * 64, BUILT)


def same_evaluation(got: Evaluation, expected: Evaluation) -> None:
    assert got.keys.keys == expected.keys.keys
    assert {n: str(p) for n, p in got.keys.blocked.items()} == {
        n: str(p) for n, p in expected.keys.blocked.items()
    }


def test_a_port_with_path_sources_is_keyed_on_the_content_at_those_paths(
    self_hosting: Path,
) -> None:
    repo = self_hosting
    loader = TreeLoader()
    tree = loader.load_git(repo)
    inputs = tree.inputs()
    assert inputs.keys() == tree.listing.keys()
    # ordinary ports: their tree ids; app: its tree id combined with those of src and README
    assert {n: i for n, i in inputs.items() if i != tree.listing[n]} == {
        "app": combined_id(
            tree.listing["app"],
            [
                ("src", PathEntry(FileMode.TREE, git(repo, "rev-parse", "HEAD:src"))),
                ("README", PathEntry(FileMode.REGULAR, git(repo, "rev-parse", "HEAD:README"))),
            ],
        )
    }
    assert tree.combined == {"app": inputs["app"]}
    first_listing = dict(tree.listing)
    before = full_evaluation(tree)
    evaluation = before

    def step(message: str) -> dict[str, str]:
        """Commit, advance, and return the ports whose keys changed."""
        nonlocal tree, evaluation
        previous_keys = evaluation.keys.keys
        commit_all(repo, message)
        old = tree
        tree = loader.advance(tree, "HEAD")
        evaluation = evaluation.advance(tree.inputs(), tree.changed_ports(), BUILT)
        same_evaluation(evaluation, full_evaluation(TreeLoader().load_git(repo)))
        assert tree.changed_inputs(old) == tree.changed_ports()
        keys = evaluation.keys.keys
        return {n: k for n, k in keys.items() if previous_keys.get(n) != k}

    # a file deep under a referenced directory: app and what depends on it, nothing else
    (repo / "src" / "lib" / "core.py").write_text("ANSWER = 43\n")
    changed = step("src: new answer")
    assert set(changed) == {"app", "tool"}
    assert tree.changes == {"app": tree.inputs()["app"]}
    assert tree.listing["app"] == first_listing["app"]  # ports/app/ itself is untouched
    # a referenced file; then only its mode
    (repo / "README").write_text("the app, documented\n")
    assert set(step("README")) == {"app", "tool"}
    (repo / "src" / "main.py").chmod(0o755)
    assert set(step("main.py is executable")) == {"app", "tool"}
    # a path nothing references, and a port's own directory, as before
    (repo / "docs" / "guide.md").write_text("a better guide\n")
    assert step("docs") == {}
    assert tree.changes == {}
    write_port(repo, "zlib", version="1.4")
    assert set(step("zlib 1.4")) == {"zlib", "curl", "app", "tool"}
    # back to the first content: the first keys again
    (repo / "README").write_text("the app\n")
    (repo / "src" / "lib" / "core.py").write_text("ANSWER = 42\n")
    (repo / "src" / "main.py").chmod(0o644)
    write_port(repo, "zlib", version="1.3")
    step("revert everything")
    assert evaluation.keys.keys == before.keys.keys


def test_a_missing_path_fails_that_port_only_and_names_the_source(self_hosting: Path) -> None:
    repo = self_hosting
    loader = TreeLoader()
    tree = loader.load_git(repo)
    evaluation = full_evaluation(tree)
    git(repo, "rm", "-q", "README")
    commit_all(repo, "lose the README")
    for loaded in (loader.advance(tree, "HEAD"), TreeLoader().load_git(repo)):
        error = loaded.ports["app"]
        assert isinstance(error, RecipeError) and error.port == "app"
        assert str(error) == (
            "ports/app/port.toml:10: source #2: path 'README' does not exist in the tree"
            " (git would not record it there)"
        )
        assert all(isinstance(loaded.ports[n], Recipe) for n in ("zlib", "curl", "tool"))
    tree = loader.advance(tree, "HEAD")
    evaluation = evaluation.advance(tree.inputs(), tree.changed_ports(), BUILT)
    same_evaluation(evaluation, full_evaluation(TreeLoader().load_git(repo)))
    assert set(evaluation.keys.keys) == {"zlib", "curl"}
    assert str(evaluation.keys.blocked["tool"]).startswith("tool: dependency app cannot be built")
    assert "path 'README' does not exist" in str(evaluation.keys.blocked["tool"])
    # a symlink, and a path through a symlinked directory, are no more usable
    os.symlink("docs/guide.md", repo / "README")
    os.symlink("src", repo / "alias")
    write_port(repo, "app", path_recipe("app", ("alias/lib", "README")))
    commit_all(repo, "links")
    for loaded in (TreeLoader().load_git(repo), TreeLoader().load_dir(repo)):
        assert [p.message for p in loaded.ports["app"].problems] == [  # type: ignore[union-attr]
            "source #1: path 'alias/lib' does not exist in the tree"
            " (git would not record it there)",
            "source #2: path 'README' is a symlink (name the file or directory it points to)",
        ]
    # the path comes back: the port builds again, found incrementally
    (repo / "README").unlink()
    (repo / "README").write_text("back\n")
    write_port(repo, "app", path_recipe("app", ("src/lib", "README")))
    commit_all(repo, "README is back")
    tree = loader.advance(tree, "HEAD")
    evaluation = evaluation.advance(tree.inputs(), tree.changed_ports(), BUILT)
    same_evaluation(evaluation, full_evaluation(TreeLoader().load_git(repo)))
    assert {"app", "tool"} <= evaluation.keys.keys.keys()


def test_directory_ids_of_referenced_paths_are_git_ids(self_hosting: Path) -> None:
    repo = self_hosting
    src = repo / "src"
    (repo / ".gitignore").write_text("__pycache__/\n*.orig\n")
    (src / "lib" / "__pycache__").mkdir()
    (src / "lib" / "__pycache__" / "core.cpython-311.pyc").write_bytes(b"\x00compiled")
    (src / "main.py.orig").write_text("ignored\n")
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    os.symlink("lib/core.py", src / "link")
    (src / "empty").mkdir()
    (src / "bin").write_bytes(b"\xff\x00binary")
    write_port(repo, "docs", path_recipe("docs", ("docs/guide.md", "src/run.sh")))
    commit_all(repo, "files of every kind")
    snapshots = (GitSnapshot.open(repo), DirSnapshot(repo))
    for path in ("src", "src/lib", "README", "docs/guide.md", "src/run.sh", "src/link"):
        expected = git(repo, "rev-parse", f"HEAD:{path}")
        assert [s.path_entry(path).id for s in snapshots] == [expected] * 2  # type: ignore[union-attr]
    for snapshot in snapshots:
        assert snapshot.path_entry("src/run.sh").mode == FileMode.EXECUTABLE  # type: ignore[union-attr]
        assert snapshot.path_entry("src/link").mode == FileMode.SYMLINK  # type: ignore[union-attr]
        assert snapshot.path_entry("src").mode == FileMode.TREE  # type: ignore[union-attr]
    for snapshot in snapshots:
        for missing in ("nope", "src/empty", "src/main.py.orig", "src/lib/__pycache__", "README/x"):
            assert snapshot.path_entry(missing) is None
    from_git, from_dir = TreeLoader().load_git(repo), TreeLoader().load_dir(repo)
    assert dict(from_dir.inputs()) == dict(from_git.inputs())
    assert set(from_dir.combined) == {"app", "docs"}
    # an uncommitted edit under src/ changes app's id in the directory, and nothing else
    (src / "lib" / "core.py").write_text("ANSWER = 0\n")
    edited = TreeLoader().load_dir(repo)
    assert edited.changed_inputs(from_git) == {"app": edited.ports["app"]}
    assert dict(edited.listing) == dict(from_git.listing)


def test_export_paths_writes_exactly_what_the_key_covers(
    tmp_path: Path, self_hosting: Path
) -> None:
    repo = self_hosting
    (repo / ".gitignore").write_text("*.pyc\n")
    (repo / "src" / "lib" / "core.pyc").write_bytes(b"junk")
    (repo / "src" / "main.py").chmod(0o755)
    os.symlink("main.py", repo / "src" / "link")
    write_port(repo, "app", path_recipe("app", ("src", "README")) + 'filename = "README.txt"\n')
    commit_all(repo, "app with a renamed README")
    (repo / "README").write_text("uncommitted\n")
    for tree, readme in (
        (TreeLoader().load_git(repo), "the app\n"),
        (TreeLoader().load_dir(repo), "uncommitted\n"),
    ):
        dest = tmp_path / type(tree.snapshot).__name__
        exported = tree.export_paths("app", dest)
        assert exported == {"src": dest / "src", "README.txt": dest / "README.txt"}
        assert (dest / "README.txt").read_text() == readme
        assert sorted(str(p.relative_to(dest / "src")) for p in (dest / "src").rglob("*")) == [
            "lib",
            "lib/core.py",
            "link",
            "main.py",
        ]
        assert os.readlink(dest / "src" / "link") == "main.py"
        assert (dest / "src" / "main.py").stat().st_mode & 0o100
        assert tree.export_paths("zlib", tmp_path / "none") == {}
    # a directory edited after it was read is refused rather than built under an old key
    tree = TreeLoader().load_dir(repo)
    (repo / "src" / "main.py").write_text("print('changed')\n")
    with pytest.raises(GitError, match="'src' changed after the tree was read"):
        tree.export_paths("app", tmp_path / "late")


def test_the_cache_remembers_which_recipes_have_path_sources(
    tmp_path: Path, self_hosting: Path
) -> None:
    repo = self_hosting
    for number in range(12):
        write_port(
            repo,
            f"lib{number}",
            path_recipe(f"lib{number}", ("docs",)) if number % 3 == 0 else None,
        )
    commit_all(repo, "more ports, some with path sources")
    cold = TreeLoader(tmp_path / "cache", workers=2, parallel_threshold=1)
    expected = cold.load_git(repo)
    assert cold.parsed_by_workers > 0
    assert set(expected.combined) == {"app", "lib0", "lib3", "lib6", "lib9"}
    cold.save()
    warm = TreeLoader(tmp_path / "cache")
    tree = warm.load_git(repo)
    assert warm.parses == 0
    assert dict(tree.inputs()) == dict(expected.inputs())
    assert tree.combined == expected.combined


def test_advance_with_path_sources_equals_a_full_evaluation_after_random_commits(
    repo: Path,
) -> None:
    rng = random.Random(23)
    files = ["shared/a.txt", "shared/b.txt", "lib/x.c", "lib/sub/y.c", "top.txt"]
    paths = ["shared", "lib", "lib/sub", "top.txt", "shared/a.txt", "nowhere"]
    pool = [f"p{n}" for n in range(8)]
    for file in files:
        (repo / file).parent.mkdir(parents=True, exist_ok=True)
        (repo / file).write_text("0\n")
    commit_all(repo, "files")
    loader = TreeLoader()
    tree = loader.load_git(repo)
    evaluation = full_evaluation(tree)
    path_only = broken = 0
    for step in range(20):
        for _ in range(rng.randrange(1, 4)):
            roll = rng.random()
            if roll < 0.55:  # edit, remove or add a file outside ports/
                target = repo / rng.choice(files)
                if target.exists() and rng.random() < 0.25:
                    target.unlink()
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_text(f"{step} {rng.random()}\n")
            elif roll < 0.62 and (repo / "ports" / (name := rng.choice(pool))).exists():
                git(repo, "rm", "-q", "-r", f"ports/{name}")
            else:
                name = rng.choice(pool)
                deps = tuple(rng.sample([p for p in pool if p != name], rng.randrange(3)))
                chosen = tuple(rng.sample(paths, rng.randrange(3)))
                write_port(repo, name, path_recipe(name, chosen, deps, release=step + 1))
        commit_all(repo, f"step {step}")
        previous = tree
        tree = loader.advance(tree, "HEAD")
        evaluation = evaluation.advance(tree.inputs(), tree.changed_ports(), BUILT)
        scratch = TreeLoader().load_git(repo)
        same_evaluation(evaluation, full_evaluation(scratch))
        assert dict(tree.inputs()) == dict(scratch.inputs())
        assert tree.changed_inputs(previous).keys() == tree.changed_ports().keys()
        assert tree.changes is not None
        moved = {n for n in tree.changes if tree.listing.get(n) != previous.listing.get(n)}
        path_only += len(tree.changes.keys() - moved)
        broken += sum(isinstance(tree.ports[n], RecipeError) for n in tree.combined)
    assert path_only >= 5 and broken >= 5  # the walk did exercise both
