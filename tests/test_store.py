"""The store's composed build roots: one tree per set of dependency keys, made once."""

from __future__ import annotations

from pathlib import Path

import pytest

from portsd.build.store import Store
from portsd.errors import FileConflict


def unpacked(base: Path, name: str, *files: str) -> Path:
    root = base / name
    for file in files:
        (root / file).parent.mkdir(parents=True, exist_ok=True)
        (root / file).write_text(f"{name}: {file}\n")
    return root


def test_a_set_of_keys_is_composed_once_and_reused(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    a = unpacked(tmp_path, "a", "usr/include/a.h", "lib/liba.so.1")
    b = unpacked(tmp_path, "b", "usr/include/b.h")
    composed = store.composed([("key-a", a), ("key-b", b)])
    assert (composed / "usr/include/a.h").read_text() == "a: usr/include/a.h\n"
    assert (composed / "usr/lib/liba.so.1").stat().st_ino == (a / "lib/liba.so.1").stat().st_ino
    marker = composed / "usr/marker"
    marker.write_text("")  # a second composition would not have it
    assert store.composed([("key-b", b), ("key-a", a)]) == composed
    assert marker.exists()
    assert store.composed([("key-a", a)]) != composed
    assert sorted(p.name for p in store.composed_root.iterdir() if p.name.startswith(".")) == []


def test_a_conflict_leaves_nothing_behind(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    a = unpacked(tmp_path, "a", "usr/bin/tool")
    b = unpacked(tmp_path, "b", "usr/bin/tool")
    with pytest.raises(FileConflict, match="usr/bin/tool"):
        store.composed([("key-a", a), ("key-b", b)])
    assert list(store.composed_root.iterdir()) == []
