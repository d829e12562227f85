"""Build identity is pinned: a literal build key, a literal package hash, and the
builder's fingerprint tied to BUILDER_FORMAT (portsd/build/identity.py).

When one of these fails, the builder or the key encoding changed. If that was meant, bump
BUILDER_FORMAT in portsd/core/keys.py (every key changes, so nothing old is served as
new) and record the new values here; never only update the literals."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from portsd.build import identity, styles
from portsd.build.builder import SOURCE_DATE_EPOCH
from portsd.core.keys import BUILDER_FORMAT, build_key
from portsd.core.metadata import PackageMeta
from portsd.core.recipe import BuildStep, BuildStyle
from portsd.pkg.package import create_package

FINGERPRINTS: dict[int, dict[str, str]] = {
    2: {
        "style scripts": "429069e801b4f492f7d7729d6aaf3c3b24d905b21e3685465e136573988bcb40",
        "prepare script": "18d1c9e2d5a944e7617b0d42dcb3644b021fd4e767bac49768b41a3fa1c72c0d",
        "build environment": "8a0f3f433d486898046c97497c70f32dad4f3628e72dcf5a7a81f9c65a85d4d8",
        "sandbox /etc": "7b176c58513fdaca5c762b969f0d011ee3c4bf639691ad5119e718f093929600",
        "sandbox layout": "81d7c7a503aa744ea60fe34afe5fc9620eb00797da132eda64799f5e39a06e01",
        "sandbox command": "3b50e52285808170aff17c0059b8b2a362aebb147568663df12374b1db5f41e7",
        "SOURCE_DATE_EPOCH": "ede6480c5caf2c41ce7a03aa722a29a8420328f986d4b1643e5ebec7bb75621b",
        "package format": "d09d65514ef2e44d9c74a79d8026aac25839d554e9d1da4595889ed478403371",
        "zstd library": "53223466663964767f78a8791a3d33bfd965de3273a94c83f5f6f215615231b4",
    },
    3: {
        "style scripts": "e86ef65a1d783de78253216b6c8f662088f97ff882ac433660f703e33dca709f",
        "prepare script": "18d1c9e2d5a944e7617b0d42dcb3644b021fd4e767bac49768b41a3fa1c72c0d",
        "build environment": "8a0f3f433d486898046c97497c70f32dad4f3628e72dcf5a7a81f9c65a85d4d8",
        "sandbox /etc": "7b176c58513fdaca5c762b969f0d011ee3c4bf639691ad5119e718f093929600",
        "sandbox layout": "81d7c7a503aa744ea60fe34afe5fc9620eb00797da132eda64799f5e39a06e01",
        "sandbox command": "3b50e52285808170aff17c0059b8b2a362aebb147568663df12374b1db5f41e7",
        "SOURCE_DATE_EPOCH": "ede6480c5caf2c41ce7a03aa722a29a8420328f986d4b1643e5ebec7bb75621b",
        "package format": "37503ab804b21f4a3abe719f937a4408d22212c10a3196b54574cae0995027d8",
        "zstd library": "53223466663964767f78a8791a3d33bfd965de3273a94c83f5f6f215615231b4",
    },
    4: {  # what a build does is as in 3; dependencies enter keys by content id
        "style scripts": "e86ef65a1d783de78253216b6c8f662088f97ff882ac433660f703e33dca709f",
        "prepare script": "18d1c9e2d5a944e7617b0d42dcb3644b021fd4e767bac49768b41a3fa1c72c0d",
        "build environment": "8a0f3f433d486898046c97497c70f32dad4f3628e72dcf5a7a81f9c65a85d4d8",
        "sandbox /etc": "7b176c58513fdaca5c762b969f0d011ee3c4bf639691ad5119e718f093929600",
        "sandbox layout": "81d7c7a503aa744ea60fe34afe5fc9620eb00797da132eda64799f5e39a06e01",
        "sandbox command": "3b50e52285808170aff17c0059b8b2a362aebb147568663df12374b1db5f41e7",
        "SOURCE_DATE_EPOCH": "ede6480c5caf2c41ce7a03aa722a29a8420328f986d4b1643e5ebec7bb75621b",
        "package format": "37503ab804b21f4a3abe719f937a4408d22212c10a3196b54574cae0995027d8",
        "zstd library": "53223466663964767f78a8791a3d33bfd965de3273a94c83f5f6f215615231b4",
    },
}
"""The fingerprint's components for each BUILDER_FORMAT; add a row when you bump it."""


