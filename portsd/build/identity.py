"""The builder's fingerprint: everything, besides a key's inputs, that decides what it builds.

A build key (portsd/core/keys.py) names a port's inputs: its directory, sources, arch,
toolchain and build root. What the builder does with them (the scripts it runs, the world
the sandbox shows, the clock it sets, how it packs the result) is named by one number,
``BUILDER_FORMAT``. Change any of that without bumping the number and every cached
package of the old builder is served as if the new one had made it: the one failure a
binary cache cannot recover from. ``components()`` lists those things as plain values
computed from fixed inputs, one component each with the reason it is there;
``Fingerprint`` hashes them. tests/test_identity.py pins the fingerprint of each
``BUILDER_FORMAT`` and names the component that moved.

Not here, because a key already covers it: the recipe's own scripts and sources (tree id,
source hashes), the toolchain (the seed's content id), the dependencies (their keys).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgpack
import zstandard

from portsd.build import builder, sandbox, styles
from portsd.build.builder import BuildRequest
from portsd.build.sandbox import Host, Mount, SandboxSpec
from portsd.core.recipe import BuildSpec, BuildStep, BuildStyle, Recipe, Source
from portsd.pkg import archive, package

ScriptOf = Callable[[BuildStyle, BuildStep, Sequence[str]], str | None]

_RECIPE = Recipe(
    name="example",
    version="1.2.3",
    release=4,
    summary="an example port",
    license="MIT",
    sources=(
        Source("example-1.2.3.tar.gz", url="https://example.org/e.tar.gz", sha256="0" * 64),
        Source("extra.txt", url="https://example.org/extra.txt", sha256="1" * 64),
        Source("config.h", file="config.h"),
        Source("fix-build.patch", file="fix-build.patch"),
        Source("lib", path="lib"),
    ),
    build=BuildSpec(style=BuildStyle.AUTOTOOLS, prepare="touch prepared"),
)
"""A fixed recipe with one source of every kind, to render what depends on a recipe."""

_ARGS = ("--enable-feature", "with space", "quote'd")


@dataclass(frozen=True, slots=True)
class Component:
    """One thing that changes what a key builds: a name, why it matters, and its value
    (anything msgpack encodes), computed from fixed inputs."""

    name: str
    why: str
    value: object

    @property
    def digest(self) -> str:
        return hashlib.sha256(msgpack.packb([self.name, self.value])).hexdigest()


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """The digests of the components, by name, and one digest over them all."""

    components: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, components: Sequence[Component]) -> Fingerprint:
        return cls(tuple((c.name, c.digest) for c in components))

    @property
    def digest(self) -> str:
        return hashlib.sha256(msgpack.packb(["portsd-builder", self.components])).hexdigest()

    def changed(self, pinned: Mapping[str, str]) -> list[str]:
        """Names of components whose digest differs from ``pinned`` (or are new or gone)."""
        ours = dict(self.components)
        return sorted(
            name for name in ours.keys() | pinned.keys() if ours.get(name) != pinned.get(name)
        )


def components(script_of: ScriptOf = styles.default_script) -> tuple[Component, ...]:
    """What the builder is, as values; ``script_of`` is the style scripts' source (a test
    passes an altered one to see the fingerprint move)."""
    host = Host(bwrap="bwrap", unshare="unshare", mount="mount", sh="sh")
    request = BuildRequest(
        recipe=_RECIPE,
        key="0" * 64,
        port_dir=Path("/port"),
        sources={},
        workdir=Path("/work"),
        log=Path("/work/log"),
        arch="x86_64",
        toolchain=Path("/toolchain"),
        jobs=3,
        source_date_epoch=builder.SOURCE_DATE_EPOCH,
    )
    spec = SandboxSpec(
        host=host,
        toolchain=Path("/toolchain"),
        etc=Path("/work/etc"),
        mounts=(Mount(Path("/work/src"), builder.SRCDIR, writable=True),),
        cwd=builder.SRCDIR,
        env=builder.build_environment(request),
        root=Path("/work/deps"),
        mountpoint=Path("/work/usr"),
    )
    level = package.ZSTD_LEVEL
    zstd = package.compression_parameters(level, 1)
    return (
        Component(
            "style scripts",
            "a recipe that names a style runs these scripts; its key holds only the name",
            [
                [style.value, step.value, script_of(style, step, args)]
                for style in BuildStyle
                for step in BuildStep
                for args in ((), _ARGS)
            ],
        ),
        Component(
            "prepare script",
            "how sources are unpacked, copied and patched before the recipe's own prepare",
            [builder.prepare_script(_RECIPE, "/build/src/example-1.2.3"), builder.ARCHIVE_SUFFIXES],
        ),
        Component(
            "build environment",
            "the whole environment of every step: paths, jobs, locale, time zone",
            builder.build_environment(request),
        ),
        Component(
            "sandbox /etc",
            "the generated users, groups and hosts every build sees",
            sandbox.etc_files(),
        ),
        Component(
            "sandbox layout",
            "the merged-/usr links of the build root and how dependency roots merge into it",
            [sandbox.LAYOUT, builder.MERGED_USR],
        ),
        Component(
            "sandbox command",
            "namespaces, mounts, uid and the overlay of dependencies around every step",
            sandbox.command(spec, ["sh", "-eu", "-c", "true"]),
        ),
        Component(
            "SOURCE_DATE_EPOCH",
            "every build's clock and every package member's mtime",
            builder.SOURCE_DATE_EPOCH,
        ),
        Component(
            "package format",
            "the bytes a DESTDIR packs into: manifest and content encodings, zstd parameters",
            [
                package.PACKAGE_FORMAT,
                archive.CONTENT_FORMAT,
                level,
                [
                    zstd.format,
                    zstd.compression_level,
                    zstd.window_log,
                    zstd.hash_log,
                    zstd.chain_log,
                    zstd.search_log,
                    zstd.min_match,
                    zstd.target_length,
                    zstd.strategy,
                    zstd.write_content_size,
                    zstd.write_checksum,
                    zstd.write_dict_id,
                    zstd.job_size,
                    zstd.overlap_log,
                    zstd.force_max_window,
                    zstd.enable_ldm,
                ],
            ],
        ),
        Component(
            "zstd library",
            "one libzstd version writes the same frames; another may not",
            list(zstandard.ZSTD_VERSION),
        ),
    )


def fingerprint() -> Fingerprint:
    """The fingerprint of this builder."""
    return Fingerprint.of(components())
