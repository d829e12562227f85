"""Build orders (portsd/build/order.py): the port tree as bytes, refused when unsafe or
meant for another builder; the store's bounded cache; manifests compared."""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest

from portsd.build.order import BuildOrder, check_builder, pack_tree, unpack_tree
from portsd.build.store import Store
from portsd.core.keys import BUILDER_FORMAT
from portsd.core.metadata import PackageMeta
from portsd.core.recipe import Recipe
from portsd.errors import ConfigError, PackageError
from portsd.pkg.package import FileType, ManifestEntry, PortInfo, differences

RECIPE = Recipe(name="demo", version="1.0", release=1, summary="a demo", license="MIT")


def order(tree: bytes, paths: tuple[tuple[str, str], ...] = ()) -> BuildOrder:
    return BuildOrder(
        recipe=RECIPE,
        key="k" * 64,
        arch="x86_64",
        tree=tree,
        paths=paths,
        root=(),
        runtime=(),
        seed="seed-id",
        builder=BUILDER_FORMAT,
        jobs=1,
        timeout=60.0,
    )


def test_a_port_tree_travels_as_bytes_that_depend_only_on_its_content(tmp_path: Path) -> None:
    source = tmp_path / "source"
    (source / "port").mkdir(parents=True)
    (source / "port" / "port.toml").write_text("name = 'demo'\n")
    (source / "paths" / "lib").mkdir(parents=True)
    script = source / "paths" / "lib" / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    (source / "paths" / "lib" / "link").symlink_to("run.sh")
    first = pack_tree(source)
    os.utime(script, (1, 1))
    assert pack_tree(source) == first
    port, paths = unpack_tree(order(first, (("lib", "paths/lib"),)), tmp_path / "out")
    assert (port / "port.toml").read_text() == "name = 'demo'\n"
    assert paths == {"lib": tmp_path / "out" / "paths" / "lib"}
    assert os.access(paths["lib"] / "run.sh", os.X_OK)
    assert (paths["lib"] / "link").readlink() == Path("run.sh")


@pytest.mark.parametrize("link", [False, True])
def test_a_tree_reaching_outside_its_directory_is_refused(tmp_path: Path, link: bool) -> None:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("port/evil" if link else "../evil")
        if link:  # a symlink out of the tree
            info.type, info.linkname = tarfile.SYMTYPE, "../../evil"
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(PackageError, match="unsafe port tree"):
        unpack_tree(order(raw.getvalue()), tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def test_an_order_for_another_seed_format_or_arch_is_refused() -> None:
    good = order(b"")
    check_builder(good, builder=BUILDER_FORMAT, seed="seed-id", arch="x86_64")
    for builder, seed, arch, what in [
        (BUILDER_FORMAT, "other", "x86_64", "seed"),
        (BUILDER_FORMAT + 1, "seed-id", "x86_64", "builder format"),
        (BUILDER_FORMAT, "seed-id", "aarch64", "arch"),
    ]:
        with pytest.raises(ConfigError, match=f"demo .*wants {what}"):
            check_builder(good, builder=builder, seed=seed, arch=arch)
    # a self-contained toolchain's order stands on no seed: any builder's will do
    check_builder(replace(good, seed=None), builder=BUILDER_FORMAT, seed="other", arch="x86_64")


def test_the_store_keeps_the_most_recently_used_trees(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    for age, key in enumerate(["a", "b", "c", "d"]):
        (store.root / key).mkdir()
        os.utime(store.root / key, (1000 + age, 1000 + age))
    assert store.cached("a") is not None  # used now: the newest
    assert store.prune(2) == 2
    assert sorted(p.name for p in store.root.iterdir()) == ["a", "composed", "d"]
    assert store.cached("b") is None


def test_differences_name_the_members_that_differ() -> None:
    meta = PackageMeta(name="demo", version="1.0", release=1, arch="x86_64", build_key="a" * 64)

    def entry(path: str, digest: str) -> ManifestEntry:
        return ManifestEntry(path, FileType.FILE, 0o644, 1, digest * 64)

    one = PortInfo(meta, (entry("usr/a", "1"), entry("usr/b", "2")))
    other = PortInfo(meta, (entry("usr/a", "1"), entry("usr/b", "3"), entry("usr/c", "4")))
    assert differences(one, other) == ("usr/b", "usr/c")
    assert differences(one, one) == ()
    assert differences(one, replace(one, meta=replace(meta, installed_size=5))) == (".PORTINFO",)