def test_the_builder_fingerprint_is_pinned_to_builder_format() -> None:
    pinned = FINGERPRINTS.get(BUILDER_FORMAT)
    assert pinned is not None, (
        f"BUILDER_FORMAT {BUILDER_FORMAT} has no pinned fingerprint: add a row to FINGERPRINTS"
    )
    changed = identity.fingerprint().changed(pinned)
    assert not changed, (
        f"what a build key builds changed ({', '.join(changed)}) but BUILDER_FORMAT did not:"
        f" bump BUILDER_FORMAT in portsd/core/keys.py and pin the new fingerprint here"
    )


def test_changing_one_style_script_changes_the_fingerprint_and_names_it() -> None:
    def one_flag_more(style: BuildStyle, step: BuildStep, args: Sequence[str]) -> str | None:
        script = styles.default_script(style, step, args)
        if (style, step) == (BuildStyle.MAKE, BuildStep.BUILD):
            return f"{script} V=1"
        return script

    ours = identity.fingerprint()
    altered = identity.Fingerprint.of(identity.components(one_flag_more))
    assert altered.digest != ours.digest
    assert altered.changed(dict(ours.components)) == ["style scripts"]
    assert identity.Fingerprint.of(identity.components()) == ours  # computed from fixed inputs


def test_every_component_says_why_it_is_there() -> None:
    names = [c.name for c in identity.components()]
    assert len(set(names)) == len(names)
    assert all(c.why for c in identity.components())


def test_a_build_key_is_pinned() -> None:
    key = build_key(
        "4b825dc642cb6eb9a060e54bf8d69288fbee4904",
        ["9a93b2b7dfdac77ceba5a558a580e74667dd6fede4585b91eefb60f03b72df23"],
        "x86_64",
        "c0ffee" * 10 + "c0de",
        [("zlib", "1" * 64), ("openssl", "2" * 64)],  # their content ids
    )
    assert BUILDER_FORMAT == 4, "a new BUILDER_FORMAT changes every key: pin the new one here"
    assert key == "d41b3dde27638dad0495c68f71aabd9a0e7938e9b463dd4a726293e1608d8d91"


def test_a_package_is_pinned(tmp_path: Path) -> None:
    destdir = tmp_path / "destdir"
    (destdir / "usr/bin").mkdir(parents=True)
    (destdir / "usr/share/doc/example").mkdir(parents=True)
    (destdir / "usr/lib/empty").mkdir(parents=True)
    (destdir / "usr/bin/example").write_bytes(b"#!/bin/sh\necho example\n")
    (destdir / "usr/share/doc/example/README").write_text("An example.\n" * 100)
    (destdir / "usr/bin/ex").symlink_to("example")
    for directory in ("usr", "usr/bin", "usr/lib", "usr/share", "usr/share/doc"):
        os.chmod(destdir / directory, 0o755)  # whatever the umask
    for path, mode in (
        ("usr/share/doc/example", 0o755),
        ("usr/bin/example", 0o755),
        ("usr/share/doc/example/README", 0o644),
        ("usr/lib/empty", 0o700),
    ):
        os.chmod(destdir / path, mode)
    meta = PackageMeta("example", "1.2.3", 4, "x86_64", "3" * 64, summary="an example")
    built = create_package(destdir, meta, tmp_path / "out", epoch=SOURCE_DATE_EPOCH)
    assert built.sha256 == "d98dd7fe494240e8fe0ba2e61f3a228145058e3db7def2e9eb1e1eb559e6d9ed"
